"""Task vectors: uploaded as tau directly, or as fine-tuned weights from which the base is subtracted."""
from collections.abc import Callable
from functools import partial
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from app.deps import BlobsDep, LongRequestOwnerDep, OwnerDep, ReleasingRoute, SessionDep, SettingsDep, owned_or_404
from app.downloads import DOWNLOAD_RESPONSES, blob_response
from app.forms import FormFields
from app.problems import PROBLEM_RESPONSES, Problem
from app.quotas import check_storage
from app.schemas import BaseModelIdQuery, Page, Sha256Query, TaskVectorOut
from app.uploads import FILE_PROPERTY, Upload, ingest_upload, multipart_body
from engine.safetensors_io import read_header
from store import weights
from store.blobs import BlobStore
from store.ids import new_id
from store.models import BaseModel, JobInput, TaskVector
from store.queries import add_with_blob, delete_unless_in_use, page
from tvforge.settings import Settings

router = APIRouter(prefix="/v1/task-vectors", tags=["task vectors"], responses=PROBLEM_RESPONSES,
                   route_class=ReleasingRoute)

CREATE_BODY = multipart_body({
    "base_model_id": {"type": "string"},
    "name": {"type": "string", "maxLength": 200},
    "kind": {"type": "string", "enum": ["task_vector", "finetuned"], "default": "task_vector"},
    "class_names": {"type": "string", "description": "JSON array of the task's class names."},
    "file": FILE_PROPERTY | {"description": "safetensors: tau (dense tensors and/or LoRA factors `<tensor>.lora_A`, "
                                            "`<tensor>.lora_B`), or the fine-tuned state dict when kind=finetuned."},
}, ["base_model_id", "name", "file"])


def _register(session, blobs: BlobStore, settings: Settings, owner: str, upload: Upload,
              admit: Callable[[int], None]) -> TaskVector:
    form = FormFields(upload)
    base_model_id = form.text("base_model_id", required=True)
    name = form.text("name", required=True)
    kind = form.text("kind", choices=("task_vector", "finetuned")) or "task_vector"
    class_names = form.class_names(settings.max_dataset_classes)
    form.require_file(upload)
    form.raise_if_errors()

    base = owned_or_404(session, BaseModel, base_model_id, owner)
    base_path = blobs.path(base.sha256)
    base_header = read_header(base_path)
    # LoRA factors give a weight two tensors: no task vector or checkpoint of this base lists more than twice its.
    header = weights.read_weights_header(upload.file.path, upload.filename, max_tensors=2 * len(base_header.tensors))
    weights.check_kind(upload.file.path, header, base_path, base_header, kind)  # before any value is read whole
    if kind == "finetuned":
        tau_path = blobs.pending_path(".safetensors")
        try:
            weights.finetuned_to_task_vector(upload.file.path, header, base_path, base_header, tau_path)
            tau_header = read_header(tau_path)
            stats = weights.validate_task_vector(tau_path, tau_header, base_header)
            committed = blobs.commit_file(tau_path)
        finally:
            tau_path.unlink(missing_ok=True)
    else:
        stats = weights.validate_task_vector(upload.file.path, header, base_header)
        tau_header = header
        committed = blobs.commit(upload.file)
    row = TaskVector(id=new_id("tv"), owner=owner, base_model_id=base.id, name=name, source_kind=kind,
                     sha256=committed.sha256, source_sha256=upload.file.sha256, size_bytes=committed.size,
                     tensor_count=len(tau_header.tensors), parameter_count=tau_header.parameter_count,
                     l2_norm=stats.l2_norm,
                     magnitude_cuts=stats.magnitude_cuts, magnitude_means=stats.magnitude_means,
                     lora_rank=stats.lora_rank, class_names=class_names)
    add_with_blob(session, blobs, committed, row, admit)
    return row


@router.post("", status_code=201, response_model=TaskVectorOut, openapi_extra=CREATE_BODY)
async def create_task_vector(request: Request, owner: LongRequestOwnerDep, session: SessionDep, blobs: BlobsDep,
                             settings: SettingsDep):
    admit = partial(check_storage, session, settings, owner)
    return await ingest_upload(request, blobs, settings.max_upload_bytes,
                               lambda upload: _register(session, blobs, settings, owner, upload, admit),
                               partial(admit, lock=False))


@router.get("", response_model=Page[TaskVectorOut])
def list_task_vectors(owner: OwnerDep, session: SessionDep, limit: Annotated[int, Query(ge=1, le=200)] = 50,
                      cursor: str | None = None, base_model_id: BaseModelIdQuery = None, sha256: Sha256Query = None,
                      source_sha256: Sha256Query = None):
    where = ((TaskVector.base_model_id == base_model_id,) if base_model_id else ()) + (
        (TaskVector.sha256 == sha256,) if sha256 else ()) + (
        (TaskVector.source_sha256 == source_sha256,) if source_sha256 else ())
    items, next_cursor = page(session, TaskVector, owner, limit, cursor, where)
    return {"items": items, "next_cursor": next_cursor}



@router.get("/{task_vector_id}", response_model=TaskVectorOut)
def get_task_vector(task_vector_id: str, owner: OwnerDep, session: SessionDep):
    return owned_or_404(session, TaskVector, task_vector_id, owner)


@router.get("/{task_vector_id}/download", response_class=Response, responses=DOWNLOAD_RESPONSES)
def download_task_vector(task_vector_id: str, request: Request, owner: LongRequestOwnerDep, session: SessionDep,
                         blobs: BlobsDep):
    row = owned_or_404(session, TaskVector, task_vector_id, owner)
    return blob_response(request, blobs, row.sha256, f"{row.id}.safetensors")


@router.delete("/{task_vector_id}", status_code=204, response_class=Response)
def delete_task_vector(task_vector_id: str, owner: OwnerDep, session: SessionDep):
    row = owned_or_404(session, TaskVector, task_vector_id, owner)
    if not delete_unless_in_use(session, row, JobInput.task_vector_id):
        raise Problem(409, "A queued or running job uses this task vector.", slug="in-use")

"""Base models: an open_clip architecture or config, with weights from a file or an offline pretrained tag."""
from collections.abc import Callable
from functools import partial
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy import exists, select
from sqlalchemy.exc import IntegrityError

from app.deps import BlobsDep, LongRequestOwnerDep, OwnerDep, ReleasingRoute, SessionDep, SettingsDep, owned_or_404
from app.forms import FormFields
from app.problems import PROBLEM_RESPONSES, Problem
from app.quotas import check_storage
from app.schemas import BaseModelOut, Page, Sha256Query
from app.uploads import FILE_PROPERTY, Upload, ingest_upload, multipart_body
from engine.context import ModelSpec
from engine.safetensors_io import read_header, save_tensors
from store import weights
from store.blobs import BlobStore
from store.ids import new_id
from store.models import BaseModel, Job, TaskVector
from store.queries import add_with_blob, page
from tvforge.settings import Settings

router = APIRouter(prefix="/v1/base-models", tags=["base models"], responses=PROBLEM_RESPONSES,
                   route_class=ReleasingRoute)

CREATE_BODY = multipart_body({
    "name": {"type": "string", "maxLength": 200},
    "architecture": {"type": "string", "description": "An open_clip model name, e.g. ViT-B-32."},
    "config": {"type": "string", "description": "An open_clip model config, as JSON."},
    "file": FILE_PROPERTY | {"description": "The full state dict as safetensors."},
    "pretrained": {"type": "string", "description": "An open_clip pretrained tag resolvable offline."},
}, ["name"])


def _export_pretrained(blobs: BlobStore, spec: ModelSpec, tag: str):
    """The weights of an open_clip pretrained tag, from the local cache only (HF_HUB_OFFLINE): never a path."""
    import open_clip

    if tag not in open_clip.list_pretrained_tags_by_model(spec.architecture):
        raise Problem(422, f"{tag!r} is not an open_clip pretrained tag of {spec.architecture!r}; known: "
                           f"{', '.join(open_clip.list_pretrained_tags_by_model(spec.architecture)) or 'none'}.",
                      slug="pretrained-unavailable")
    try:
        model = open_clip.create_model(spec.architecture, pretrained=tag)
    except Exception as exc:  # open_clip raises RuntimeError for missing weights, ValueError for unknown tags
        raise Problem(422, f"Pretrained weights {tag!r} for {spec.architecture!r} are not available "
                           f"offline: {exc}", slug="pretrained-unavailable") from None
    path = blobs.pending_path(".safetensors")
    save_tensors(path, {k: v.detach().contiguous() for k, v in model.state_dict().items()})
    return path


def _register(session, blobs: BlobStore, settings: Settings, owner: str, upload: Upload,
              admit: Callable[[int], None]) -> BaseModel:
    form = FormFields(upload)
    name = form.text("name", required=True)
    architecture = form.text("architecture")
    config = form.json_value("config", dict)
    pretrained = form.text("pretrained")
    form.exactly_one("architecture", "config", architecture, config)
    form.exactly_one("file", "pretrained", upload.file, pretrained)
    if pretrained and config is not None:
        form.errors.append({"loc": ["body", "pretrained"], "msg": "Pretrained tags need an architecture name",
                            "type": "value_error"})
    form.raise_if_errors()

    spec = ModelSpec(architecture=architecture, config=config)
    expected = weights.expected_state(spec, settings.max_model_parameters)
    if upload.file is not None:
        header = weights.read_weights_header(upload.file.path, upload.filename, max_tensors=len(expected))
        counts = weights.validate_base(upload.file.path, header, expected)
        committed = blobs.commit(upload.file)
    else:
        path = _export_pretrained(blobs, spec, pretrained)
        counts = weights.counts(read_header(path))
        committed = blobs.commit_file(path)
    row = BaseModel(id=new_id("bm"), owner=owner, name=name, architecture=architecture, config=config,
                    pretrained=pretrained, sha256=committed.sha256, size_bytes=committed.size,
                    tensor_count=counts.tensor_count, parameter_count=counts.parameter_count,
                    visual_parameter_count=counts.visual_parameter_count,
                    text_parameter_count=counts.text_parameter_count)
    add_with_blob(session, blobs, committed, row, admit)
    return row


@router.post("", status_code=201, response_model=BaseModelOut, openapi_extra=CREATE_BODY)
async def create_base_model(request: Request, owner: LongRequestOwnerDep, session: SessionDep, blobs: BlobsDep,
                            settings: SettingsDep):
    admit = partial(check_storage, session, settings, owner)
    return await ingest_upload(request, blobs, settings.max_upload_bytes,
                               lambda upload: _register(session, blobs, settings, owner, upload, admit),
                               partial(admit, lock=False))


@router.get("", response_model=Page[BaseModelOut])
def list_base_models(owner: OwnerDep, session: SessionDep, limit: Annotated[int, Query(ge=1, le=200)] = 50,
                     cursor: str | None = None, sha256: Sha256Query = None):
    where = (BaseModel.sha256 == sha256,) if sha256 else ()
    items, next_cursor = page(session, BaseModel, owner, limit, cursor, where)
    return {"items": items, "next_cursor": next_cursor}


@router.get("/{base_model_id}", response_model=BaseModelOut)
def get_base_model(base_model_id: str, owner: OwnerDep, session: SessionDep):
    row = owned_or_404(session, BaseModel, base_model_id, owner)
    return row


@router.delete("/{base_model_id}", status_code=204, response_class=Response)
def delete_base_model(base_model_id: str, owner: OwnerDep, session: SessionDep):
    row = owned_or_404(session, BaseModel, base_model_id, owner)
    in_use = session.scalar(select(exists().where(TaskVector.base_model_id == row.id))) or session.scalar(
        select(exists().where(Job.base_model_id == row.id)))
    if in_use:
        raise Problem(409, "Task vectors or jobs still use this base model; delete them first.", slug="in-use")
    session.delete(row)
    try:
        session.commit()
    except IntegrityError:  # a task vector or job of it was created meanwhile (their foreign keys RESTRICT)
        session.rollback()
        raise Problem(409, "Task vectors or jobs still use this base model; delete them first.",
                      slug="in-use") from None

"""Datasets: zip folders or npz, validated and stored in one canonical npz form."""
from collections.abc import Callable
from functools import partial
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from app.deps import BlobsDep, LongRequestOwnerDep, OwnerDep, ReleasingRoute, SessionDep, SettingsDep, owned_or_404
from app.forms import FormFields
from app.problems import PROBLEM_RESPONSES, Problem
from app.quotas import check_storage
from app.schemas import DatasetOut, Page, Sha256Query
from app.uploads import FILE_PROPERTY, Upload, ingest_upload, multipart_body
from store.blobs import BlobStore
from store.datasets import DatasetLimits, ingest_dataset
from store.ids import new_id
from store.models import Dataset, JobInput
from store.queries import add_with_blob, delete_unless_in_use, page
from tvforge.settings import Settings

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=PROBLEM_RESPONSES,
                   route_class=ReleasingRoute)

CREATE_BODY = multipart_body({
    "name": {"type": "string", "maxLength": 200},
    "class_names": {"type": "string", "description": "JSON array; its order defines label ids."},
    "templates": {"type": "string", "description": "JSON array of zero-shot prompt templates, each with {c} "
                                                   "where the class name goes; default: the service's templates."},
    "file": FILE_PROPERTY | {"description": "A zip of class/image folders (optionally under train/, val/, "
                                            "test/) or an .npz with images (uint8) and labels, or "
                                            "train_images/train_labels, val_..., test_... (docs/api.md)."},
}, ["name", "file"])


def _register(session, blobs: BlobStore, settings: Settings, owner: str, upload: Upload,
              admit: Callable[[int], None]) -> Dataset:
    form = FormFields(upload)
    name = form.text("name", required=True)
    class_names = form.class_names(settings.max_dataset_classes)
    templates = form.string_list("templates")
    form.require_file(upload)
    form.raise_if_errors()

    limits = DatasetLimits(max_images=settings.max_dataset_images,
                           max_unpacked_bytes=settings.max_dataset_unpacked_bytes,
                           max_decoded_bytes=settings.max_dataset_decoded_bytes,
                           max_classes=settings.max_dataset_classes,
                           max_source_pixels=settings.max_dataset_source_pixels,
                           resize_to=settings.dataset_image_size)
    canonical = blobs.pending_path(".npz")
    try:
        summary = ingest_dataset(upload.file.path, upload.filename, canonical, limits, class_names, templates)
        committed = blobs.commit_file(canonical)
    finally:
        canonical.unlink(missing_ok=True)
    row = Dataset(id=new_id("ds"), owner=owner, name=name, source_format=summary.source_format,
                  source_sha256=upload.file.sha256, sha256=committed.sha256, size_bytes=committed.size,
                  labeled=summary.labeled, class_names=summary.class_names, templates=summary.templates,
                  splits=summary.splits, image_shape=summary.image_shape)
    add_with_blob(session, blobs, committed, row, admit)
    return row


@router.post("", status_code=201, response_model=DatasetOut, openapi_extra=CREATE_BODY)
async def create_dataset(request: Request, owner: LongRequestOwnerDep, session: SessionDep, blobs: BlobsDep,
                         settings: SettingsDep):
    admit = partial(check_storage, session, settings, owner)
    return await ingest_upload(request, blobs, settings.max_upload_bytes,
                               lambda upload: _register(session, blobs, settings, owner, upload, admit),
                               partial(admit, lock=False))


@router.get("", response_model=Page[DatasetOut])
def list_datasets(owner: OwnerDep, session: SessionDep, limit: Annotated[int, Query(ge=1, le=200)] = 50,
                  cursor: str | None = None, source_sha256: Sha256Query = None):
    where = (Dataset.source_sha256 == source_sha256,) if source_sha256 else ()
    items, next_cursor = page(session, Dataset, owner, limit, cursor, where)
    return {"items": items, "next_cursor": next_cursor}



@router.get("/{dataset_id}", response_model=DatasetOut)
def get_dataset(dataset_id: str, owner: OwnerDep, session: SessionDep):
    return owned_or_404(session, Dataset, dataset_id, owner)


@router.delete("/{dataset_id}", status_code=204, response_class=Response)
def delete_dataset(dataset_id: str, owner: OwnerDep, session: SessionDep):
    row = owned_or_404(session, Dataset, dataset_id, owner)
    if not delete_unless_in_use(session, row, JobInput.dataset_id):
        raise Problem(409, "A queued or running job uses this dataset.", slug="in-use")

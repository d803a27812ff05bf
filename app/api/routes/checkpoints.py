"""Merged checkpoints produced by jobs."""
from fastapi import APIRouter, Request, Response

from app.api.deps import BlobsDep, OwnerDep, SessionDep
from app.api.downloads import DOWNLOAD_RESPONSES, blob_response
from app.api.problems import PROBLEM_RESPONSES, not_found
from app.api.schemas import CheckpointOut
from app.store.models import Checkpoint
from app.store.queries import get_owned

router = APIRouter(prefix="/v1/checkpoints", tags=["checkpoints"], responses=PROBLEM_RESPONSES)


def _owned(session, checkpoint_id: str, owner: str) -> Checkpoint:
    row = get_owned(session, Checkpoint, checkpoint_id, owner)
    if row is None:
        raise not_found("checkpoint", checkpoint_id)
    return row


@router.get("/{checkpoint_id}", response_model=CheckpointOut)
def get_checkpoint(checkpoint_id: str, owner: OwnerDep, session: SessionDep):
    return _owned(session, checkpoint_id, owner)


@router.get("/{checkpoint_id}/download", response_class=Response, responses=DOWNLOAD_RESPONSES)
def download_checkpoint(checkpoint_id: str, request: Request, owner: OwnerDep, session: SessionDep,
                        blobs: BlobsDep):
    row = _owned(session, checkpoint_id, owner)
    return blob_response(request, blobs, row.sha256, f"{row.job_id}-merged.safetensors")

"""Merged checkpoints produced by jobs."""
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response

from app.cards import card_markdown, model_card
from app.deps import BlobsDep, LongRequestOwnerDep, OwnerDep, ReleasingRoute, SessionDep, owned_or_404
from app.downloads import DOWNLOAD_RESPONSES, blob_response
from app.problems import PROBLEM_RESPONSES, Problem
from app.schemas import CheckpointOut, JobIdQuery, Page, Sha256Query
from store import jobs
from store.models import Checkpoint, Job, JobInput
from store.queries import delete_unless_in_use, page

router = APIRouter(prefix="/v1/checkpoints", tags=["checkpoints"], responses=PROBLEM_RESPONSES,
                   route_class=ReleasingRoute)


@router.get("", response_model=Page[CheckpointOut])
def list_checkpoints(owner: OwnerDep, session: SessionDep, limit: Annotated[int, Query(ge=1, le=200)] = 50,
                     cursor: str | None = None, job_id: JobIdQuery = None, sha256: Sha256Query = None):
    where = ((Checkpoint.job_id == job_id,) if job_id else ()) + ((Checkpoint.sha256 == sha256,) if sha256 else ())
    items, next_cursor = page(session, Checkpoint, owner, limit, cursor, where)
    return {"items": items, "next_cursor": next_cursor}


@router.get("/{checkpoint_id}", response_model=CheckpointOut)
def get_checkpoint(checkpoint_id: str, owner: OwnerDep, session: SessionDep):
    return owned_or_404(session, Checkpoint, checkpoint_id, owner)


@router.get("/{checkpoint_id}/download", response_class=Response, responses=DOWNLOAD_RESPONSES)
def download_checkpoint(checkpoint_id: str, request: Request, owner: LongRequestOwnerDep, session: SessionDep,
                        blobs: BlobsDep):
    row = owned_or_404(session, Checkpoint, checkpoint_id, owner)
    return blob_response(request, blobs, row.sha256, f"{row.job_id}-merged.safetensors")


@router.get("/{checkpoint_id}/card", responses={200: {
    "description": "The model card: recipe, input sha256s and software (read from the file's metadata), chosen "
                   "values, metrics and coefficients (from the job). `?format=markdown` for text/markdown.",
    "content": {"application/json": {}, "text/markdown": {}}}})
def checkpoint_card(checkpoint_id: str, owner: OwnerDep, session: SessionDep, blobs: BlobsDep,
                    format: Literal["json", "markdown"] = "json"):
    row = owned_or_404(session, Checkpoint, checkpoint_id, owner)
    card = model_card(row, session.get(Job, row.job_id), blobs.path(row.sha256))
    if format == "markdown":
        return Response(card_markdown(card), media_type="text/markdown; charset=utf-8")
    return card


@router.delete("/{checkpoint_id}", status_code=204, response_class=Response)
def delete_checkpoint(checkpoint_id: str, owner: OwnerDep, session: SessionDep):
    """The job stays, its result still naming the checkpoint (which then answers 404); the file is removed by the
    blob collector once nothing references it."""
    row = owned_or_404(session, Checkpoint, checkpoint_id, owner)
    if not delete_unless_in_use(session, row, JobInput.checkpoint_id):
        readers = jobs.readers_of_checkpoint(session, checkpoint_id)
        raise Problem(409, f"Queued or running jobs read this checkpoint (evaluations of it, or merges starting from "
                           f"it): {', '.join(readers)}.", slug="in-use")

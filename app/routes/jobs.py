"""Composition jobs: the row is created and committed first, then its id is published to the broker."""
import asyncio
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError, OperationalError

from app.deps import (
    CredentialsDep,
    LongRequestOwnerDep,
    OwnerDep,
    ReleasingRoute,
    SessionDep,
    SettingsDep,
    admit,
    base_model_of,
    bearer_key,
    owned_or_404,
)
from app.problems import PROBLEM_RESPONSES, Problem, not_found
from app.quotas import check_storage
from app.rate_limits import rate_limits
from app.schemas import (
    CoefficientsOut,
    DryRunOut,
    IdempotencyKeyHeader,
    JobCreate,
    JobFields,
    JobOut,
    LearningCurveOut,
    Page,
)
from app.submit import check_dataset_needs, invalid, sizing, submit, within_bounds
from engine.cost import JobEstimate, estimate_job
from store import jobs
from store.db import get_engine, no_wait_engine, session_scope
from store.ids import new_id
from store.jobs import JobStatus
from store.models import BaseModel, Checkpoint, Dataset, Job, JobInput, JobKind, TaskVector
from store.queries import job_for_key, page

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=PROBLEM_RESPONSES,
                   route_class=ReleasingRoute)
RETRY_AFTER_S = "2"
SSE_POLL_S = 0.5
SSE_KEEPALIVE_S = 15.0


@dataclass(frozen=True)
class JobRows:
    """The rows a job names, held so that sizing it reads the rows that were checked: the session's identity
    map keeps only weak references, so asking it again could query anew and find a row deleted meanwhile."""

    base: BaseModel
    vectors: list[TaskVector]
    datasets: list[Dataset]


def _check_inputs(session, owner: str, body: JobFields) -> JobRows:
    """Every id the job names must be the owner's and fit together; returns their rows."""
    base = owned_or_404(session, BaseModel, body.base_model_id, owner)
    if len(set(body.task_vectors)) != len(body.task_vectors):
        raise invalid(["task_vectors"], "Task vector ids must be distinct")
    vectors = []
    for index, tv_id in enumerate(body.task_vectors):
        vectors.append(tv := owned_or_404(session, TaskVector, tv_id, owner))
        if tv.base_model_id != body.base_model_id:
            raise invalid(["task_vectors", index], f"Task vector {tv_id} belongs to another base model")
    if body.start_checkpoint_id is not None:
        start = owned_or_404(session, Checkpoint, body.start_checkpoint_id, owner)
        if base_model_of(session, start) != body.base_model_id:
            raise invalid(["start_checkpoint_id"], "The start checkpoint belongs to another base model")
    strays = sorted(set(body.params.task_vector_ids()) - set(body.task_vectors))
    if strays:
        raise invalid(["params"], f"Parameters name task vectors that are not in the job: {', '.join(strays)}")
    datasets = [owned_or_404(session, Dataset, dataset_id, owner)
                for dataset_id in dict.fromkeys(body.params.dataset_ids())]
    check_dataset_needs(body.params.dataset_needs(), datasets, ["params"])
    return JobRows(base, vectors, datasets)


def _estimate(body: JobFields, rows: JobRows) -> JobEstimate:
    """What the job will cost a worker (engine.cost), from the rows' sizes alone."""
    sized = sizing(rows.base, rows.datasets)
    stored = [tv.parameter_count for tv in rows.vectors]
    return estimate_job(body.method, body.params, sized.shape, stored, sized.split_sizes, sized.side,
                        sized.label_sets, lora_ranks=[tv.lora_rank for tv in rows.vectors])


@router.post("", status_code=202, response_model=JobOut, responses={
    200: {"model": DryRunOut, "description": "With ?dry_run=true: the job is valid; what it would cost. Nothing "
                                            "is queued."}})
def create_job(body: JobCreate, response: Response, owner: OwnerDep, session: SessionDep, settings: SettingsDep,
               idempotency_key: IdempotencyKeyHeader = None,
               dry_run: Annotated[bool, Query(description="Validate everything and estimate the cost; queue "
                                                          "nothing.")] = False):
    if dry_run:
        estimate = _estimate(body, _check_inputs(session, owner, body))
        within_bounds(estimate, settings)
        return JSONResponse(DryRunOut(method=body.method, estimate=estimate.as_dict(), limits={
            "max_job_images": settings.max_job_images,
            "worker_memory_bytes": settings.worker_memory_bytes}).model_dump(), status_code=200)

    def build(digest: str) -> Job:
        rows = _check_inputs(session, owner, body)
        within_bounds(_estimate(body, rows), settings)
        # the merged checkpoint is a full state dict: about the base model's size
        check_storage(session, settings, owner, rows.base.size_bytes)
        # The params echoed back are the ones the request set; defaults and chosen values go to result.metrics.
        return Job(id=new_id("job"), owner=owner, kind=JobKind.MERGE.value, method=body.method,
                   base_model_id=body.base_model_id, task_vector_ids=body.task_vectors,
                   start_checkpoint_id=body.start_checkpoint_id,
                   params=body.params.model_dump(mode="json", exclude_unset=True), seed=body.seed,
                   request_hash=digest, inputs=[JobInput(task_vector_id=tv) for tv in body.task_vectors]
                   + [JobInput(dataset_id=d.id) for d in rows.datasets]
                   + ([JobInput(checkpoint_id=body.start_checkpoint_id)] if body.start_checkpoint_id else []))

    return submit(session, response, owner, body, idempotency_key, build, settings)


@router.get("", response_model=Page[JobOut])
def list_jobs(owner: OwnerDep, session: SessionDep, limit: Annotated[int, Query(ge=1, le=200)] = 50,
              cursor: str | None = None, status: JobStatus | None = None, kind: JobKind | None = None):
    filters = ((Job.status == status,) if status else ()) + ((Job.kind == kind.value,) if kind else ())
    items, next_cursor = page(session, Job, owner, limit, cursor, filters)
    return {"items": items, "next_cursor": next_cursor}



def _polled_job(engine: Engine, credentials, settings, job_id: str) -> Response:
    key = bearer_key(credentials)
    with engine.connect() as connection:  # back to the pool before the response is built
        owner, row = job_for_key(connection, key, job_id)
    admit(settings, owner)
    if row is None:
        raise not_found("job", job_id)
    job = JobOut.model_validate(row)
    headers = {} if job.status in jobs.FINISHED else {"Retry-After": RETRY_AFTER_S}
    return Response(job.model_dump_json(), media_type="application/json", headers=headers)


@router.get("/{job_id}", response_model=JobOut)
async def get_job(job_id: str, credentials: CredentialsDep, settings: SettingsDep) -> Response:
    # The route clients poll. The key's check and the job's read are one Core statement built once
    # (store.queries.job_for_key); the response is serialised once, here, not validated again by FastAPI.
    # On SQLite with in-process rate limits (the embedded service) nothing in it waits on another server, and
    # it runs on the event loop: the read takes about 40 us, a threadpool hop cost more CPU than the whole
    # read and its wake-ups were most of the p99 at 100 pollers (9-17 ms against 5-8 ms here). A database
    # that is locked at that moment (busy timeout 0) sends the poll to a thread, where it may wait, as does
    # every other database or shared rate-limit storage.
    engine = no_wait_engine()
    if engine is not None and rate_limits(settings).in_process:
        try:
            return _polled_job(engine, credentials, settings, job_id)
        except OperationalError:
            pass
    return await run_in_threadpool(_polled_job, get_engine(), credentials, settings, job_id)


@router.delete("/{job_id}", status_code=204, response_class=Response)
def delete_job(job_id: str, owner: OwnerDep, session: SessionDep):
    """A finished job goes with its checkpoint (the file is removed by the blob collector once unreferenced)."""
    owned_or_404(session, Job, job_id, owner)
    try:
        deleted = jobs.delete_finished(session, job_id)
        if deleted:
            session.commit()
    except IntegrityError:  # a queued or running job's input row holds one of its checkpoints
        session.rollback()
        readers = jobs.readers_of_checkpoints_made_by(session, job_id)
        raise Problem(409, f"Queued or running jobs read this job's checkpoint: {', '.join(readers)}.",
                      slug="in-use") from None
    if not deleted:
        session.rollback()
        raise Problem(409, "The job is still queued or running; cancel it first.", slug="job-active")


@router.post("/{job_id}/cancel", status_code=202, response_model=JobOut)
def cancel_job(job_id: str, owner: OwnerDep, session: SessionDep):
    owned_or_404(session, Job, job_id, owner)
    if jobs.cancel(session, job_id) is None:
        session.rollback()
        raise Problem(409, "The job has already finished.", slug="job-finished")
    session.commit()
    return session.get(Job, job_id, populate_existing=True)


def _snapshot(job_id: str) -> tuple[str, bool] | None:
    """The job as JSON and whether it has finished; None once it is deleted (its owner may delete it as soon as
    it finishes, between two polls of a stream)."""
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None:
            return None
        return JobOut.model_validate(job).model_dump_json(), job.status in jobs.FINISHED


@router.get("/{job_id}/events", response_class=StreamingResponse, responses={
    200: {"description": "Server-Sent Events: `progress` whenever the job changes, then `end`.",
          "content": {"text/event-stream": {}}}})
async def job_events(job_id: str, request: Request, owner: LongRequestOwnerDep, session: SessionDep):
    await run_in_threadpool(owned_or_404, session, Job, job_id, owner)

    async def stream():
        last, quiet_s = None, 0.0
        while True:
            snapshot = await run_in_threadpool(_snapshot, job_id)
            if snapshot is None:  # the stream ends without `end`: a client asking for the job then gets its 404
                return
            payload, finished = snapshot
            if payload != last:
                yield f"event: progress\ndata: {payload}\n\n"
                last, quiet_s = payload, 0.0
            if finished:
                yield f"event: end\ndata: {payload}\n\n"
                return
            if await request.is_disconnected():
                return
            if quiet_s >= SSE_KEEPALIVE_S:
                yield ": keep-alive\n\n"
                quiet_s = 0.0
            await asyncio.sleep(SSE_POLL_S)
            quiet_s += SSE_POLL_S

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/{job_id}/coefficients", response_model=CoefficientsOut)
def job_coefficients(job_id: str, owner: OwnerDep, session: SessionDep):
    job = owned_or_404(session, Job, job_id, owner)
    coefficients = (job.artifacts or {}).get("coefficients")
    if coefficients is None:
        raise Problem(404, "This job has no learned coefficients (only finished aTLAS jobs do).",
                      slug="no-coefficients")
    known = {"task_vectors", "blocks", "values", "granularity"}
    return CoefficientsOut(job_id=job.id, **{k: coefficients[k] for k in known},
                           start_checkpoint_id=job.start_checkpoint_id,
                           extra={k: v for k, v in coefficients.items() if k not in known})


@router.get("/{job_id}/learning-curve", response_model=LearningCurveOut)
def job_learning_curve(job_id: str, owner: OwnerDep, session: SessionDep):
    job = owned_or_404(session, Job, job_id, owner)
    curve = (job.artifacts or {}).get("learning_curve")
    if curve is None:
        raise Problem(404, "This job has no learning curve (only finished aTLAS jobs do).", slug="no-learning-curve")
    return LearningCurveOut(job_id=job.id, epochs=curve)

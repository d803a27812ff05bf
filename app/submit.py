"""Submitting a job (a merge or an evaluation): idempotency, the row committed first, then its id published."""
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Response
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.problems import Problem
from app.quotas import check_active_jobs
from broker.publish import publish
from engine.cost import JobEstimate, TowerShape
from engine.methods.spec import DatasetNeed
from store import jobs
from store.models import BaseModel as BaseModelRow
from store.models import Dataset, Job
from tvforge.settings import Settings


def invalid(loc: list, msg: str) -> Problem:
    return Problem(422, "The job spec is not valid; see errors.", slug="validation",
                   errors=[{"loc": ["body", *loc], "msg": msg, "type": "value_error"}])


def check_dataset_needs(needs: list[DatasetNeed], datasets: list[Dataset], loc: list) -> None:
    """Each need met by its dataset's row (split sizes, labelled), else a 422 at loc + the need's own loc: what
    would fail on the worker is refused when posted."""
    rows = {dataset.id: dataset for dataset in datasets}
    for need in needs:
        dataset = rows[need.dataset_id]
        unmet = need.unmet({split: info["count"] for split, info in dataset.splits.items()}, dataset.labeled,
                           len(dataset.class_names) if dataset.class_names else None)
        if unmet is not None:
            raise invalid([*loc, *need.loc], unmet)


def request_hash(body: BaseModel) -> str:
    return hashlib.sha256(json.dumps(body.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def _replay(session: Session, owner: str, key: str, digest: str) -> Job | None:
    job = session.scalar(select(Job).where(Job.owner == owner, Job.idempotency_key == key))
    if job is not None and job.request_hash != digest:
        raise Problem(422, "This Idempotency-Key was already used with a different request.",
                      slug="idempotency-key-reused")
    return job


def submit(session: Session, response: Response, owner: str, body: BaseModel, idempotency_key: str | None,
           build: Callable[[str], Job], settings: Settings) -> Job:
    """The job build(request hash) makes (it checks the body's ids), queued and published; with an
    Idempotency-Key already used for the same body, that job instead (a replay is never refused
    by the quota: it queues nothing)."""
    digest = request_hash(body)
    job = _replay(session, owner, idempotency_key, digest) if idempotency_key else None
    if job is None:
        check_active_jobs(session, settings, owner)
        job = jobs.enqueue(session, build(digest))
        job.idempotency_key = idempotency_key
        try:
            session.commit()
        except IntegrityError:
            # A concurrent request with the same Idempotency-Key won the race, or a task vector or dataset
            # the job names, or a checkpoint it reads, was deleted since it was checked (job_inputs' foreign keys
            # RESTRICT).
            session.rollback()
            job = _replay(session, owner, idempotency_key, digest) if idempotency_key else None
            if job is None:
                raise Problem(409, "A task vector, dataset or checkpoint this job names was deleted while the job "
                                   "was being created; nothing was queued.", slug="input-deleted") from None
        else:
            publish(job.id)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job


def within_bounds(estimate: JobEstimate, settings: Settings) -> None:
    """A job over the service's bounds (engine.cost's estimate) is refused with the numbers."""
    if estimate.images > settings.max_job_images:
        raise Problem(422, f"This job would push about {estimate.images:,} images through the model (with its "
                           f"zero-shot heads' prompts, and aTLAS's composition of the vectors each step counted "
                           f"as images); this service takes at most {settings.max_job_images:,} per "
                           f"job (TVFORGE_MAX_JOB_IMAGES): fewer epochs, a smaller batch, smaller datasets or fewer "
                           f"classes and templates.", slug="job-too-large")
    if estimate.peak_bytes > settings.worker_memory_bytes:
        raise Problem(422, f"This job would need about {estimate.peak_bytes / 2**30:.1f} GiB on a worker, which has "
                           f"{settings.worker_memory_bytes / 2**30:.1f} GiB (TVFORGE_WORKER_MEMORY_BYTES): a smaller "
                           f"batch_size or fewer task vectors.", slug="job-too-large")


@dataclass(frozen=True)
class Sizing:
    """What engine.cost needs of a job's rows: the model's shape, and the datasets' split sizes, image side and
    label sets (classes, templates or None for the defaults)."""

    shape: TowerShape
    split_sizes: dict[str, dict[str, int]]
    side: int
    label_sets: dict[str, tuple[int, int | None]]


def sizing(base: BaseModelRow, datasets: list[Dataset]) -> Sizing:
    """From the rows alone: no file is read."""
    import open_clip

    config = base.config or open_clip.get_model_config(base.architecture) or {}
    return Sizing(TowerShape.from_config(config, base.parameter_count, base.visual_parameter_count),
                  {d.id: {split: info["count"] for split, info in d.splits.items()} for d in datasets},
                  max((max(d.image_shape[:2]) for d in datasets), default=0),
                  {d.id: (len(d.class_names or []), len(d.templates) if d.templates else None) for d in datasets})

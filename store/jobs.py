"""The job state machine: every change of a job row, each one conditional UPDATE.

    queued --claim--> running --finish--> succeeded | failed | cancelled
    queued --cancel--> cancelled          running --cancel--> (cancel_requested, the worker stops)
    running --requeue (heartbeat stale)--> queued, or failed after max_attempts
    running --release (its worker is shutting down)--> queued, the attempt given back

The SQL row is the truth; the broker only carries ids, so a job may be delivered twice.
Each transition is guarded by the state it leaves (and, for a running job, by the worker
that holds it), so of two racing callers exactly one wins and the other sees False.
Functions take the caller's session and do not commit: the caller's scope does.
"""
from datetime import datetime, timedelta

from sqlalchemy import case, delete, literal, or_, select, update
from sqlalchemy.orm import Session

from store.models import (  # JobStatus: the states, re-exported here
    JOB_SECONDS_BUCKETS,
    Checkpoint,
    Job,
    JobDurationBucket,
    JobInput,
    JobStatus,
    JobStatusType,
    bucket_label,
    database_utcnow,
)

ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)
FINISHED = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)
REPUBLISH_BACKOFF_MAX = timedelta(minutes=30)  # unclaimed_jobs


def problem(title: str, detail: str, slug: str, status: int = 500) -> dict:
    """An RFC 9457 body for a job's `error`."""
    return {"type": f"/problems/{slug}", "title": title, "status": status, "detail": detail}


def worker_lost(attempts: int) -> dict:
    return problem("Worker lost", f"The worker running this job stopped responding, {attempts} times; giving up.",
                   "worker-lost")


def _changed(session: Session, statement) -> bool:
    return session.execute(statement).rowcount == 1


def database_now(session: Session) -> datetime:
    """The database's clock (store.models.database_utcnow), which every job time is read from."""
    return session.scalar(select(database_utcnow()))


def enqueue(session: Session, job: Job) -> Job:
    """Add a new job row, queued, with no progress yet (the caller commits, then publishes its id)."""
    job.status, job.progress, job.attempts = JobStatus.QUEUED, {}, 0
    job.created_at = job.queued_at = database_now(session)
    session.add(job)
    return job


def mark_published(session: Session, job_id: str) -> bool:
    """Note that the broker took the job's id (the reaper republishes queued jobs without it)."""
    return _changed(session, update(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED)
                    .values(published_at=database_utcnow()))


def claim(session: Session, job_id: str, worker_id: str, stale_before: datetime, max_attempts: int,
          time_limit_s: float | None = None) -> bool:
    """queued (or running under a worker whose heartbeat is older than stale_before) -> running by worker_id.

    A takeable job whose cancel was requested is cancelled instead, one out of attempts is failed, and a stale
    one that beat past time_limit_s fails with the time limit, as the reaper would fail it (a late duplicate
    delivery must not give it another full run); all return False. A job running under a live heartbeat is left
    alone (False), whatever its attempts: a second delivery must not end it. worker_id must be unique to this
    claim (worker.tasks adds a random token to host:pid): a job already running under it is this same claim,
    committed once and repeated because its answer was lost, and is held (True).
    """
    job = session.get(Job, job_id)
    if job is None or job.status not in ACTIVE:
        return False
    if job.status == JobStatus.RUNNING and job.worker_id == worker_id:
        return True
    takeable = (Job.id == job_id, or_(Job.status == JobStatus.QUEUED,
                                      (Job.status == JobStatus.RUNNING) & (Job.heartbeat_at < stale_before)))
    if job.cancel_requested:
        _finish(session, takeable, JobStatus.CANCELLED)
        return False
    if job.status == JobStatus.RUNNING and _beat_past(job, time_limit_s):
        _finish(session, takeable, JobStatus.FAILED, error=time_limit_passed(time_limit_s))
        return False
    if job.attempts >= max_attempts:
        _finish(session, takeable, JobStatus.FAILED, error=worker_lost(job.attempts))
        return False
    now = database_now(session)
    return _changed(session, update(Job).where(*takeable).values(
        status=JobStatus.RUNNING, attempts=Job.attempts + 1, worker_id=worker_id, heartbeat_at=now, started_at=now,
        progress={"fraction": 0.0, "stage": "starting", "step": 0, "total": 0, "metrics": {}}))


def _held_by(job_id: str, worker_id: str):
    return (Job.id == job_id, Job.worker_id == worker_id, Job.status == JobStatus.RUNNING)


def heartbeat(session: Session, job_id: str, worker_id: str) -> bool:
    """Touch a running job's heartbeat; False when the worker no longer holds it (it was reaped or finished)."""
    return _changed(session, update(Job).where(*_held_by(job_id, worker_id)).values(
        heartbeat_at=database_utcnow()))


def write_progress(session: Session, job_id: str, worker_id: str, progress: dict) -> bool:
    return _changed(session, update(Job).where(*_held_by(job_id, worker_id)).values(progress=progress))


def cancel_requested(session: Session, job_id: str) -> bool:
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def _finish(session: Session, where: tuple, status: JobStatus, **values) -> bool:
    return _changed(session, update(Job).where(*where).values(
        status=status, **{"finished_at": database_utcnow(), **values}))


def succeed(session: Session, job_id: str, worker_id: str, result: dict, artifacts: dict | None = None,
            checkpoint: Checkpoint | None = None) -> bool:
    """running -> succeeded (with its checkpoint row, for a merge), only if this worker still holds the job and
    no cancel was asked for: a cancel answered 202 while the checkpoint was being stored wins (the caller then
    acknowledges it, and the stored blob is left to the collector).

    True also when this worker already succeeded it: a commit that landed but whose answer was lost is retried
    (store.db.transact), and finds its own work done (the checkpoint row went in with that commit)."""
    done = _finish(session, (*_held_by(job_id, worker_id), Job.cancel_requested.is_(False)), JobStatus.SUCCEEDED,
                   result=result, artifacts=artifacts,
                   progress={"fraction": 1.0, "stage": "done", "step": 1, "total": 1, "metrics": {}})
    if done:
        started, finished = session.execute(select(Job.started_at, Job.finished_at).where(Job.id == job_id)).one()
        _count_duration(session, (finished - started).total_seconds())
    if done and checkpoint is not None:
        session.add(checkpoint)
    return done or session.scalar(select(Job.id).where(
        Job.id == job_id, Job.worker_id == worker_id, Job.status == JobStatus.SUCCEEDED)) is not None


def _count_duration(session: Session, seconds: float) -> None:
    """Adds a succeeded job's run time to its bucket of tvforge_job_duration_seconds (store.models)."""
    upper = next(bound for bound in JOB_SECONDS_BUCKETS if seconds <= bound)
    session.execute(update(JobDurationBucket).where(JobDurationBucket.le == bucket_label(upper)).values(
        jobs=JobDurationBucket.jobs + 1, seconds=JobDurationBucket.seconds + seconds))


def fail(session: Session, job_id: str, worker_id: str, error: dict) -> bool:
    """running -> failed with an RFC 9457 error, only if this worker still holds the job."""
    return _finish(session, _held_by(job_id, worker_id), JobStatus.FAILED, error=error)


def release(session: Session, job_id: str, worker_id: str) -> bool:
    """running -> queued, by a worker that is shutting down (a redeploy) and stopped the job between steps: the
    attempt it spent is given back, since the job did not fail it; the caller publishes the job again."""
    return _changed(session, update(Job).where(*_held_by(job_id, worker_id)).values(
        status=JobStatus.QUEUED, worker_id=None, published_at=None, queued_at=database_utcnow(),
        attempts=Job.attempts - 1,
        progress={"fraction": 0.0, "stage": "released by a stopping worker", "step": 0, "total": 0, "metrics": {}}))


def acknowledge_cancel(session: Session, job_id: str, worker_id: str) -> bool:
    """running -> cancelled, by the worker that stopped at a cancel request."""
    return _finish(session, _held_by(job_id, worker_id), JobStatus.CANCELLED)


def cancel(session: Session, job_id: str) -> JobStatus | None:
    """The owner's cancel: a queued job is cancelled at once (CANCELLED); a running one is asked to stop
    between steps (RUNNING); None when the job had already finished. One statement: as two (queued, then
    running), a job re-queued between them by the reaper or a stopping worker was missed by both on
    PostgreSQL, and ran on without its cancel."""
    queued = Job.status == JobStatus.QUEUED
    if not _changed(session, update(Job).where(Job.id == job_id, Job.status.in_(ACTIVE)).values(
            cancel_requested=True,
            status=case((queued, literal(JobStatus.CANCELLED, JobStatusType)), else_=Job.status),
            finished_at=case((queued, database_utcnow()), else_=Job.finished_at))):
        return None
    return session.scalar(select(Job.status).where(Job.id == job_id))  # this transaction holds the row now


def _beat_past(job: Job, time_limit_s: float | None) -> bool:
    """Whether the job's attempt was still beating time_limit_s after it started: Celery's soft limit came and went
    (a worker lost before its limit stopped beating before it, however late anyone looks)."""
    return time_limit_s is not None and job.started_at is not None and job.heartbeat_at is not None \
        and job.heartbeat_at - job.started_at >= timedelta(seconds=time_limit_s)


def time_limit_passed(time_limit_s: float) -> dict:
    return problem("Time limit", f"The job ran past {time_limit_s} s.", "time-limit")


def requeue_lost(session: Session, job: Job, stale_before: datetime, max_attempts: int,
                 time_limit_s: float | None = None) -> JobStatus | None:
    """A running job whose heartbeat is older than stale_before goes back to queued, or to failed after
    max_attempts; one whose owner asked to cancel it is cancelled (no worker is left to do it). One that was still
    beating time_limit_s after its attempt started fails with the time limit: Celery's hard limit killed it (its
    soft limit was not honoured in time), and running it again would end the same way. Conditional on the stale
    heartbeat, so a worker that just came back keeps its job."""
    timed_out = _beat_past(job, time_limit_s)
    if job.cancel_requested:
        values, status = {"status": JobStatus.CANCELLED, "finished_at": database_utcnow()}, JobStatus.CANCELLED
    elif timed_out:
        values, status = {"status": JobStatus.FAILED, "finished_at": database_utcnow(),
                          "error": time_limit_passed(time_limit_s)}, JobStatus.FAILED
    elif job.attempts >= max_attempts:
        values, status = {"status": JobStatus.FAILED, "finished_at": database_utcnow(),
                          "error": worker_lost(job.attempts)}, JobStatus.FAILED
    else:
        values = {"status": JobStatus.QUEUED, "worker_id": None, "published_at": None, "queued_at": database_utcnow(),
                  "progress": dict(job.progress or {}, stage="requeued after a lost worker")}
        status = JobStatus.QUEUED
    stale = (Job.id == job.id, Job.status == JobStatus.RUNNING, Job.heartbeat_at < stale_before)
    return status if _changed(session, update(Job).where(*stale).values(**values)) else None


def lost_jobs(session: Session, stale_before: datetime) -> list[Job]:
    return list(session.scalars(select(Job).where(Job.status == JobStatus.RUNNING, Job.heartbeat_at < stale_before)))


def unpublished_jobs(session: Session, created_before: datetime) -> list[str]:
    return list(session.scalars(select(Job.id).where(
        Job.status == JobStatus.QUEUED, Job.published_at.is_(None), Job.created_at < created_before)))


def unclaimed_jobs(session: Session, republish_after_s: float) -> list[str]:
    """Queued jobs published at least republish_after_s ago and still not claimed: the broker may have lost their
    message (a restarted Redis without persistence). Publishing them again is harmless (claims are conditional),
    but a job that merely waits behind busy workers would gain a message every interval, so each wait is at least
    as long as the job had been queued when it was last published (since it last became queued: a job re-queued
    after running for hours is not made to wait hours), up to REPUBLISH_BACKOFF_MAX: messages grow with the log of
    the wait, and a job whose message a broker restart lost waits at most that long for a new one (uncapped, a job
    that had waited 9 h behind busy workers sat 8 h more with idle workers)."""
    now = database_now(session)
    rows = session.execute(select(Job.id, Job.queued_at, Job.created_at, Job.published_at).where(
        Job.status == JobStatus.QUEUED, Job.published_at.is_not(None),
        Job.published_at < now - timedelta(seconds=republish_after_s)))
    return [job_id for job_id, queued_at, created_at, published_at in rows
            if now - published_at >= max(timedelta(seconds=republish_after_s),
                                         min(published_at - (queued_at or created_at), REPUBLISH_BACKOFF_MAX))]


def stale_before(session: Session, timeout_s: float) -> datetime:
    return database_now(session) - timedelta(seconds=timeout_s)


def drop_finished_inputs(session: Session, condition) -> None:
    """Delete the job_inputs rows matching condition that belong to finished jobs: only a queued or running
    job's inputs keep what they name from being deleted (their foreign keys RESTRICT)."""
    session.execute(delete(JobInput).where(condition, JobInput.job_id.not_in(select(Job.id).where(
        Job.status.in_(ACTIVE)))))


def delete_finished(session: Session, job_id: str) -> bool:
    """Delete a finished job with its inputs and checkpoint rows (their blobs go to the collector); False if the
    job is still queued or running. Raises IntegrityError when a queued or running job reads one of its
    checkpoints: that job's input row RESTRICTs the cascade, so a job naming the checkpoint concurrently either
    commits first (this fails) or finds the checkpoint gone (its insert fails)."""
    drop_finished_inputs(session, JobInput.checkpoint_id.in_(select(Checkpoint.id).where(Checkpoint.job_id == job_id)))
    return _changed(session, delete(Job).where(Job.id == job_id, Job.status.in_(FINISHED)))


def _active_readers(session: Session, checkpoints) -> list[str]:
    """Queued or running jobs that read a checkpoint matching the condition: evaluations of it, merges starting
    from it."""
    return sorted(set(session.scalars(select(JobInput.job_id).join(Job, Job.id == JobInput.job_id).join(
        Checkpoint, Checkpoint.id == JobInput.checkpoint_id).where(checkpoints, Job.status.in_(ACTIVE)))))


def readers_of_checkpoint(session: Session, checkpoint_id: str) -> list[str]:
    return _active_readers(session, Checkpoint.id == checkpoint_id)


def readers_of_checkpoints_made_by(session: Session, job_id: str) -> list[str]:
    return _active_readers(session, Checkpoint.job_id == job_id)

"""Per-owner quotas: bytes stored (403 past it) and jobs queued or running at once (429 with Retry-After).

The storage check runs twice for an upload: before its body is read (an owner already at the quota
is refused without streaming anything; a plain read) and with the file's real size just before its row is
committed. That one, and a job's checks, hold the owner's lock (store.usage.lock_owner) until the row is
committed or the request ends: concurrent requests of one owner pass them one at a time, so none overshoots.
"""
from sqlalchemy.orm import Session

from app.problems import Problem
from store import usage
from tvforge.settings import OwnerQuota, Settings

ACTIVE_JOBS_RETRY_AFTER_S = 10


def quota_of(settings: Settings, owner: str) -> OwnerQuota:
    default = OwnerQuota(storage_bytes=settings.quota_storage_bytes, active_jobs=settings.quota_active_jobs)
    override = settings.quota_overrides.get(owner)
    return default.model_copy(update=override.model_dump(exclude_unset=True)) if override else default


def check_storage(session: Session, settings: Settings, owner: str, adding: int, lock: bool = True) -> None:
    """403 if the owner's stored bytes plus `adding` pass its storage quota; lock=False for the early look that
    admits nothing (an upload's, before its body is read)."""
    limit = quota_of(settings, owner).storage_bytes
    if limit is None:
        return
    if lock:
        usage.lock_owner(session, owner)
    used = usage.storage_bytes(session, owner)
    if used + adding > limit:
        raise Problem(403, f"This would store {used + adding:,} bytes for you; your quota is {limit:,} bytes "
                           f"({used:,} in use). Delete checkpoints, task vectors, datasets or base models you no "
                           f"longer need.", slug="quota-exceeded")


def check_active_jobs(session: Session, settings: Settings, owner: str) -> None:
    """429 with Retry-After if the owner already has as many jobs queued or running as its quota allows."""
    limit = quota_of(settings, owner).active_jobs
    if limit is None:
        return
    usage.lock_owner(session, owner)
    if usage.active_jobs(session, owner) >= limit:
        raise Problem(429, f"You have {limit} jobs queued or running, your quota; submit again when one ends.",
                      slug="quota-exceeded", headers={"Retry-After": str(ACTIVE_JOBS_RETRY_AFTER_S)})

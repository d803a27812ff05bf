"""What an owner holds: bytes stored and jobs in flight (the inputs of the quotas in app/quotas.py)."""
from sqlalchemy import false, func, select, update
from sqlalchemy.orm import Session

from store.jobs import ACTIVE
from store.models import BaseModel, Checkpoint, Dataset, Job, JobKind, TaskVector


def storage_bytes(session: Session, owner: str) -> int:
    """The sizes of the owner's base models, task vectors, datasets and checkpoints, and of the checkpoints its
    queued and running merges will write (each about its base model's size): counted from submission, or an
    owner with room for one checkpoint could queue any number of merges and overshoot by all but one.

    A blob that two rows share (the same bytes uploaded twice) counts for each: deleting one row
    gives back what it counted, whatever else points at the blob.
    """
    stored = sum(session.scalar(select(func.coalesce(func.sum(model.size_bytes), 0)).where(model.owner == owner))
                 for model in (BaseModel, TaskVector, Dataset, Checkpoint))
    pending = session.scalar(select(func.coalesce(func.sum(BaseModel.size_bytes), 0)).join(
        Job, Job.base_model_id == BaseModel.id).where(Job.owner == owner, Job.status.in_(ACTIVE),
                                                      Job.kind == JobKind.MERGE.value))
    return stored + pending


def active_jobs(session: Session, owner: str) -> int:
    return session.scalar(select(func.count()).select_from(Job).where(Job.owner == owner,
                                                                      Job.status.in_(ACTIVE)))


def lock_owner(session: Session, owner: str) -> None:
    """Until the session's transaction ends, other transactions that lock the same owner wait: a quota's count
    and the insert it admits become one step, so two concurrent requests cannot both pass a check that only one
    fits. PostgreSQL: a transaction-level advisory lock on the owner's hash (owners sharing a hash only wait for
    each other). SQLite: its one write lock, which a write statement takes at once even when it changes no row."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(func.hashtext(owner))))
    else:
        session.execute(update(Job).where(false()).values(owner=Job.owner).execution_options(
            synchronize_session=False))

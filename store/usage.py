"""What an owner holds: bytes stored and jobs in flight (the inputs of the quotas in app/quotas.py)."""
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from store.jobs import ACTIVE
from store.models import BaseModel, Checkpoint, Dataset, Job, TaskVector


def storage_bytes(session: Session, owner: str) -> int:
    """The sizes of the owner's base models, task vectors, datasets and checkpoints.

    A blob that two rows share (the same bytes uploaded twice) counts for each: deleting one row
    gives back what it counted, whatever else points at the blob.
    """
    return sum(session.scalar(select(func.coalesce(func.sum(model.size_bytes), 0)).where(model.owner == owner))
               for model in (BaseModel, TaskVector, Dataset, Checkpoint))


def active_jobs(session: Session, owner: str) -> int:
    return session.scalar(select(func.count()).select_from(Job).where(Job.owner == owner,
                                                                      Job.status.in_(ACTIVE)))

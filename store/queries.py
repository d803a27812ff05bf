"""Queries shared by routes and workers: owner-scoped reads, cursor pages, blob references."""
import base64
import binascii
import re
from collections.abc import Callable

from sqlalchemy import Connection, Row, Select, and_, bindparam, exists, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from store.blobs import BlobStore, Committed
from store.jobs import drop_finished_inputs
from store.keys import LIVE_KEY, live_key_params
from store.models import ApiKey, BaseModel, Checkpoint, Dataset, Job, TaskVector

ID_PATTERN = re.compile(r"[a-z]+_[0-9a-f]{32}")


class BadCursor(ValueError):
    pass


def get_owned(session: Session, model, resource_id: str, owner: str):
    """The row if it exists and belongs to owner, else None (another owner's row looks absent).

    A string that is not shaped like an id is absent without a query (PostgreSQL refuses NUL bytes).
    """
    if not ID_PATTERN.fullmatch(resource_id):
        return None
    row = session.get(model, resource_id)
    return row if row is not None and row.owner == owner else None


_JOBS = Job.__table__
_JOB_FOR_KEY = (select(ApiKey.__table__.c.owner.label("key_owner"), *_JOBS.c).select_from(ApiKey.__table__)
                .outerjoin(_JOBS, and_(_JOBS.c.id == bindparam("job_id"), _JOBS.c.owner == ApiKey.__table__.c.owner))
                .where(LIVE_KEY).limit(1))


def job_for_key(connection: Connection, key: str, job_id: str) -> tuple[str | None, Row | None]:
    """For the route clients poll, in one Core statement built once (no ORM session, no identity map): the owner
    of a live key (None: no such key) and that owner's job as a row of the jobs table (None: absent or another
    owner's). An id of the wrong shape is bound as NULL, which matches nothing (PostgreSQL refuses NUL bytes)."""
    row = connection.execute(_JOB_FOR_KEY, {**live_key_params(key),
                                            "job_id": job_id if ID_PATTERN.fullmatch(job_id) else None}).first()
    if row is None:
        return None, None
    return row.key_owner, row if row.id is not None else None


def encode_cursor(last_id: str) -> str:
    return base64.urlsafe_b64encode(last_id.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        last_id = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise BadCursor(cursor) from None
    if not ID_PATTERN.fullmatch(last_id):
        raise BadCursor(cursor)
    return last_id


def page(session: Session, model, owner: str, limit: int, cursor: str | None,
         where: tuple = ()) -> tuple[list, str | None]:
    """One page in id order (ids are time-ordered), and the cursor of the next one."""
    stmt: Select = select(model).where(model.owner == owner, *where).order_by(model.id).limit(limit + 1)
    if cursor:
        stmt = stmt.where(model.id > decode_cursor(cursor))
    rows = list(session.scalars(stmt))
    if len(rows) > limit:
        return rows[:limit], encode_cursor(rows[limit - 1].id)
    return rows, None


def blob_referenced(session: Session, sha256: str) -> bool:
    """Whether any row still points at this blob (blobs are shared between identical uploads)."""
    return any(
        session.scalar(select(exists().where(column == sha256)))
        for column in (BaseModel.sha256, TaskVector.sha256, Dataset.sha256, Checkpoint.sha256)
    )


def add_with_blob(session: Session, blobs: BlobStore, committed: Committed, row,
                  admit: Callable[[int], None] | None = None) -> None:
    """Commit a row that points at a blob just stored; if admit(row.size_bytes) refuses it or the
    commit fails, the blob goes too, unless a row or another upload of the same bytes uses it
    (BlobStore.discard).

    The blob is stored before the row: a crash in between leaves an unreferenced blob, never
    a row pointing at a missing file.
    """
    try:
        if admit is not None:
            admit(row.size_bytes)
        session.add(row)
        session.commit()
    except BaseException:
        session.rollback()
        if committed.created and not blob_referenced(session, committed.sha256):
            blobs.discard(committed)
        raise


def referenced_blobs(session: Session) -> set[str]:
    """Every blob a row points at."""
    digests: set[str] = set()
    for column in (BaseModel.sha256, TaskVector.sha256, Dataset.sha256, Checkpoint.sha256):
        digests.update(session.scalars(select(column)))
    return digests


def delete_unless_in_use(session: Session, row, job_input_column) -> bool:
    """Delete a task vector, dataset or checkpoint unless a queued or running job reads it; False when one does.

    The inputs of finished jobs are dropped first; job_inputs' foreign key RESTRICTs the rest, so a job
    created concurrently either commits first (the delete fails) or finds the row gone (its insert fails).
    Its blob stays until the collector (BlobStore.collect_garbage) finds it unreferenced.
    """
    drop_finished_inputs(session, job_input_column == row.id)
    session.delete(row)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        return False
    return True

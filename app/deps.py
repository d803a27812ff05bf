"""Request dependencies: a database session, the caller's identity, the blob store."""
import functools
import inspect
from collections import Counter
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.problems import Problem, not_found
from app.rate_limits import rate_limits
from store.blobs import BlobStore, get_blob_store
from store.db import new_session
from store.keys import owner_for_key
from store.models import BaseModel, Checkpoint, Dataset, Job, TaskVector
from store.queries import get_owned
from tvforge.settings import Settings, get_settings

bearer = HTTPBearer(auto_error=False, description="An API key made with `tvforge keys create`.")


async def get_session() -> AsyncIterator[Session]:
    session = new_session()  # no connection yet: the first statement, in the route's thread, checks one out
    try:
        yield session
    finally:
        session.close()


# A request holds a pooled connection only while its statements run: auth (below) releases its own, and
# ReleasingRoute closes the route's session when the route function returns, in the same thread. FastAPI
# would close it only after validating the response, which for a sync route is another threadpool hop: with
# more requests in flight than threads, every thread then waited for a connection that a request queued for
# a thread still held (0 requests served, then 500s, at 100 concurrent pollers). Async, so that opening and
# the final close take no threadpool slot either.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


# Async on purpose: FastAPI runs a sync dependency in a threadpool hop of its own (about 0.15 ms of a request
# that reads one row), and the settings are built once. The blob store stays sync: the first call may reach S3.
async def _settings() -> Settings:
    return get_settings()


SettingsDep = Annotated[Settings, Depends(_settings)]
BlobsDep = Annotated[BlobStore, Depends(get_blob_store)]


CredentialsDep = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def _unauthorized() -> Problem:
    return Problem(401, "A valid API key is required: Authorization: Bearer <key>.", slug="unauthorized",
                   headers={"WWW-Authenticate": "Bearer"})


def bearer_key(credentials: HTTPAuthorizationCredentials | None) -> str:
    """The key a request presents; a 401 problem if it presents none."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise _unauthorized()
    return credentials.credentials


def admit(settings: Settings, owner: str | None) -> str:
    """The owner of the request's live key (None: no live key, a 401), counted against their rate limits (429)."""
    if owner is None:
        raise _unauthorized()
    rate_limits(settings).check(owner)
    return owner


def current_owner(session: SessionDep, settings: SettingsDep, credentials: CredentialsDep) -> str:
    """The key's owner, counted against their rate limits; a 401 or 429 problem otherwise."""
    owner = owner_for_key(session, bearer_key(credentials))
    session.rollback()  # ends the read: the connection goes back to the pool before the route runs
    return admit(settings, owner)


OwnerDep = Annotated[str, Depends(current_owner)]


# Per owner, the uploads, downloads and event streams this process is serving. Each can hold its connection for
# as long as the client trickles or reads: without a bound, one key could take every connection the server
# accepts (TVFORGE_MAX_CONNECTIONS). Only the event loop touches it (the dependency below is async).
_open_long_requests: Counter[str] = Counter()
LONG_REQUEST_RETRY_AFTER_S = 5


async def long_request_owner(owner: OwnerDep, settings: SettingsDep) -> AsyncIterator[str]:
    """The owner, holding one of their long-request slots until the response has been sent (request scope:
    streamed bodies included); a 429 problem when all of them are taken."""
    limit = settings.max_long_requests_per_owner
    if _open_long_requests[owner] >= limit:
        raise Problem(429, f"This key already has {limit} uploads, downloads and event streams open on this "
                           "server; retry when one has finished.", slug="too-many-open-requests",
                      headers={"Retry-After": str(LONG_REQUEST_RETRY_AFTER_S)})
    _open_long_requests[owner] += 1
    try:
        yield owner
    finally:
        _open_long_requests[owner] -= 1
        if not _open_long_requests[owner]:
            del _open_long_requests[owner]


LongRequestOwnerDep = Annotated[str, Depends(long_request_owner, scope="request")]


RESOURCE_NAMES = {BaseModel: "base model", TaskVector: "task vector", Dataset: "dataset", Job: "job",
                  Checkpoint: "checkpoint"}


def owned_or_404(session: Session, model, resource_id: str, owner: str):
    """The owner's row, or a 404 problem (another owner's row is answered exactly like a missing one)."""
    row = get_owned(session, model, resource_id, owner)
    if row is None:
        raise not_found(RESOURCE_NAMES[model], resource_id)
    return row


def base_model_of(session: Session, checkpoint: Checkpoint) -> str:
    """The base model a checkpoint was made from, through its job; a 404 if a concurrent delete removed the job
    (and the checkpoint with it) after the checkpoint was read."""
    job = session.get(Job, checkpoint.job_id)
    if job is None:
        raise not_found(RESOURCE_NAMES[Checkpoint], checkpoint.id)
    return job.base_model_id


def _closing_sessions(endpoint):
    @functools.wraps(endpoint)  # FastAPI reads the parameters through __wrapped__
    def run(*args, **kwargs):
        try:
            return endpoint(*args, **kwargs)
        finally:
            for value in kwargs.values():
                if isinstance(value, Session):
                    value.close()
    return run


class ReleasingRoute(APIRoute):
    """A route whose sync endpoint gives its database connection back as soon as it returns (see SessionDep)."""

    def __init__(self, path: str, endpoint, **kwargs):
        if not inspect.iscoroutinefunction(endpoint):
            endpoint = _closing_sessions(endpoint)
        super().__init__(path, endpoint, **kwargs)

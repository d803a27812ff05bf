"""Engine and session factory, one per process and database URL."""
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache, partial
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import SingletonThreadPool
from tenacity import Retrying, before_sleep_log, retry_if_exception, stop_after_delay, wait_exponential_jitter

from tvforge.settings import get_settings

log = logging.getLogger(__name__)
T = TypeVar("T")

# A PostgreSQL host that accepts the connection and never answers (a partition, a hung server) holds a connecting
# thread for psycopg's own default of 130 s per address: past the worker's retry window (the heartbeat timeout,
# 60 s) and far past what an API request should wait. A connect_timeout in the URL or PGCONNECT_TIMEOUT wins.
POSTGRES_CONNECT_TIMEOUT_S = 10


def _sqlite_pragmas(dbapi_connection, _record, busy_timeout_ms: int = 30000) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    # API and workers write concurrently: WAL lets readers go on, busy_timeout makes writers wait.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    cursor.close()


@lru_cache
def engine_for(url: str) -> Engine:
    # As many pooled connections as the API has threads to use them (AnyIO's threadpool holds 40): a thread
    # never waits for a connection while another request's thread sits idle holding one.
    pool = {"pool_size": get_settings().db_pool_size, "max_overflow": 0, "pool_timeout": 10}
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **pool)
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(url, pool_pre_ping=True, connect_args=connect_args_for(url), **pool)
    return engine


def connect_args_for(url: str) -> dict:
    """The DBAPI connect arguments tvforge adds to a URL: POSTGRES_CONNECT_TIMEOUT_S for PostgreSQL unless the URL
    or the environment (PGCONNECT_TIMEOUT) sets a connect timeout; nothing for SQLite."""
    if url.startswith("sqlite") or "connect_timeout" in make_url(url).query or "PGCONNECT_TIMEOUT" in os.environ:
        return {}
    return {"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S}


@lru_cache
def _no_wait_engine_for(url: str) -> Engine:
    engine = create_engine(url, poolclass=SingletonThreadPool, connect_args={"check_same_thread": False, "timeout": 0})
    event.listen(engine, "connect", partial(_sqlite_pragmas, busy_timeout_ms=0))
    return engine


def no_wait_engine() -> Engine | None:
    """For SQLite only (None otherwise): an engine of one connection per thread that never waits for a lock
    (busy timeout 0: a locked database raises OperationalError at once), for point reads made where waiting
    is not allowed: the API's event loop. In WAL mode a reader is locked out only in rare moments (the
    WAL's recovery, an exclusive-mode writer); the caller then retries where it may wait. SingletonThreadPool
    keeps five threads' connections and closes the oldest beyond that: one event loop's thread per process is
    what it is for."""
    url = get_settings().resolved_database_url
    return _no_wait_engine_for(url) if url.startswith("sqlite") else None


@lru_cache
def _session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(engine_for(url), expire_on_commit=False)


def get_engine() -> Engine:
    return engine_for(get_settings().resolved_database_url)


def new_session() -> Session:
    return _session_factory(get_settings().resolved_database_url)()


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session that commits on success and rolls back on any error."""
    session = new_session()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def is_transient(error: BaseException) -> bool:
    """The database could not answer now (down, restarting, "starting up", locked, no pooled connection free),
    so the same transaction may succeed later; a constraint or programming error would fail again."""
    if isinstance(error, PoolTimeout) or (isinstance(error, DBAPIError) and error.connection_invalidated):
        return True
    if not isinstance(error, OperationalError):
        return False
    # SQLite reports a missing table or a syntax error as OperationalError too: of its errors, only locks pass.
    sqlite_name = getattr(error.orig, "sqlite_errorname", None)
    return sqlite_name is None or sqlite_name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED"))


def transact(work: Callable[[Session], T], retry_for_s: float) -> T:
    """work(session) in a transaction of its own (session_scope), run again from the start while the database
    is unreachable, for up to retry_for_s; then the last error is raised. A commit whose acknowledgement was
    lost is run again, so work must be safe to repeat: store.jobs' transitions are conditional on the row's
    state, and reads are."""
    retrying = Retrying(retry=retry_if_exception(is_transient), stop=stop_after_delay(retry_for_s),
                        wait=wait_exponential_jitter(multiplier=0.1, max=5.0, jitter=0.5), reraise=True,
                        before_sleep=before_sleep_log(log, logging.WARNING))
    return retrying(_in_one_transaction, work)


def _in_one_transaction(work: Callable[[Session], T]) -> T:
    with session_scope() as session:
        return work(session)

"""Engine and session factory, one per process and database URL."""
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache, partial

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import SingletonThreadPool

from tvforge.settings import get_settings


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
        engine = create_engine(url, pool_pre_ping=True, **pool)
    return engine


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

"""Faults: the parts of the service restart under load, and no job is lost (issue 9's fault suite).

Each test runs its own stack on its own servers, so restarting them touches no other test.
Recovery times are printed (pytest -s) for the record.
"""
import socket
import threading
import time

import httpx
import pytest

from tests.conftest import Stack, register_long_job_inputs, submit_long_job
from tests.services import start_redis

pytestmark = pytest.mark.integration


@pytest.fixture
def own_redis():
    url, stop = start_redis()
    state = {"url": url, "stop": stop}
    yield state
    state["stop"]()


def wait_all(client, job_ids: list[str], timeout_s: float) -> list[dict]:
    return [client.wait_for_job(job_id, timeout_s=timeout_s) for job_id in job_ids]


def one_running_three_queued(client, ids: dict) -> tuple[dict, list[str]]:
    """A long aTLAS job once a worker runs it, and three task-arithmetic jobs queued behind it."""
    running = submit_long_job(client, ids, epochs=40)
    deadline = time.monotonic() + 60
    while client.get_job(running["id"])["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    queued = [client.create_job("task_arithmetic", ids["base"], ids["vectors"], {"scaling": 0.1 * i})["id"]
              for i in range(1, 4)]
    return running, queued


def test_jobs_queued_or_running_when_redis_restarts_empty_all_finish(tmp_path_factory, own_redis, demo_assets):
    stack = Stack(tmp_path_factory.mktemp("redis-restart"), own_redis["url"], republish_after_s=2,
                  reaper_interval_s=0.5)
    stack.start_api()
    worker = stack.start_worker()
    try:
        with stack.client() as client:
            ids = register_long_job_inputs(client, demo_assets, tmp_path_factory.mktemp("target"))
            running, queued = one_running_three_queued(client, ids)
            assert {client.get_job(job_id)["status"] for job_id in queued} == {"queued"}

            # Redis restarts without persistence: every queued message is gone.
            port = int(own_redis["url"].rsplit(":", 1)[1].split("/")[0])
            own_redis["stop"]()
            own_redis["url"], own_redis["stop"] = start_redis(port)
            restarted = time.monotonic()
            finals = wait_all(client, [running["id"], *queued], timeout_s=180)
            recovery_s = time.monotonic() - restarted
        print(f"redis restart: {len(finals)} jobs finished {recovery_s:.1f} s after it")
        assert [job["status"] for job in finals] == ["succeeded"] * 4, [job["error"] for job in finals]
        assert worker.poll() is None  # the worker reconnected rather than died
    finally:
        stack.stop()


def test_jobs_queued_or_running_when_postgres_restarts_all_finish(tmp_path_factory, own_redis, demo_assets):
    from tests.services import start_postgres_cluster

    cluster = start_postgres_cluster()
    stack = Stack(tmp_path_factory.mktemp("pg-restart"), own_redis["url"], database_url=cluster.url,
                  republish_after_s=2, reaper_interval_s=0.5)
    stack.start_api()
    worker = stack.start_worker()
    try:
        with stack.client() as client:
            ids = register_long_job_inputs(client, demo_assets, tmp_path_factory.mktemp("pg-target"))
            running, queued = one_running_three_queued(client, ids)

            cluster.halt()
            down = httpx.get(f"{stack.url}/v1/jobs", headers={"Authorization": f"Bearer {stack.owner_key}"},
                             timeout=30)
            assert down.status_code == 503, down.text  # not a 500: the client is told to retry
            assert down.headers["content-type"] == "application/problem+json" and down.headers["retry-after"]
            time.sleep(3)
            cluster.start()
            restarted = time.monotonic()
            finals = wait_all(client, [running["id"], *queued], timeout_s=240)
            recovery_s = time.monotonic() - restarted
        print(f"postgres restart: {len(finals)} jobs finished {recovery_s:.1f} s after it")
        assert [job["status"] for job in finals] == ["succeeded"] * 4, [job["error"] for job in finals]
        assert worker.poll() is None
    finally:
        stack.stop()
        cluster.stop()


@pytest.fixture
def job_on_own_postgres(monkeypatch, tmp_path):
    """A running job, claimed by worker "w", on a PostgreSQL cluster of its own (the test halts it), with the
    process's settings pointed at it."""
    from migrations import upgrade
    from store import jobs
    from store.db import get_engine, session_scope
    from tests.job_rows import add_queued_job
    from tests.services import start_postgres_cluster
    from tvforge.settings import get_settings

    cluster = start_postgres_cluster()
    monkeypatch.setenv("TVFORGE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("TVFORGE_DATABASE_URL", cluster.url)
    get_settings.cache_clear()
    try:
        upgrade(cluster.url)
        with session_scope() as session:
            job_id = add_queued_job(session)
        with session_scope() as session:
            assert jobs.claim(session, job_id, "w", jobs.stale_before(session, 60), max_attempts=3)
        yield cluster, job_id
    finally:
        get_engine().dispose()
        get_settings.cache_clear()
        cluster.stop()


@pytest.mark.postgres
def test_a_workers_final_write_waits_through_a_postgres_restart(job_on_own_postgres):
    """A job that has done its work is recorded once PostgreSQL is back (store.db.transact), rather than failed
    for the outage. CI once failed the running job of the restart test above when its final write met
    PostgreSQL "starting up"."""
    from store import jobs
    from store.db import session_scope, transact
    from store.models import Job

    cluster, job_id = job_on_own_postgres
    cluster.halt()
    outcome: dict = {}

    def finish() -> None:
        try:
            outcome["recorded"] = transact(lambda session: jobs.succeed(session, job_id, "w", result={}),
                                           retry_for_s=60)
        except BaseException as error:  # reported below
            outcome["error"] = error

    writer = threading.Thread(target=finish)
    writer.start()
    time.sleep(1.5)
    assert writer.is_alive(), outcome  # still retrying, not failed
    cluster.start()
    writer.join(timeout=60)
    assert outcome == {"recorded": True}
    with session_scope() as session:
        assert session.get(Job, job_id).status == "succeeded"


def test_an_error_that_would_recur_is_not_retried(tmp_path, monkeypatch):
    """SQLite names a missing table an OperationalError, as it does a lock: only the lock is retried."""
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    from store.db import get_engine, transact
    from tvforge.settings import get_settings

    monkeypatch.setenv("TVFORGE_DATA_DIR", str(tmp_path))
    get_settings.cache_clear()
    try:
        started = time.monotonic()
        with pytest.raises(OperationalError, match="no such table"):
            transact(lambda session: session.execute(text("SELECT * FROM nowhere")), retry_for_s=30)
        assert time.monotonic() - started < 5
    finally:
        get_engine().dispose()
        get_settings.cache_clear()


def test_a_locked_sqlite_database_is_transient(tmp_path):
    """The other half of the rule above: SQLite's lock errors are retried."""
    import sqlite3

    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    from store.db import is_transient

    path = tmp_path / "locked.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0})
    try:
        with pytest.raises(OperationalError) as raised, engine.connect() as connection:
            connection.execute(text("SELECT * FROM t"))
        assert "locked" in str(raised.value) and is_transient(raised.value)
    finally:
        holder.execute("COMMIT")
        holder.close()
        engine.dispose()


@pytest.mark.parametrize(("default_s", "in_url", "environment"),
                         [(1, "", None), (1000, "?connect_timeout=1", None), (1000, "", "1")],
                         ids=["default", "the URL's own", "PGCONNECT_TIMEOUT"])
def test_a_postgres_host_that_never_answers_fails_the_connection_instead_of_holding_it(monkeypatch, default_s,
                                                                                      in_url, environment):
    """A listener that accepts the TCP connection and never says a word, as a hung or partitioned server does:
    psycopg's own default would wait 130 s for its reply, past the worker's retry window. The engine's connect
    raises a transient error (so the API answers 503 and the worker's retries go on) within the timeout in
    force: tvforge's default, else the URL's or the environment's (psycopg rounds 1 s up to 2)."""
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    import store.db
    from store.db import engine_for, is_transient

    monkeypatch.setattr(store.db, "POSTGRES_CONNECT_TIMEOUT_S", default_s)
    if environment is None:
        monkeypatch.delenv("PGCONNECT_TIMEOUT", raising=False)
    else:
        monkeypatch.setenv("PGCONNECT_TIMEOUT", environment)
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = []
    threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True).start()
    engine = engine_for.__wrapped__(f"postgresql+psycopg://u:p@127.0.0.1:{listener.getsockname()[1]}/silent{in_url}")
    outcome: list[BaseException] = []

    def connect() -> None:
        try:
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        except BaseException as exc:  # noqa: BLE001 - examined below
            outcome.append(exc)

    attempt = threading.Thread(target=connect, daemon=True)
    started = time.monotonic()
    attempt.start()
    attempt.join(timeout=15)
    try:
        assert accepted, "the connection never reached the listener"
        assert not attempt.is_alive(), "the connect attempt is still waiting on a server that never answers"
        assert time.monotonic() - started < 8, "the connect gave up, but not at the timeout in force"
        assert isinstance(outcome[0], OperationalError) and is_transient(outcome[0])
    finally:
        engine.dispose()
        listener.close()
        for connection, _ in accepted:
            connection.close()


def test_the_api_restarted_with_uploads_and_event_streams_open_loses_nothing(tmp_path_factory, own_redis,
                                                                             demo_assets):
    stack = Stack(tmp_path_factory.mktemp("api-restart"), own_redis["url"], graceful_shutdown_s=2)
    stack.start_api()
    stack.start_worker()
    try:
        with stack.client() as client:
            ids = register_long_job_inputs(client, demo_assets, tmp_path_factory.mktemp("api-target"))
            job = submit_long_job(client, ids, epochs=30)
            vectors_before = len(list(client.iterate("/v1/task-vectors")))
            events: list[str] = []

            def follow() -> None:
                try:
                    for name, _ in client.events(job["id"]):
                        events.append(name)
                except httpx.HTTPError as error:  # the stream is cut when the API goes
                    events.append(f"cut: {type(error).__name__}")

            follower = threading.Thread(target=follow, daemon=True)
            follower.start()
            upload = socket.create_connection(("127.0.0.1", stack.port), timeout=30)
            upload.sendall(b"POST /v1/task-vectors HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                           + stack.owner_key.encode() + b"\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                           b"Content-Length: 100000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"file\"; "
                           b"filename=\"v.safetensors\"\r\n\r\n" + b"\0" * 5000)
            time.sleep(1)
            tmp = stack.root / "var" / "blobs" / "tmp"
            assert [p for p in tmp.iterdir() if p.is_file()], "the upload should be streaming to a pending file"

            stack.stop_api()
            stopped = time.monotonic()
            follower.join(timeout=30)
            assert not follower.is_alive(), "the event stream must end when the API goes"
            upload.settimeout(5)
            try:
                assert b"201" not in upload.recv(4096)
            except OSError:
                pass  # reset: as good as an error answer
            upload.close()
            assert [p for p in tmp.iterdir() if p.is_file()] == [], "a cut-off upload leaves no partial file"

            stack.start_api()
            print(f"api restart: serving again {time.monotonic() - stopped:.1f} s after it stopped")
            assert len(list(client.iterate("/v1/task-vectors"))) == vectors_before
            streamed = list(client.events(job["id"]))  # a new stream follows it to the end
            assert streamed[-1][0] == "end" and streamed[-1][1]["status"] == "succeeded", streamed[-1]
            assert client.get_job(job["id"])["status"] == "succeeded"
    finally:
        stack.stop()

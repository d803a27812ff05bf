"""GET /v1/jobs/{id}, the route clients poll: on the embedded SQLite it reads on the event loop, and a database
it cannot read at once sends it to a thread that waits, never blocking the loop. In-process (httpx's ASGI
transport), so that the test can lock the database before the app has opened any connection to it."""
import asyncio
import sqlite3
import threading
import time

import httpx
import pytest

from migrations import upgrade
from store.db import engine_for, no_wait_engine, session_scope
from store.keys import create_key
from tvforge.settings import get_settings


@pytest.fixture(params=[""])
def embedded(request, tmp_path, monkeypatch):
    monkeypatch.setenv("TVFORGE_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("TVFORGE_RATE_LIMIT", request.param)
    get_settings.cache_clear()
    (tmp_path / "var").mkdir()
    database = tmp_path / "var" / "tvforge.db"
    upgrade(f"sqlite:///{database}")
    with session_scope() as session:
        key = create_key(session, "alice")
    engine_for(get_settings().resolved_database_url).dispose()  # no connection of this process stays open
    yield database, key
    engine_for(get_settings().resolved_database_url).dispose()
    no_wait_engine().dispose()
    get_settings.cache_clear()


def test_a_poll_waits_for_a_locked_database_in_a_thread_not_on_the_event_loop(embedded):
    from app.main import create_app

    database, key = embedded
    # An exclusive-mode writer locks out every reader, WAL or not: the one state in which SQLite refuses a read.
    holder = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("UPDATE api_keys SET name = 'held'")
    hold_s = 2.0
    released = threading.Event()
    threading.Timer(hold_s, lambda: (holder.execute("COMMIT"), holder.close(), released.set())).start()

    async def scenario() -> tuple[httpx.Response, bool, float]:
        transport = httpx.ASGITransport(app=create_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://tvforge") as client:
            started = time.monotonic()
            poll = asyncio.create_task(client.get(f"/v1/jobs/job_{'0' * 32}",
                                                  headers={"Authorization": f"Bearer {key}"}))
            await asyncio.sleep(0.1)
            assert (await client.get("/healthz")).status_code == 200
            # Served while the lock was still held, so while the poll waited for it: the poll did not hold the
            # loop. An ordering, not a time limit (a 0.5 s limit here once failed in CI at 0.53 s).
            served_meanwhile = not released.is_set() and not poll.done()
            answer = await poll
            return answer, served_meanwhile, time.monotonic() - started

    answer, served_meanwhile, poll_s = asyncio.run(scenario())
    assert served_meanwhile and poll_s >= hold_s * 0.9
    assert answer.status_code == 404 and answer.json()["title"] == "Not Found", answer.text  # read once unlocked



@pytest.mark.parametrize("embedded", ["3/minute"], indirect=True)
def test_a_poll_is_read_on_the_event_loop_and_answers_as_the_route_documents(embedded):
    """Every statement of these polls goes through the no-wait engine (none through the threadpool's), the
    job's body is the documented one, and the owner's rate limit applies to the route (the fourth poll)."""
    from sqlalchemy import event

    from app.main import create_app
    from store.db import get_engine
    from store.models import BaseModel, Job

    _database, key = embedded
    base_id, job_id, vector_id = "bm_" + "1" * 32, "job_" + "2" * 32, "tv_" + "3" * 32
    with session_scope() as session:
        session.add(BaseModel(id=base_id, owner="alice", name="tiny", architecture="ViT-B-32", config=None,
                              pretrained=None, sha256="0" * 64, size_bytes=1, tensor_count=1, parameter_count=1,
                              visual_parameter_count=1, text_parameter_count=0))
        session.flush()
        session.add(Job(id=job_id, owner="alice", method="task_arithmetic", base_model_id=base_id,
                        task_vector_ids=[vector_id], params={"scaling": 0.3}, request_hash="2" * 64))
    statements = {"loop": 0, "thread": 0}
    counters = {"loop": lambda *_: statements.update(loop=statements["loop"] + 1),
                "thread": lambda *_: statements.update(thread=statements["thread"] + 1)}
    event.listen(no_wait_engine(), "before_cursor_execute", counters["loop"])
    event.listen(get_engine(), "before_cursor_execute", counters["thread"])

    async def polls() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=create_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://tvforge") as client:
            mine = f"/v1/jobs/{job_id}"
            return [await client.get(path, headers=headers) for path, headers in (
                (mine, {"Authorization": f"Bearer {key}"}), (mine, {"Authorization": "Bearer tvf_not-a-key"}),
                (f"/v1/jobs/job_{'4' * 32}", {"Authorization": f"Bearer {key}"}),
                (mine, {"Authorization": f"Bearer {key}"}), (mine, {"Authorization": f"Bearer {key}"}))]

    try:
        found, wrong_key, missing, third, limited = asyncio.run(polls())
    finally:
        event.remove(no_wait_engine(), "before_cursor_execute", counters["loop"])
        event.remove(get_engine(), "before_cursor_execute", counters["thread"])
    assert found.status_code == 200 and found.headers["retry-after"] == "2"
    body = found.json()
    assert (body["id"], body["status"], body["task_vectors"], body["params"]) == (
        job_id, "queued", [vector_id], {"scaling": 0.3})
    assert body["created_at"].endswith("Z") and body["progress"]["fraction"] == 0.0
    assert wrong_key.status_code == 401 and wrong_key.headers["www-authenticate"] == "Bearer"
    assert missing.status_code == 404 and third.status_code == 200
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    assert statements == {"loop": 5, "thread": 0}

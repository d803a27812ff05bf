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
from store.db import session_scope
from store.keys import create_key
from tvforge.settings import get_settings


@pytest.fixture
def embedded(tmp_path, monkeypatch):
    monkeypatch.setenv("TVFORGE_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("TVFORGE_RATE_LIMIT", "")
    get_settings.cache_clear()
    (tmp_path / "var").mkdir()
    database = tmp_path / "var" / "tvforge.db"
    upgrade(f"sqlite:///{database}")
    with session_scope() as session:
        key = create_key(session, "alice")
    from store.db import engine_for

    engine_for(get_settings().resolved_database_url).dispose()  # no connection of this process stays open
    yield database, key
    get_settings.cache_clear()


def test_a_poll_waits_for_a_locked_database_in_a_thread_not_on_the_event_loop(embedded):
    from app.main import create_app

    database, key = embedded
    # An exclusive-mode writer locks out every reader, WAL or not: the one state in which SQLite refuses a read.
    holder = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("UPDATE api_keys SET name = 'held'")
    hold_s = 1.0
    threading.Timer(hold_s, lambda: (holder.execute("COMMIT"), holder.close())).start()

    async def scenario() -> tuple[httpx.Response, float, float]:
        transport = httpx.ASGITransport(app=create_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://tvforge") as client:
            started = time.monotonic()
            poll = asyncio.create_task(client.get(f"/v1/jobs/job_{'0' * 32}",
                                                  headers={"Authorization": f"Bearer {key}"}))
            await asyncio.sleep(0.1)
            assert (await client.get("/healthz")).status_code == 200  # the loop serves others meanwhile
            others_s = time.monotonic() - started
            answer = await poll
            return answer, others_s, time.monotonic() - started

    answer, others_s, poll_s = asyncio.run(scenario())
    assert others_s < hold_s / 2 and poll_s >= hold_s * 0.9
    assert answer.status_code == 404 and answer.json()["title"] == "Not Found", answer.text  # read once unlocked


"""The worker's job runner in process (worker.runner), on a throw-away SQLite database: what it does when its
own machine fails it (no work folder, a database it cannot reach, Celery's soft time limit)."""
import contextlib
import threading

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import OperationalError

from engine.context import Progress
from migrations import upgrade
from store.db import get_engine, session_scope
from store.jobs import JobStatus
from store.models import Job
from tests.job_rows import add_queued_job
from tvforge.settings import get_settings
from worker import runner


@pytest.fixture
def job_id(tmp_path, monkeypatch) -> str:
    monkeypatch.setenv("TVFORGE_DATA_DIR", str(tmp_path))
    get_settings.cache_clear()
    upgrade(get_settings().resolved_database_url)
    with session_scope() as session:
        job_id = add_queued_job(session, method="task_arithmetic")
    yield job_id
    get_engine().dispose()
    get_settings.cache_clear()


def heartbeats() -> list[str]:
    return [thread.name for thread in threading.enumerate() if thread.name.startswith("heartbeat-")]


def test_a_job_whose_work_folder_cannot_be_made_fails_and_leaves_no_heartbeat(job_id, monkeypatch):
    """Its heartbeat would otherwise keep the row `running` under this worker for as long as the process lives."""
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runner.tempfile, "mkdtemp", disk_full)
    assert runner.run_job(job_id, "w1:token") is JobStatus.FAILED
    assert heartbeats() == []
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job.status is JobStatus.FAILED and "No space left on device" in job.error["detail"]


def test_a_worker_cut_off_from_the_database_gives_its_job_up_before_the_reaper_hands_it_on(job_id, monkeypatch):
    """A failed beat alone does not lose the job (a blip); no beat for the heartbeat timeout less one interval
    does, so the worker stops before another can claim the job (the reaper's cutoff is the whole timeout)."""
    assert runner.claim(job_id, "w1:token", get_settings())

    @contextlib.contextmanager
    def unreachable():
        raise OperationalError("UPDATE jobs", {}, ConnectionError("could not connect to server"))
        yield

    monkeypatch.setattr(runner, "session_scope", unreachable)
    heartbeat = runner.Heartbeat(job_id, "w1:token", interval_s=0.2, timeout_s=1.0)
    heartbeat.start()
    try:
        assert not heartbeat.lost.wait(0.3)  # give_up_after_s is 0.8 s: not yet, whatever the machine's load
        assert heartbeat.lost.wait(10)
    finally:
        heartbeat.stop()


def test_the_soft_time_limit_is_not_swallowed_by_a_progress_write(job_id, monkeypatch):
    """Celery raises SoftTimeLimitExceeded in the job's thread, wherever it is: during a progress write too."""
    writer = runner.ProgressWriter(job_id, "w1:token")

    def raising(error):
        def write_progress(*args, **kwargs):
            raise error
        return write_progress

    monkeypatch.setattr(runner.jobs, "write_progress", raising(OperationalError("UPDATE", {}, ConnectionError())))
    writer(Progress("merging", 1, 4))  # a database error: advisory, logged
    monkeypatch.setattr(runner.jobs, "write_progress", raising(SoftTimeLimitExceeded()))
    with pytest.raises(SoftTimeLimitExceeded):
        writer(Progress("evaluating", 2, 4))


def test_a_pool_process_makes_its_own_blob_store_and_database_connections(job_id):
    """Celery forks pool processes from the main one, whose reaper already made an S3 client and database
    connections: a forked process must not share their sockets."""
    from store.blobs import get_blob_store
    from worker.tasks import _init_pool_process

    inherited = get_blob_store()
    _init_pool_process()
    assert get_blob_store() is not inherited

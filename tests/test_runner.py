"""The worker's job runner in process (worker.runner), on a throw-away SQLite database: what it does when its
own machine fails it (no work folder, a database it cannot reach, Celery's soft time limit)."""
import contextlib
import threading
import time

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import OperationalError

from engine.context import Progress
from migrations import upgrade
from store.db import get_engine, session_scope
from store.jobs import JobStatus
from store.models import Checkpoint, Job
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


def with_tiny_inputs(job_id: str, tmp_path) -> None:
    """The queued job made a task-arithmetic merge of a tiny real base and one task vector, stored as uploads are."""
    from engine.safetensors_io import save_tensors
    from store.blobs import get_blob_store
    from store.ids import new_id
    from store.models import BaseModel, TaskVector
    from tests.engine_jobs import TINY_CONFIG, tiny_state, write_task_vector

    state = tiny_state()
    blobs = get_blob_store()
    base_file, vector_file = tmp_path / "base.safetensors", tmp_path / "tau.safetensors"
    save_tensors(base_file, state)
    write_task_vector(vector_file, state, seed=1)
    base_blob, vector_blob = blobs.commit_file(base_file), blobs.commit_file(vector_file)
    with session_scope() as session:
        base = BaseModel(id=new_id("bm"), owner="alice", name="tiny", architecture=None, config=TINY_CONFIG,
                         pretrained=None, sha256=base_blob.sha256, size_bytes=base_blob.size, tensor_count=1,
                         parameter_count=1, visual_parameter_count=1, text_parameter_count=0)
        vector = TaskVector(id=new_id("tv"), owner="alice", base_model_id=base.id, name="tau", source_kind="upload",
                            sha256=vector_blob.sha256, size_bytes=vector_blob.size, tensor_count=1,
                            parameter_count=1, l2_norm=1.0)
        session.add_all([base, vector])
        session.flush()
        job = session.get(Job, job_id)
        job.base_model_id, job.task_vector_ids = base.id, [vector.id]


def test_a_worker_told_to_stop_after_the_work_is_done_records_it(job_id, monkeypatch, tmp_path):
    """A shutdown (a redeploy) that begins once the merge has returned does not hand the job back, which would
    run it again from the start: the worker records the checkpoint it has. (A shutdown during the work stops it
    between steps: tests/test_job_lifecycle.py.)"""
    with_tiny_inputs(job_id, tmp_path)

    stopping, polls_after = threading.Event(), []
    merged = runner.run_method

    def merge_then_shut_down(*args, **kwargs):
        result = merged(*args, **kwargs)
        stopping.set()
        deadline = time.monotonic() + 30
        while len(polls_after) < 2 and time.monotonic() < deadline:  # the heartbeat has seen the shutdown
            time.sleep(0.05)
        return result

    def worker_stopping() -> bool:
        if stopping.is_set():
            polls_after.append(True)
        return stopping.is_set()

    monkeypatch.setattr(runner, "run_method", merge_then_shut_down)
    assert runner.run_job(job_id, "w1:token", worker_stopping) is JobStatus.SUCCEEDED
    assert len(polls_after) >= 2
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job.status is JobStatus.SUCCEEDED and session.get(Checkpoint, job.result["checkpoint_id"])


def test_a_cancel_accepted_while_the_checkpoint_is_stored_wins(job_id, monkeypatch, tmp_path):
    """The owner cancels after the merge's last step, while the checkpoint goes to the blob store (minutes for a
    large model on S3): the cancel was answered 202 with the job running, so the job ends cancelled, with no
    checkpoint row (the stored blob is left to the collector)."""
    from store import jobs
    from store.blobs import BlobStore

    with_tiny_inputs(job_id, tmp_path)
    store_file = BlobStore.commit_file
    answers = []

    def cancelled_while_storing(self, *args, **kwargs):
        with session_scope() as session:
            answers.append(jobs.cancel(session, job_id))  # what POST /v1/jobs/{id}/cancel does
        return store_file(self, *args, **kwargs)

    monkeypatch.setattr(BlobStore, "commit_file", cancelled_while_storing)
    assert runner.run_job(job_id, "w1:token") is JobStatus.CANCELLED
    assert answers == [JobStatus.RUNNING]
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job.status is JobStatus.CANCELLED and job.result is None
        assert session.query(Checkpoint).filter_by(job_id=job_id).count() == 0


def test_a_cpu_worker_counts_its_own_memory_once(monkeypatch):
    """The estimate counts the worker's resident memory as its runtime, and MemAvailable leaves that memory out:
    compared with MemAvailable alone it was counted twice, and jobs that fit were refused (19.3 GiB available,
    3 GiB held, a job needing 18.8 GiB besides)."""
    from engine.cost import JobEstimate

    monkeypatch.setattr(runner, "available_memory_bytes", lambda: 19 * 2**30)
    monkeypatch.setattr(runner, "resident_bytes", lambda: 3 * 2**30)
    runner.refuse_if_too_large(JobEstimate(1, 21 * 2**30), "cpu", 2**62)  # fits beside what it holds
    with pytest.raises(runner.TooLargeForWorker, match="22.0 GiB for it"):
        runner.refuse_if_too_large(JobEstimate(1, 23 * 2**30), "cpu", 2**62)
    with pytest.raises(runner.TooLargeForWorker, match="0.5 GiB for it"):
        runner.refuse_if_too_large(JobEstimate(1, 2**30), "cpu", 2**29)  # over the worker's setting

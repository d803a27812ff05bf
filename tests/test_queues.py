"""Jobs are routed by what they do: the model queue for jobs that run the model on images, the tensor queue
for streaming merges; a worker takes only the queues it is given."""
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import yaml

from broker.celery_app import MODEL_QUEUE, TENSOR_QUEUE
from broker.routing import queue_for
from store.models import Job, JobInput, JobKind
from tests.conftest import REPO, Stack, register_long_job_inputs, submit_long_job
from tests.services import start_redis


@pytest.mark.parametrize("kind, inputs, queue", [
    (JobKind.MERGE, [JobInput(task_vector_id="tv_1"), JobInput(task_vector_id="tv_2")], TENSOR_QUEUE),
    (JobKind.MERGE, [JobInput(task_vector_id="tv_1"), JobInput(dataset_id="ds_1")], MODEL_QUEUE),
    (JobKind.EVALUATION, [JobInput(dataset_id="ds_1")], MODEL_QUEUE),
    (JobKind.EVALUATION, [], MODEL_QUEUE),
])
def test_a_job_goes_to_the_model_queue_exactly_when_it_runs_the_model(kind, inputs, queue):
    assert queue_for(Job(kind=kind.value, inputs=inputs)) == queue


@pytest.mark.integration
def test_a_worker_takes_only_its_queues(tmp_path_factory, demo_assets):
    redis_url, stop_redis = start_redis()
    stack = Stack(tmp_path_factory.mktemp("queues"), redis_url, torch_threads=0)  # the default, as deployed
    stack.start_api()
    stack.start_worker("--queues", "tensors", "--concurrency", "2")  # as compose's CPU worker
    try:
        with stack.client() as client:
            ids = register_long_job_inputs(client, demo_assets, tmp_path_factory.mktemp("queue-inputs"))
            model_job = submit_long_job(client, ids, epochs=1)
            merge = client.create_job("task_arithmetic", ids["base"], ids["vectors"], {"scaling": 0.3})
            assert client.wait_for_job(merge["id"], timeout_s=120)["status"] == "succeeded"
            assert_compose_healthcheck_passes(stack, "worker-cpu")
            time.sleep(2)  # the tensor worker had every chance to take the aTLAS job
            assert client.get_job(model_job["id"])["status"] == "queued"
            stack.start_worker("--queues", "model")
            assert client.wait_for_job(model_job["id"], timeout_s=180)["status"] == "succeeded"
        # torch's default (a thread per core) is shared among a worker's pool processes: two here, one there
        default = int(subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                                     env=stack.env, capture_output=True, text=True, check=True).stdout)
        assert pool_threads(stack.root / "worker0.log") == [max(1, default // 2)] * 2
        assert pool_threads(stack.root / "worker1.log") == [default]
    finally:
        stack.stop()
        stop_redis()


def pool_threads(log: Path) -> list[int]:
    """The torch threads each pool process of a worker reported at its start."""
    return [int(n) for n in re.findall(r"pool process \d+: (\d+) torch thread", log.read_text(errors="replace"))]


def assert_compose_healthcheck_passes(stack: Stack, service: str) -> None:
    """docker-compose.yml's healthcheck of the service, run against this stack's live worker."""
    test = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"][service]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL" and test[1].startswith("celery ")
    command = test[1].replace("$$", "$").replace("celery ", f"{shlex.quote(sys.executable)} -m celery ", 1)
    result = subprocess.run(["sh", "-c", command], env=stack.env | {"HOSTNAME": socket.gethostname()}, cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "pong" in result.stdout, result.stdout + result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_cuda_worker_that_finds_no_gpu_exits_with_the_reason():
    """Started, it would take jobs and fail each one (or hold them back from a healthy worker)."""
    result = subprocess.run([sys.executable, "-m", "tvforge.cli", "worker", "--queues", "model"], cwd=REPO,
                            env=os.environ | {"TVFORGE_DEVICE": "cuda", "TVFORGE_BROKER_URL": "redis://127.0.0.1:1/0"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "finds no CUDA device" in result.stderr, result.stderr


def test_an_unknown_queue_is_refused(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tvforge.cli", "worker", "--queues", "gpu"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "unknown queue" in result.stderr


def test_publishing_never_raises_once_the_job_is_committed(tmp_path, monkeypatch):
    """The API commits the job's row, then publishes it. A database error there was answered 503 ("retry shortly"),
    and a client's retry queued a second job: publish() reports it (False when nothing was sent) and leaves the
    job to the reaper, which publishes a queued job that has no published_at."""
    from sqlalchemy.exc import OperationalError

    from broker import publish as publishing
    from broker.celery_app import celery_app
    from migrations import upgrade
    from store import jobs
    from store.db import get_engine, session_scope
    from tests.job_rows import add_queued_job
    from tvforge.settings import get_settings

    monkeypatch.setenv("TVFORGE_DATA_DIR", str(tmp_path))
    get_settings.cache_clear()
    upgrade(get_settings().resolved_database_url)
    try:
        with session_scope() as session:
            job_id = add_queued_job(session)
        sent = []
        monkeypatch.setattr(celery_app, "send_task", lambda *args, **kwargs: sent.append(kwargs["args"]))

        def database_down(*_args, **_kwargs):
            raise OperationalError("UPDATE jobs", {}, Exception("server closed the connection unexpectedly"))

        monkeypatch.setattr(jobs, "mark_published", database_down)
        assert publishing.publish(job_id) is True and sent == [[job_id]]  # sent, not marked: may be sent again
        monkeypatch.setattr("broker.routing.queue_of", database_down)
        assert publishing.publish(job_id) is False and sent == [[job_id]]  # nothing sent
        with session_scope() as session:
            assert jobs.unpublished_jobs(session, jobs.database_now(session) + timedelta(seconds=1)) == [job_id]
    finally:
        get_engine().dispose()
        get_settings.cache_clear()

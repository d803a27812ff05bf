"""Celery tasks and worker signals."""
import os
import secrets
import socket

from celery.signals import setup_logging, worker_process_init, worker_ready, worker_shutdown

from broker.celery_app import RUN_JOB, celery_app
from store.db import get_engine
from tvforge import logs
from tvforge.logs import configure_logging
from tvforge.settings import get_settings
from worker.reaper import Reaper
from worker.runner import run_job

_reaper: Reaper | None = None


@setup_logging.connect
def _configure_logging(**_) -> None:
    configure_logging(get_settings().log_format)  # connected: Celery leaves logging to us


@celery_app.task(name=RUN_JOB)
def run_job_task(job_id: str) -> str | None:
    token = logs.job_id.set(job_id)  # every log line of the job carries its id
    try:
        # A token per delivery: a retried claim knows its own row, and a restarted process that reuses the pid
        # (a container's first pids repeat) is not taken for the one that died.
        return run_job(job_id, worker_id=f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}")
    finally:
        logs.job_id.reset(token)


@worker_process_init.connect
def _init_pool_process(**_) -> None:
    # Pooled connections inherited from the parent must not be shared with it.
    get_engine().dispose(close=False)
    threads = get_settings().torch_threads
    if threads:
        import torch

        torch.set_num_threads(threads)
    from engine.kernels import warm_up

    warm_up()  # the merges' compiled loops, loaded once per process rather than in the first job


@worker_ready.connect
def _start_reaper(**_) -> None:
    global _reaper
    _reaper = Reaper()
    _reaper.start()


@worker_shutdown.connect
def _stop_reaper(**_) -> None:
    if _reaper is not None:
        _reaper.stop()

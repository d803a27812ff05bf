"""Celery tasks and worker signals."""
import ctypes
import logging
import multiprocessing
import os
import secrets
import socket

from celery.signals import setup_logging, worker_process_init, worker_ready, worker_shutdown, worker_shutting_down

from broker.celery_app import RUN_JOB, celery_app
from store.blobs import blob_store_at
from store.db import get_engine
from tvforge import logs
from tvforge.logs import configure_logging
from tvforge.settings import get_settings
from worker.reaper import Reaper
from worker.runner import run_job

log = logging.getLogger(__name__)
_reaper: Reaper | None = None
# Set in the main process when it starts a warm shutdown (SIGTERM: docker stop, a redeploy); the pool's processes,
# forked from it, inherit this shared byte and hand their running jobs back to the queue between steps, instead of
# running on until the container's grace period ends and the kill costs the job an attempt. A raw byte, not an
# Event: an Event's lock, held by a pool process killed at the wrong moment, would hang the shutdown.
_stopping = multiprocessing.get_context("fork").RawValue(ctypes.c_bool, False)


@setup_logging.connect
def _configure_logging(**_) -> None:
    configure_logging(get_settings().log_format)  # connected: Celery leaves logging to us


@celery_app.task(name=RUN_JOB)
def run_job_task(job_id: str) -> str | None:
    token = logs.job_id.set(job_id)  # every log line of the job carries its id
    try:
        # A token per delivery: a retried claim knows its own row, and a restarted process that reuses the pid
        # (a container's first pids repeat) is not taken for the one that died.
        return run_job(job_id, worker_id=f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}",
                       worker_stopping=lambda: _stopping.value)
    finally:
        logs.job_id.reset(token)


def pool_torch_threads(configured: int, torch_default: int, concurrency: int | None) -> int:
    """Torch threads of each pool process: the setting, else torch's default (a thread per core) shared among the
    pool's processes (Celery's default pool: a process per CPU). With every core each, two spectral merges at once
    took 5.6x as long as with one thread each, two TIES merges 1.3x (bench.worker_threads, 2 cores)."""
    if configured:
        return configured
    return max(1, torch_default // (concurrency or os.cpu_count() or 1))


@worker_process_init.connect
def _init_pool_process(**_) -> None:
    # Pooled connections inherited from the parent must not be shared with it: the database's, and an S3
    # store's client (its reaper made one before this process was forked; boto3's are not fork-safe).
    get_engine().dispose(close=False)
    blob_store_at.cache_clear()
    import torch

    threads = pool_torch_threads(get_settings().torch_threads, torch.get_num_threads(),
                                 celery_app.conf.worker_concurrency)
    torch.set_num_threads(threads)
    log.info("pool process %d: %d torch thread(s)", os.getpid(), threads)
    from engine.kernels import warm_up

    warm_up()  # the merges' compiled loops, loaded once per process rather than in the first job


@worker_ready.connect
def _start_reaper(**_) -> None:
    global _reaper
    _reaper = Reaper()
    _reaper.start()


@worker_shutting_down.connect
def _hand_back_running_jobs(**_) -> None:
    _stopping.value = True


@worker_shutdown.connect
def _stop_reaper(**_) -> None:
    if _reaper is not None:
        _reaper.stop()

"""Finds jobs that no worker is looking after, and hands them back to the queue (or fails them)."""
import logging
import threading
import time

from broker.publish import publish
from engine.heads import prune_head_cache
from store import jobs
from store.blobs import get_blob_store
from store.db import session_scope
from store.jobs import JobStatus
from store.queries import referenced_blobs
from tvforge.settings import Settings, get_settings

log = logging.getLogger(__name__)
UNPUBLISHED_GRACE_S = 5.0


def reap_once(settings: Settings) -> dict[str, list[str]]:
    """One sweep. Running jobs with a stale heartbeat are re-queued (or failed after max_attempts);
    queued jobs the broker never took, or took longer ago than republish_after_s without a worker claiming
    them, are published again."""
    requeued, failed, cancelled = [], [], []
    with session_scope() as session:
        stale = jobs.stale_before(session, settings.heartbeat_timeout_s)
        for job in jobs.lost_jobs(session, stale):
            outcome = jobs.requeue_lost(session, job, stale, settings.max_attempts, settings.job_time_limit_s)
            if outcome is JobStatus.QUEUED:
                requeued.append(job.id)
            elif outcome is JobStatus.FAILED:
                failed.append(job.id)
            elif outcome is JobStatus.CANCELLED:
                cancelled.append(job.id)
        unpublished = jobs.unpublished_jobs(session, created_before=jobs.stale_before(session, UNPUBLISHED_GRACE_S))
        unpublished += jobs.unclaimed_jobs(session, settings.republish_after_s)
    for job_id in requeued:
        log.warning("job %s lost its worker; re-queued", job_id)
    for job_id in failed:
        log.error("job %s lost its worker too often, or past its time limit; failed", job_id)
    for job_id in cancelled:
        log.warning("job %s lost its worker after a cancel request; cancelled", job_id)
    republished = [job_id for job_id in unpublished if job_id not in requeued]
    for job_id in requeued + republished:
        publish(job_id)
    return {"requeued": requeued, "failed": failed, "cancelled": cancelled, "republished": republished}


def collect_garbage(settings: Settings) -> list[str]:
    """Files nothing needs any more: blobs no row references past their grace period
    (store.blobs.BlobStore.collect_garbage), work folders and partial uploads left by killed processes
    (older than any job may run), and the least recently used zero-shot heads past the cache's size."""
    def referenced() -> set[str]:
        with session_scope() as session:
            return referenced_blobs(session)

    blobs = get_blob_store()
    removed = blobs.collect_garbage(referenced, settings.blob_gc_grace_s)
    stale_tmp = blobs.clean_tmp(older_than_s=max(24 * 3600.0, settings.job_time_limit_s + 3600.0))
    heads = prune_head_cache(settings.head_cache_dir, settings.head_cache_max_bytes) \
        if settings.head_cache_dir.is_dir() else 0
    if removed or stale_tmp or heads:
        log.info("removed %d unreferenced blobs, %d stale temporary files, %d cached heads",
                 len(removed), stale_tmp, heads)
    return removed


class Reaper(threading.Thread):
    def __init__(self, settings: Settings | None = None):
        super().__init__(daemon=True, name="tvforge-reaper")
        self.settings = settings or get_settings()
        self._stop_event = threading.Event()

    def run(self) -> None:
        last_collection = 0.0
        while not self._stop_event.wait(self.settings.reaper_interval_s):
            try:
                reap_once(self.settings)
                if time.monotonic() - last_collection >= self.settings.blob_gc_interval_s:
                    collect_garbage(self.settings)
                    last_collection = time.monotonic()
            except Exception:  # keep sweeping: a failed sweep is retried at the next interval
                log.exception("reaper sweep failed")

    def stop(self) -> None:
        self._stop_event.set()

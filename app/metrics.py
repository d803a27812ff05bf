"""Prometheus metrics at /metrics (prometheus_client): request latency from this API process, and the
service's state read from the database and the broker at scrape time - jobs by status and method, job
durations, the queue's depth, workers' heartbeats, the blob store's bytes. The workers write every job
fact to the database, so one scrape of any API process shows the whole service."""
import itertools
import logging
import time

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from broker.publish import queue_depth
from store.db import session_scope
from store.jobs import JobStatus, database_now
from store.models import BaseModel, Checkpoint, Dataset, Job, JobDurationBucket, TaskVector

log = logging.getLogger(__name__)
REGISTRY = CollectorRegistry()
REQUEST_SECONDS = Histogram("tvforge_http_request_duration_seconds", "HTTP request latency, by route template.",
                            ["method", "route", "status"], registry=REGISTRY)


class ServiceCollector:
    """The service's state, read from the database and the broker when Prometheus scrapes. A database that
    cannot answer leaves its families out and sets tvforge_database_up to 0: the scrape still serves this
    process's request latency and the queue, when they matter most."""

    def collect(self):
        try:
            families, up = list(self._from_database()), 1
        except SQLAlchemyError:
            log.warning("metrics: the database did not answer", exc_info=True)
            families, up = [], 0
        yield GaugeMetricFamily("tvforge_database_up", "1 if the database answered this scrape, else 0.", value=up)
        yield from families
        depth = queue_depth()
        queue = GaugeMetricFamily("tvforge_queue_depth", "Job ids waiting in the broker, by queue (model: jobs "
                                  "that run the model on images; tensors: streaming merges); absent if unreachable.",
                                  labels=["queue"])
        for name, count in (depth or {}).items():
            queue.add_metric([name], count)
        yield queue

    @staticmethod
    def _from_database():
        with session_scope() as session:
            by_status = GaugeMetricFamily("tvforge_jobs", "Jobs by status, kind and method.",
                                          labels=["status", "kind", "method"])
            for status, kind, method, count in session.execute(
                    select(Job.status, Job.kind, Job.method, func.count()).group_by(Job.status, Job.kind, Job.method)):
                by_status.add_metric([JobStatus(status).value, str(getattr(kind, "value", kind)), method or ""],
                                     count)
            yield by_status

            # Kept as totals by the workers (store.models.JobDurationBucket), cumulated here.
            rows = sorted(session.execute(select(JobDurationBucket.le, JobDurationBucket.jobs,
                                                 JobDurationBucket.seconds)), key=lambda row: float(row.le))
            cumulative = itertools.accumulate(row.jobs for row in rows)
            histogram = HistogramMetricFamily("tvforge_job_duration_seconds", "Run time of succeeded jobs.")
            histogram.add_metric([], [(row.le, count) for row, count in zip(rows, cumulative, strict=True)],
                                 sum(row.seconds for row in rows))
            yield histogram

            newest = session.scalar(select(func.max(Job.heartbeat_at)).where(Job.status == JobStatus.RUNNING))
            running_workers = session.scalar(select(func.count(func.distinct(Job.worker_id)))
                                             .where(Job.status == JobStatus.RUNNING))
            age = GaugeMetricFamily("tvforge_worker_heartbeat_age_seconds",
                                    "Seconds since the freshest heartbeat of a running job (absent when none runs).")
            if newest is not None:
                age.add_metric([], (database_now(session) - newest).total_seconds())
            yield age
            yield GaugeMetricFamily("tvforge_workers_running_jobs", "Workers holding a running job.",
                                    value=running_workers or 0)

            stored = 0
            for model in (BaseModel, TaskVector, Dataset, Checkpoint):
                rows = select(model.sha256, func.max(model.size_bytes)).group_by(model.sha256).subquery()
                stored += session.scalar(select(func.coalesce(func.sum(rows.c[1]), 0))) or 0
            yield GaugeMetricFamily("tvforge_blob_store_bytes", "Bytes of the stored files rows point at.",
                                    value=stored)


REGISTRY.register(ServiceCollector())
router = APIRouter(include_in_schema=False)


@router.get("/metrics")
def metrics() -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


class LatencyMiddleware:
    """Every request's latency under its route template (no ids, so few series). Pure ASGI: Starlette's
    BaseHTTPMiddleware runs the app in a task group, which turned an exception raised while reading the body
    (a stalled upload's 408) into an ExceptionGroup and a 500."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            REQUEST_SECONDS.labels(scope["method"], getattr(route, "path", "unmatched"),
                                   str(status)).observe(time.perf_counter() - started)

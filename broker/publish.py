"""Publishing job ids to the broker; the API and the reaper both go through here."""
import logging

from sqlalchemy.exc import SQLAlchemyError

from store import jobs
from store.db import session_scope

log = logging.getLogger(__name__)


def publish(job_id: str) -> bool:
    """Send the job's id to the broker and note when; False if the broker or the database could not be reached.

    A job that could not be published stays queued with published_at empty, and the reaper tries again. Never
    raises: the job's row is already committed, so an error here must not tell the API's client to submit it
    again (a 503 "retry" queued a second job).
    """
    from broker.celery_app import RUN_JOB, celery_app
    from broker.routing import queue_of

    try:
        with session_scope() as session:
            queue = queue_of(session, job_id)
    except SQLAlchemyError:
        log.warning("could not read job %s's queue; the reaper will publish it", job_id, exc_info=True)
        return False
    try:
        celery_app.send_task(RUN_JOB, args=[job_id], queue=queue, retry=True,
                             retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5})
    except Exception:  # kombu raises OperationalError and friends; the reaper retries later
        log.warning("could not publish job %s; the reaper will retry", job_id, exc_info=True)
        return False
    try:
        with session_scope() as session:
            jobs.mark_published(session, job_id)
    except SQLAlchemyError:  # the message is out; unmarked, the reaper sends another (claims are conditional)
        log.warning("job %s published but not marked so; the reaper may publish it again", job_id, exc_info=True)
    return True


def broker_reachable(timeout_s: float = 2.0) -> bool:
    from broker.celery_app import celery_app

    try:
        with celery_app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=timeout_s)
        return True
    except Exception:  # any transport error means not reachable
        return False


def queue_depth(timeout_s: float = 2.0) -> dict[str, int] | None:
    """Job ids waiting in each of the broker's queues (Redis LLEN), by queue name; None if it cannot be asked."""
    import redis

    from broker.celery_app import QUEUES
    from tvforge.settings import get_settings

    try:
        client = redis.Redis.from_url(get_settings().broker_url, socket_timeout=timeout_s,
                                      socket_connect_timeout=timeout_s)
        return {name: int(client.llen(queue)) for name, queue in QUEUES.items()}
    except redis.RedisError:
        return None

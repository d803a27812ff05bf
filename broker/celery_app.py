"""The Celery application, configured for long jobs (Celery's own guidance).

acks_late + reject_on_worker_lost: a job whose worker dies goes back to the broker.
prefetch 1: a worker holds only the job it runs. The visibility timeout exceeds the
hard time limit, so Redis never redelivers a job that is still legitimately running.
Publishers name the task by RUN_JOB; worker.tasks registers its implementation.

Two queues (broker.routing says which a job goes to): MODEL_QUEUE for jobs that run the model on
images (aTLAS, STA's gradients, searches on validation data, evaluations), where a GPU pays off;
TENSOR_QUEUE for merges that only stream tensors. A worker takes both by default; a deployment can
point GPU workers at the first and cheap CPU workers at the second.
"""
from celery import Celery

from tvforge.settings import get_settings

RUN_JOB = "tvforge.run_job"
MODEL_QUEUE = "tvforge.jobs.model"
TENSOR_QUEUE = "tvforge.jobs.tensors"
QUEUES = {"model": MODEL_QUEUE, "tensors": TENSOR_QUEUE}

settings = get_settings()
celery_app = Celery("tvforge", broker=settings.broker_url)
celery_app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_soft_time_limit=settings.job_time_limit_s,
    task_time_limit=settings.job_time_limit_s + 120,
    broker_transport_options={"visibility_timeout": settings.job_time_limit_s + 3600},
    broker_connection_retry_on_startup=True,
    task_ignore_result=True,
    task_default_queue=MODEL_QUEUE,
    worker_hijack_root_logger=False,
    worker_send_task_events=False,
)

"""Which queue a job goes to: the model queue if it pushes images through the model, else the tensor queue."""
from sqlalchemy.orm import Session

from broker.celery_app import MODEL_QUEUE, TENSOR_QUEUE
from store.models import Job, JobKind


def queue_for(job: Job) -> str:
    """Evaluations and every job that names a dataset (training, calibration, a lambda search, a report
    on validation data) run the model; the rest stream tensors (task arithmetic, TIES, data-free STA)."""
    runs_model = job.kind == JobKind.EVALUATION.value or any(item.dataset_id for item in job.inputs)
    return MODEL_QUEUE if runs_model else TENSOR_QUEUE


def queue_of(session: Session, job_id: str) -> str:
    job = session.get(Job, job_id)
    return TENSOR_QUEUE if job is None else queue_for(job)

"""A job row on a stub base model, for the tests of the state machine and the runner that need no files."""
from sqlalchemy.orm import Session

from store import jobs
from store.ids import new_id
from store.models import BaseModel, Job, JobKind


def add_queued_job(session: Session, method: str = "ties") -> str:
    """A queued merge job (no task vectors) on a new stub base model; returns its id (the caller commits)."""
    base = BaseModel(id=new_id("bm"), owner="alice", name="b", architecture="ViT-B-32", config=None,
                     pretrained=None, sha256="0" * 64, size_bytes=1, tensor_count=1, parameter_count=1,
                     visual_parameter_count=1, text_parameter_count=0)
    session.add(base)
    session.flush()
    return jobs.enqueue(session, Job(id=new_id("job"), owner="alice", kind=JobKind.MERGE.value, method=method,
                                     base_model_id=base.id, task_vector_ids=[], params={}, seed=0,
                                     request_hash="h")).id

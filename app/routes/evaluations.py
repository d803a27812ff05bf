"""Evaluations: a checkpoint (or a base model itself) measured on datasets, run by the workers as a job."""

from fastapi import APIRouter, Response

from app.deps import OwnerDep, ReleasingRoute, SessionDep, SettingsDep, base_model_of, owned_or_404
from app.problems import PROBLEM_RESPONSES
from app.schemas import EvaluationCreate, IdempotencyKeyHeader, JobOut
from app.submit import check_dataset_needs, invalid, sizing, submit, within_bounds
from engine.context import REPORT_SPLITS
from engine.cost import JobEstimate, evaluation_estimate
from engine.methods.spec import DatasetNeed
from store.ids import new_id
from store.models import BaseModel, Checkpoint, Dataset, Job, JobInput, JobKind, TaskVector

router = APIRouter(prefix="/v1/evaluations", tags=["evaluations"], responses=PROBLEM_RESPONSES,
                   route_class=ReleasingRoute)


def _check(session, owner: str, body: EvaluationCreate) -> tuple[str, list[str]]:
    """The evaluated model's base model id and the reference task vector ids; every id must be the owner's
    and every reference of the same base model."""
    if body.checkpoint_id is not None:
        base_model_id = base_model_of(session, owned_or_404(session, Checkpoint, body.checkpoint_id, owner))
    else:
        base_model_id = owned_or_404(session, BaseModel, body.base_model_id, owner).id
    vectors = []
    for index, item in enumerate(body.datasets):
        dataset = owned_or_404(session, Dataset, item.dataset_id, owner)
        need = DatasetNeed(("split",), dataset.id, (item.split,), True, "to evaluate on", min_classes=1) \
            if item.split else DatasetNeed(("dataset_id",), dataset.id, REPORT_SPLITS, True, "to evaluate on",
                                           min_classes=1)
        check_dataset_needs([need], [dataset], ["datasets", index])
        if item.reference_checkpoint_id is not None:
            reference = owned_or_404(session, Checkpoint, item.reference_checkpoint_id, owner)
            if base_model_of(session, reference) != base_model_id:
                raise invalid(["datasets", index, "reference_checkpoint_id"],
                              "The reference checkpoint belongs to another base model")
        if item.reference_task_vector_id is not None:
            vector = owned_or_404(session, TaskVector, item.reference_task_vector_id, owner)
            if vector.base_model_id != base_model_id:
                raise invalid(["datasets", index, "reference_task_vector_id"],
                              "The reference task vector belongs to another base model")
            vectors.append(vector.id)
    return base_model_id, list(dict.fromkeys(vectors))


def _checkpoints_named(body: EvaluationCreate) -> list[str]:
    """The evaluated checkpoint and the reference checkpoints, once each."""
    named = [body.checkpoint_id, *(item.reference_checkpoint_id for item in body.datasets)]
    return list(dict.fromkeys(checkpoint_id for checkpoint_id in named if checkpoint_id is not None))


def _estimate(session, base_model_id: str, body: EvaluationCreate) -> JobEstimate:
    """What the evaluation will cost a worker (engine.cost), from the rows' sizes alone."""
    sized = sizing(session.get(BaseModel, base_model_id), [session.get(Dataset, item.dataset_id)
                                                            for item in body.datasets])
    items = [(item.dataset_id, item.split,
              item.reference_checkpoint_id is not None or item.reference_task_vector_id is not None)
             for item in body.datasets]
    return evaluation_estimate(items, sized.shape, sized.split_sizes, sized.side, sized.label_sets)


@router.post("", status_code=202, response_model=JobOut, summary="Evaluate a checkpoint or base model")
def create_evaluation(body: EvaluationCreate, response: Response, owner: OwnerDep, session: SessionDep,
                      settings: SettingsDep, idempotency_key: IdempotencyKeyHeader = None):
    """Queues an evaluation job; follow it at `Location` (/v1/jobs/{id}). Its result's `metrics.evaluation`
    holds each dataset's accuracy with its split, and the normalised accuracy where a reference is given."""
    def build(digest: str) -> Job:
        base_model_id, vectors = _check(session, owner, body)
        within_bounds(_estimate(session, base_model_id, body), settings)
        return Job(id=new_id("job"), owner=owner, kind=JobKind.EVALUATION.value, method=None,
                   base_model_id=base_model_id,
                   task_vector_ids=vectors, params=body.model_dump(mode="json", exclude_unset=True), seed=body.seed,
                   request_hash=digest, inputs=[JobInput(task_vector_id=tv) for tv in vectors]
                   + [JobInput(dataset_id=item.dataset_id) for item in body.datasets]
                   + [JobInput(checkpoint_id=checkpoint_id) for checkpoint_id in _checkpoints_named(body)])

    return submit(session, response, owner, body, idempotency_key, build, settings)

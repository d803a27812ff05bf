"""Request and response bodies of the HTTP contract (docs/api.md)."""
from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar, Union

from fastapi import Header, Query
from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from engine.methods.catalogue import METHODS
from engine.methods.spec import MethodSpec, StrictModel
from store.jobs import JobStatus

T = TypeVar("T")


# Finds what a client already uploaded (the same file's sha256), so that it can skip the upload.
Sha256Query = Annotated[str | None, Query(pattern="^[0-9a-f]{64}$", description="Only rows of the file with this "
                                                                               "sha256 (lowercase hex).")]

# An empty key was stored as '' and made every later empty-keyed submission of the owner's a false 409.
IdempotencyKeyHeader = Annotated[str | None, Header(min_length=1, max_length=200, description=(
    "Makes a repeat of this request (same key, same body) return the job the first one made."))]

BaseModelIdQuery = Annotated[str | None, Query(pattern="^bm_[0-9a-f]{32}$",
                                               description="Only task vectors of this base model.")]

JobIdQuery = Annotated[str | None, Query(pattern="^job_[0-9a-f]{32}$", description="Only checkpoints this job made.")]


class Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class ProblemOut(BaseModel):
    """RFC 9457 problem details."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    instance: str | None = None
    errors: list[dict[str, Any]] | None = None


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = Field(None, description="Pass as ?cursor= for the next page; null on the last.")


class BaseModelOut(Out):
    id: str
    name: str
    architecture: str | None
    config: dict | None
    pretrained: str | None
    sha256: str
    size_bytes: int
    tensor_count: int
    parameter_count: int
    visual_parameter_count: int
    text_parameter_count: int
    created_at: datetime


class TaskVectorOut(Out):
    id: str
    base_model_id: str
    name: str
    source_kind: Literal["task_vector", "finetuned"]
    sha256: str
    source_sha256: str | None = Field(description="sha256 of the file uploaded: the fine-tuned checkpoint for "
                                                  "kind finetuned (null for those uploaded before it was kept).")
    size_bytes: int
    tensor_count: int = Field(description="Tensors stored in the file (a LoRA factor counts as one).")
    parameter_count: int = Field(description="Values stored in the file (LoRA factors' entries, not their product's).")
    l2_norm: float = Field(description="L2 norm of the task vector (of the products, for LoRA factors).")
    lora_rank: int | None = Field(description="The largest rank among its LoRA factors; null for a dense vector.")
    class_names: list[str] | None
    created_at: datetime


class DatasetOut(Out):
    id: str
    name: str
    source_format: str
    source_sha256: str
    sha256: str
    size_bytes: int
    labeled: bool
    class_names: list[str] | None
    templates: list[str] | None = Field(description="Zero-shot prompt templates ({c}: the class name); null: the "
                                                    "service's default templates.")
    splits: dict[str, Any]
    image_shape: list[int]
    created_at: datetime


class JobFields(StrictModel):
    """What every job body holds beside its method and params."""

    base_model_id: str = Field(description="The base model whose task vectors are composed.")
    task_vectors: list[str] = Field(min_length=1, max_length=64, description="Task vector ids, in order.")
    start_checkpoint_id: str | None = Field(
        None, description="Chaining: an earlier job's checkpoint of the same base model to merge onto instead of "
                          "theta_0 (aTLAS learns its coefficients from there). Accuracies stay normalised by each "
                          "task's fine-tuned model theta_0 + tau_t.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seeds every random draw: same spec and seed, same bytes.")


def _job_body(spec: MethodSpec) -> type[JobFields]:
    title = "".join(word.capitalize() for word in spec.name.split("_"))
    return create_model(
        f"{title}Job", __base__=JobFields, __doc__=f"A `{spec.name}` job. {spec.summary}",
        method=(Literal[spec.name], Field(description="The composition method.")),
        params=(spec.params, Field(default={}, validate_default=True,
                                   description=f"Parameters of {spec.name} (GET /v1/methods/{spec.name}).")),
    )


# One body per method, told apart by `method`: every method's params are in the OpenAPI document.
JOB_BODIES: dict[str, type[JobFields]] = {name: _job_body(spec) for name, spec in METHODS.items()}
JobCreate = Annotated[Union[tuple(JOB_BODIES.values())], Field(discriminator="method")]  # noqa: UP007


class EvaluationDataset(StrictModel):
    dataset_id: str = Field(description="A labelled dataset of the caller's.")
    reference_checkpoint_id: str | None = Field(
        None, description="A checkpoint of the same base model whose accuracy on this dataset normalises the "
                          "evaluated model's (its fine-tuned model, say).")
    reference_task_vector_id: str | None = Field(
        None, description="Or a task vector of the same base model: its fine-tuned model theta_0 + tau normalises.")
    split: Literal["train", "val", "test"] | None = Field(
        None, description="The split to measure on; None: test, else val, else train.")

    @model_validator(mode="after")
    def _one_reference(self) -> "EvaluationDataset":
        if self.reference_checkpoint_id is not None and self.reference_task_vector_id is not None:
            raise ValueError("give at most one of reference_checkpoint_id and reference_task_vector_id")
        return self


class EvaluationCreate(StrictModel):
    """Measure a checkpoint, or a base model itself, on datasets; runs on the workers like any job."""

    checkpoint_id: str | None = Field(None, description="The checkpoint to evaluate.")
    base_model_id: str | None = Field(None, description="Or a base model, evaluated as it is (zero-shot).")
    datasets: list[EvaluationDataset] = Field(min_length=1, max_length=64)
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Recorded with the job; evaluation draws nothing random.")

    @model_validator(mode="after")
    def _one_model(self) -> "EvaluationCreate":
        if (self.checkpoint_id is None) == (self.base_model_id is None):
            raise ValueError("give exactly one of checkpoint_id and base_model_id")
        if len({d.dataset_id for d in self.datasets}) != len(self.datasets):
            raise ValueError("a dataset is listed twice")
        return self


class MethodOut(BaseModel):
    name: str
    summary: str
    reference: str
    params_schema: dict[str, Any] = Field(description="JSON Schema of the method's params, with defaults.")
    result_keys: dict[str, str] = Field(description="Keys the method reports in result.metrics, and what they hold.")


class ProgressOut(BaseModel):
    fraction: float = 0.0
    stage: str | None = None
    step: int = 0
    total: int = 0
    metrics: dict[str, Any] = Field(default_factory=dict)


class JobOut(Out):
    id: str
    kind: Literal["merge", "evaluation"] = Field(description="merge: a method writes a checkpoint; evaluation: "
                                                            "existing weights measured on datasets.")
    method: str | None = Field(description="The composition method (merges only).")
    status: JobStatus
    base_model_id: str
    task_vectors: list[str] = Field(validation_alias="task_vector_ids")
    start_checkpoint_id: str | None = Field(None, description="The checkpoint the merge started from (chaining).")
    params: dict[str, Any]
    seed: int
    progress: ProgressOut
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    attempts: int
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class CheckpointOut(Out):
    id: str
    job_id: str
    sha256: str
    size_bytes: int
    format: str
    contents: dict[str, Any]
    created_at: datetime


class CoefficientsOut(BaseModel):
    job_id: str
    task_vectors: list[str]
    blocks: list[str]
    values: list[list[float]]
    granularity: str
    start_checkpoint_id: str | None = Field(
        None, description="Chaining: the checkpoint the coefficients compose onto (null: theta_0).")
    extra: dict[str, Any] = Field(default_factory=dict)


class LearningCurveOut(BaseModel):
    job_id: str
    epochs: list[dict[str, Any]] = Field(
        description="One entry per epoch (epoch 0: before training): loss, accuracy per selection dataset, the "
                    "split each was measured on, and for addition the normalised accuracies.")


class DryRunOut(BaseModel):
    valid: bool = True
    method: str
    estimate: dict[str, Any] = Field(description="images: through the image tower (training and evaluation), the "
                                                 "zero-shot heads' prompts through the text tower, and aTLAS's "
                                                 "per-step composition of the task vectors counted as images "
                                                 "(composition_images, their share); peak_bytes / peak_gib: the "
                                                 "worker's memory (engine/cost.py).")
    limits: dict[str, Any] = Field(description="The service's bounds the estimate was checked against.")

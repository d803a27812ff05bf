"""Parameter schemas of the composition methods, registered by name.

Datasets are named by id and reach the runner as MergeInputs.datasets; each
schema lists them in dataset_ids() and the task vectors it names in
task_vector_ids(), so the API can check both before queueing a job.
Selection (lambda search, best epoch) uses each dataset's `val` split, or its
`train` split when it has no `val`; reported accuracies use `test` when present.
"""
from typing import Literal

from pydantic import Field, model_validator

from engine.registry import MethodParams, MethodSpec, register

# {0, 0.05, ..., 1.0}: the original task-vectors recipe's search grid.
SCALING_GRID = tuple(round(0.05 * i, 2) for i in range(21))

TaskDatasets = dict[str, str]  # task vector id -> dataset id


class TaskArithmeticParams(MethodParams):
    scaling: float = Field(
        0.3, ge=-10, le=10,
        description="lambda in theta_0 + lambda * sum(tau); 0.3 is the usual default without validation data.",
    )
    operation: Literal["add", "negate"] = Field(
        "add", description="add: multi-task model; negate: theta_0 - lambda * sum(tau), to forget the tasks.",
    )
    validation_datasets: TaskDatasets = Field(
        default_factory=dict,
        description="Task vector id -> dataset id. When given, lambda is searched over {0, 0.05, ..., 1.0} "
                    "on these datasets and `scaling` is not used. add: the highest mean normalised accuracy "
                    "(merged / that task's fine-tuned model); negate: the lowest mean target accuracy whose "
                    "control accuracy stays >= 0.95 x the zero-shot control accuracy.",
    )
    control_dataset_id: str | None = Field(
        None, description="negate with search: the control task whose accuracy must be kept.",
    )

    @model_validator(mode="after")
    def _search_inputs(self) -> "TaskArithmeticParams":
        if self.control_dataset_id is not None and not (self.operation == "negate" and self.validation_datasets):
            raise ValueError("control_dataset_id is used only by a negation search (operation negate "
                             "with validation_datasets)")
        if self.operation == "negate" and self.validation_datasets and self.control_dataset_id is None:
            raise ValueError("a negation search needs control_dataset_id")
        return self

    def dataset_ids(self) -> list[str]:
        ids = list(self.validation_datasets.values())
        return _unique(ids + ([self.control_dataset_id] if self.control_dataset_id else []))

    def task_vector_ids(self) -> list[str]:
        return list(self.validation_datasets)


class TiesParams(MethodParams):
    top_k: float = Field(
        20.0, gt=0, le=100,
        description="Percent of each task vector tensor's entries kept, by magnitude (ties at the cut are "
                    "kept). 20 is the TIES paper's default.",
    )
    scaling: float = Field(
        1.0, ge=-10, le=10,
        description="lambda applied to the merged vector. The disjoint mean averages agreeing entries "
                    "instead of summing them, so 1 keeps each task's own step size.",
    )


class StaParams(MethodParams):
    """Selective task arithmetic. Defaults meant to need no tuning:

    - Importance |tau * g| is divided by its mean over the tensor, so a score reads
      "times the tensor's average importance" for every task and layer alike,
      whatever the loss scale or the layer's gradient magnitudes.
    - threshold 3 keeps the entries at least three times as important as that
      average. The kept fraction follows each tensor's own distribution instead of
      a density fixed per model (about 5 % on the benchmark's task vectors). Fused
      at lambda 1, denser masks interfere: on a 6-task tiny-CLIP build, thresholds
      1 and 2 (36 % and 12 % kept) gave 30 % and 48 % mean accuracy against 57-59 %
      for thresholds 3-4 and 60 % for task arithmetic with a searched lambda.
    - lambda 1: sparse masks barely overlap, so each task keeps its own step size
      (STA's claim against task arithmetic's lambda search).
    """

    calibration_datasets: TaskDatasets = Field(
        default_factory=dict,
        description="Task vector id -> labelled dataset (train split, else val) used for its Taylor "
                    "importance. Task vectors without one fall back to the data-free score |tau|.",
    )
    importance: Literal["tau", "theta"] = Field(
        "tau", description="tau: |tau_t * g_t| (how much the loss depends on the fine-tuning step); "
                           "theta: |theta_t * g_t| (classic Taylor pruning score).",
    )
    threshold: float = Field(
        3.0, gt=0,
        description="Keep entries whose importance divided by the tensor's mean importance is >= this.",
    )
    density: float | None = Field(
        None, gt=0, le=1,
        description="Instead of the threshold, keep this fraction of each tensor's entries, the most "
                    "important first (ties at the cut are kept).",
    )
    scaling: float = Field(1.0, ge=-10, le=10, description="lambda in theta_0 + lambda * sum(m_t * tau_t).")
    disjoint: bool = Field(
        False, description="Where masks overlap, the entry goes only to the task with the higher normalised "
                           "importance (ties: the task listed first).",
    )
    forget: list[str] = Field(
        default_factory=list,
        description="Task vector ids to forget: their masked part is subtracted (theta_0 - lambda * m_f * tau_f).",
    )
    calibration_samples: int = Field(
        512, ge=1, le=100_000, description="Calibration images drawn (seeded) per task, at most the split's size.",
    )
    micro_batch_size: int = Field(
        32, ge=1, le=4096,
        description="Images per gradient; importance is the mean over micro-batches of |product|.",
    )

    @model_validator(mode="after")
    def _forget_unique(self) -> "StaParams":
        if len(set(self.forget)) != len(self.forget):
            raise ValueError("forget lists a task vector twice")
        return self

    def dataset_ids(self) -> list[str]:
        return _unique(list(self.calibration_datasets.values()))

    def task_vector_ids(self) -> list[str]:
        return _unique(list(self.calibration_datasets) + self.forget)


# Per objective: (lr, epochs). supervised: the paper's task addition (1e-3, 20) or
# few-shot (0.1, 10); negation: the public recipe's 1e-3 x a per-dataset multiplier
# of 2-10 over 2-20 epochs, here 5e-3 for 10; entropy: AdaMerging's 1e-3.
ATLAS_DEFAULTS: dict[str, tuple[float, int]] = {
    "addition": (1e-3, 20), "few_shot": (0.1, 10), "negation": (5e-3, 10), "entropy": (1e-3, 10),
}


class AtlasParams(MethodParams):
    """Learned anisotropic scaling: one coefficient per (task vector, image-tower tensor)."""

    objective: Literal["supervised", "negation", "entropy"] = Field(
        "supervised",
        description="supervised: multi-task addition (task_datasets) or few-shot on target_dataset_id; "
                    "negation: loss -CE(target) + CE(control); entropy: unlabelled test-time adaptation "
                    "on target_dataset_id.",
    )
    granularity: Literal["block", "isotropic"] = Field(
        "block", description="block: one coefficient per task vector and parameter tensor; isotropic: one per "
                             "task vector.",
    )
    task_datasets: TaskDatasets = Field(
        default_factory=dict,
        description="supervised addition: task vector id -> its dataset; the batch is split across them, each "
                    "with its own zero-shot head.",
    )
    target_dataset_id: str | None = Field(None, description="few-shot, negation or entropy target.")
    control_dataset_id: str | None = Field(None, description="negation: the task whose accuracy must be kept.")
    shots: int | None = Field(
        None, ge=1, le=10_000,
        description="few-shot: images per class drawn (seeded) from the target's train split; None uses all.",
    )
    augment: bool | None = Field(
        None, description="Random resized crop (scale 0.5-1) and horizontal flip; None: on for few-shot only.",
    )
    lr: float | None = Field(
        None, gt=0, le=10,
        description="AdamW learning rate (cosine decay); None: 1e-3 addition, 0.1 few-shot, 5e-3 negation, "
                    "1e-3 entropy.",
    )
    epochs: int | None = Field(
        None, ge=1, le=1000, description="None: 20 addition, 10 few-shot, negation and entropy.",
    )
    batch_size: int = Field(128, ge=2, le=4096, description="Images per step, split equally across the tasks.")
    weight_decay: float = Field(0.1, ge=0, le=10)
    grad_clip: float = Field(1.0, gt=0, le=1e6, description="Max global gradient norm of the coefficients.")
    eval_batch_size: int = Field(256, ge=1, le=8192)

    @model_validator(mode="after")
    def _objective_inputs(self) -> "AtlasParams":
        if self.objective == "supervised":
            if bool(self.task_datasets) == (self.target_dataset_id is not None):
                raise ValueError("supervised needs exactly one of task_datasets (addition) and "
                                 "target_dataset_id (few-shot)")
            if self.shots is not None and self.target_dataset_id is None:
                raise ValueError("shots applies to few-shot (target_dataset_id)")
        else:
            if self.target_dataset_id is None or self.task_datasets or self.shots is not None:
                raise ValueError(f"{self.objective} needs target_dataset_id, and no task_datasets or shots")
        if (self.objective == "negation") != (self.control_dataset_id is not None):
            raise ValueError("control_dataset_id is required by negation and used only there")
        return self

    @property
    def mode(self) -> str:
        """addition, few_shot, negation or entropy."""
        if self.objective == "supervised":
            return "addition" if self.task_datasets else "few_shot"
        return self.objective

    def dataset_ids(self) -> list[str]:
        ids = list(self.task_datasets.values()) + [self.target_dataset_id, self.control_dataset_id]
        return _unique([i for i in ids if i is not None])

    def task_vector_ids(self) -> list[str]:
        return list(self.task_datasets)


def _unique(ids: list[str]) -> list[str]:
    return list(dict.fromkeys(ids))


register(MethodSpec(
    name="task_arithmetic",
    params=TaskArithmeticParams,
    runner="engine.task_arithmetic:run",
    summary="theta_0 + lambda * sum of task vectors, streamed one tensor at a time; lambda optionally "
            "searched on validation data.",
))
register(MethodSpec(
    name="ties",
    params=TiesParams,
    runner="engine.ties:run",
    summary="TIES: trim each task vector to its top-k% entries, elect a sign per entry, average the agreeing "
            "entries; streamed.",
))
register(MethodSpec(
    name="sta",
    params=StaParams,
    runner="engine.sta:run",
    summary="Selective task arithmetic: keep each task's important entries (Taylor importance on calibration "
            "data), fuse or forget them; training-free.",
))
register(MethodSpec(
    name="atlas",
    params=AtlasParams,
    runner="engine.atlas:run",
    summary="aTLAS: learn one coefficient per task vector and parameter block (supervised, negation or "
            "test-time entropy), then write theta_0 + the learned composition.",
))

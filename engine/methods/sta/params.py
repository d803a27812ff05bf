from typing import Literal

from pydantic import Field, model_validator

from engine.methods.spec import (
    SEARCH_RESULT_KEYS,
    DatasetNeed,
    MethodParams,
    MethodSpec,
    TaskDatasets,
    check_task_datasets,
    search_needs,
    unique,
)

CALIBRATION_SPLITS = ("train", "val")

# lambda searched over {0, 0.1, ..., 2}: twice task arithmetic's range, so the paper's data-free lambda 1
# lies inside it (sparse masks drop most of each vector, so the best lambda may exceed 1).
STA_SCALING_GRID = tuple(round(0.1 * i, 1) for i in range(21))

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
        default={},
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
    scaling: float = Field(
        1.0, ge=-10, le=10,
        description="lambda in theta_0 + lambda * sum(m_t * tau_t); 1 is the paper's data-free default. Not used "
                    "when validation_datasets are given.",
    )
    validation_datasets: TaskDatasets = Field(
        default={},
        description="Task vector id -> dataset id. When given, lambda is searched over {0, 0.1, ..., 2} on each "
                    "dataset's val split (else train): for addition (no forget) the highest mean normalised "
                    "accuracy; for forgetting (every task vector in forget, control_dataset_id given) the lowest "
                    "mean target accuracy whose control accuracy stays >= 0.95 x zero-shot.",
    )
    control_dataset_id: str | None = Field(
        None, description="Forgetting with a search: the control task whose accuracy must be kept.",
    )
    disjoint: bool = Field(
        False, description="Where masks overlap, the entry goes only to the task with the higher normalised "
                           "importance (ties: the task listed first).",
    )
    forget: list[str] = Field(
        default=[],
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
    def _consistent(self) -> "StaParams":
        if len(set(self.forget)) != len(self.forget):
            raise ValueError("forget lists a task vector twice")
        if self.validation_datasets and self.forget:
            if set(self.validation_datasets) != set(self.forget):
                raise ValueError("a forgetting search validates exactly the forgotten task vectors")
            if self.control_dataset_id is None:
                raise ValueError("a forgetting search needs control_dataset_id")
        elif self.control_dataset_id is not None:
            raise ValueError("control_dataset_id is used only by a forgetting search (forget with "
                             "validation_datasets)")
        check_task_datasets(self.validation_datasets, "validation_datasets", normalised=not self.forget,
                            control=self.control_dataset_id)
        return self

    def dataset_ids(self) -> list[str]:
        return unique([*self.calibration_datasets.values(), *self.validation_datasets.values(),
                       self.control_dataset_id])

    def dataset_needs(self) -> list[DatasetNeed]:
        calibration = [DatasetNeed(("calibration_datasets", tv), ds, CALIBRATION_SPLITS, True,
                                   "to score importance on") for tv, ds in self.calibration_datasets.items()]
        return calibration + search_needs(self.validation_datasets, self.control_dataset_id)

    def task_vector_ids(self) -> list[str]:
        return unique([*self.calibration_datasets, *self.forget, *self.validation_datasets])

    def evaluation_targets(self) -> list[tuple[str, str | None]]:
        """The validation datasets (else the calibration ones), normalised unless forgotten, and the control."""
        named = self.validation_datasets or self.calibration_datasets
        targets = [(ds, None if tv in self.forget else tv) for tv, ds in named.items()]
        return targets + ([(self.control_dataset_id, None)] if self.control_dataset_id else [])


SPEC = MethodSpec(
    name="sta",
    summary="Selective task arithmetic: keep each task's important entries (first-order Taylor importance on "
            "calibration data), fuse them or forget them; training-free; lambda 1 or searched on validation data.",
    reference="Bowen et al., Beyond Task Vectors: Selective Task Arithmetic Based on Importance Metrics "
              "(arXiv 2411.16139).",
    params=StaParams,
    result_keys={
        "importance_source": "Per task vector: taylor (calibration data) or magnitude (|tau|, no data).",
        "magnitude_tensors": "Per task vector: tensors scored by |tau| because the loss does not reach them.",
        "mask_density": "Per task vector: the fraction of its entries kept.",
        **SEARCH_RESULT_KEYS,
    },
)

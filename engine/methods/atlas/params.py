from dataclasses import dataclass
from typing import Literal

from pydantic import Field, model_validator

from engine.context import SELECTION_SPLITS
from engine.methods.spec import DatasetNeed, MethodParams, MethodSpec, TaskDatasets, check_task_datasets, unique

Split = Literal["train", "val", "test"]


@dataclass(frozen=True)
class ModeRecipe:
    """The official recipe of one mode (fredzzhang/atlas): lr, epochs, schedule, and the splits it trains on."""

    lr: float
    epochs: int
    schedule: Literal["constant", "cosine"]
    train_splits: tuple[str, ...]  # the first present is used


# addition (learn_task_addition.py): lr 1e-3 constant, 20 epochs, trained and selected on validation data.
# few-shot (learn_few_shots.py): lr 0.1 cosine, 10 epochs, k shots drawn from the training split.
# negation (learn_task_negation.py): 1e-3 x a per-dataset multiplier of 2-10 over 2-20 epochs, constant;
#   5e-3 for 10 is a middle of those, trained on the target's and the control's validation data.
# entropy: AdaMerging's 1e-3, cosine as the official test-time adaptation, on the unlabelled test images.
# ufm (learn_ufm.py): lr 1e-3, 10 epochs, cosine without warm-up, on the unlabelled test images.
RECIPES: dict[str, ModeRecipe] = {
    "addition": ModeRecipe(1e-3, 20, "constant", ("val",)),
    "few_shot": ModeRecipe(0.1, 10, "cosine", ("train",)),
    "negation": ModeRecipe(5e-3, 10, "constant", ("val",)),
    "entropy": ModeRecipe(1e-3, 10, "cosine", ("test", "train", "val")),
    "ufm": ModeRecipe(1e-3, 10, "cosine", ("test", "train", "val")),
}


class AtlasParams(MethodParams):
    """Learned anisotropic scaling: one coefficient per (task vector, image-tower tensor)."""

    objective: Literal["supervised", "negation", "entropy", "ufm"] = Field(
        "supervised",
        description="supervised: multi-task addition (task_datasets) or few-shot on target_dataset_id; "
                    "negation: loss -CE(target) + CE(control); entropy: unlabelled test-time adaptation "
                    "on target_dataset_id by the entropy of the predictions; ufm: unlabelled test-time adaptation "
                    "by the paper's unsupervised FixMatch (trusted zero-shot pseudo-labels per class, and the "
                    "confident sharpened predictions of the unaugmented images taught to their augmented views).",
    )
    granularity: Literal["block", "isotropic"] = Field(
        "block", description="block: one coefficient per task vector and parameter tensor; isotropic: one per "
                             "task vector.",
    )
    task_datasets: TaskDatasets = Field(
        default={},
        description="supervised addition: task vector id -> its dataset; the batch is split across them, each "
                    "with its own zero-shot head.",
    )
    target_dataset_id: str | None = Field(None, description="few-shot, negation, entropy or ufm target.")
    control_dataset_id: str | None = Field(None, description="negation: the task whose accuracy must be kept.")
    shots: int | None = Field(
        None, ge=1, le=10_000,
        description="few-shot: images per class drawn (seeded) from the target's train split; None uses all.",
    )
    partitions: int = Field(
        1, ge=1, le=64,
        description="aTLAS x K: each block's entries are split at random into this many partitions, each with its "
                    "own coefficient (block granularity only). The split is drawn from partition_seed and stored "
                    "with the coefficients, so the checkpoint can be rebuilt from them.",
    )
    partition_seed: int | None = Field(
        None, ge=0, le=2**63 - 1, description="Seed of the partitions (K > 1); None: the job's seed.",
    )
    vectors_per_block: int | None = Field(
        None, ge=1, le=10_000,
        description="Memory budget (supervised, block granularity, one partition): per block, only the b task "
                    "vectors with the largest |dL/dlambda| at lambda = 0 on the training data (the paper's blockwise "
                    "gradient selection, averaged over up to 10 batches) are held and learned; the others' "
                    "coefficients stay 0. None: every vector.",
    )
    trusted_per_class: int | None = Field(
        None, ge=1, le=10_000,
        description="ufm: per class, how many of the images the zero-shot model assigns to it, the most confident "
                    "first, are trusted with that class as their label; None: min(N / C, 100) for N images and C "
                    "classes (the paper's).",
    )
    augment: bool | None = Field(
        None, description="Random resized crop (scale 0.5-1, aspect 3/4-4/3) and horizontal flip of the raw image, "
                          "in place of preprocessing's centre crop; None: on for few-shot and for ufm's strong "
                          "view (its weak view is never augmented).",
    )
    train_split: Split | None = Field(
        None, description="The split the coefficients are trained on; None: val for addition and negation (data the "
                          "task vectors were not fine-tuned on, as the official code), train for few-shot (the "
                          "k shots), test for entropy and ufm (the unlabelled test images; else train, else val).",
    )
    lr: float | None = Field(
        None, gt=0, le=10,
        description="AdamW learning rate; None: 1e-3 addition, 0.1 few-shot, 5e-3 negation, 1e-3 entropy and ufm.",
    )
    schedule: Literal["constant", "cosine"] | None = Field(
        None, description="Learning-rate schedule; None: constant for addition and negation, cosine for few-shot, "
                          "entropy and ufm (the official code's).",
    )
    epochs: int | None = Field(
        None, ge=1, le=1000,
        description="None: 20 addition, 10 few-shot, negation, entropy and ufm. An epoch is one pass over the "
                    "smallest task's training split (addition), at least 10 batches of the repeated k shots "
                    "(few-shot), one pass over the target's split (negation, entropy, ufm). Negation stops after the "
                    "first epoch whose "
                    "control accuracy falls below 0.95 x zero-shot.",
    )
    batch_size: int = Field(
        128, ge=2, le=4096,
        description="Images per step; addition splits it equally across the tasks, negation between target and "
                    "control.",
    )
    vector_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="How the stacked task vectors are held: auto keeps float32 on CPU and float16 on CUDA "
                            "(the official code keeps them in fp16 on the GPU); bfloat16 or float16 halve their "
                            "memory. Each block's composition is still added to theta_0 in its own precision.",
    )
    weight_decay: float = Field(0.1, ge=0, le=10, description="AdamW weight decay of the coefficients.")
    grad_clip: float = Field(1.0, gt=0, le=1e6, description="Max global gradient norm of the coefficients.")
    eval_batch_size: int = Field(256, ge=1, le=8192, description="Images per evaluation batch.")

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
        if self.partitions > 1 and self.granularity != "block":
            raise ValueError("partitions split blocks: they need granularity block")
        if self.partition_seed is not None and self.partitions == 1:
            raise ValueError("partition_seed applies to partitions > 1")
        if self.vectors_per_block is not None and not (
                self.objective == "supervised" and self.granularity == "block" and self.partitions == 1):
            raise ValueError("vectors_per_block selects vectors per block for supervised training, with granularity "
                             "block and one partition")
        if self.trusted_per_class is not None and self.objective != "ufm":
            raise ValueError("trusted_per_class applies to ufm")
        check_task_datasets(self.task_datasets, "task_datasets", normalised=True)
        if self.control_dataset_id is not None and self.control_dataset_id == self.target_dataset_id:
            raise ValueError("control_dataset_id is the target: the control must be another task (the loss would "
                             "cancel out)")
        return self

    @property
    def mode(self) -> str:
        """addition, few_shot, negation, entropy or ufm."""
        if self.objective == "supervised":
            return "addition" if self.task_datasets else "few_shot"
        return self.objective

    @property
    def recipe(self) -> ModeRecipe:
        return RECIPES[self.mode]

    @property
    def train_order(self) -> tuple[str, ...]:
        """The splits a task may train on, the first present used: train_split, else the mode's (RECIPES)."""
        return (self.train_split,) if self.train_split else self.recipe.train_splits

    def dataset_ids(self) -> list[str]:
        ids = list(self.task_datasets.values()) + [self.target_dataset_id, self.control_dataset_id]
        return unique(ids)

    def dataset_needs(self) -> list[DatasetNeed]:
        """The datasets it trains on (method.train_split); supervised and negation losses need their labels."""
        order = self.train_order
        purpose = f"to train aTLAS on ({self.mode})" + ("" if self.train_split else "; train_split can name another")
        labelled = self.mode in ("addition", "few_shot", "negation")
        if self.mode == "addition":
            return [DatasetNeed(("task_datasets", tv), ds, order, labelled, purpose)
                    for tv, ds in self.task_datasets.items()]
        needs = [DatasetNeed(("target_dataset_id",), self.target_dataset_id, order, labelled, purpose)]
        if self.mode == "negation":  # its best epoch compares the target's and the control's accuracies
            needs.append(DatasetNeed(("control_dataset_id",), self.control_dataset_id, order, labelled, purpose))
            needs += [DatasetNeed((field,), dataset_id, SELECTION_SPLITS, True, "to select the best epoch on "
                                  "(negation compares the target's and the control's accuracies)")
                      for field, dataset_id in (("target_dataset_id", self.target_dataset_id),
                                                ("control_dataset_id", self.control_dataset_id))]
        return needs

    def task_vector_ids(self) -> list[str]:
        return list(self.task_datasets)

    def evaluation_targets(self) -> list[tuple[str, str | None]]:
        if self.mode == "addition":
            return [(ds, tv) for tv, ds in self.task_datasets.items()]
        return [(ds, None) for ds in unique([self.target_dataset_id, self.control_dataset_id])]


SPEC = MethodSpec(
    name="atlas",
    summary="aTLAS: learn one coefficient per task vector and parameter block (supervised addition or "
            "few-shot, negation, or test-time adaptation by entropy or UFM), then write theta_0 + the learned "
            "composition.",
    reference="Zhang et al., Knowledge Composition using Task Vectors with Learned Anisotropic Scaling, "
              "NeurIPS 2024 (arXiv 2407.02880); fredzzhang/atlas.",
    params=AtlasParams,
    result_keys={
        "mode": "addition, few_shot, negation, entropy or ufm.",
        "steps": "Optimiser steps taken.",
        "steps_per_epoch": "Optimiser steps in one epoch (see epochs).",
        "stopped_early": "negation: the epoch after which training stopped because the control dropped; else null.",
        "coefficients": "Number of learned coefficients.",
        "blocks": "Parameter blocks composed.",
        "uncomposed_tensors": "Task-vector tensors outside the image tower, left at theta_0.",
        "train_images": "few-shot: images in the drawn k-shot subset.",
        "trusted": "ufm: the trusted set: per_class (k), images, and per class how many were trusted.",
        "stacked_vector_bytes": "Memory held by the stacked task vectors while training.",
        "budget": "With vectors_per_block: the vectors selected per block, the batches the selection averaged "
                  "over, and how many coefficients were learned.",
    },
)

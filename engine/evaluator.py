"""Evaluating weights on a job's datasets: one base model in memory, its weights swapped in place.

Methods use it to search a scaling on selection splits, the evaluation service and merge jobs
use it to report a checkpoint's accuracy, and the benchmarks call the same code. Every
accuracy it reports names its split; an accuracy is normalised by the fine-tuned model
theta_0 + tau_t of the task vector the dataset belongs to, measured on the same split.
"""
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.context import JobContext, MergeInputs
from engine.data import Task, load_task, task_vector_by_id
from engine.heads import HeadFactory, image_logits
from engine.metrics import accuracy_of, mean_normalised_accuracy, normalised, predict
from engine.weights import InPlaceWeights, load_base_model, load_float_deltas


@dataclass(frozen=True)
class EvalTarget:
    """A dataset to evaluate, the task vector whose fine-tuned model normalises its accuracy (if any), and the
    split to measure on (None: the first present of the order the caller gives)."""

    dataset_id: str
    task_vector_id: str | None = None
    split: str | None = None


class Evaluator:
    def __init__(self, inputs: MergeInputs, ctx: JobContext, batch_size: int = 256):
        self.inputs, self.ctx, self.batch_size = inputs, ctx, batch_size
        self.model = load_base_model(inputs, ctx.device)
        self.heads = HeadFactory(self.model, inputs, ctx)
        self.weights = InPlaceWeights(self.model, inputs.base_path, inputs.start_path)
        self._tasks: dict[tuple[str, str | None], Task] = {}
        self._finetuned: dict[tuple[str, str, str], float] = {}  # (task vector, dataset, split) -> accuracy

    # -- what the model holds
    def use_base(self) -> None:
        self.weights.restore()

    def use_deltas(self, deltas: dict[str, torch.Tensor], scale: float = 1.0) -> None:
        """The merge's weights: theta_0 (or the job's start checkpoint) + scale * deltas (float32 tensors by
        state-dict name)."""
        self.weights.load(deltas, scale)

    def use_finetuned(self, task_vector_id: str) -> None:
        """The fine-tuned model theta_0 + tau_t (from theta_0 whatever the merge starts from)."""
        self.weights.load(self.task_vector_deltas(task_vector_id), onto_start=False)

    def use_checkpoint(self, path: Path) -> None:
        self.weights.restore()
        self.weights.load_checkpoint(path)

    def task_vector_deltas(self, task_vector_id: str) -> dict[str, torch.Tensor]:
        return load_float_deltas(task_vector_by_id(self.inputs, task_vector_id).path, self.weights.tensors)

    # -- datasets
    def task(self, target: EvalTarget) -> Task:
        key = (target.dataset_id, target.task_vector_id)
        if key not in self._tasks:
            tv = task_vector_by_id(self.inputs, target.task_vector_id) if target.task_vector_id else None
            self._tasks[key] = load_task(self.inputs, target.dataset_id, self.heads, tv)
        return self._tasks[key]

    def split_of(self, target: EvalTarget, order: Iterable[str]) -> str:
        """The target's own split, else the first present in order; it must exist and be labelled."""
        task = self.task(target)
        split = target.split if target.split is not None else task.split_name(order)
        if not task.has_labelled([split]):
            raise ValueError(f"dataset {task.dataset.name!r} has no labelled {split} split")
        return split

    @torch.no_grad()
    def predictions(self, task: Task, split: str) -> np.ndarray:
        """The current weights' predicted class for each image of the task's split."""
        images, _ = task.splits[split]
        return predict(lambda pixels: image_logits(self.model, pixels, task.head), images, self.model,
                       self.batch_size, self.ctx.device)

    def accuracy(self, task: Task, split: str) -> float:
        return accuracy_of(self.predictions(task, split), task.splits[split][1])

    def finetuned_accuracy(self, target: EvalTarget, split: str) -> float:
        """Accuracy of theta_0 + tau_t on the dataset's split (cached); leaves the model at theta_0."""
        key = (target.task_vector_id, target.dataset_id, split)
        if key not in self._finetuned:
            self.ctx.check_cancel()
            self.use_finetuned(target.task_vector_id)
            self._finetuned[key] = self.accuracy(self.task(target), split)
            self.use_base()
        return self._finetuned[key]

    def references(self, targets: Iterable[EvalTarget], order: Iterable[str]) -> dict[str, float]:
        """Fine-tuned accuracy per dataset with a task vector, on the first split of order it has.

        Call before loading the weights to evaluate: measuring a reference resets the model to theta_0.
        """
        order = list(order)
        return {t.dataset_id: self.finetuned_accuracy(t, self.split_of(t, order))
                for t in targets if t.task_vector_id is not None}

    def report(self, targets: Iterable[EvalTarget], order: Iterable[str],
               references: dict[str, float] | None = None, keep_predictions: bool = False) -> dict:
        """Accuracy of the current weights on each target's split (split_of).

        references: {dataset id: accuracy of its reference model on the same split} (the fine-tuned models of
        references(), or any other); each dataset with one also gets its normalised accuracy, and the report
        their mean.
        """
        targets, order = list(targets), list(order)
        datasets, accuracies = {}, {}
        for target in targets:
            self.ctx.check_cancel()
            task = self.task(target)
            split = self.split_of(target, order)
            predictions = self.predictions(task, split)
            entry = {"split": split, "images": int(len(predictions)),
                     "accuracy": accuracy_of(predictions, task.splits[split][1])}
            if keep_predictions:
                entry["correct"] = (predictions == task.splits[split][1])
            if references and target.dataset_id in references:
                entry.update(reference_accuracy=references[target.dataset_id],
                             normalised_accuracy=normalised(entry["accuracy"], references[target.dataset_id]))
                if target.task_vector_id is not None:
                    entry["task_vector_id"] = target.task_vector_id
            datasets[target.dataset_id] = entry
            accuracies[target.dataset_id] = entry["accuracy"]
        out = {"datasets": datasets}
        if accuracies:  # none: every target unlabelled (evaluate_checkpoint), nothing to average
            out["mean_accuracy"] = float(np.mean(list(accuracies.values())))
        if references:
            out["mean_normalised_accuracy"] = mean_normalised_accuracy(accuracies, references)
        return out

"""Evaluating models on the job's datasets, and the validation search of task arithmetic's lambda.

Classification uses the frozen zero-shot head of each dataset's class names,
built from the base model's text tower. Accuracy is selected on a dataset's
`val` split (`train` when it has none) and reported on `test` (else the
selection split). Normalised accuracy is merged accuracy divided by the
accuracy of that task's own fine-tuned model theta_0 + tau_t.
"""
import hashlib
import json
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from engine.clip import (
    SPLITS,
    build_model,
    image_logits,
    load_dataset,
    load_state_dict_file,
    preprocess_images,
    zero_shot_head,
)
from engine.context import (
    DatasetInput,
    JobContext,
    MergeInputs,
    Progress,
    TaskVectorInput,
)
from engine.params import SCALING_GRID

SELECTION_SPLITS = ("val", "train")
REPORT_SPLITS = ("test", "val", "train")
CONTROL_KEPT = 0.95  # negation keeps control accuracy >= this x zero-shot control accuracy

Split = tuple[np.ndarray, np.ndarray]  # uint8 images [N,H,W,C], int64 labels [N]
LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # preprocessed pixels -> logits


def autocast(device: str):
    """Mixed precision on CUDA, full precision on CPU.

    float16 rather than bfloat16: a task vector's entries are ~1e-3 of the weights they
    change, below bfloat16's resolution; training pairs it with loss scaling.
    """
    if device.startswith("cuda"):
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return nullcontext()


def split_sizes(path: Path) -> dict[str, int]:
    """Number of entries per split of a canonical .npz, reading only the labels."""
    with np.load(path, allow_pickle=False) as data:
        return {split: len(data[f"{split}_labels"]) for split in SPLITS
                if f"{split}_images" in data and f"{split}_labels" in data}


def pick_split(sizes: dict[str, int], order: Iterable[str], dataset_name: str) -> str:
    """The first non-empty split in order, given the size of each split."""
    for split in order:
        if sizes.get(split):
            return split
    raise ValueError(f"dataset {dataset_name!r} has none of the splits {list(order)}")


def is_labelled(split: Split) -> bool:
    return bool(len(split[1])) and bool((split[1] >= 0).all())


@dataclass
class Task:
    """A dataset with its zero-shot head, and the task vector it belongs to (None for targets and controls)."""

    dataset: DatasetInput
    splits: dict[str, Split]
    head: torch.Tensor
    task_vector_id: str | None = None

    @property
    def name(self) -> str:
        return self.dataset.id

    @property
    def sizes(self) -> dict[str, int]:
        return {name: len(labels) for name, (_, labels) in self.splits.items()}

    def split(self, order: Iterable[str]) -> Split:
        return self.splits[pick_split(self.sizes, order, self.dataset.name)]

    def has_labelled(self, order: Iterable[str]) -> bool:
        """Whether one of the splits in order exists, and the first such is labelled."""
        return any(self.sizes.get(name) for name in order) and is_labelled(self.split(order))

    @property
    def selection(self) -> Split:
        return self.split(SELECTION_SPLITS)

    @property
    def report(self) -> Split:
        return self.split(REPORT_SPLITS)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_base_model(inputs: MergeInputs, device: str) -> torch.nn.Module:
    """The base open_clip model with theta_0 loaded, every weight frozen, in eval mode, on device."""
    model = build_model(inputs.base_spec)
    model.load_state_dict(load_state_dict_file(inputs.base_path))
    model.requires_grad_(False)
    return model.to(device).eval()


class HeadFactory:
    """Zero-shot heads of the base model, cached under ctx.cache_dir keyed by the base file's content."""

    def __init__(self, model: torch.nn.Module, inputs: MergeInputs, ctx: JobContext):
        self.model, self.ctx = model, ctx
        self.cache_key = None
        if ctx.cache_dir is not None:
            spec = inputs.base_spec.architecture or json.dumps(inputs.base_spec.config, sort_keys=True)
            self.cache_key = f"{spec}:{file_sha256(inputs.base_path)}"

    def __call__(self, class_names: list[str]) -> torch.Tensor:
        return zero_shot_head(self.model, class_names, device=self.ctx.device,
                              cache_dir=self.ctx.cache_dir, cache_key=self.cache_key)


def load_task(inputs: MergeInputs, dataset_id: str, heads: HeadFactory,
              task_vector: TaskVectorInput | None = None) -> Task:
    """Load a dataset's splits and its head (class names from the dataset, else from the task vector)."""
    dataset = inputs.datasets.get(dataset_id)
    if dataset is None:
        raise ValueError(f"dataset {dataset_id!r} is not among the job's datasets")
    class_names = dataset.class_names or (task_vector.class_names if task_vector else None)
    if not class_names:
        raise ValueError(f"dataset {dataset.name!r} has no class names, needed for its zero-shot head")
    splits = load_dataset(dataset.path)
    for split, (_, labels) in splits.items():
        if len(labels) and labels.max() >= len(class_names):
            raise ValueError(f"dataset {dataset.name!r} ({split}): label {labels.max()} but "
                             f"{len(class_names)} class names")
    return Task(dataset, splits, heads(class_names), task_vector.id if task_vector else None)


def task_vector_by_id(inputs: MergeInputs, task_vector_id: str) -> TaskVectorInput:
    for tv in inputs.task_vectors:
        if tv.id == task_vector_id:
            return tv
    raise ValueError(f"task vector {task_vector_id!r} is not among the job's task vectors")


@torch.no_grad()
def accuracy(logits_fn: LogitsFn, split: Split, model: torch.nn.Module, batch_size: int, device: str) -> float:
    """Top-1 accuracy of logits_fn on a labelled split; model only supplies the preprocessing."""
    images, labels = split
    if not is_labelled(split):
        raise ValueError("accuracy needs labels")
    correct = 0
    for start in range(0, len(images), batch_size):
        pixels = preprocess_images(images[start:start + batch_size], model).to(device)
        with autocast(device):
            predictions = logits_fn(pixels).argmax(dim=-1).cpu()
        correct += int((predictions == torch.as_tensor(labels[start:start + batch_size])).sum())
    return correct / len(images)


def model_accuracy(model: torch.nn.Module, task: Task, split: Split, batch_size: int, device: str) -> float:
    return accuracy(lambda pixels: image_logits(model, pixels, task.head), split, model, batch_size, device)


def load_float_deltas(path: Path, model_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A task vector's floating-point tensors that the model has, in float32."""
    return {name: tensor.float() for name, tensor in load_state_dict_file(path).items()
            if name in model_tensors and tensor.is_floating_point()}


class InPlaceWeights:
    """Sets a model's tensors to theta_0 + scale * delta in place, theta_0 read from the base file.

    Re-reading theta_0 from the memory-mapped base keeps one model copy in memory,
    and restores it exactly (no drift from adding and subtracting deltas).
    """

    def __init__(self, model: torch.nn.Module, base_path: Path):
        self.tensors = model.state_dict(keep_vars=True)
        self.base_path = base_path
        self._touched: set[str] = set()

    @torch.no_grad()
    def load(self, deltas: dict[str, torch.Tensor], scale: float = 1.0) -> None:
        with safe_open(str(self.base_path), framework="pt") as base:
            for name in sorted(self._touched | set(deltas)):
                value = base.get_tensor(name).float()
                if name in deltas:
                    value = value + scale * deltas[name]
                self.tensors[name].copy_(value)
        self._touched = set(deltas)

    def restore(self) -> None:
        self.load({})


def evaluate_checkpoint(inputs: MergeInputs, checkpoint: Path, task_datasets: dict[str, str], ctx: JobContext,
                        other_datasets: Iterable[str] = (), batch_size: int = 256) -> dict[str, dict[str, float]]:
    """Accuracy of a merged checkpoint on each dataset's report split (test, else val, else train).

    task_datasets maps task vector id -> its dataset, whose accuracy is also normalised by that
    task's fine-tuned model theta_0 + tau_t; other_datasets (controls, targets) get accuracy only.
    """
    model = load_base_model(inputs, ctx.device)
    heads = HeadFactory(model, inputs, ctx)
    tasks = [load_task(inputs, ds, heads, task_vector_by_id(inputs, tv)) for tv, ds in task_datasets.items()]
    tasks += [load_task(inputs, ds, heads) for ds in other_datasets]
    weights = InPlaceWeights(model, inputs.base_path)
    finetuned = {}
    for task in tasks:
        if task.task_vector_id is not None:
            ctx.check_cancel()
            weights.load(load_float_deltas(task_vector_by_id(inputs, task.task_vector_id).path, weights.tensors))
            finetuned[task.name] = model_accuracy(model, task, task.report, batch_size, ctx.device)
    model.load_state_dict(load_state_dict_file(checkpoint))
    merged = {task.name: model_accuracy(model, task, task.report, batch_size, ctx.device) for task in tasks}
    return {"accuracy": merged, "finetuned_accuracy": finetuned,
            "normalised_accuracy": {name: normalised(merged[name], acc) for name, acc in finetuned.items()}}


def normalised(merged: float, finetuned: float) -> float:
    return merged / finetuned if finetuned > 0 else 0.0


def search_task_arithmetic_scaling(inputs: MergeInputs, validation: dict[str, str], negate: bool,
                                   control_dataset_id: str | None, ctx: JobContext,
                                   batch_size: int = 256) -> tuple[float, dict]:
    """Pick lambda from SCALING_GRID on validation data; returns (lambda, metrics with the search table).

    add: the highest mean normalised accuracy over the validated tasks. negate: the lowest mean
    target accuracy among the lambdas whose control accuracy is >= 0.95 x zero-shot (lambda 0).
    Ties go to the smaller lambda.
    """
    model = load_base_model(inputs, ctx.device)
    heads = HeadFactory(model, inputs, ctx)
    weights = InPlaceWeights(model, inputs.base_path)
    tasks = [load_task(inputs, ds, heads, task_vector_by_id(inputs, tv)) for tv, ds in validation.items()]
    control = load_task(inputs, control_dataset_id, heads) if control_dataset_id else None
    total_steps = len(tasks) + len(SCALING_GRID)
    step = 0

    def report(stage: str, metrics: dict) -> None:
        nonlocal step
        step += 1
        ctx.report(Progress(stage, step, total_steps, metrics))

    finetuned = {}
    for task in tasks:
        ctx.check_cancel()
        weights.load(load_float_deltas(task_vector_by_id(inputs, task.task_vector_id).path, weights.tensors))
        finetuned[task.name] = model_accuracy(model, task, task.selection, batch_size, ctx.device)
        report("finetuned_accuracy", {task.name: finetuned[task.name]})

    summed: dict[str, torch.Tensor] = {}
    for tv in inputs.task_vectors:
        for name, delta in load_float_deltas(tv.path, weights.tensors).items():
            summed[name] = summed[name] + delta if name in summed else delta
    sign = -1.0 if negate else 1.0
    table = []
    for scaling in SCALING_GRID:
        ctx.check_cancel()
        weights.load(summed, sign * scaling)
        row = {"scaling": scaling,
               "accuracy": {t.name: model_accuracy(model, t, t.selection, batch_size, ctx.device) for t in tasks}}
        row["mean_accuracy"] = float(np.mean(list(row["accuracy"].values())))
        row["mean_normalised_accuracy"] = float(np.mean(
            [normalised(row["accuracy"][name], acc) for name, acc in finetuned.items()]))
        if control is not None:
            row["control_accuracy"] = model_accuracy(model, control, control.selection, batch_size, ctx.device)
        table.append(row)
        report("scaling_search", row)

    if negate:
        floor = CONTROL_KEPT * table[0]["control_accuracy"]
        allowed = [row for row in table if row["control_accuracy"] >= floor]
        best = min(allowed, key=lambda row: row["mean_accuracy"])
    else:
        best = max(table, key=lambda row: row["mean_normalised_accuracy"])
    metrics = {"finetuned_accuracy": finetuned, "search": table, "selection": best}
    return best["scaling"], metrics

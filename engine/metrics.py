"""Metrics, each defined once for methods, the evaluation service and the benchmarks alike.

- accuracy: top-1, the fraction of a labelled split's images whose largest logit is their label;
- normalised accuracy: a merged model's accuracy on a task divided by the accuracy of that
  task's own fine-tuned model theta_0 + tau_t on the same split (the papers' headline figure),
  averaged over tasks as mean normalised accuracy;
- negation selection: among candidates (lambdas, epochs) whose control accuracy stays at least
  CONTROL_KEPT x the zero-shot control accuracy, the lowest target accuracy (task vectors'
  negation recipe; aTLAS uses the same rule). Ties go to the earliest candidate.
"""
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any, TypeVar

import numpy as np
import torch

from engine.data import Split, images_per_batch, is_labelled, preprocess_images
from engine.heads import image_logits

CONTROL_KEPT = 0.95

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # preprocessed pixels -> logits
Candidate = TypeVar("Candidate")


def autocast(device: str):
    """Mixed precision on CUDA, full precision on CPU.

    float16 rather than bfloat16: a task vector's entries are ~1e-3 of the weights they
    change, below bfloat16's resolution; training pairs it with loss scaling.
    """
    if device.startswith("cuda"):
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return nullcontext()


@torch.no_grad()
def predict(logits_fn: LogitsFn, images: np.ndarray, model: torch.nn.Module, batch_size: int,
            device: str) -> np.ndarray:
    """Predicted class per image (int64); model only supplies the preprocessing."""
    predictions = []
    batch_size = images_per_batch(batch_size, model)
    for start in range(0, len(images), batch_size):
        pixels = preprocess_images(images[start:start + batch_size], model).to(device)
        with autocast(device):
            predictions.append(logits_fn(pixels).argmax(dim=-1).cpu().numpy())
        del pixels  # not held while the next batch is made
    return np.concatenate(predictions) if predictions else np.zeros(0, dtype=np.int64)


def accuracy_of(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(predictions == labels)) if len(labels) else 0.0


def accuracy(logits_fn: LogitsFn, split: Split, model: torch.nn.Module, batch_size: int, device: str) -> float:
    """Top-1 accuracy of logits_fn on a labelled split."""
    images, labels = split
    if not is_labelled(split):
        raise ValueError("accuracy needs labels")
    return accuracy_of(predict(logits_fn, images, model, batch_size, device), labels)


def normalised(merged: float, finetuned: float) -> float:
    return merged / finetuned if finetuned > 0 else 0.0


def mean_normalised_accuracy(accuracy_by_task: dict[str, float], finetuned_by_task: dict[str, float]) -> float:
    """Mean over the tasks with a fine-tuned reference of merged / fine-tuned accuracy."""
    return float(np.mean([normalised(accuracy_by_task[name], reference)
                          for name, reference in finetuned_by_task.items()]))


def control_kept(control_accuracy: float, zero_shot_control_accuracy: float) -> bool:
    return control_accuracy >= CONTROL_KEPT * zero_shot_control_accuracy


def best_negation(candidates: Sequence[Candidate], target: Callable[[Candidate], float],
                  control: Callable[[Candidate], float], zero_shot_control: float) -> Candidate | None:
    """The candidate with the lowest target accuracy among those that keep the control; None if none does."""
    allowed = [c for c in candidates if control_kept(control(c), zero_shot_control)]
    return min(allowed, key=target) if allowed else None


def chosen(value: Any, source: str) -> dict[str, Any]:
    """A value a method chose or used, with where it came from ('given', 'default', 'search on val', ...)."""
    return {"value": value, "source": source}


def given_or_default(params, field: str) -> dict[str, Any]:
    """chosen() for a parameter used as it is: 'given' when the request set it, else 'default'."""
    return chosen(getattr(params, field), "given" if field in params.model_fields_set else "default")


def evaluate_accuracy(model: torch.nn.Module, images_uint8: np.ndarray, labels: np.ndarray, head: torch.Tensor,
                      batch_size: int = 256, device: str = "cpu") -> float:
    """Top-1 accuracy of an open_clip model with a zero-shot head on uint8 images (eval mode, restored after)."""
    if len(images_uint8) == 0:
        raise ValueError("no images to evaluate")
    was_training = model.training
    model.eval().to(device)
    head = head.to(device)
    predictions = predict(lambda pixels: image_logits(model, pixels, head), images_uint8, model, batch_size, device)
    model.train(was_training)
    return accuracy_of(predictions, np.asarray(labels))

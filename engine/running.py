"""What a worker runs: a method (its runner, then the written checkpoint evaluated on the job's datasets),
or an evaluation of existing weights.

The worker and the benchmarks call these, so a job's reported accuracies and the benchmark's come from
the same code.
"""
from dataclasses import dataclass
from pathlib import Path

from engine.context import REPORT_SPLITS, JobContext, MergeInputs, MethodResult, Progress
from engine.cost import RUNTIME_BYTES, JobEstimate, TowerShape, estimate_job, evaluation_estimate
from engine.data import image_side, split_sizes
from engine.evaluator import EvalTarget, Evaluator
from engine.methods.spec import MethodParams, MethodSpec
from engine.safetensors_io import check_finite, read_header
from engine.task_vectors import layout


class NonFiniteWeights(ValueError):
    """A merge produced NaN or Inf (finite inputs can overflow, e.g. a large lambda on float16 weights)."""


def run_method(spec: MethodSpec, inputs: MergeInputs, params: MethodParams, ctx: JobContext) -> MethodResult:
    """The method's checkpoint, checked finite tensor by tensor, then evaluated on the job's datasets."""
    result = spec.runner()(inputs, params, ctx)
    written = ctx.written.get(result.checkpoint_path)
    if written is not None:
        bad, result.checkpoint_sha256 = written.non_finite, written.sha256
    else:  # a method that wrote its file some other way: read it back
        bad = check_finite(result.checkpoint_path, read_header(result.checkpoint_path))
    if bad:
        result.checkpoint_path.unlink(missing_ok=True)
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteWeights(f"the merged weights hold NaN or Inf in {len(bad)} tensors ({shown}); a smaller "
                               f"scaling, or float32 base weights, would keep them finite")
    targets = [EvalTarget(dataset_id, task_vector_id) for dataset_id, task_vector_id in params.evaluation_targets()]
    if targets:
        ctx.check_cancel()
        result.metrics["evaluation"] = evaluate_checkpoint(inputs, result.checkpoint_path, targets, ctx)
    return result


def evaluate_checkpoint(inputs: MergeInputs, checkpoint, targets: list[EvalTarget], ctx: JobContext) -> dict:
    """The checkpoint's accuracy on each target's report split, normalised where a target names a task vector."""
    evaluator = Evaluator(inputs, ctx)
    labelled = [t for t in targets if evaluator.task(t).has_labelled(REPORT_SPLITS)]
    references = evaluator.references(labelled, REPORT_SPLITS)
    evaluator.use_checkpoint(checkpoint)
    report = evaluator.report(labelled, REPORT_SPLITS, references)
    unlabelled = [t.dataset_id for t in targets if t not in labelled]
    if unlabelled:
        report["unlabelled"] = unlabelled
    return report


@dataclass(frozen=True)
class EvaluationItem:
    """One dataset to evaluate, and what normalises its accuracy: a full checkpoint (its fine-tuned model, say)
    or theta_0 + one of the inputs' task vectors; at most one of the two."""

    dataset_id: str
    reference_checkpoint: Path | None = None
    reference_task_vector_id: str | None = None
    split: str | None = None  # None: test, else val, else train


def evaluate(inputs: MergeInputs, weights: Path | None, items: list[EvaluationItem], ctx: JobContext) -> dict:
    """Accuracy of a checkpoint (or of the base model itself, weights None) on each dataset's split,
    normalised by each item's reference when it has one. The evaluation service's job."""
    evaluator = Evaluator(inputs, ctx)
    targets = [EvalTarget(item.dataset_id, split=item.split) for item in items]
    referenced = [(item, target) for item, target in zip(items, targets, strict=True)
                  if item.reference_checkpoint is not None or item.reference_task_vector_id is not None]
    references = {}
    for step, (item, target) in enumerate(referenced, start=1):
        ctx.check_cancel()
        if item.reference_checkpoint is not None:
            evaluator.use_checkpoint(item.reference_checkpoint)
        else:
            evaluator.use_finetuned(item.reference_task_vector_id)
        references[item.dataset_id] = evaluator.accuracy(evaluator.task(target),
                                                         evaluator.split_of(target, REPORT_SPLITS))
        ctx.report(Progress("references", step, len(referenced), {"dataset_id": item.dataset_id}))
    if weights is None:
        evaluator.use_base()
    else:
        evaluator.use_checkpoint(weights)
    return evaluator.report(targets, REPORT_SPLITS, references)


def _shape_and_sizes(inputs: MergeInputs) -> tuple[TowerShape, dict[str, dict[str, int]], int]:
    """The model's shape and the datasets' split sizes and image side, from the files' headers."""
    import open_clip

    header = read_header(inputs.base_path)
    parameters = sum(info.numel for info in header.tensors.values())
    visual = sum(info.numel for name, info in header.tensors.items() if name.startswith("visual."))
    config = inputs.base_spec.config or open_clip.get_model_config(inputs.base_spec.architecture) or {}
    sizes, side = {}, 0
    for dataset_id, dataset in inputs.datasets.items():
        sizes[dataset_id] = split_sizes(dataset.path)
        side = max(side, image_side(dataset.path))
    return TowerShape.from_config(config, parameters, visual), sizes, side


def estimate_inputs(spec: MethodSpec, inputs: MergeInputs, params: MethodParams,
                    runtime_bytes: int = RUNTIME_BYTES) -> JobEstimate:
    """engine.cost's estimate of a job from its files' headers (no tensor or image is read)."""
    shape, sizes, side = _shape_and_sizes(inputs)
    headers = [read_header(tv.path) for tv in inputs.task_vectors]
    return estimate_job(spec.name, params, shape, [header.parameter_count for header in headers], sizes, side,
                        _label_sets(inputs), runtime_bytes, [layout(header).max_rank for header in headers])


def estimate_evaluation(inputs: MergeInputs, items: list[EvaluationItem],
                        runtime_bytes: int = RUNTIME_BYTES) -> JobEstimate:
    """engine.cost's estimate of an evaluation job from its files' headers."""
    shape, sizes, side = _shape_and_sizes(inputs)
    described = [(item.dataset_id, item.split,
                  item.reference_checkpoint is not None or item.reference_task_vector_id is not None)
                 for item in items]
    return evaluation_estimate(described, shape, sizes, side, _label_sets(inputs), runtime_bytes)


def _label_sets(inputs: MergeInputs) -> dict[str, tuple[int, int | None]]:
    return {dataset_id: (len(dataset.class_names or []), len(dataset.templates) if dataset.templates else None)
            for dataset_id, dataset in inputs.datasets.items()}

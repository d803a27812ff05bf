"""Choosing lambda in theta_0 + lambda * delta on validation data, for every training-free method.

The grid {0, 0.05, ..., 1.0} and the selection rules are the task-vectors recipe
(mlfoundations/task_vectors, src/eval.py and the paper's section 3): addition keeps the
lambda with the highest mean normalised accuracy on the validation splits; negation the
lowest mean target accuracy whose control accuracy stays >= 0.95 x zero-shot. TIES
(prateeks/ties-merging) and STA search the same grid when validation data is given.
Ties go to the smaller lambda.
"""
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.context import SELECTION_SPLITS, JobContext, MergeInputs, Progress
from engine.evaluator import EvalTarget, Evaluator
from engine.metrics import best_negation, chosen
from engine.streaming import DeltaMerge, collect_deltas, merge_streaming

# {0, 0.05, ..., 1.0}: the original task-vectors recipe's search grid.
SCALING_GRID = tuple(round(0.05 * i, 2) for i in range(21))


@dataclass(frozen=True)
class SearchSpec:
    """What to search on: the tasks whose accuracy counts, and (negation) the control to keep."""

    targets: list[EvalTarget]
    negate: bool = False
    control: EvalTarget | None = None


def search_scaling(evaluator: Evaluator, delta: dict[str, torch.Tensor], spec: SearchSpec,
                   grid: tuple[float, ...] = SCALING_GRID, patience: int | None = None) -> tuple[float, dict]:
    """Pick lambda from grid for theta_0 + sign * lambda * delta (sign -1 for negation).

    patience (addition only): stop once that many grid points in a row have not improved on the best
    (iso-merging's early stopping, src/eval/eval.py). Returns (lambda, metrics): "search" holds every
    row evaluated with its split, "chosen" names the pick.
    """
    if patience is not None and spec.negate:
        raise ValueError("early stopping is for addition searches")
    ctx = evaluator.ctx
    order = SELECTION_SPLITS
    references = {} if spec.negate else evaluator.references(spec.targets, order)
    key = "mean_normalised_accuracy" if references else "mean_accuracy"
    total = len(grid)
    sign = -1.0 if spec.negate else 1.0
    rows = []
    since_best = 0
    for step, scaling in enumerate(grid, start=1):
        ctx.check_cancel()
        evaluator.use_deltas(delta, sign * scaling)
        report = evaluator.report(spec.targets, order, references)
        row = {"scaling": scaling, "mean_accuracy": report["mean_accuracy"],
               "accuracy": {name: entry["accuracy"] for name, entry in report["datasets"].items()}}
        if "mean_normalised_accuracy" in report:
            row["mean_normalised_accuracy"] = report["mean_normalised_accuracy"]
        if spec.control is not None:
            control = evaluator.report([spec.control], order)["datasets"][spec.control.dataset_id]
            row["control_accuracy"] = control["accuracy"]
        improved = not spec.negate and (len(rows) == 0 or row[key] > max(r[key] for r in rows))
        rows.append(row)
        ctx.report(Progress("scaling_search", step, total, row))
        since_best = 0 if improved else since_best + 1
        if patience is not None and since_best >= patience:
            break
    evaluator.use_base()

    if spec.negate:
        best = best_negation(rows, target=lambda r: r["mean_accuracy"], control=lambda r: r["control_accuracy"],
                             zero_shot_control=_zero_shot_control(rows))
        rule = "lowest mean target accuracy with control >= 0.95 x zero-shot"
    else:
        best = max(rows, key=lambda r: r[key])  # max keeps the first (smallest lambda) of equal scores
        rule = f"highest {key.replace('_', ' ')}"
        if patience is not None:
            rule += f", stopping after {patience} points without improvement"
    splits = {t.dataset_id: evaluator.task(t).split_name(order) for t in spec.targets}
    if spec.control is not None:
        splits[spec.control.dataset_id] = evaluator.task(spec.control).split_name(order)
    metrics = {
        "search": {"grid": list(grid), "rule": rule, "splits": splits, "finetuned_accuracy": references,
                   "rows": rows},
        "selected": best,
    }
    return best["scaling"], metrics


def _zero_shot_control(rows: list[dict]) -> float:
    """The control accuracy at lambda 0 (the grid starts there: the base model)."""
    zero = [r for r in rows if r["scaling"] == 0]
    if not zero:
        raise ValueError("a negation search needs lambda 0 in its grid (the zero-shot control)")
    return zero[0]["control_accuracy"]


def searched(value: float, metrics: dict) -> dict:
    """chosen() for a searched lambda, naming the splits it was chosen on."""
    splits = sorted(set(metrics["search"]["splits"].values()))
    return chosen(value, f"search on {'/'.join(splits)} ({metrics['search']['rule']})")


# (name, base tensor, the vectors' slices, lambda) -> base + lambda * the merged task vector, float32
ScaledDeltaMerge = Callable[[str, torch.Tensor, Sequence[torch.Tensor | None], float], torch.Tensor]


@dataclass(frozen=True)
class ScaledMerge:
    """What write_scaled_merge wrote: the checkpoint, its tensor count, the lambda used and its source, and
    the search's metrics (empty without validation data)."""

    path: Path
    tensors: int
    scaling: float
    chosen_scaling: dict
    metrics: dict


def write_scaled_merge(inputs: MergeInputs, ctx: JobContext, delta: DeltaMerge, validation_datasets: dict[str, str],
                       grid: tuple[float, ...], scaling: float, chosen_scaling: dict,
                       patience: int | None = None, scaled_delta: ScaledDeltaMerge | None = None) -> ScaledMerge:
    """Write theta_0 + lambda * delta(tensor) to ctx.workdir/merged.safetensors, for a method that merges the
    task vectors into one delta per tensor (TIES, TSV-M, Iso-C, Iso-CTS, DARE).

    With validation_datasets, lambda is searched over grid on them (the merged vector is then held in
    memory, one model's worth); without, `scaling` is used and the delta streams tensor by tensor, through
    scaled_delta where the method has one (the same bits as base + lambda * delta, without whole-tensor
    temporaries).
    """
    paths = [tv.path for tv in inputs.task_vectors]
    metrics: dict = {}
    if validation_datasets:
        deltas = collect_deltas(inputs.base_path, paths, delta, ctx)
        evaluator = Evaluator(inputs, ctx)
        spec = SearchSpec(targets=[EvalTarget(ds, tv) for tv, ds in validation_datasets.items()])
        scaling, metrics = search_scaling(evaluator, deltas, spec, grid, patience)
        chosen_scaling = searched(scaling, metrics)
        del evaluator

        def merge(name: str, base: torch.Tensor, _taus) -> torch.Tensor:
            return base + scaling * deltas[name]
    elif scaled_delta is not None:
        def merge(name: str, base: torch.Tensor, taus) -> torch.Tensor:
            return scaled_delta(name, base, taus, scaling)
    else:
        def merge(name: str, base: torch.Tensor, taus) -> torch.Tensor:
            return base + scaling * delta(name, taus)

    out = ctx.workdir / "merged.safetensors"
    count = merge_streaming(inputs.onto_path, paths, out, merge, ctx)
    return ScaledMerge(out, count, scaling, chosen_scaling, metrics)

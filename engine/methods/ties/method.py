"""TIES merging (Yadav et al., 2023): trim, elect sign, disjoint merge, one tensor at a time.

Follows prateeky2806/ties-merging (ties_minimal.ipynb: topk_values_mask over the flattened task
vector, resolve_sign by the sum of the trimmed vectors, disjoint_merge) and FusionBench's
ties_merging_utils for the `sum` merge. The global cut is found one task vector at a time, so
memory grows with the model, not with the number of vectors; merging then streams tensor by tensor.
"""
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from engine.context import JobContext, MergeInputs, MethodResult, Progress
from engine.evaluator import EvalTarget, Evaluator
from engine.methods.ties.params import TiesParams
from engine.metrics import chosen, given_or_default
from engine.safetensors_io import read_header
from engine.scaling_search import SearchSpec, search_scaling, searched
from engine.selection import EXACT_IN_FLOAT32, kth_largest_magnitude
from engine.streaming import collect_deltas, merge_streaming


def trim_cut(magnitude: torch.Tensor, top_k: float) -> float:
    """The magnitude at or above which entries are in the top_k percent (0 keeps everything)."""
    keep = math.ceil(top_k / 100 * magnitude.numel())
    if keep >= magnitude.numel():
        return 0.0
    if magnitude.dtype not in EXACT_IN_FLOAT32:  # float64 (tests' references): a sort-based selection
        flat = magnitude.flatten()
        return float(flat.kthvalue(flat.numel() - keep + 1).values)
    return kth_largest_magnitude(lambda: [magnitude], keep)


def trim(tau: torch.Tensor, top_k: float, cut: float | None = None) -> torch.Tensor:
    """tau with all but its top_k percent largest-magnitude entries zeroed (entries tied at the cut kept)."""
    cut = trim_cut(tau.abs(), top_k) if cut is None else cut
    return torch.where(tau.abs() >= cut, tau, torch.zeros_like(tau))


def global_cut(path: Path, names: set[str], top_k: float) -> float:
    """The top_k cut over every named float tensor of one task vector file, as if flattened together; read
    tensor by tensor from the memory map (twice: one pass per radix level), never concatenated."""
    with safe_open(str(path), framework="pt") as vector:
        present = sorted(names & set(vector.keys()))
        total = sum(math.prod(vector.get_slice(name).get_shape()) for name in present)
        keep = math.ceil(top_k / 100 * total)
        if not present or keep >= total:
            return 0.0
        return kth_largest_magnitude(lambda: (vector.get_tensor(name) for name in present), keep)


def ties_merge(taus: Sequence[torch.Tensor | None], top_k: float, cuts: Sequence[float] | None = None,
               merge: str = "mean") -> torch.Tensor:
    """The merged task vector of one tensor: the trimmed entries agreeing with the elected sign, averaged
    (mean) or summed (sum). cuts: each vector's global cut; None trims each tensor on its own.

    One pass over the vectors, holding one at a time (taus may load lazily). The reference's two passes
    (sum the trimmed vectors to elect each entry's sign, then merge the entries agreeing with it) give the
    same numbers from running sums kept apart by sign: the entries agreeing with a positive elected sign
    are exactly the positive ones, so their sum and count are the positive running sum and count, added in
    the same order. The elected sign is taken from the full running sum, as the reference computes it.
    """
    trimmed_sum = positive_sum = negative_sum = positive_count = negative_count = None
    for index, tau in enumerate(taus):
        if tau is None:
            continue
        cut = trim_cut(tau.abs(), top_k) if cuts is None else cuts[index]
        trimmed = torch.where(tau.abs() >= cut, tau, torch.zeros_like(tau))
        positive, negative = trimmed > 0, trimmed < 0
        if trimmed_sum is None:
            trimmed_sum = trimmed.clone()
            positive_sum, negative_sum = torch.where(positive, trimmed, 0.0), torch.where(negative, trimmed, 0.0)
            positive_count, negative_count = positive.float(), negative.float()
            continue
        trimmed_sum += trimmed
        positive_sum += torch.where(positive, trimmed, 0.0)
        negative_sum += torch.where(negative, trimmed, 0.0)
        positive_count += positive
        negative_count += negative
    elected = torch.sign(trimmed_sum)
    total = torch.where(elected > 0, positive_sum, torch.where(elected < 0, negative_sum, 0.0))
    if merge == "sum":
        return total
    count = torch.where(elected > 0, positive_count, torch.where(elected < 0, negative_count, 0.0))
    return torch.where(count > 0, total / count.clamp(min=1), 0.0)


def run(inputs: MergeInputs, params: TiesParams, ctx: JobContext) -> MethodResult:
    paths = [tv.path for tv in inputs.task_vectors]
    cuts = None
    if params.trim_scope == "global":
        base = read_header(inputs.base_path).tensors
        merged_names = {name for name, info in base.items() if info.is_float}
        cuts = []
        for step, path in enumerate(paths, start=1):
            ctx.check_cancel()
            cuts.append(global_cut(path, merged_names, params.top_k))
            ctx.report(Progress("trim_cuts", step, len(paths)))
    kept = [0, 0]  # nonzero merged entries, entries merged

    def merged_delta(taus: Sequence[torch.Tensor | None]) -> torch.Tensor:
        delta = ties_merge(taus, params.top_k, cuts, params.merge)
        kept[0] += int(torch.count_nonzero(delta))
        kept[1] += delta.numel()
        return delta

    metrics: dict = {}
    if params.validation_datasets:
        deltas = collect_deltas(inputs.base_path, paths, lambda _name, taus: merged_delta(taus), ctx)
        evaluator = Evaluator(inputs, ctx)
        spec = SearchSpec(targets=[EvalTarget(ds, tv) for tv, ds in params.validation_datasets.items()])
        scaling, metrics = search_scaling(evaluator, deltas, spec, params.scaling_grid)
        chosen_scaling = searched(scaling, metrics)
        del evaluator

        def merge(name: str, base: torch.Tensor, _taus) -> torch.Tensor:
            return base + scaling * deltas[name]
    else:
        scaling = params.resolved_scaling
        chosen_scaling = given_or_default(params, "scaling") | {"value": scaling}

        def merge(_name: str, base: torch.Tensor, taus) -> torch.Tensor:
            return base + scaling * merged_delta(taus)

    out = ctx.workdir / "merged.safetensors"
    count = merge_streaming(inputs.base_path, paths, out, merge, ctx)
    metrics["chosen"] = {
        "top_k": given_or_default(params, "top_k"), "trim_scope": given_or_default(params, "trim_scope"),
        "merge": given_or_default(params, "merge"), "scaling": chosen_scaling,
    }
    if cuts is not None:
        metrics["chosen"]["trim_cuts"] = chosen(cuts, "measured: each vector's global top-k magnitude")
    metrics.update(tensors=count, merged_density=kept[0] / kept[1] if kept[1] else 0.0)
    return MethodResult(out, metrics=metrics)

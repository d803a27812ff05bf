"""TIES merging (Yadav et al., 2023): trim, elect sign, disjoint merge, one tensor at a time.

Follows prateeky2806/ties-merging (ties_minimal.ipynb: topk_values_mask over the flattened task
vector, resolve_sign by the sum of the trimmed vectors, disjoint_merge) and FusionBench's
ties_merging_utils for the `sum` merge. The global cut is found one task vector at a time, so
memory grows with the model, not with the number of vectors; merging then streams tensor by tensor, and
within a tensor chunk by chunk through fused loops (engine/kernels.py).

One deliberate deviation: an entry whose trimmed values sum to exactly 0 merges to 0. The reference
(resolve_zero_signs, "majority") gives such an entry the sign that most of the model's entries elected,
which needs a pass over the whole model before any tensor is written; the entries it changes are those
whose nonzero trimmed values cancel exactly in float32 (an entry that every vector trims away merges to
0 either way).
"""
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np
import torch

from engine.context import JobContext, MergeInputs, MethodResult, Progress
from engine.kernels import ties_count_type, ties_step
from engine.methods.ties.params import TiesParams
from engine.metrics import chosen, given_or_default
from engine.safetensors_io import read_header
from engine.scaling_search import write_scaled_merge
from engine.selection import PERCENTS, file_top_k_cuts, top_k_cuts
from engine.streaming import CHUNK, Float32Reader, float32_readers, in_chunks


def _tensor_cut(read: Float32Reader, numel: int, top_k: float) -> float:
    """The top_k cut of one tensor on its own (trim_scope tensor)."""
    def chunks():
        return (read(start, min(numel, start + CHUNK)) for start in range(0, numel, CHUNK))
    return top_k_cuts(chunks, [top_k])[0]


def trim(tau: torch.Tensor, top_k: float) -> torch.Tensor:
    """tau with all but its top_k percent largest-magnitude entries zeroed (entries tied at the cut kept)."""
    (_shape, (read,)) = float32_readers([tau])
    cut = _tensor_cut(read, tau.numel(), top_k)
    return torch.where(tau.abs() >= cut, tau, torch.zeros_like(tau))


def ties_merge(taus: Sequence[torch.Tensor | None], top_k: float, cuts: Sequence[float] | None = None,
               merge: str = "mean") -> torch.Tensor:
    return counted_ties_merge(taus, top_k, cuts, merge)[0]


def counted_ties_merge(taus: Sequence[torch.Tensor | None], top_k: float, cuts: Sequence[float] | None = None,
                       merge: str = "mean", onto: torch.Tensor | None = None,
                       scale: float = 1.0) -> tuple[torch.Tensor, int]:
    """The merged task vector of one tensor, float32: the trimmed entries agreeing with the elected sign,
    averaged (mean) or summed (sum), and how many of the merged entries are nonzero. cuts: each vector's global
    cut; None trims each tensor on its own. With onto (float32, the tensor's shape), onto + scale * merged
    instead, the same bits as torch's `onto + scale * merged`.

    One pass over the vectors, chunk by chunk (engine.kernels.ties_step).
    The reference's two passes (sum the trimmed vectors to elect each entry's sign, then merge the entries
    agreeing with it) give the same numbers from running sums kept apart by sign: the entries agreeing with
    a positive elected sign are exactly the positive ones, so their sum and count are the positive running
    sum and count, added in the same order. The elected sign is taken from the full running sum, as the
    reference computes it. The first vector's pass starts the sums without reading them and the last's
    resolves each entry without writing them back, so at N = 2 the sums make one trip through the cache.
    """
    shape, readers = float32_readers(taus)
    numel = math.prod(shape)
    present = []
    for index, read in enumerate(readers):
        if read is not None:
            cut = _tensor_cut(read, numel, top_k) if cuts is None else cuts[index]
            present.append((read, np.float32(cut)))
    flat_onto = None if onto is None else onto.reshape(-1).numpy()
    out = np.empty(numel, np.float32)
    if not present:
        out[:] = 0.0 if flat_onto is None else flat_onto
        return torch.from_numpy(out).view(shape), 0
    count_type = ties_count_type(len(present))
    mean, factor = merge == "mean", np.float32(scale)

    def merge_range(first: int, last: int) -> int:
        sums = [np.empty(CHUNK, np.float32) for _ in range(3)]
        counts = [np.empty(CHUNK, count_type) for _ in range(2)]
        nonzero = 0
        for start in range(first, last, CHUNK):
            stop = min(last, start + CHUNK)
            running = [buffer[:stop - start] for buffer in (*sums, *counts)]
            onto_chunk = None if flat_onto is None else flat_onto[start:stop]
            for position, (read, cut) in enumerate(present):
                nonzero += ties_step(position, len(present), read(start, stop), cut, running, mean, onto_chunk, factor,
                                     out[start:stop])
        return nonzero

    nonzero = sum(in_chunks(numel, merge_range))
    return torch.from_numpy(out).view(shape), nonzero


def global_cuts(inputs: MergeInputs, top_k: float, ctx: JobContext) -> tuple[list[float], str]:
    """Each vector's global top_k cut, and where the cuts came from: the ones measured at upload where
    top_k is a whole percent and every vector has them, else measured now over the base's float tensors
    (a task vector holds no other), one vector per thread (the kernels release the GIL)."""
    vectors = inputs.task_vectors
    if float(top_k).is_integer() and all(tv.magnitude_cuts is not None for tv in vectors):
        index = PERCENTS.index(int(top_k))
        return [tv.magnitude_cuts[index] for tv in vectors], "each vector's global top-k magnitude, measured at upload"
    base = read_header(inputs.base_path).tensors
    merged_names = {name for name, info in base.items() if info.is_float}
    pool = ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads()))
    try:
        pending = [pool.submit(file_top_k_cuts, tv.path, merged_names, [top_k]) for tv in vectors]
        for step, _ in enumerate(as_completed(pending), start=1):
            ctx.check_cancel()
            ctx.report(Progress("trim_cuts", step, len(vectors)))
        return [future.result()[0] for future in pending], "each vector's global top-k magnitude, measured"
    finally:
        pool.shutdown(cancel_futures=True)


def run(inputs: MergeInputs, params: TiesParams, ctx: JobContext) -> MethodResult:
    cuts, cuts_source = None, None
    if params.trim_scope == "global":
        cuts, cuts_source = global_cuts(inputs, params.top_k, ctx)
    kept = [0, 0]  # nonzero merged entries, entries merged

    def counted(taus: Sequence[torch.Tensor | None], onto: torch.Tensor | None = None,
                scale: float = 1.0) -> torch.Tensor:
        merged, nonzero = counted_ties_merge(taus, params.top_k, cuts, params.merge, onto, scale)
        kept[0] += nonzero
        kept[1] += merged.numel()
        return merged

    scaling = params.resolved_scaling
    written = write_scaled_merge(inputs, ctx, lambda _name, taus: counted(taus), params.validation_datasets,
                                 params.scaling_grid, scaling, given_or_default(params, "scaling") | {"value": scaling},
                                 scaled_delta=lambda _name, base, taus, scale: counted(taus, base, scale))
    metrics = written.metrics
    metrics["chosen"] = {
        "top_k": given_or_default(params, "top_k"), "trim_scope": given_or_default(params, "trim_scope"),
        "merge": given_or_default(params, "merge"), "scaling": written.chosen_scaling,
    }
    if cuts is not None:
        metrics["chosen"]["trim_cuts"] = chosen(cuts, cuts_source)
    metrics.update(tensors=written.tensors, merged_density=kept[0] / kept[1] if kept[1] else 0.0)
    return MethodResult(written.path, metrics=metrics)

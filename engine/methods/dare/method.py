"""DARE (Yu et al., 2024): random drop and rescale of each task vector, then a sum or a TIES-style merge.

The drop follows FusionBench's dare/utils.py (param_random_drop_: keep where a uniform draw exceeds p, then
divide by 1 - p); the sum follows its DareTaskArithmetic, the ties combination mergekit's dare_ties (sign
consensus and a disjoint mean, no magnitude trim). The draws are splitmix64 hashes of the entry's index in a
stream seeded by (seed, the vector's position, the tensor's name) instead of torch.rand_like's sequential
stream: the same seed gives the same bytes whatever the order in which tensors are merged, the chunking or the
threads, and the merge streams chunk by chunk like TIES (engine/kernels.py), so memory does not grow with the
number of vectors.
"""
import math
import zlib
from collections.abc import Sequence

import numpy as np
import torch

from engine.context import JobContext, MergeInputs, MethodResult
from engine.kernels import dare_drop, splitmix64, ties_accumulate, ties_resolve
from engine.methods.dare.params import DareParams
from engine.metrics import chosen, given_or_default
from engine.scaling_search import write_scaled_merge
from engine.streaming import CHUNK, float32_readers, in_chunks

MASK_64 = (1 << 64) - 1


def drop_stream(seed: int, position: int, name: str) -> np.uint64:
    """The draws' stream of one vector's tensor: splitmix64 over (seed, position, the name's crc32)."""
    state = seed & MASK_64
    for word in (position, zlib.crc32(name.encode())):
        state = int(splitmix64(np.uint64((state + word * 0x9E3779B97F4A7C15) & MASK_64)))
    return np.uint64(state)


def _divisor(drop_rate: float, rescale: bool) -> np.float32:
    return np.float32(1 - drop_rate) if rescale else np.float32(1.0)


def dare_merge(name: str, taus: Sequence[torch.Tensor | None], params: DareParams, seed: int) -> tuple[torch.Tensor,
                                                                                                      int, int]:
    """One tensor's merged delta, float32, chunk by chunk: each vector's chunk is dropped into a scratch buffer
    and added to the running sum (sum) or TIES's running sums (ties); returns it, the surviving entries and
    the entries."""
    shape, readers = float32_readers(taus)
    numel = math.prod(shape)
    present = [(read, drop_stream(seed, position, name)) for position, read in enumerate(readers) if read is not None]
    divisor = _divisor(params.drop_rate, params.rescale)
    out = np.zeros(numel, np.float32)

    def merge_range(first: int, last: int) -> int:
        scratch = np.empty(CHUNK, np.float32)
        sums = [np.empty(CHUNK, np.float32) for _ in range(3)]
        counts = [np.empty(CHUNK, np.int32) for _ in range(2)]
        kept = 0
        for start in range(first, last, CHUNK):
            stop = min(last, start + CHUNK)
            dropped = scratch[:stop - start]
            if params.combine == "ties":
                running = [buffer[:stop - start] for buffer in (*sums, *counts)]
                for buffer in running:
                    buffer.fill(0)
            for read, stream in present:
                kept += dare_drop(read(start, stop), stream, start, params.drop_rate, divisor, dropped)
                if params.combine == "ties":  # DARE in place of the magnitude trim: a cut of 0 keeps every entry
                    ties_accumulate(dropped, np.float32(0.0), *running)
                else:
                    np.add(out[start:stop], dropped, out=out[start:stop])
            if params.combine == "ties":
                ties_resolve(*running, True, out[start:stop])
        return kept

    kept = sum(in_chunks(numel, merge_range))
    return torch.from_numpy(out).view(shape), kept, numel * len(present)


def run(inputs: MergeInputs, params: DareParams, ctx: JobContext) -> MethodResult:
    seed = params.seed if params.seed is not None else ctx.seed
    counts = [0, 0]  # surviving entries, entries

    def merged_delta(name: str, taus: Sequence[torch.Tensor | None]) -> torch.Tensor:
        delta, kept, entries = dare_merge(name, taus, params, seed)
        counts[0] += kept
        counts[1] += entries
        return delta

    scaling = params.resolved_scaling
    written = write_scaled_merge(inputs, ctx, merged_delta, params.validation_datasets, params.scaling_grid, scaling,
                                 given_or_default(params, "scaling") | {"value": scaling})
    metrics = written.metrics
    metrics["chosen"] = {
        "drop_rate": given_or_default(params, "drop_rate"), "rescale": given_or_default(params, "rescale"),
        "combine": given_or_default(params, "combine"), "scaling": written.chosen_scaling,
        "seed": chosen(seed, "given" if params.seed is not None else "the job's seed"),
    }
    metrics.update(tensors=written.tensors, kept_fraction=counts[0] / counts[1] if counts[1] else 0.0)
    return MethodResult(written.path, metrics=metrics)

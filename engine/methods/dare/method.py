"""DARE (Yu et al., 2024): random drop and rescale of each task vector, then a sum or a TIES-style merge.

The drop follows FusionBench's dare/utils.py (param_random_drop_: keep where a uniform draw exceeds p, then
divide by 1 - p); the sum follows its DareTaskArithmetic, the ties combination mergekit's dare_ties (sign
consensus and a disjoint mean, no magnitude trim). The draws are 32-bit halves of splitmix64 hashes of the
entry's index in a stream seeded by (seed, the vector's position, the tensor's name) instead of
torch.rand_like's sequential stream (whose float32 uniforms have 24 bits): the same seed gives the same bytes
whatever the order in which tensors are merged, the chunking or the threads, and the merge streams chunk by
chunk like TIES (engine/kernels.py), so memory does not grow with the number of vectors.
"""
import math
import zlib
from collections.abc import Sequence

import numpy as np
import torch

from engine.context import JobContext, MergeInputs, MethodResult
from engine.kernels import dare_drop, drop_threshold, splitmix64, ties_count_type, ties_step
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


def dare_merge(name: str, taus: Sequence[torch.Tensor | None], params: DareParams, seed: int,
               onto: torch.Tensor | None = None, scale: float = 1.0) -> tuple[torch.Tensor, int, int]:
    """One tensor's merged delta, float32, chunk by chunk: each vector's chunk is dropped into a scratch buffer
    and added to the chunk's running sum (sum) or TIES's running sums (ties); returns it, the surviving entries
    and the entries. With onto (float32, the tensor's shape), onto + scale * the merged delta instead, in the
    same pass (the same bits as torch's `onto + scale * delta`)."""
    shape, readers = float32_readers(taus)
    numel = math.prod(shape)
    present = [(read, drop_stream(seed, position, name)) for position, read in enumerate(readers) if read is not None]
    divisor = _divisor(params.drop_rate, params.rescale)
    threshold = drop_threshold(params.drop_rate)
    flat_onto = None if onto is None else onto.reshape(-1).numpy()
    factor = np.float32(scale)
    out = np.empty(numel, np.float32)
    ties = params.combine == "ties"
    count_type = ties_count_type(len(present))

    def merge_range(first: int, last: int) -> int:
        scratch, summed = np.empty(CHUNK, np.float32), np.empty(CHUNK, np.float32)
        sums = [np.empty(CHUNK, np.float32) for _ in range(3)]
        counts = [np.empty(CHUNK, count_type) for _ in range(2)]
        kept = 0
        for start in range(first, last, CHUNK):
            stop = min(last, start + CHUNK)
            dropped = scratch[:stop - start]
            onto_chunk = None if flat_onto is None else flat_onto[start:stop]
            running = [buffer[:stop - start] for buffer in (*sums, *counts)]
            total = out[start:stop] if onto_chunk is None else summed[:stop - start]
            total.fill(0)
            for position, (read, stream) in enumerate(present):
                if ties:  # DARE in place of the magnitude trim: a cut of 0 keeps every entry
                    kept += dare_drop(read(start, stop), stream, start, threshold, divisor, dropped, False)
                    ties_step(position, len(present), dropped, np.float32(0.0), running, True, onto_chunk, factor,
                              out[start:stop])
                else:  # added into the running sum as it is drawn (the bits of np.add of the dropped chunk)
                    kept += dare_drop(read(start, stop), stream, start, threshold, divisor, total, True)
            if not ties and onto_chunk is not None:
                np.multiply(total, factor, out=total)
                np.add(onto_chunk, total, out=out[start:stop])
        return kept

    if not present:
        out[:] = 0.0 if flat_onto is None else flat_onto
        return torch.from_numpy(out).view(shape), 0, 0
    kept = sum(in_chunks(numel, merge_range))
    return torch.from_numpy(out).view(shape), kept, numel * len(present)


def run(inputs: MergeInputs, params: DareParams, ctx: JobContext) -> MethodResult:
    seed = params.seed if params.seed is not None else ctx.seed
    counts = [0, 0]  # surviving entries, entries

    def counted(name: str, taus: Sequence[torch.Tensor | None], onto: torch.Tensor | None = None,
                scale: float = 1.0) -> torch.Tensor:
        merged, kept, entries = dare_merge(name, taus, params, seed, onto, scale)
        counts[0] += kept
        counts[1] += entries
        return merged

    scaling = params.resolved_scaling
    written = write_scaled_merge(inputs, ctx, counted, params.validation_datasets, params.scaling_grid, scaling,
                                 given_or_default(params, "scaling") | {"value": scaling},
                                 scaled_delta=lambda name, base, taus, scale: counted(name, taus, base, scale))
    metrics = written.metrics
    metrics["chosen"] = {
        "drop_rate": given_or_default(params, "drop_rate"), "rescale": given_or_default(params, "rescale"),
        "combine": given_or_default(params, "combine"), "scaling": written.chosen_scaling,
        "seed": chosen(seed, "given" if params.seed is not None else "the job's seed"),
    }
    metrics.update(tensors=written.tensors, kept_fraction=counts[0] / counts[1] if counts[1] else 0.0)
    return MethodResult(written.path, metrics=metrics)

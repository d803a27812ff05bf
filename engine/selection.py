"""Exact top-k magnitude cuts without sorting: a radix select on the bits of float32 magnitudes.

A non-negative float32's bit pattern, read as an int32, orders exactly as the float does. So the k-th largest
magnitude is found by counting entries per high 16 bits (one pass, a 32768-bin histogram), picking the bin
that holds the k-th largest, then counting that bin's entries per low 16 bits (a second pass). Every pass
streams chunk by chunk, so memory is one chunk and the counts, and the answer is the very value
torch.kthvalue gives over the concatenated magnitudes (ties included), at a fraction of its cost.

Many ranks at once (an upload's 100 cuts) need about 100 first-level bins, and 100 rows of 2^16 counts (26 MB)
written at random missed the cache at nearly every entry (0.69 s of a 351 MB vector's 1.1 s validation). So
beyond a few bins the low 16 bits are taken 8 at a time, in two passes whose rows of 2^8 counts stay in cache.
"""
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from engine.kernels import (
    HIGH_BINS,
    LOW_BINS,
    SPLIT_BINS,
    abs_sum,
    chunk_measures,
    high_histogram,
    low16_histograms,
    low_histograms,
    mid_histograms,
)
from engine.streaming import CHUNK
from engine.task_vectors import TaskVectorFile

PERCENTS = tuple(range(1, 101))  # the top_k values whose cuts a task vector carries from its upload


def mean_magnitude(read: Callable[[int, int], np.ndarray], numel: int) -> np.float32:
    """mean |x| over a tensor read chunk by chunk, in float32: chunk sums in float64, added in chunk order, so
    the value is the same whatever reads it and on however many threads (an upload measures it, STA's data-free
    masks use it); 0 for an empty tensor."""
    total = 0.0
    for start in range(0, numel, CHUNK):
        total += abs_sum(read(start, min(numel, start + CHUNK)))
    return _mean(total, numel)


def _mean(total: float, numel: int) -> np.float32:
    """A tensor's mean magnitude from its float64 sum of |x|, as every reader rounds it; 0 for an empty tensor."""
    return np.float32(total / numel) if numel else np.float32(0.0)


def file_magnitude_means(path: Path) -> dict[str, float]:
    """mean |tau| of every float tensor of a task vector file (LoRA factors as their product), by name."""
    vector = TaskVectorFile(path)
    return {name: float(mean_magnitude(partial(vector.float32, name), math.prod(vector.shape(name))))
            for name in vector.float_names()}


def _bin_from_top(counts: np.ndarray, rank: int) -> tuple[int, int]:
    """(bin holding the rank-th largest entry, entries in the bins above it); rank counts from 1."""
    from_top = np.cumsum(counts[::-1])
    index = int(np.searchsorted(from_top, rank))
    if index == len(counts):  # counts not of the entries the rank was computed over: never a wrong answer
        raise ValueError(f"rank {rank} beyond the {int(from_top[-1])} entries counted")
    above = int(from_top[index - 1]) if index > 0 else 0
    return len(counts) - 1 - index, above


def _high_histogram(chunks: Callable[[], Iterable[np.ndarray]]) -> np.ndarray:
    high = np.zeros(HIGH_BINS, dtype=np.int64)
    for chunk in chunks():
        if chunk.dtype != np.float32:  # the bit tricks read 4-byte floats; anything else would be misread
            raise TypeError(f"{chunk.dtype} chunk: magnitudes are selected in float32")
        high_histogram(chunk, high)
    return high


def _as_float(bits: int) -> float:
    return float(np.array([bits], dtype=np.int32).view(np.float32)[0])


# Up to this many first-level bins, the low 16 bits are one level: rows of 2^16 counts, 256 KiB each in int32
FEW_BINS = 2


def _narrowed(counts: np.ndarray, slot_of: Callable[[int], int], located: dict[int, tuple[int, int]],
              width: int) -> dict[int, tuple[int, int]]:
    """One more level for each rank: from (bits so far, entries above that prefix's bin) and the level's
    counts per prefix slot, (the bits extended by this level's `width`, entries above the narrower bin)."""
    narrowed = {}
    for rank, (prefix, above) in located.items():
        level_bin, level_above = _bin_from_top(counts[slot_of(prefix)], rank - above)
        narrowed[rank] = ((prefix << width) | level_bin, above + level_above)
    return narrowed


def _select(chunks: Callable[[], Iterable[np.ndarray]], ranks_of: Callable[[int], list[int]],
            high: np.ndarray | None = None) -> list[float]:
    """The rank-th largest magnitudes over every entry of chunks() (called once per level: twice, or three times
    for ranks over more than FEW_BINS first-level bins; once less if `high`, the first level's counts, is given),
    for the ranks that ranks_of(number of entries) gives; a rank of 0 gives 0.0. Every rank is served by the same
    passes: a row of counts per distinct prefix at each level after the first, and a last row for the entries no
    rank needs."""
    if high is None:
        high = _high_histogram(chunks)
    total = int(high.sum())
    ranks = ranks_of(total)
    located = {rank: _bin_from_top(high, rank) for rank in set(ranks) if rank > 0}
    if not located:
        return [0.0] * len(ranks)
    count_type = np.int32 if total < 2**31 else np.int64  # a cell's count; int32 for any file under 8 GiB of floats
    high_bins = sorted({high_bin for high_bin, _ in located.values()})
    slot_of_high = np.full(HIGH_BINS, len(high_bins), dtype=np.int32)
    slot_of_high[high_bins] = np.arange(len(high_bins), dtype=np.int32)
    high_slot = slot_of_high.__getitem__

    if len(high_bins) <= FEW_BINS:
        low = np.zeros((len(high_bins) + 1, LOW_BINS), dtype=count_type)
        for chunk in chunks():
            low16_histograms(chunk, slot_of_high, low)
        located = _narrowed(low, high_slot, located, 16)
    else:
        mid = np.zeros((len(high_bins) + 1, SPLIT_BINS), dtype=count_type)
        for chunk in chunks():
            mid_histograms(chunk, slot_of_high, mid)
        located = _narrowed(mid, high_slot, located, 8)
        pairs = sorted({prefix for prefix, _ in located.values()})
        slot_of_mid = np.full((len(high_bins) + 1, SPLIT_BINS), len(pairs), dtype=np.int32)
        for slot, prefix in enumerate(pairs):
            slot_of_mid[high_slot(prefix >> 8), prefix & 0xFF] = slot
        low = np.zeros((len(pairs) + 1, SPLIT_BINS), dtype=count_type)
        for chunk in chunks():
            low_histograms(chunk, slot_of_high, slot_of_mid, low)
        located = _narrowed(low, lambda pair: slot_of_mid[high_slot(pair >> 8), pair & 0xFF], located, 8)
    return [_as_float(located[rank][0]) if rank > 0 else 0.0 for rank in ranks]


def kth_largest_magnitude(chunks: Callable[[], Iterable[np.ndarray]], k: int) -> float:
    """The k-th largest |x| over every entry of the float32 arrays chunks() yields (called twice: one pass per
    level); k >= 1 and at most the number of entries."""
    def ranks_of(total: int) -> list[int]:
        if k < 1 or k > total:
            raise ValueError(f"k={k} outside 1..{total}")
        return [k]
    return _select(chunks, ranks_of)[0]


def top_k_cuts(chunks: Callable[[], Iterable[np.ndarray]], percents: Iterable[float] = PERCENTS,
               high: np.ndarray | None = None) -> list[float]:
    """For each top_k percent, the magnitude at or above which entries are in the top_k percent of all the
    entries chunks() yields (TIES's trim: ceil(top_k% of the entries) kept, ties at the cut too; 0.0 where
    that keeps everything), all from the same passes."""
    def ranks_of(total: int) -> list[int]:
        keeps = [math.ceil(p / 100 * total) for p in percents]
        return [keep if keep < total else 0 for keep in keeps]
    return _select(chunks, ranks_of, high)


def file_top_k_cuts(path: Path, names: set[str] | None = None, percents: Iterable[float] = PERCENTS,
                    chunk: int = CHUNK) -> list[float]:
    """top_k_cuts over the named float tensors of a task vector file (all of them by default; LoRA factors
    count as their product), as if flattened together; read chunk by chunk, once per level, never concatenated."""
    vector = TaskVectorFile(path)
    present = sorted(name for name in vector.float_names() if names is None or name in names)
    return top_k_cuts(partial(_vector_chunks, vector, present, chunk), percents)


def _vector_chunks(vector: TaskVectorFile, names: list[str], chunk: int) -> Iterator[np.ndarray]:
    """The named tensors' values as float32, chunk by chunk, one tensor after another."""
    for name in names:
        numel = math.prod(vector.shape(name))
        for start in range(0, numel, chunk):
            yield vector.float32(name, start, start + chunk)


@dataclass(frozen=True)
class VectorMeasures:
    """What an upload measures of a task vector's values."""

    non_finite: list[str]  # float tensors holding NaN or Inf as float32 (a float64 beyond its range too)
    l2_norm: float  # of the dense task vector as merges read it (float32; LoRA factors as their product), summed
    # in float64; NaN, and the means and cuts empty, when a tensor is not finite
    magnitude_means: dict[str, float]  # file_magnitude_means' values: STA's data-free masks read them
    magnitude_cuts: list[float]  # file_top_k_cuts' values for PERCENTS: TIES reads them


def measure_vector(vector: TaskVectorFile) -> VectorMeasures:
    """Finiteness, L2 norm, per-tensor mean magnitudes and the first level of the top-k cuts in one pass over
    the vector's values as merges read them, float32 (engine.kernels.chunk_measures, chunk by chunk), then the
    cuts' remaining levels: three passes in all, where the separate measurements (finiteness and norm, the
    means, the cuts' three levels) made five. Means and cuts are bit for bit the ones file_magnitude_means and
    file_top_k_cuts give (the same chunks, sums in the same order) for the same layout: the upload passes the
    layout that knows the base, which differs from a merge's only for a base tensor named like a LoRA factor."""
    names = vector.float_names()
    high = np.zeros(HIGH_BINS, dtype=np.int64)
    non_finite, squared, means = [], 0.0, {}
    for name in names:
        numel = math.prod(vector.shape(name))
        finite, absolute = True, 0.0
        for start in range(0, numel, CHUNK):
            chunk_finite, chunk_absolute, chunk_squared = chunk_measures(
                vector.float32(name, start, min(numel, start + CHUNK)), high)
            finite, absolute, squared = finite and chunk_finite, absolute + chunk_absolute, squared + chunk_squared
        if not finite:
            non_finite.append(name)
        means[name] = float(_mean(absolute, numel))
    if non_finite:
        return VectorMeasures(non_finite, math.nan, {}, [])
    cuts = top_k_cuts(partial(_vector_chunks, vector, names, CHUNK), PERCENTS, high)
    return VectorMeasures([], math.sqrt(squared), means, cuts)

"""Exact top-k magnitude cuts without sorting: a two-level radix select on the bits of float32 magnitudes.

A non-negative float32's bit pattern, read as an int32, orders exactly as the float does. So the k-th largest
magnitude is found by counting entries per high 16 bits (one pass, a 32768-bin histogram), picking the bin
that holds the k-th largest, then counting that bin's entries per low 16 bits (a second pass). Both passes
stream chunk by chunk, so memory is one chunk, and the answer is the very value torch.kthvalue gives
over the concatenated magnitudes (ties included), at a fraction of its cost.
"""
from collections.abc import Callable, Iterable

import numpy as np

from engine.kernels import HIGH_BINS, LOW_BINS, high_histogram, low_histogram


def _bin_from_top(counts: np.ndarray, rank: int) -> tuple[int, int]:
    """(bin holding the rank-th largest entry, entries in the bins above it); rank counts from 1."""
    from_top = np.cumsum(counts[::-1])
    index = int(np.searchsorted(from_top, rank))
    above = int(from_top[index - 1]) if index > 0 else 0
    return len(counts) - 1 - index, above


def kth_largest_magnitude(chunks: Callable[[], Iterable[np.ndarray]], k: int) -> float:
    """The k-th largest |x| over every entry of the float32 arrays chunks() yields (called twice: one pass
    per level); k >= 1 and at most the number of entries."""
    high = np.zeros(HIGH_BINS, dtype=np.int64)
    for chunk in chunks():
        if chunk.dtype != np.float32:  # the bit tricks read 4-byte floats; anything else would be misread
            raise TypeError(f"{chunk.dtype} chunk: magnitudes are selected in float32")
        high_histogram(chunk, high)
    if k < 1 or k > int(high.sum()):
        raise ValueError(f"k={k} outside 1..{int(high.sum())}")
    high_bin, above = _bin_from_top(high, k)
    low = np.zeros(LOW_BINS, dtype=np.int64)
    for chunk in chunks():
        low_histogram(chunk, high_bin, low)
    low_bin, _ = _bin_from_top(low, k - above)
    return float(np.array([(high_bin << 16) | low_bin], dtype=np.int32).view(np.float32)[0])

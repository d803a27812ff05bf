"""Fused loops for the training-free merges, compiled with numba.

A merge step written as torch operations makes one pass over memory per operation (abs, compare,
where, add, ...) and a temporary for each; TIES took about ten such passes per task vector per entry.
These kernels do the same arithmetic in one loop over a chunk small enough to stay in cache, in the
same order, so the results are bit-for-bit those of the torch formulation (tests/test_engine_selection.py
checks them against an independent two-pass reference).

Inputs are 1-D float32 numpy arrays (memory-mapped task vectors are converted chunk by chunk by the
callers). `cache=True` keeps the compiled code beside this file, so only the first process compiles.
"""
import math

import numba
import numpy as np

HIGH_BINS = 1 << 15  # a magnitude's sign bit is 0, so its high 16 bits are below 2**15
LOW_BINS = 1 << 16  # the second level when it is the last: the low 16 bits
SPLIT_BINS = 1 << 8  # the second and third levels when the low 16 bits are split: 8 bits each
MAGNITUDE_MASK = 0x7FFFFFFF


@numba.njit(cache=True, nogil=True)
def high_histogram(values: np.ndarray, counts: np.ndarray) -> None:
    """counts[high 16 bits of |v|] += 1 for every v (float32): the first level of a radix select."""
    bits = values.view(np.int32)
    for j in range(bits.shape[0]):
        counts[(bits[j] & MAGNITUDE_MASK) >> 16] += 1


@numba.njit(cache=True, nogil=True)
def low16_histograms(values: np.ndarray, slot_of_high: np.ndarray, counts: np.ndarray) -> None:
    """counts[slot_of_high[high], low 16 bits] += 1 for every |v| whose high 16 bits some rank needs: the second
    and last level, for a few ranks. Bins no rank needs map to the last row and are skipped (a branch that
    predicts well: few bins are needed, so most entries are skipped)."""
    bits = values.view(np.int32)
    discarded = counts.shape[0] - 1
    for j in range(bits.shape[0]):
        magnitude = bits[j] & MAGNITUDE_MASK
        slot = slot_of_high[magnitude >> 16]
        if slot != discarded:
            counts[slot, magnitude & 0xFFFF] += 1


@numba.njit(cache=True, nogil=True)
def chunk_measures(values: np.ndarray, counts: np.ndarray) -> tuple[bool, float, float]:
    """An upload's one pass over a float32 chunk: (no NaN or Inf, sum |v|, sum v^2), both sums in float64 in
    index order (sum |v| is abs_sum's), and high_histogram's counts."""
    bits = values.view(np.int32)
    exponent = np.int32(0x7F800000)
    found = 0
    absolute = 0.0
    squared = 0.0
    for j in range(bits.shape[0]):
        found |= (bits[j] & exponent) == exponent
        value = np.float64(values[j])
        absolute += abs(value)
        squared += value * value
        counts[(bits[j] & MAGNITUDE_MASK) >> 16] += 1
    return found == 0, absolute, squared


@numba.njit(cache=True, nogil=True)
def mid_histograms(values: np.ndarray, slot_of_high: np.ndarray, counts: np.ndarray) -> None:
    """counts[slot_of_high[high], bits 15..8] += 1 for every |v|: the second level of several radix selects at
    once. Bins that hold no wanted rank map to a last, discarded row: no branch on the data, which mispredicted
    at random entries and cost 4x the first level."""
    bits = values.view(np.int32)
    for j in range(bits.shape[0]):
        magnitude = bits[j] & MAGNITUDE_MASK
        counts[slot_of_high[magnitude >> 16], (magnitude >> 8) & 0xFF] += 1


@numba.njit(cache=True, nogil=True)
def low_histograms(values: np.ndarray, slot_of_high: np.ndarray, slot_of_mid: np.ndarray,
                   counts: np.ndarray) -> None:
    """counts[slot_of_mid[slot_of_high[high], bits 15..8], bits 7..0] += 1 for every |v| whose prefix some rank
    needs: the third level. Prefixes no rank needs map to the last row, as in mid_histograms, but here they are
    skipped: nearly every entry's is, so the branch predicts well, and it spares stores that all hit one row."""
    bits = values.view(np.int32)
    discarded = counts.shape[0] - 1
    for j in range(bits.shape[0]):
        magnitude = bits[j] & MAGNITUDE_MASK
        slot = slot_of_mid[slot_of_high[magnitude >> 16], (magnitude >> 8) & 0xFF]
        if slot != discarded:
            counts[slot, magnitude & 0xFF] += 1


@numba.njit(cache=True, nogil=True, inline="always")
def _trimmed(value, cut):
    """TIES's trim of one entry, split by sign: (kept positive part, kept negative part, kept > 0, kept < 0).
    Selects, not ifs, so the loops that call it vectorise: which entries are kept is data, and a branch on
    it mispredicts at every other entry. The kept value is positive + negative exactly, one of them being 0."""
    zero = np.float32(0.0)
    up = (value >= cut) & (value > zero)  # a cut of 0 keeps zeros, which count on neither side
    down = (value <= -cut) & (value < zero)
    return (value if up else zero), (value if down else zero), up, down


@numba.njit(cache=True, nogil=True, inline="always")
def _disjoint(elected, positive_total, negative_total, positive_count, negative_count, mean):
    """The elected sign's agreeing entries' sum, or their mean, from the running sums kept apart by sign."""
    zero = np.float32(0.0)
    if elected > 0:
        total, count = positive_total, positive_count
    elif elected < 0:
        total, count = negative_total, negative_count
    else:
        total, count = zero, 0
    if not mean:
        return total
    if count > 0:
        return total / np.float32(count)
    return zero


@numba.njit(cache=True, nogil=True)
def ties_begin(tau: np.ndarray, cut: np.float32, trimmed_sum: np.ndarray, positive_sum: np.ndarray,
               negative_sum: np.ndarray, positive_count: np.ndarray, negative_count: np.ndarray) -> None:
    """Start the running sums and counts from the first task vector's trimmed entries (|tau| >= cut): what
    ties_accumulate adds to zeroed sums, without reading them."""
    for j in range(tau.shape[0]):
        positive, negative, up, down = _trimmed(tau[j], cut)
        trimmed_sum[j] = positive + negative
        positive_sum[j] = positive
        negative_sum[j] = negative
        positive_count[j] = up
        negative_count[j] = down


@numba.njit(cache=True, nogil=True)
def ties_accumulate(tau: np.ndarray, cut: np.float32, trimmed_sum: np.ndarray, positive_sum: np.ndarray,
                    negative_sum: np.ndarray, positive_count: np.ndarray, negative_count: np.ndarray) -> None:
    """Add one task vector's trimmed entries (|tau| >= cut) to the running sums and counts."""
    for j in range(tau.shape[0]):
        positive, negative, up, down = _trimmed(tau[j], cut)
        trimmed_sum[j] += positive + negative
        positive_sum[j] += positive
        negative_sum[j] += negative
        positive_count[j] += up
        negative_count[j] += down


@numba.njit(cache=True, nogil=True)
def ties_finish(tau: np.ndarray, cut: np.float32, trimmed_sum: np.ndarray, positive_sum: np.ndarray,
                negative_sum: np.ndarray, positive_count: np.ndarray, negative_count: np.ndarray, mean: bool,
                onto, scale: np.float32, out: np.ndarray) -> int:
    """ties_accumulate of the last task vector and the resolve in one pass (each entry's sign elected from its
    trimmed sum, then the agreeing entries' sum or mean), the running sums read but not written back:
    out = the merged entries (onto None) or onto + scale * merged (float32, as torch computes
    base + lambda * delta). Returns how many merged entries are nonzero."""
    nonzero = 0
    for j in range(out.shape[0]):
        positive, negative, up, down = _trimmed(tau[j], cut)
        merged = _disjoint(trimmed_sum[j] + (positive + negative), positive_sum[j] + positive,
                           negative_sum[j] + negative, positive_count[j] + up, negative_count[j] + down, mean)
        nonzero += merged != np.float32(0.0)
        if onto is None:
            out[j] = merged
        else:
            out[j] = onto[j] + scale * merged
    return nonzero


def ties_step(position: int, vectors: int, tau: np.ndarray, cut: np.float32, running: list[np.ndarray], mean: bool,
              onto: np.ndarray | None, scale: np.float32, out: np.ndarray) -> int:
    """Task vector `position` (of `vectors`) over one chunk: ties_begin for the first, ties_accumulate for the
    middle ones, ties_finish for the last (writing out; returns its count of nonzero merged entries, else 0).
    running: the chunk's three sums and two counts (counts of a type that holds `vectors`)."""
    if position == vectors - 1:
        if vectors == 1:
            for buffer in running:
                buffer.fill(0)
        return ties_finish(tau, cut, *running, mean, onto, scale, out)
    if position == 0:
        ties_begin(tau, cut, *running)
    else:
        ties_accumulate(tau, cut, *running)
    return 0


def ties_count_type(vectors: int) -> type:
    """The smallest count type ties_step's running counts can use: a count never exceeds the vectors."""
    return np.uint8 if vectors <= np.iinfo(np.uint8).max else np.int32


@numba.njit(cache=True, nogil=True)
def _no_all_ones_exponent(bits: np.ndarray, exponent: int) -> bool:
    found = 0
    for j in range(bits.shape[0]):
        found |= (bits[j] & exponent) == exponent  # an integer OR: the loop vectorises
    return found == 0


def all_finite(values: np.ndarray) -> bool:
    """No NaN and no infinity in a float32 or float64 array: none has an exponent of all ones. One
    vectorised pass over the bits, no temporary, no torch (whose thread team, started from a writer
    thread, competed with the merge's own threads)."""
    if values.dtype == np.float32:
        return _no_all_ones_exponent(values.view(np.int32), np.int32(0x7F800000))
    return _no_all_ones_exponent(values.view(np.int64), np.int64(0x7FF0000000000000))


@numba.njit(cache=True, nogil=True)
def masked_accumulate(tau: np.ndarray, packed: np.ndarray, first: int, sign: np.float32, total: np.ndarray) -> None:
    """total[j] += sign * (tau[j] if mask bit first + j is set else 0), the mask bit-packed as numpy's
    packbits packs it (big-endian within a byte): STA's fusion of one task vector, without unpacking."""
    zero = np.float32(0.0)
    for j in range(tau.shape[0]):
        position = first + j
        kept = (packed[position >> 3] >> (7 - (position & 7))) & 1
        total[j] += sign * (tau[j] if kept else zero)


@numba.njit(cache=True, nogil=True)
def threshold_mask(importance: np.ndarray, mean: np.float32, threshold: np.float32, packed: np.ndarray) -> int:
    """STA's selection of one tensor, bit-packed as numpy's packbits packs it into the zeroed packed:
    score = importance / mean (float32, as torch divides), kept where score >= threshold and > 0.
    Returns how many are kept; a mean of 0 keeps none."""
    if not mean > 0:
        return 0
    kept = 0
    for j in range(importance.shape[0]):
        score = importance[j] / mean
        keep = (score >= threshold) & (score > 0)
        packed[j >> 3] |= np.uint8(keep) << np.uint8(7 - (j & 7))
        kept += keep
    return kept


@numba.njit(cache=True, nogil=True)
def threshold_accumulate(tau: np.ndarray, mean: np.float32, threshold: np.float32, sign: np.float32,
                         total: np.ndarray) -> int:
    """STA's data-free default for one task vector's chunk in one loop: threshold_mask's selection of |tau|
    (score = |tau| / mean >= threshold and > 0; a mean of 0 keeps none) and masked_accumulate's
    total[j] += sign * kept tau[j], the same arithmetic without the bits between them. Returns how many kept."""
    if not mean > 0:
        return 0
    zero = np.float32(0.0)
    kept = 0
    for j in range(tau.shape[0]):
        score = abs(tau[j]) / mean
        keep = (score >= threshold) & (score > 0)
        total[j] += sign * (tau[j] if keep else zero)
        kept += keep
    return kept


GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # splitmix64's increment
LOW_32 = np.uint64(0xFFFFFFFF)


@numba.njit(cache=True, nogil=True)
def splitmix64(z: np.uint64) -> np.uint64:
    """splitmix64's output function (Steele, Lea and Flood 2014): a well-mixed 64-bit hash of z."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def drop_threshold(drop_rate: float) -> np.uint64:
    """The 32-bit draw above which an entry survives: draw / 2**32 > drop_rate exactly when draw > this."""
    return np.uint64(math.floor(drop_rate * 2**32))


@numba.njit(cache=True, nogil=True, inline="always")
def _pair_output(stream: np.uint64, index: int) -> np.uint64:
    """splitmix64's output that holds entry index's draw (outputs are counted from 1)."""
    return splitmix64(stream + np.uint64((index >> 1) + 1) * GOLDEN_GAMMA)


@numba.njit(cache=True, nogil=True, inline="always")
def _put_survivor(out: np.ndarray, at: int, value: np.float32, draw: np.uint64, threshold: np.uint64,
                  divisor: np.float32, accumulate: bool) -> None:
    survivor = value / divisor if draw > threshold else np.float32(0.0)
    if accumulate:
        out[at] += survivor
    else:
        out[at] = survivor


@numba.njit(cache=True, nogil=True)
def dare_drop(tau: np.ndarray, stream: np.uint64, first: int, threshold: np.uint64, divisor: np.float32,
              out: np.ndarray, accumulate: bool) -> int:
    """DARE's drop of entries first .. first + len(tau) of one task vector's tensor: out[j] = tau[j] / divisor if
    the entry survives, else 0 (accumulate: out[j] += that, the sum of vectors without a pass of its own).
    Entries 2k and 2k + 1 draw the high and the low 32 bits of splitmix64's (k + 1)-th output
    (splitmix64(stream + (k + 1) * gamma)), and an entry survives when its draw exceeds threshold
    (drop_threshold). A draw depends on the entry's index alone, so any chunking or threading gives the same
    bytes. Two draws per hash: 0.079 s per 88M entries on one core here, against 0.112 s for one 53-bit draw per
    hash. Returns how many survived."""
    count = tau.shape[0]
    j = 0
    kept = 0
    if first & 1 and count:  # an odd first entry is the low half of its pair
        draw = _pair_output(stream, first) & LOW_32
        _put_survivor(out, 0, tau[0], draw, threshold, divisor, accumulate)
        kept += draw > threshold
        j = 1
    for k in range((count - j) >> 1):
        at = j + 2 * k
        output = _pair_output(stream, first + at)
        high, low = output >> np.uint64(32), output & LOW_32
        _put_survivor(out, at, tau[at], high, threshold, divisor, accumulate)
        _put_survivor(out, at + 1, tau[at + 1], low, threshold, divisor, accumulate)
        kept += (high > threshold) + (low > threshold)
    if (count - j) & 1:  # an even last entry is the high half of its pair
        draw = _pair_output(stream, first + count - 1) >> np.uint64(32)
        _put_survivor(out, count - 1, tau[count - 1], draw, threshold, divisor, accumulate)
        kept += draw > threshold
    return kept


@numba.njit(cache=True, nogil=True)
def abs_sum(values: np.ndarray) -> float:
    """sum |v| over a float32 chunk, accumulated in float64 in index order."""
    total = 0.0
    for j in range(values.shape[0]):
        total += abs(np.float64(values[j]))
    return total


def warm_up() -> None:
    """Compile (or load from numba's cache) every kernel for the array types merges pass them: writable
    arrays and read-only memory-map views. A worker calls this at start so that no job pays for it."""
    counts_high = np.zeros(HIGH_BINS, np.int64)
    writable = np.ones(4, np.float32)
    read_only = np.frombuffer(writable.tobytes(), np.float32)
    sums = [np.zeros(4, np.float32) for _ in range(3)]
    slots = np.zeros(HIGH_BINS, np.int32)
    mid_slots = np.zeros((1, SPLIT_BINS), np.int32)
    for values in (writable, read_only):
        high_histogram(values, counts_high)
        abs_sum(values)
        chunk_measures(values, counts_high)
        for dtype in (np.int32, np.int64):
            low16_histograms(values, slots, np.zeros((1, LOW_BINS), dtype))
            mid_histograms(values, slots, np.zeros((1, SPLIT_BINS), dtype))
            low_histograms(values, slots, mid_slots, np.zeros((1, SPLIT_BINS), dtype))
        for count_type in (np.uint8, np.int32):  # TIES: a byte per count up to 255 vectors
            running = [*sums, *(np.zeros(4, count_type) for _ in range(2))]
            ties_begin(values, np.float32(0.5), *running)
            ties_accumulate(values, np.float32(0.5), *running)
            for onto in (None, writable, read_only):
                ties_finish(values, np.float32(0.5), *running, True, onto, np.float32(1.0), np.empty(4, np.float32))
    for values in (writable, read_only, writable.astype(np.float64)):
        all_finite(values)
    threshold_mask(writable, np.float32(1.0), np.float32(1.0), np.zeros(1, np.uint8))
    for values in (writable, read_only):
        masked_accumulate(values, np.zeros(1, np.uint8), 0, np.float32(1.0), np.zeros(4, np.float32))
        for accumulate in (False, True):
            dare_drop(values, np.uint64(1), 0, drop_threshold(0.5), np.float32(0.5), np.zeros(4, np.float32),
                      accumulate)
        threshold_accumulate(values, np.float32(1.0), np.float32(1.0), np.float32(1.0), np.zeros(4, np.float32))


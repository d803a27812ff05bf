"""The radix top-k cut against torch's own selection, and TIES's one-pass merge against the two-pass reference."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.methods.ties.method import counted_ties_merge, ties_merge
from engine.selection import kth_largest_magnitude

finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)  # subnormals and zeros too


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(finite32, min_size=1, max_size=40), min_size=1, max_size=4), st.data())
def test_kth_largest_magnitude_is_kthvalue_over_the_concatenation(chunks, data):
    tensors = [torch.tensor(chunk, dtype=torch.float32) for chunk in chunks]
    flat = torch.cat(tensors).abs()
    k = data.draw(st.integers(1, flat.numel()))
    expected = float(flat.kthvalue(flat.numel() - k + 1).values)
    assert kth_largest_magnitude(lambda: (t.numpy() for t in tensors), k) == expected


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 2000), st.integers(0, 2**31), st.sampled_from([torch.float16, torch.bfloat16, torch.float32]))
def test_kth_largest_magnitude_with_many_ties_and_zeros(size, seed, dtype):
    generator = torch.Generator().manual_seed(seed)
    values = (torch.randint(-5, 6, (size,), generator=generator) * 0.25).to(dtype)  # few distinct values, zeros
    k = int(torch.randint(1, size + 1, (1,), generator=generator))
    flat = values.float().abs()
    assert kth_largest_magnitude(lambda: [flat.numpy()], k) == float(flat.kthvalue(size - k + 1).values)


def test_kth_largest_magnitude_refuses_other_dtypes_and_a_k_out_of_range():
    with pytest.raises(TypeError):
        kth_largest_magnitude(lambda: [np.ones(3)], 1)  # float64: its bits would be misread
    with pytest.raises(ValueError):
        kth_largest_magnitude(lambda: [np.ones(3, np.float32)], 4)


def two_pass_reference(taus, top_k, cuts, merge):
    """The TIES code's order of work (ties_minimal.ipynb): trim all, elect by the sum, then merge agreeing."""
    trimmed = []
    for index, tau in enumerate(taus):
        if tau is None:
            continue
        if cuts is None:
            flat = tau.abs().flatten()
            keep = int(np.ceil(top_k / 100 * flat.numel()))
            cut = 0.0 if keep >= flat.numel() else float(flat.kthvalue(flat.numel() - keep + 1).values)
        else:
            cut = cuts[index]
        trimmed.append(torch.where(tau.abs() >= cut, tau, torch.zeros_like(tau)))
    total_sum = torch.zeros_like(trimmed[0])
    for t in trimmed:
        total_sum += t
    elected = torch.sign(total_sum)
    total, count = torch.zeros_like(total_sum), torch.zeros_like(total_sum)
    for t in trimmed:
        agrees = (torch.sign(t) == elected) & (t != 0)
        total += torch.where(agrees, t, torch.zeros_like(t))
        count += agrees
    if merge == "sum":
        return total
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 6), st.integers(1, 300), st.sampled_from([5.0, 20.0, 60.0, 100.0]),
       st.sampled_from(["mean", "sum"]), st.booleans(), st.sampled_from([None, 0, 1, -1]),
       st.sampled_from([None, 0.3, 1.0, -0.7]), st.integers(0, 2**31))
def test_one_pass_ties_equals_the_two_pass_reference_bit_for_bit(n, size, top_k, merge, global_cuts, gap, scale,
                                                                 seed):
    generator = torch.Generator().manual_seed(seed)
    taus = [(torch.randn(size, generator=generator) * 4).round() / 4 for _ in range(n)]  # ties and exact zeros
    if gap is not None and n > 1:
        taus[gap] = None  # a vector without this tensor: second, or last (the one that resolves)
    cuts = [float(torch.rand(1, generator=generator)) for _ in range(n)] if global_cuts else None
    expected = two_pass_reference(taus, top_k, cuts, merge)
    if scale is None:
        merged, nonzero = counted_ties_merge(taus, top_k, cuts, merge)
    else:  # onto + lambda * merged in the same pass, as a streamed merge writes it
        onto = torch.randn(size, generator=generator)
        merged, nonzero = counted_ties_merge(taus, top_k, cuts, merge, onto, scale)
        expected = onto + scale * expected
    assert torch.equal(merged.view(torch.int32), expected.view(torch.int32))
    assert nonzero == int((two_pass_reference(taus, top_k, cuts, merge) != 0).sum())


def test_ties_mean_over_more_vectors_than_a_byte_counts():
    generator = torch.Generator().manual_seed(3)
    taus = [(torch.randn(40, generator=generator) * 4).round().abs() / 4 + 0.25 for _ in range(300)]  # all agree
    expected = two_pass_reference(taus, 100.0, None, "mean")
    assert torch.equal(ties_merge(taus, 100.0, None, "mean").view(torch.int32), expected.view(torch.int32))


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 300), st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
       st.sampled_from([None, float("nan"), float("inf"), float("-inf")]), st.data())
def test_all_finite_is_isfinite_all(size, dtype, bad, data):
    from engine.safetensors_io import all_finite

    values = torch.randn(size).to(dtype)
    if bad is not None:
        values[data.draw(st.integers(0, size - 1))] = bad
    assert all_finite(values) == bool(values.isfinite().all())


@pytest.mark.parametrize("merge", ["mean", "sum"])
def test_merges_split_over_threads_give_the_same_bits(merge):
    from engine.methods.task_arithmetic.method import scaled_sum
    from engine.streaming import CHUNK

    generator = torch.Generator().manual_seed(0)
    size = 3 * CHUNK + 5  # ranges that end inside a chunk
    taus = [(torch.randn(size, generator=generator) * 4).round() / 4 for _ in range(3)]
    base = torch.randn(size, generator=generator)
    cuts = [0.5, 1.0, 0.25]
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        merged, summed = ties_merge(taus, 20, cuts, merge), scaled_sum(base, taus, 0.3)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(merged.view(torch.int32), two_pass_reference(taus, 20, cuts, merge).view(torch.int32))
    expected = base + 0.3 * (torch.zeros(size) + taus[0] + taus[1] + taus[2])
    assert torch.equal(summed.view(torch.int32), expected.view(torch.int32))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3000), st.integers(0, 2**31),
       st.sampled_from(["normal", "coarse", "one_high_bin", "one_pair", "all_in_one_high_bin"]))
def test_top_k_cuts_are_each_percents_kth_largest(size, seed, spread):
    from engine.selection import PERCENTS, top_k_cuts

    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(size, generator=generator)
    if spread == "coarse":
        values = (values * 4).round() / 4  # ties and exact zeros
    elif spread == "all_in_one_high_bin":  # every rank in one first-level bin: the one 16-bit level
        values = 1 + torch.rand(size, generator=generator) * 2**-7
    elif spread != "normal":  # two thirds of the entries in one high bin, [1, 1 + 2^-7) (ranks split by the
        # middle 8 bits), or in one (high, middle) pair, [1, 1 + 2^-15) (split by the low 8 alone); the rest spread
        width = 2**-7 if spread == "one_high_bin" else 2**-15
        clustered = torch.rand(size, generator=generator) < 2 / 3
        values = torch.where(clustered, 1 + torch.rand(size, generator=generator) * width, values)
    chunks = [values[: size // 3].numpy(), values[size // 3:].numpy()]
    magnitudes = values.abs()
    expected = []
    for percent in PERCENTS:
        keep = int(np.ceil(percent / 100 * size))
        expected.append(0.0 if keep >= size else float(magnitudes.kthvalue(size - keep + 1).values))
    assert top_k_cuts(lambda: iter(chunks)) == expected


def test_file_top_k_cuts_read_every_float_dtype_as_float32(tmp_path):
    from engine.safetensors_io import save_tensors
    from engine.selection import file_top_k_cuts

    generator = torch.Generator().manual_seed(1)
    tensors = {"a": torch.randn(3, 70, generator=generator).to(torch.bfloat16),
               "b": torch.randn(500, generator=generator).half(), "c": torch.randn(7, 9, generator=generator)}
    save_tensors(tmp_path / "v.safetensors", tensors)
    flat = torch.cat([t.float().flatten() for t in tensors.values()]).abs()
    cuts = file_top_k_cuts(tmp_path / "v.safetensors", chunk=64)  # chunks that split every tensor
    for percent in (1, 20, 99):
        keep = int(np.ceil(percent / 100 * flat.numel()))
        assert cuts[percent - 1] == float(flat.kthvalue(flat.numel() - keep + 1).values)
    assert cuts[99] == 0.0


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 200), st.integers(0, 199), st.sampled_from([1.0, -1.0]), st.integers(0, 2**31))
def test_masked_accumulate_reads_packbits_masks_in_place(size, first, sign, seed):
    """STA's fusion step against unpacking the mask and adding with torch, from any offset into the mask."""
    from engine.kernels import masked_accumulate

    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(first + size, generator=generator) < 0.4
    tau = torch.randn(size, generator=generator)
    total = torch.randn(size, generator=generator)
    expected = total + sign * torch.where(mask[first:], tau, 0.0)
    out = total.numpy().copy()
    masked_accumulate(tau.numpy(), np.packbits(mask.numpy()), first, np.float32(sign), out)
    assert np.array_equal(out.view(np.int32), expected.numpy().view(np.int32))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.sampled_from([0.5, 1.0, 2.7, 3.0]), st.booleans(), st.integers(0, 2**31))
def test_threshold_mask_packs_the_bits_of_normalise_and_select(size, threshold, zeros, seed):
    from engine.kernels import threshold_mask
    from engine.methods.sta.method import normalise, pack_mask, select

    generator = torch.Generator().manual_seed(seed)
    importance = torch.rand(size, generator=generator) * (0.0 if zeros else 1.0)
    importance[torch.rand(size, generator=generator) < 0.2] = 0.0
    expected = select(normalise(importance), threshold, None)
    bits = np.zeros(-(-size // 8), np.uint8)
    kept = threshold_mask(importance.numpy(), np.float32(importance.mean()), np.float32(threshold), bits)
    assert np.array_equal(bits, pack_mask(expected).numpy()) and kept == int(expected.sum())

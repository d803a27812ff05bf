"""LoRA task vectors: the file layout, products read in any range, and every method merging factors exactly as
it merges their product stored dense."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from engine.context import MergeInputs, TaskVectorInput
from engine.methods.atlas.method import build_composition, write_checkpoint
from engine.methods.catalogue import METHODS
from engine.safetensors_io import SafetensorsError, read_header, save_tensors
from engine.task_vectors import LORA_A, LORA_B, TaskVectorFile, layout
from engine.weights import build_model
from tests.engine_jobs import SPEC, Recorder, make_job, one_thread  # noqa: F401 - fixture

pytestmark = pytest.mark.usefixtures("one_thread")


def write_lora_vector(path: Path, state: dict[str, torch.Tensor], seed: int, rank: int = 3,
                      factor_dtype: torch.dtype = torch.float32) -> Path:
    """The image tower's weight matrices as rank-`rank` factors (in factor_dtype), its other tensors dense."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, tensor in state.items():
        if not name.startswith("visual."):
            continue
        if tensor.ndim == 2:
            out_dim, in_dim = tensor.shape
            tensors[name + LORA_B] = (0.1 * torch.randn(out_dim, rank, generator=generator)).to(factor_dtype)
            tensors[name + LORA_A] = (0.1 * torch.randn(rank, in_dim, generator=generator)).to(factor_dtype)
        else:
            tensors[name] = 0.02 * torch.randn(tensor.shape, generator=generator)
    save_tensors(path, tensors)
    return path


def densify(path: Path, out: Path) -> Path:
    """The same task vector stored dense: each factored tensor's product as the engine reads it."""
    vector = TaskVectorFile(path)
    save_tensors(out, vector.float_deltas())
    return out


def lora_job(root: Path, n_vectors: int = 3):
    """A job whose vectors are LoRA factors (the second one's in bfloat16), and the same job stored dense."""
    job = make_job(root, n_vectors=n_vectors, with_datasets=False)
    lora, dense = [], []
    for i, tv in enumerate(job.inputs.task_vectors):
        dtype = torch.bfloat16 if i == 1 else torch.float32
        path = write_lora_vector(root / f"lora{i}.safetensors", job.state, seed=500 + i, factor_dtype=dtype)
        lora.append(TaskVectorInput(tv.id, tv.name, path, tv.class_names))
        dense.append(TaskVectorInput(tv.id, tv.name, densify(path, root / f"dense{i}.safetensors"), tv.class_names))
    return (MergeInputs(job.inputs.base_path, SPEC, lora), MergeInputs(job.inputs.base_path, SPEC, dense), job.state)


def header_of(tmp_path, tensors: dict[str, torch.Tensor]):
    path = tmp_path / "v.safetensors"
    save_tensors(path, tensors)
    return read_header(path)


BASE = {"w": torch.zeros(6, 4), "b": torch.zeros(6)}


@pytest.mark.parametrize(("tensors", "message"), [
    ({"w.lora_A": torch.zeros(2, 4)}, "w.lora_A has no w.lora_B"),
    ({"w.lora_B": torch.zeros(6, 2)}, "w.lora_B has no w.lora_A"),
    ({"w.lora_A": torch.zeros(2, 4), "w.lora_B": torch.zeros(6, 3)}, "must be lora_A (rank, in)"),
    ({"w.lora_A": torch.zeros(2, 5), "w.lora_B": torch.zeros(6, 2)}, "give shape [6, 5]"),
    ({"w.lora_A": torch.zeros(5, 4), "w.lora_B": torch.zeros(6, 5)}, "rank of w is 5; it must be in [1, 4]"),
    ({"w.lora_A": torch.zeros(2, 4, dtype=torch.int32), "w.lora_B": torch.zeros(6, 2)}, "floating point"),
    ({"w": torch.zeros(6, 4), "w.lora_A": torch.zeros(2, 4), "w.lora_B": torch.zeros(6, 2)}, "both dense and"),
    ({"v.lora_A": torch.zeros(2, 4), "v.lora_B": torch.zeros(6, 2)}, "which the base model does not have"),
    ({"b.lora_A": torch.zeros(1, 6), "b.lora_B": torch.zeros(1, 1)}, "give shape [1, 6]"),
])
def test_malformed_factors_are_named_from_the_header_alone(tmp_path, tensors, message):
    base = header_of(tmp_path, BASE).tensors
    with pytest.raises(SafetensorsError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)")):
        layout(header_of(tmp_path, tensors), base)


def test_layout_mixes_dense_tensors_and_factors(tmp_path):
    header = header_of(tmp_path, {"b": torch.zeros(6), "w.lora_A": torch.zeros(2, 4), "w.lora_B": torch.zeros(6, 2)})
    found = layout(header, header_of(tmp_path, BASE).tensors)
    assert set(found.dense) == {"b"} and found.names == {"b", "w"}
    assert found.factors["w"].shape == (6, 4) and found.max_rank == 2


@settings(max_examples=60, deadline=None)
@given(out_dim=st.integers(1, 400), in_dim=st.integers(1, 700), rank=st.integers(1, 8), data=st.data())
def test_any_range_of_a_product_is_the_same_bits_as_the_whole(tmp_path_factory, out_dim, in_dim, rank, data):
    rank = min(rank, out_dim, in_dim)
    generator = torch.Generator().manual_seed(out_dim * 1000 + in_dim)
    b, a = torch.randn(out_dim, rank, generator=generator), torch.randn(rank, in_dim, generator=generator)
    path = tmp_path_factory.mktemp("lora") / "v.safetensors"
    save_tensors(path, {"w.lora_A": a, "w.lora_B": b})
    vector = TaskVectorFile(path)
    whole = vector.tensor("w")
    torch.testing.assert_close(whole.double(), b.double() @ a.double(), rtol=1e-5, atol=1e-5)
    numel = out_dim * in_dim
    start = data.draw(st.integers(0, numel))
    stop = data.draw(st.integers(start, numel + 10))
    assert np.array_equal(vector.float32("w", start, stop), whole.reshape(-1).numpy()[start:stop])
    got_b, got_a = vector.lora("w")
    assert torch.equal(got_b, b) and torch.equal(got_a, a)


def test_an_upload_measures_the_product_and_names_non_finite_factors(tmp_path):
    from engine.selection import file_magnitude_means, file_top_k_cuts, measure_vector

    b, a = torch.randn(300, 4, dtype=torch.float64), torch.randn(4, 500, dtype=torch.float64)
    path = tmp_path / "v.safetensors"
    save_tensors(path, {"w.lora_A": a.float(), "w.lora_B": b.float(), "bias": torch.full((3,), 2.0)})
    measured = measure_vector(TaskVectorFile(path))
    assert measured.non_finite == []
    assert measured.l2_norm == pytest.approx(
        math.sqrt(float((b.float().double() @ a.float().double()).square().sum()) + 12), rel=1e-6)
    assert measured.magnitude_means == file_magnitude_means(path)
    assert measured.magnitude_cuts == file_top_k_cuts(path)
    a[1, 7] = float("nan")
    save_tensors(path, {"w.lora_A": a.float(), "w.lora_B": b.float()})
    assert measure_vector(TaskVectorFile(path)).non_finite == ["w"]


TRAINING_FREE = sorted(name for name in METHODS if name != "atlas")


@pytest.mark.parametrize("method", TRAINING_FREE)
def test_each_merge_of_factors_equals_its_merge_of_their_products(method, tmp_path):
    lora, dense, _ = lora_job(tmp_path / "job")
    spec = METHODS[method]
    got = spec.runner()(lora, spec.params(), Recorder().context(tmp_path / "lora", seed=3))
    want = spec.runner()(dense, spec.params(), Recorder().context(tmp_path / "dense", seed=3))
    got_tensors, want_tensors = load_file(str(got.checkpoint_path)), load_file(str(want.checkpoint_path))
    assert got_tensors.keys() == want_tensors.keys()
    assert all(torch.equal(got_tensors[name], want_tensors[name]) for name in want_tensors), method
    changed = [name for name in want_tensors if name.startswith("visual.") and not torch.equal(
        want_tensors[name], load_file(str(lora.base_path))[name])]
    assert changed, "the merge changed nothing: the comparison would prove nothing"


def test_atlas_composes_the_factors_without_their_products(tmp_path):
    lora, dense, state = lora_job(tmp_path / "job")
    model = build_model(SPEC)
    model.load_state_dict(state)
    model.requires_grad_(False)
    factored, _ = build_composition(model, lora.task_vectors, "block", "cpu")
    stored, _ = build_composition(model, dense.task_vectors, "block", "cpu")
    assert factored.blocks == stored.blocks
    assert set(factored.low_rank) == {name for name in factored.blocks if state[name].ndim == 2}
    assert not set(factored.low_rank) & set(factored.stacks)
    assert factored.stacked_bytes < stored.stacked_bytes / 2
    coefficients = torch.randn(factored.coefficient_shape, generator=torch.Generator().manual_seed(0))
    got, want = factored.compose(coefficients), stored.compose(coefficients)
    for name in factored.blocks:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)

    selected = {name: [0, 2] for name in factored.blocks}  # a memory budget, and K = 3 partitions
    budget, _ = build_composition(model, lora.task_vectors, "block", "cpu", partitions=3, partition_seed=5,
                                  selected=selected)
    reference, _ = build_composition(model, dense.task_vectors, "block", "cpu", partitions=3, partition_seed=5,
                                     selected=selected)
    coefficients = torch.randn(budget.coefficient_shape, generator=torch.Generator().manual_seed(1))
    got, want = budget.compose(coefficients), reference.compose(coefficients)
    for name in budget.blocks:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)

    document = {"task_vectors": [tv.id for tv in lora.task_vectors], "blocks": factored.blocks,
                "values": [[0.3 + 0.1 * t] * len(factored.blocks) for t in range(3)], "granularity": "block"}
    written = {}
    for inputs, name in ((lora, "lora"), (dense, "dense")):
        out = tmp_path / f"{name}.safetensors"
        write_checkpoint(inputs, document, out, Recorder().context(tmp_path / name))
        written[name] = load_file(str(out))
    assert all(torch.equal(written["lora"][name], written["dense"][name]) for name in written["dense"])

"""DARE: the drop is splitmix64 of each entry's index (checked against numpy), keeps each task vector's
expectation, is reproducible from its seed whatever the chunking, and its merges equal independent computations
(task arithmetic at p = 0; a loop TIES over the dropped vectors)."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from engine.kernels import dare_drop, drop_threshold
from engine.methods.catalogue import get_method
from engine.methods.dare.method import dare_merge, drop_stream, run
from engine.methods.dare.params import DareParams
from engine.methods.task_arithmetic.params import TaskArithmeticParams
from engine.streaming import CHUNK
from tests.engine_jobs import IndependentEvaluator, Recorder, make_job, one_thread  # noqa: F401 - fixture
from tests.test_engine_ties import reference_ties

pytestmark = pytest.mark.usefixtures("one_thread")


def drop_and_rescale(tau: torch.Tensor, drop_rate: float, rescale: bool, seed: int, position: int,
                     name: str) -> tuple[torch.Tensor, int]:
    """The drop of one vector's tensor taken whole (the merge takes it chunk by chunk), and its survivors."""
    flat = tau.detach().float().contiguous().view(-1).numpy()
    out = np.empty_like(flat)
    divisor = np.float32(1 - drop_rate) if rescale else np.float32(1.0)
    kept = dare_drop(flat, drop_stream(seed, position, name), 0, drop_threshold(drop_rate), divisor, out, False)
    return torch.from_numpy(out).view(tau.shape), int(kept)


def test_drop_keeps_the_expectation():
    """The mean of many seeded drops is tau (within 4 standard errors, entry by entry)."""
    tau = torch.linspace(-1, 1, 50)
    p, draws = 0.7, 4000
    total = torch.zeros(50, dtype=torch.float64)
    for seed in range(draws):
        total += drop_and_rescale(tau, p, True, seed, 0, "w")[0].double()
    standard_error = tau.abs().double() * np.sqrt(p / (1 - p)) / np.sqrt(draws)
    assert bool(((total / draws - tau.double()).abs() <= 4 * standard_error + 1e-12).all())


def test_survivors_are_rescaled_exactly_and_the_rest_are_zero():
    tau = torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    dropped, kept = drop_and_rescale(tau, 0.9, True, 3, 1, "visual.w")
    survivors = dropped != 0
    assert kept == int(survivors.sum())
    assert kept / tau.numel() == pytest.approx(0.1, abs=0.005)
    torch.testing.assert_close(dropped[survivors], tau[survivors] / (1 - 0.9), rtol=0, atol=0)
    plain, _ = drop_and_rescale(tau, 0.9, False, 3, 1, "visual.w")
    assert torch.equal(plain[survivors], tau[survivors])


def test_masks_are_seeded_per_vector_and_tensor():
    tau = torch.ones(1000)
    first = drop_and_rescale(tau, 0.5, True, 7, 0, "a")[0]
    assert torch.equal(first, drop_and_rescale(tau, 0.5, True, 7, 0, "a")[0])
    for other in [(8, 0, "a"), (7, 1, "a"), (7, 0, "b")]:
        assert not torch.equal(first, drop_and_rescale(tau, 0.5, True, *other)[0]), other


def test_no_drop_is_task_arithmetic_bit_for_bit(tmp_path):
    job = make_job(tmp_path / "job", n_vectors=3, with_datasets=False)
    dare = run(job.inputs, DareParams(drop_rate=0.0, scaling=0.4), Recorder().context(tmp_path / "dare"))
    arithmetic = get_method("task_arithmetic").runner()(job.inputs, TaskArithmeticParams(scaling=0.4),
                                                        Recorder().context(tmp_path / "ta"))
    got, want = load_file(str(dare.checkpoint_path)), load_file(str(arithmetic.checkpoint_path))
    assert all(torch.equal(got[name], want[name]) for name in want)
    assert dare.metrics["kept_fraction"] == 1.0


@pytest.mark.parametrize("combine", ["sum", "ties"])
def test_merges_the_dropped_vectors_as_an_independent_computation_does(combine, tmp_path):
    job = make_job(tmp_path / "job", n_vectors=3, with_datasets=False)
    result = run(job.inputs, DareParams(combine=combine), Recorder().context(tmp_path / "w", seed=11))
    dropped = [{name: drop_and_rescale(tau, 0.5, True, 11, position, name)[0] for name, tau in taus.items()}
               for position, taus in enumerate(job.taus.values())]
    if combine == "sum":
        delta = {name: sum(vector[name].double() for vector in dropped) for name in dropped[0]}
    else:  # sign election and disjoint mean over every entry: TIES's loops with nothing trimmed
        delta = {name: torch.from_numpy(reference_ties([v[name].double().numpy() for v in dropped], 100.0))
                 for name in dropped[0]}
    scaling = 0.3 if combine == "sum" else 1.0
    merged = load_file(str(result.checkpoint_path))
    for name, tensor in IndependentEvaluator.plus_state(job.state, delta, scaling).items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    chosen = result.metrics["chosen"]
    assert chosen["seed"] == {"value": 11, "source": "the job's seed"}
    assert chosen["scaling"] == {"value": scaling, "source": "default"}
    assert result.metrics["kept_fraction"] == pytest.approx(0.5, abs=0.01)


def test_params():
    assert get_method("dare").params is DareParams
    assert DareParams().resolved_scaling == 0.3 and DareParams(combine="ties").resolved_scaling == 1.0
    assert DareParams().scaling_grid[-1] == 1.0 and DareParams(combine="ties").scaling_grid[0] == 0.8
    for bad in ({"drop_rate": 1.0}, {"drop_rate": -0.1}, {"seed": -1}, {"combine": "mean"}):
        with pytest.raises(ValueError):
            DareParams(**bad)


def reference_draws(stream: np.uint64, count: int) -> np.ndarray:
    """Entries 0..count-1's uniforms in [0, 1) (numpy): the high, then the low 32 bits of each of splitmix64's
    outputs 1, 2, ... from state `stream`."""
    with np.errstate(over="ignore"):
        z = stream + np.arange(1, (count + 1) // 2 + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    halves = np.stack([z >> np.uint64(32), z & np.uint64(0xFFFFFFFF)], axis=1).reshape(-1)[:count]
    return halves.astype(np.float64) / 2.0**32


def test_drop_is_splitmix64_of_each_entrys_index():
    tau = torch.randn(5000, generator=torch.Generator().manual_seed(1))
    dropped, kept = drop_and_rescale(tau, 0.3, True, 5, 2, "visual.w")
    keep = reference_draws(drop_stream(5, 2, "visual.w"), 5000) > 0.3
    expected = np.where(keep, tau.numpy() / np.float32(0.7), np.float32(0.0)).astype(np.float32)
    assert np.array_equal(dropped.numpy(), expected) and kept == int(keep.sum())


@pytest.mark.parametrize(("first", "count"), [(0, 1), (1, 1), (1, 2), (3, 6), (7, 10), (10, 7)])
def test_a_slice_from_any_entry_draws_what_the_whole_tensor_does(first, count):
    """Draws come two per hash: a slice that starts or ends inside a pair still draws each entry's own half."""
    tau = np.linspace(-1, 1, 20, dtype=np.float32)
    stream, threshold, divisor = drop_stream(1, 0, "w"), drop_threshold(0.5), np.float32(0.5)
    whole = np.empty_like(tau)
    dare_drop(tau, stream, 0, threshold, divisor, whole, False)
    part = np.empty(count, np.float32)
    kept = dare_drop(tau[first:first + count], stream, first, threshold, divisor, part, False)
    assert np.array_equal(part, whole[first:first + count]) and kept == int((part != 0).sum())


def test_accumulating_adds_what_the_drop_writes():
    """The sum path draws straight into its running sum: the same bits as adding the dropped chunk."""
    tau = np.linspace(-1, 1, 21, dtype=np.float32)
    running = np.linspace(3, 4, 21, dtype=np.float32)
    args = (drop_stream(2, 1, "w"), 3, drop_threshold(0.4), np.float32(0.6))
    dropped = np.empty_like(tau)
    kept = dare_drop(tau, *args, dropped, False)
    summed = running.copy()
    assert dare_drop(tau, *args, summed, True) == kept and np.array_equal(summed, running + dropped)


def test_the_threshold_is_exact():
    """An entry survives when draw / 2**32 > drop_rate, that is when its 32-bit draw exceeds the threshold: a
    draw equal to the threshold is dropped, one above it survives."""
    for drop_rate in (0.0, 0.3, 0.5, 0.9, 1 - 2.0**-40):
        threshold = int(drop_threshold(drop_rate))
        assert threshold / 2**32 <= drop_rate < (threshold + 1) / 2**32
    stream = drop_stream(4, 0, "w")
    draw = int(reference_draws(stream, 1)[0] * 2**32)  # entry 0's 32-bit draw
    out = np.empty(1, np.float32)
    for threshold, survives in ((draw, False), (draw - 1, True)):
        assert dare_drop(np.ones(1, np.float32), stream, 0, np.uint64(threshold), np.float32(1.0), out, False) \
            == survives and out[0] == float(survives)


def test_chunks_and_threads_give_the_same_bytes_as_a_whole_tensor():
    tau = torch.randn(3 * CHUNK + 5, generator=torch.Generator().manual_seed(2))
    whole = drop_and_rescale(tau, 0.5, True, 3, 0, "w")[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        merged, kept, entries = dare_merge("w", [tau], DareParams(), 3)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(merged, whole) and entries == tau.numel() and kept == int((whole != 0).sum())

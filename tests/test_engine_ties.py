"""TIES: trim, elect, disjoint mean, against hand computations and an independent loop implementation."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from engine.context import Cancelled, MergeInputs, ModelSpec, TaskVectorInput
from engine.methods.catalogue import get_method
from engine.methods.ties.method import run, ties_merge, trim
from engine.methods.ties.params import TiesParams
from engine.safetensors_io import save_tensors
from tests.engine_jobs import IndependentEvaluator, Recorder, make_job, one_thread  # noqa: F401 - fixture

pytestmark = pytest.mark.usefixtures("one_thread")

# Three 2x3 task vectors; with top_k 50 each keeps its 3 largest magnitudes.
TAUS = [
    torch.tensor([[1.0, -2.0, 0.5], [3.0, -0.1, 0.2]]),
    torch.tensor([[-4.0, 1.0, 0.3], [2.0, 0.4, -0.6]]),
    torch.tensor([[2.0, -1.5, -0.7], [-0.5, 0.8, 0.1]]),
]
# By hand: trimmed = [[1,-2,0],[3,0,0]], [[-4,1,0],[2,0,0]], [[2,-1.5,0],[0,0.8,0]];
# sum = [[-1,-2.5,0],[5,0.8,0]] elects signs [[-,-,0],[+,+,0]];
# agreeing entries: (0,0) -4; (0,1) -2,-1.5; (1,0) 3,2; (1,1) 0.8.
MERGED_BY_HAND = torch.tensor([[-4.0, -1.75, 0.0], [2.5, 0.8, 0.0]])


def test_trim_keeps_top_k_percent_by_magnitude():
    assert torch.equal(trim(TAUS[0], 50), torch.tensor([[1.0, -2.0, 0.0], [3.0, 0.0, 0.0]]))
    # 20% of 6 entries is 1.2: rounded up to 2.
    assert torch.equal(trim(TAUS[2], 20), torch.tensor([[2.0, -1.5, 0.0], [0.0, 0.0, 0.0]]))
    assert torch.equal(trim(TAUS[1], 100), TAUS[1])
    # Entries tied at the cut are all kept.
    assert torch.equal(trim(torch.tensor([3.0, -1.0, 1.0, 0.5]), 50), torch.tensor([3.0, -1.0, 1.0, 0.0]))


def test_elect_and_disjoint_mean_by_hand():
    assert torch.equal(ties_merge(TAUS, 50), MERGED_BY_HAND)


def reference_ties(taus: list[np.ndarray], top_k: float) -> np.ndarray:
    """Entry-by-entry loops, float64, but for the sign election: the sum whose sign is elected is added in
    float32 in the vectors' order, as the reference code adds float32 weights; in float64, a sum that is
    exactly 0 in float32 (-0.99 - 0.4 + 0.38 + 1.01, in that order) can come out below 0 and elect another sign."""
    trimmed = []
    for tau in taus:
        flat = tau.ravel()
        keep = int(np.ceil(top_k / 100 * flat.size))
        cut = np.sort(np.abs(flat))[::-1][keep - 1]
        trimmed.append(np.where(np.abs(tau) >= cut, tau, 0.0))
    merged = np.zeros_like(taus[0])
    for index in np.ndindex(merged.shape):
        values = [t[index] for t in trimmed]
        total = np.float32(0.0)
        for value in values:
            total = np.float32(total + np.float32(value))
        sign = np.sign(total)
        agreeing = [v for v in values if v != 0 and np.sign(v) == sign]
        merged[index] = np.mean(agreeing) if agreeing else 0.0
    return merged


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 12), st.sampled_from([10.0, 20.0, 50.0, 100.0]), st.integers(0, 2**31))
def test_matches_loop_reference(n_tasks, size, top_k, seed):
    rng = np.random.default_rng(seed)
    taus = [rng.normal(size=(size,)).round(2).astype(np.float32) for _ in range(n_tasks)]  # rounding: ties
    merged = ties_merge([torch.from_numpy(t) for t in taus], top_k).numpy()
    # the merge works in float32; the loops in float64 over the same float32 entries
    reference = reference_ties([t.astype(np.float64) for t in taus], top_k)
    np.testing.assert_allclose(merged, reference, rtol=1e-6, atol=1e-7)


def hand_job(tmp_path):
    """A base with the 2x3 tensor in fp16, an int buffer and a tensor no vector touches."""
    base = {"w": torch.tensor([[0.5, 0.5, 0.5], [1.0, 1.0, 1.0]], dtype=torch.float16),
            "steps": torch.tensor([7], dtype=torch.int64), "untouched": torch.ones(4)}
    save_tensors(tmp_path / "base.safetensors", base)
    vectors = []
    for i, tau in enumerate(TAUS):
        save_tensors(tmp_path / f"tv{i}.safetensors", {"w": tau})
        vectors.append(TaskVectorInput(f"tv{i}", f"tv{i}", tmp_path / f"tv{i}.safetensors"))
    return base, MergeInputs(tmp_path / "base.safetensors", ModelSpec(architecture="ViT-B-32"), vectors)


def test_run_writes_full_state_dict_in_base_dtypes(tmp_path):
    base, inputs = hand_job(tmp_path)
    recorder = Recorder()
    result = run(inputs, TiesParams(top_k=50, scaling=0.5, trim_scope="tensor"), recorder.context(tmp_path / "work"))
    assert result.checkpoint_path == tmp_path / "work" / "merged.safetensors"
    merged = load_file(str(result.checkpoint_path))
    assert set(merged) == set(base)
    assert merged["w"].dtype == torch.float16
    expected = (base["w"].float() + 0.5 * MERGED_BY_HAND).half()
    assert torch.equal(merged["w"], expected)
    assert torch.equal(merged["steps"], base["steps"]) and torch.equal(merged["untouched"], base["untouched"])
    assert result.metrics["merged_density"] == pytest.approx(4 / 6)
    assert [p.step for p in recorder.reports] == [1, 2, 3] and recorder.reports[-1].fraction == 1.0


def test_same_inputs_same_bytes(tmp_path):
    job = make_job(tmp_path / "job", n_vectors=3, with_datasets=False)
    first = run(job.inputs, TiesParams(), Recorder().context(tmp_path / "a")).checkpoint_path.read_bytes()
    second = run(job.inputs, TiesParams(), Recorder().context(tmp_path / "b", seed=5)).checkpoint_path.read_bytes()
    assert first == second


def test_cancel_between_tensors_leaves_no_file(tmp_path):
    _, inputs = hand_job(tmp_path)
    recorder = Recorder(cancel_after=1)
    with pytest.raises(Cancelled):
        run(inputs, TiesParams(), recorder.context(tmp_path / "work"))
    assert recorder.checks == 2
    assert not (tmp_path / "work" / "merged.safetensors").exists()


def reference_global_ties(taus: list[dict[str, torch.Tensor]], top_k: float, merge: str) -> dict[str, torch.Tensor]:
    """FusionBench-style, float64: each task vector flattened over all its tensors, one global top-k cut,
    sign elected from the sum, disjoint mean or sum of the agreeing entries, reshaped back."""
    names = sorted(taus[0])
    flat = np.stack([np.concatenate([tau[n].double().numpy().ravel() for n in names]) for tau in taus])
    keep = int(np.ceil(top_k / 100 * flat.shape[1]))
    cuts = np.sort(np.abs(flat), axis=1)[:, ::-1][:, keep - 1:keep]
    trimmed = np.where(np.abs(flat) >= cuts, flat, 0.0)
    sign = np.sign(trimmed.sum(axis=0))
    agree = (np.sign(trimmed) == sign) & (trimmed != 0)
    total = np.where(agree, trimmed, 0.0).sum(axis=0)
    merged = total if merge == "sum" else np.where(agree.any(axis=0), total / np.maximum(agree.sum(axis=0), 1), 0.0)
    out, offset = {}, 0
    for n in names:
        size = taus[0][n].numel()
        out[n] = torch.from_numpy(merged[offset:offset + size].reshape(taus[0][n].shape))
        offset += size
    return out


@pytest.mark.parametrize("merge,scaling", [("mean", 1.0), ("sum", 0.3)])
def test_global_trim_matches_a_flattened_reference(tmp_path, merge, scaling):
    job = make_job(tmp_path / "job", n_vectors=3, with_datasets=False)
    result = run(job.inputs, TiesParams(merge=merge), Recorder().context(tmp_path / "w"))
    expected = IndependentEvaluator.plus_state(job.state, reference_global_ties(list(job.taus.values()), 20, merge),
                                               scaling)
    merged = load_file(str(result.checkpoint_path))
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-6, atol=1e-7)
    assert result.metrics["chosen"]["scaling"] == {"value": scaling, "source": "default"}
    assert result.metrics["chosen"]["trim_scope"] == {"value": "global", "source": "default"}


def test_lambda_search_on_validation_data_picks_what_an_independent_search_picks(tmp_path):
    job = make_job(tmp_path / "job", n_vectors=2)
    pairs = {"tv0": "ds0", "tv1": "ds1"}
    params = TiesParams(validation_datasets=pairs, merge="sum")
    result = run(job.inputs, params, Recorder().context(tmp_path / "w"))
    delta = reference_global_ties(list(job.taus.values()), 20, "sum")
    best, scores = IndependentEvaluator(job).best_addition(delta, params.scaling_grid, pairs)
    assert [row["mean_normalised_accuracy"] for row in result.metrics["search"]["rows"]] == \
        pytest.approx([scores[s] for s in params.scaling_grid])
    assert result.metrics["chosen"]["scaling"]["value"] == best
    assert result.metrics["chosen"]["scaling"]["source"].startswith("search on val")
    merged = load_file(str(result.checkpoint_path))
    for name, tensor in IndependentEvaluator.plus_state(job.state, delta, best).items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-6, atol=1e-7)


def test_registered():
    spec = get_method("ties")
    assert spec.params is TiesParams and spec.runner() is run
    assert TiesParams().top_k == 20 and TiesParams().resolved_scaling == 1.0
    assert TiesParams(merge="sum").resolved_scaling == 0.3
    assert TiesParams().scaling_grid[0] == 0.8 and TiesParams().scaling_grid[-1] == 2.5
    with pytest.raises(ValueError):
        TiesParams(top_k=0)


@pytest.mark.parametrize("top_k,source", [(20.0, "measured at upload"), (12.5, "measured")])
def test_cuts_measured_at_upload_give_the_same_bytes(tmp_path, top_k, source):
    """A worker hands TIES the cuts the upload measured (whole percents); other top_k are measured anew."""
    import dataclasses

    from engine.selection import file_top_k_cuts

    job = make_job(tmp_path / "job", n_vectors=3, with_datasets=False)
    measured_now = run(job.inputs, TiesParams(top_k=top_k), Recorder().context(tmp_path / "a"))
    with_cuts = dataclasses.replace(job.inputs, task_vectors=[
        dataclasses.replace(tv, magnitude_cuts=file_top_k_cuts(tv.path)) for tv in job.inputs.task_vectors])
    from_upload = run(with_cuts, TiesParams(top_k=top_k), Recorder().context(tmp_path / "b"))
    assert from_upload.checkpoint_path.read_bytes() == measured_now.checkpoint_path.read_bytes()
    assert from_upload.metrics["chosen"]["trim_cuts"]["source"].endswith(source)
    assert from_upload.metrics["chosen"]["trim_cuts"]["value"] == measured_now.metrics["chosen"]["trim_cuts"]["value"]

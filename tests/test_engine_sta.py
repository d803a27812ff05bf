"""STA: Taylor importance and masks against direct autograd on a tiny open_clip, packing, fusion, forgetting."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from safetensors.torch import load_file

from engine.context import Cancelled
from engine.data import load_dataset, preprocess_images
from engine.heads import zero_shot_head
from engine.methods.catalogue import get_method
from engine.methods.sta.method import pack_mask, run, select, unpack_mask
from engine.methods.sta.params import STA_SCALING_GRID, StaParams
from engine.weights import build_model
from tests.engine_jobs import (  # noqa: F401 - one_thread is a fixture
    SPEC,
    IndependentEvaluator,
    Recorder,
    make_job,
    one_thread,
    write_task_vector,
)

pytestmark = pytest.mark.usefixtures("one_thread")
SAMPLES, MICRO = 10, 4  # 3 micro-batches, the last one partial


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    return make_job(tmp_path_factory.mktemp("sta") / "job", n_vectors=2)


def read_masks(workdir, index):
    return load_file(str(workdir / "sta" / f"masks-{index:04d}.safetensors"))


def direct_importance(job, tv_id, dataset_id, seed, index, theta=False):
    """mean over micro-batches of |w * dCE/dw|, w = tau (or theta_0 + tau), by autograd on the fine-tuned model."""
    model = build_model(SPEC)
    model.load_state_dict(job.state)
    head = zero_shot_head(model, job.inputs.datasets[dataset_id].class_names)
    tau = job.taus[tv_id]
    model.load_state_dict({n: t + tau[n] if n in tau else t for n, t in job.state.items()})
    images, labels = load_dataset(job.inputs.datasets[dataset_id].path)["train"]
    order = np.random.default_rng((seed, index)).permutation(len(images))[:SAMPLES]
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(tau[n]) for n in tau}
    batches = [order[i:i + MICRO] for i in range(0, len(order), MICRO)]
    for batch in batches:
        features = F.normalize(model.encode_image(preprocess_images(images[batch], model)), dim=-1)
        loss = F.cross_entropy(features @ head.T, torch.as_tensor(labels[batch]))
        grads = torch.autograd.grad(loss, [params[n] for n in tau])
        for n, g in zip(tau, grads, strict=True):
            weight = job.state[n] + tau[n] if theta else tau[n]
            total[n] += (weight * g).abs()
    return {n: t / len(batches) for n, t in total.items()}


@pytest.mark.parametrize("importance", ["tau", "theta"])
def test_taylor_importance_and_masks_match_autograd(job, tmp_path, importance):
    params = StaParams(calibration_datasets={"tv0": "ds0"}, calibration_samples=SAMPLES, micro_batch_size=MICRO,
                       disjoint=True, importance=importance)
    result = run(job.inputs, params, Recorder().context(tmp_path / "w", seed=3))
    expected = direct_importance(job, "tv0", "ds0", seed=3, index=0, theta=importance == "theta")
    masks = read_masks(tmp_path / "w", 0)
    scores = load_file(str(tmp_path / "w" / "sta" / "scores-0000.safetensors"))
    assert set(masks) == set(expected)
    for name, importance_values in expected.items():
        normalised = importance_values / importance_values.mean()
        torch.testing.assert_close(scores[name].float(), normalised, rtol=2e-3, atol=1e-3)
        mask = unpack_mask(masks[name], tuple(normalised.shape))
        borderline = (normalised - params.threshold).abs() < 1e-3
        assert torch.equal(mask[~borderline], (normalised >= params.threshold)[~borderline]), name
    assert result.metrics["importance_source"] == {"tv0": "taylor", "tv1": "magnitude"}
    assert result.metrics["magnitude_tensors"] == {"tv0": 0, "tv1": len(job.taus["tv1"])}


def test_magnitude_fallback_and_fusion(job, tmp_path):
    params = StaParams(calibration_datasets={"tv0": "ds0"}, calibration_samples=SAMPLES, micro_batch_size=MICRO,
                       scaling=0.7)
    result = run(job.inputs, params, Recorder().context(tmp_path / "w"))
    masks = [read_masks(tmp_path / "w", i) for i in range(2)]
    for name, tau in job.taus["tv1"].items():  # no calibration data: |tau| / mean |tau| >= threshold
        expected = tau.abs() / tau.abs().mean() >= params.threshold
        assert torch.equal(unpack_mask(masks[1][name], tuple(tau.shape)), expected)
    merged = load_file(str(result.checkpoint_path))
    assert merged.keys() == job.state.keys()
    for name, base in job.state.items():
        expected = base.double()
        for index, vector in enumerate(job.taus.values()):
            if name in vector:
                mask = unpack_mask(masks[index][name], tuple(base.shape))
                expected = expected + 0.7 * torch.where(mask, vector[name].double(), 0.0)
        torch.testing.assert_close(merged[name], expected.float(), rtol=1e-6, atol=1e-7)
    assert 0 < result.metrics["mask_density"]["tv0"] < 1


def test_forgetting_touches_only_the_masked_entries(job, tmp_path):
    params = StaParams(calibration_datasets={"tv1": "ds1"}, forget=["tv1"], calibration_samples=SAMPLES,
                       micro_batch_size=MICRO)
    inputs = job.inputs.__class__(job.inputs.base_path, job.inputs.base_spec, job.inputs.task_vectors[1:],
                                  job.inputs.datasets)
    result = run(inputs, params, Recorder().context(tmp_path / "w"))
    masks = read_masks(tmp_path / "w", 0)
    merged = load_file(str(result.checkpoint_path))
    forgotten = 0
    for name, base in job.state.items():
        if name not in job.taus["tv1"]:
            assert torch.equal(merged[name], base)
            continue
        mask = unpack_mask(masks[name], tuple(base.shape))
        assert torch.equal(merged[name][~mask], base[~mask])
        torch.testing.assert_close(merged[name][mask], (base - job.taus["tv1"][name])[mask])
        forgotten += int(mask.sum())
    assert 0 < forgotten < sum(t.numel() for t in job.taus["tv1"].values())


def test_disjoint_gives_each_entry_to_the_higher_score(job, tmp_path):
    params = StaParams(calibration_datasets={"tv0": "ds0", "tv1": "ds1"}, calibration_samples=SAMPLES,
                       micro_batch_size=MICRO, disjoint=True, density=0.5)
    result = run(job.inputs, params, Recorder().context(tmp_path / "w"))
    masks = [read_masks(tmp_path / "w", i) for i in range(2)]
    scores = [load_file(str(tmp_path / "w" / "sta" / f"scores-{i:04d}.safetensors")) for i in range(2)]
    merged = load_file(str(result.checkpoint_path))
    overlaps = 0
    for name, tau0 in job.taus["tv0"].items():
        shape, tau1 = tuple(tau0.shape), job.taus["tv1"][name]
        m0, m1 = unpack_mask(masks[0][name], shape), unpack_mask(masks[1][name], shape)
        assert m0.float().mean() == pytest.approx(0.5, abs=1 / m0.numel() + 1e-9)  # density, ties aside
        first_wins = m0 & (~m1 | (scores[0][name] >= scores[1][name]))
        expected = torch.where(first_wins, tau0, torch.where(m1, tau1, 0.0))
        torch.testing.assert_close(merged[name] - job.state[name], expected, rtol=1e-5, atol=1e-6)
        overlaps += int((m0 & m1).sum())
    assert overlaps > 0  # the rule was exercised


def test_deterministic_bytes_and_seed_matters(job, tmp_path):
    params = StaParams(calibration_datasets={"tv0": "ds0", "tv1": "ds1"}, calibration_samples=6, micro_batch_size=2)
    a = run(job.inputs, params, Recorder().context(tmp_path / "a", seed=1)).checkpoint_path.read_bytes()
    b = run(job.inputs, params, Recorder().context(tmp_path / "b", seed=1)).checkpoint_path.read_bytes()
    c = run(job.inputs, params, Recorder().context(tmp_path / "c", seed=2)).checkpoint_path.read_bytes()
    assert a == b and a != c
    for i in range(2):
        assert (tmp_path / "a" / "sta" / f"masks-{i:04d}.safetensors").read_bytes() == \
            (tmp_path / "b" / "sta" / f"masks-{i:04d}.safetensors").read_bytes()


def test_text_tower_entries_fall_back_to_magnitude(job, tmp_path):
    path = write_task_vector(tmp_path / "text.safetensors", job.state, seed=9, prefix="transformer.resblocks.0.")
    vector = job.inputs.task_vectors[0].__class__("tvt", "text", path, ["cat", "dog", "bird"])
    inputs = job.inputs.__class__(job.inputs.base_path, job.inputs.base_spec, [vector], job.inputs.datasets)
    params = StaParams(calibration_datasets={"tvt": "ds0"}, calibration_samples=4, micro_batch_size=4)
    result = run(inputs, params, Recorder().context(tmp_path / "w"))
    assert result.metrics["importance_source"] == {"tvt": "taylor"}
    assert result.metrics["magnitude_tensors"] == {"tvt": 12}  # the loss never reaches the text tower


def test_cancel_between_micro_batches(job, tmp_path):
    recorder = Recorder(cancel_after=3)
    params = StaParams(calibration_datasets={"tv0": "ds0"}, calibration_samples=SAMPLES, micro_batch_size=MICRO)
    with pytest.raises(Cancelled):
        run(job.inputs, params, recorder.context(tmp_path / "w"))
    # One check before the task, one after each of its micro-batches: the 4th stops the job after the 3rd batch.
    assert recorder.checks == 4 and [p.step for p in recorder.reports] == [1, 2, 3]
    assert not (tmp_path / "w" / "merged.safetensors").exists()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 9), min_size=1, max_size=3), st.integers(0, 2**31))
def test_packed_masks_round_trip(shape, seed):
    mask = torch.from_numpy(np.random.default_rng(seed).random(shape) < 0.3)
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    assert torch.equal(unpack_mask(packed, tuple(shape)), mask)


def test_select_threshold_and_density():
    scores = torch.tensor([0.0, 0.5, 1.0, 2.0, 2.0, 4.0])
    assert select(scores, 1.0, None).tolist() == [False, False, True, True, True, True]
    assert select(scores, 1.0, 0.34).tolist() == [False, False, False, True, True, True]  # 2 kept + a tie
    assert select(scores, 1.0, 1.0).tolist() == [False, True, True, True, True, True]  # never a zero score
    assert not select(torch.zeros(5), 1.0, None).any()


def test_params_schema():
    assert get_method("sta").params is StaParams
    params = StaParams(calibration_datasets={"a": "d", "b": "d"}, forget=["c", "a"])
    assert params.dataset_ids() == ["d"] and params.task_vector_ids() == ["a", "b", "c"]
    defaults = StaParams()
    assert (defaults.threshold, defaults.density, defaults.scaling, defaults.importance) == (3.0, None, 1.0, "tau")
    with pytest.raises(ValidationError):
        StaParams(forget=["a", "a"])
    with pytest.raises(ValidationError):
        StaParams(density=0)
    with pytest.raises(ValidationError):  # a forgetting search validates the forgotten vectors, with a control
        StaParams(forget=["a"], validation_datasets={"a": "d"})
    with pytest.raises(ValidationError):
        StaParams(forget=["a"], validation_datasets={"b": "d"}, control_dataset_id="c")
    with pytest.raises(ValidationError):
        StaParams(control_dataset_id="c")


def fused_delta_at_lambda_one(job, tmp_path, params: StaParams) -> dict[str, torch.Tensor]:
    """The fused vector, read off the checkpoint STA writes at lambda 1 (masks are tested above)."""
    result = run(job.inputs, params.model_copy(update={"scaling": 1.0, "validation_datasets": {},
                                                       "control_dataset_id": None}),
                 Recorder().context(tmp_path))
    merged = load_file(str(result.checkpoint_path))
    return {n: merged[n].double() - t.double() for n, t in job.state.items() if n in job.taus["tv0"]}


def test_addition_search_picks_what_an_independent_search_picks(job, tmp_path):
    pairs = {"tv0": "ds0", "tv1": "ds1"}
    params = StaParams(calibration_datasets=pairs, calibration_samples=SAMPLES, micro_batch_size=MICRO,
                       threshold=1.0, validation_datasets=pairs)
    result = run(job.inputs, params, Recorder().context(tmp_path / "search"))
    delta = fused_delta_at_lambda_one(job, tmp_path / "at-one", params)
    best, scores = IndependentEvaluator(job).best_addition(delta, STA_SCALING_GRID, pairs)
    assert [row["mean_normalised_accuracy"] for row in result.metrics["search"]["rows"]] == \
        pytest.approx([scores[s] for s in STA_SCALING_GRID])
    assert result.metrics["chosen"]["scaling"]["value"] == best

    merged = load_file(str(result.checkpoint_path))
    for name, tensor in IndependentEvaluator.plus_state(job.state, delta, best).items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-5, atol=1e-6)


def test_forgetting_search_keeps_the_control(job, tmp_path):
    params = StaParams(calibration_datasets={"tv0": "ds0"}, calibration_samples=SAMPLES, micro_batch_size=MICRO,
                       threshold=1.0, forget=["tv0"], validation_datasets={"tv0": "ds0"}, control_dataset_id="ctrl")
    inputs = job.inputs.__class__(job.inputs.base_path, job.inputs.base_spec, job.inputs.task_vectors[:1],
                                  job.inputs.datasets)
    one_vector = job.__class__(inputs, job.state, {"tv0": job.taus["tv0"]})
    result = run(inputs, params, Recorder().context(tmp_path / "search"))
    delta = fused_delta_at_lambda_one(one_vector, tmp_path / "at-one", params)  # minus m * tau, as forgotten
    independent = IndependentEvaluator(one_vector)
    rows = {s: (independent.accuracy(independent.plus(delta, s), "ds0", "val"),
                independent.accuracy(independent.plus(delta, s), "ctrl", "val")) for s in STA_SCALING_GRID}
    kept = [s for s in STA_SCALING_GRID if rows[s][1] >= 0.95 * rows[0.0][1]]
    best = min(kept, key=lambda s: rows[s][0])
    assert result.metrics["chosen"]["scaling"]["value"] == best
    assert [row["control_accuracy"] for row in result.metrics["search"]["rows"]] == \
        pytest.approx([rows[s][1] for s in STA_SCALING_GRID])


def test_data_free_default_decides_masks_while_fusing(job, tmp_path):
    """No calibration data: masks |tau| / mean |tau| >= threshold decided tensor by tensor during fusion, no mask
    files; the same bytes as the two-step path (threshold_mask to bits, then masked_accumulate), and the same
    densities as the masks computed here."""
    from engine.kernels import masked_accumulate, threshold_mask

    params = StaParams(scaling=0.6, forget=["tv1"])
    result = run(job.inputs, params, Recorder().context(tmp_path / "w"))
    assert not (tmp_path / "w" / "sta").exists()
    merged = load_file(str(result.checkpoint_path))
    kept = {"tv0": 0, "tv1": 0}
    entries = {"tv0": 0, "tv1": 0}
    for name, base in job.state.items():
        present = [(tv, vector[name]) for tv, vector in job.taus.items() if name in vector]
        if not present:
            assert torch.equal(merged[name], base)
            continue
        total = np.zeros(base.numel(), np.float32)
        for tv, tau in present:
            flat = tau.float().reshape(-1).numpy()
            bits = np.zeros(-(-flat.size // 8), np.uint8)
            mean = np.float32(np.abs(flat).astype(np.float64).sum() / flat.size)  # the mean, in float64, rounded
            kept[tv] += threshold_mask(np.abs(flat), mean, np.float32(3.0), bits)
            entries[tv] += flat.size
            masked_accumulate(flat, bits, 0, np.float32(-1.0 if tv == "tv1" else 1.0), total)
        expected = base + 0.6 * torch.from_numpy(total).view(base.shape)
        assert torch.equal(merged[name], expected), name
    assert result.metrics["mask_density"] == {tv: kept[tv] / entries[tv] for tv in kept}
    assert result.metrics["importance_source"] == {"tv0": "magnitude", "tv1": "magnitude"}
    assert result.metrics["magnitude_tensors"] == {tv: len(vector) for tv, vector in job.taus.items()}


def test_the_means_an_upload_measured_give_the_same_bytes_in_one_read(job, tmp_path):
    """STA's data-free masks from the per-tensor mean magnitudes stored at upload: the same merge, each vector read
    once; the means are what a float64 computation gives, rounded to float32."""
    import dataclasses

    from engine.selection import file_magnitude_means

    means = {tv.id: file_magnitude_means(tv.path) for tv in job.inputs.task_vectors}
    for tv_id, vector in job.taus.items():
        for name, tau in vector.items():
            assert means[tv_id][name] == float(np.float32(tau.double().abs().mean()))
    stored = dataclasses.replace(job.inputs, task_vectors=[dataclasses.replace(tv, magnitude_means=means[tv.id])
                                                           for tv in job.inputs.task_vectors])
    params = StaParams(scaling=0.6, forget=["tv1"])
    with_means = load_file(str(run(stored, params, Recorder().context(tmp_path / "a")).checkpoint_path))
    measured = load_file(str(run(job.inputs, params, Recorder().context(tmp_path / "b")).checkpoint_path))
    assert all(torch.equal(with_means[name], measured[name]) for name in measured)
    wrong = dataclasses.replace(stored, task_vectors=[dataclasses.replace(tv, magnitude_means={
        name: 2 * value for name, value in means[tv.id].items()}) for tv in job.inputs.task_vectors])
    doubled = load_file(str(run(wrong, params, Recorder().context(tmp_path / "c")).checkpoint_path))
    assert any(not torch.equal(doubled[name], measured[name]) for name in measured)  # the stored means are used


@settings(max_examples=30, deadline=None)
@given(size=st.integers(0, 300_000), seed=st.integers(0, 2**16))
def test_mean_magnitude_is_the_float64_mean_whatever_the_reads(size, seed):
    from engine.selection import mean_magnitude

    values = np.random.default_rng(seed).standard_normal(size).astype(np.float32)
    mean = mean_magnitude(lambda start, stop: values[start:stop], size)
    expected = np.abs(values).astype(np.float64).mean() if size else 0.0
    assert mean.dtype == np.float32 and mean == pytest.approx(expected, rel=1e-6)

"""aTLAS: stacked composition vs a naive sum, gradients, training loop, outputs, determinism, cancel."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from safetensors.torch import load_file
from torch.func import functional_call

from engine.context import Cancelled
from engine.data import preprocess_images
from engine.heads import zero_shot_head
from engine.methods.atlas.method import (
    ComposedTower,
    IndexStream,
    augmented_pixels,
    batch_parts,
    build_composition,
    few_shot_indices,
    gradient_selection,
    load_tasks,
    part_loss,
    partition_assignment,
    run,
    trusted_pseudo_labels,
    ufm_loss,
    write_checkpoint,
)
from engine.methods.atlas.params import AtlasParams
from engine.methods.catalogue import get_method
from engine.weights import build_model
from tests.engine_jobs import SPEC, Recorder, make_job, one_thread, write_task_vector  # noqa: F401 - fixture

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("atlas") / "job"
    job = make_job(root, n_vectors=2, sizes={"train": 12, "val": 6, "test": 6})
    # A third vector also touches the text tower, which aTLAS leaves at theta_0.
    path = write_task_vector(root / "tv2.safetensors", job.state, seed=7, prefix="")
    vector = job.inputs.task_vectors[0].__class__("tv2", "vector 2", path, None)
    job.inputs.task_vectors.append(vector)
    job.taus["tv2"] = load_file(str(path))
    return job


@pytest.fixture(scope="module")
def model(job):
    model = build_model(SPEC)
    model.load_state_dict(job.state)
    return model.requires_grad_(False)


def naive_weights(job, coefficients, blocks, isotropic=False):
    """theta_0 + sum_t sum_b lambda[t, b] tau_t[b] for every tensor, entry by entry in a Python loop."""
    out = {}
    for name, base in job.state.items():
        total = base.clone()
        if name in blocks:
            j = 0 if isotropic else blocks.index(name)
            for t, tau in enumerate(job.taus.values()):
                if name in tau:
                    total = total + coefficients[t, j] * tau[name]
        out[name] = total
    return out


@pytest.mark.parametrize("granularity", ["block", "isotropic"])
def test_composition_equals_naive_sum(job, model, granularity):
    composition, uncomposed = build_composition(model, job.inputs.task_vectors, granularity, "cpu")
    assert composition.blocks == sorted(n for n in job.state if n.startswith("visual."))
    assert uncomposed == len(job.taus["tv2"]) - len(composition.blocks)
    assert all(stack.shape[0] == 3 for stack in composition.stacks.values())
    coefficients = torch.randn(composition.coefficient_shape, generator=torch.Generator().manual_seed(0))
    assert coefficients.shape == (3, len(composition.blocks) if granularity == "block" else 1)
    composed = composition.compose(coefficients)
    expected = naive_weights(job, coefficients, composition.blocks, granularity == "isotropic")
    for name in composition.blocks:
        torch.testing.assert_close(composed[name], expected[name], rtol=1e-5, atol=1e-6)


def loss_of(features, head, labels):
    return F.cross_entropy(features @ head.T, labels)


def test_gradient_matches_independent_autograd_and_finite_differences(job, model):
    composition, _ = build_composition(model, job.inputs.task_vectors, "block", "cpu")
    tower = ComposedTower(model, composition)
    head = zero_shot_head(model, ["cat", "dog", "bird"])
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 1])
    start = 0.3 * torch.randn(composition.coefficient_shape, generator=torch.Generator().manual_seed(2))

    coefficients = start.clone().requires_grad_(True)
    loss_of(tower.features(coefficients, pixels), head, labels).backward()
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())

    # Independently: the whole CLIP through functional_call with naively summed weights.
    independent = start.clone().requires_grad_(True)
    weights = naive_weights(job, independent, composition.blocks)
    features = F.normalize(functional_call(model, weights, (pixels,))[0], dim=-1)
    loss_of(features, head, labels).backward()
    torch.testing.assert_close(coefficients.grad, independent.grad, rtol=1e-4, atol=1e-6)

    # Central differences in float64 on the coefficients with the largest gradients.
    double_model = build_model(SPEC).double()
    double_model.load_state_dict(job.state)
    double_model.requires_grad_(False)
    double_tower = ComposedTower(double_model, build_composition(double_model, job.inputs.task_vectors, "block",
                                                                 "cpu")[0])

    def double_loss(values):
        return float(loss_of(double_tower.features(values, pixels.double()), head.double(), labels))

    eps = 1e-5
    for flat_index in coefficients.grad.abs().flatten().topk(3).indices.tolist():
        index = np.unravel_index(flat_index, start.shape)
        up, down = start.double().clone(), start.double().clone()
        up[index] += eps
        down[index] -= eps
        numeric = (double_loss(up) - double_loss(down)) / (2 * eps)
        assert float(coefficients.grad[index]) == pytest.approx(numeric, rel=2e-3, abs=1e-6)


def read_checkpoint_expectation(job, coefficients_json):
    values = torch.tensor(coefficients_json["values"], dtype=torch.float32)
    return naive_weights(job, values, coefficients_json["blocks"])


def test_addition_outputs_and_checkpoint(job, tmp_path):
    params = AtlasParams(task_datasets={"tv0": "ds0", "tv1": "ds1"}, epochs=3, batch_size=8, lr=0.05)
    recorder = Recorder()
    result = run(job.inputs, params, recorder.context(tmp_path / "w", cache_dir=tmp_path / "cache"))
    coefficients = result.artifacts["coefficients"]
    assert coefficients["task_vectors"] == ["tv0", "tv1", "tv2"] and coefficients["granularity"] == "block"
    assert coefficients["blocks"] == sorted(n for n in job.state if n.startswith("visual."))
    assert np.array(coefficients["values"]).shape == (3, len(coefficients["blocks"]))
    curve = result.artifacts["learning_curve"]
    assert [entry["epoch"] for entry in curve] == [0, 1, 2, 3] and curve[0]["loss"] is None
    best = max(curve, key=lambda entry: entry["mean_normalised_accuracy"])  # first of the ties
    assert result.metrics["chosen"]["best_epoch"]["value"] == best["epoch"]
    if best["epoch"] == 0:
        assert not np.any(coefficients["values"])
    merged = load_file(str(result.checkpoint_path))
    expected = read_checkpoint_expectation(job, coefficients)
    assert merged.keys() == job.state.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-6, atol=1e-7)
    stages = [p.stage for p in recorder.reports]
    # Trained on val (6 images per task) with 4 images per task per step (batch 8, 2 tasks): 2 steps an epoch.
    assert stages.count("training") == 3 * 2 and stages.count("evaluation") == 4 and stages[-1] == "merging"
    assert result.metrics["chosen"]["train_split"]["value"] == {"ds0": "val", "ds1": "val"}
    assert result.metrics["steps_per_epoch"] == 2
    assert {entry["lr"] for entry in curve[1:]} == {0.05}  # constant schedule for addition
    assert list((tmp_path / "cache").iterdir())  # heads cached for the next job


def test_entropy_on_unlabelled_data_keeps_the_last_epoch(job, tmp_path):
    images = np.load(job.inputs.datasets["ds1"].path)["train_images"]
    np.savez(tmp_path / "unlabelled.npz", test_images=images, test_labels=np.full(len(images), -1))
    dataset = job.inputs.datasets["ds1"].__class__("unl", "unlabelled", tmp_path / "unlabelled.npz", ["a", "b"])
    inputs = job.inputs.__class__(job.inputs.base_path, job.inputs.base_spec, job.inputs.task_vectors,
                                  {"unl": dataset})
    params = AtlasParams(objective="entropy", target_dataset_id="unl", epochs=4, batch_size=12, lr=0.2)
    result = run(inputs, params, Recorder().context(tmp_path / "w"))
    curve = result.artifacts["learning_curve"]
    assert curve[-1]["loss"] < curve[1]["loss"]  # entropy minimised
    assert result.metrics["chosen"]["best_epoch"] == {"value": 4, "source": "last epoch (no labelled data to "
                                                                        "select on)"}
    assert np.abs(result.artifacts["coefficients"]["values"]).max() > 0.05


def test_a_checkpoint_with_only_unlabelled_targets_reports_no_mean(job, tmp_path):
    """The worker's path (run_method) evaluates the labelled targets only; with none there is no mean to report
    (it was NaN, from a mean over nothing)."""
    import json

    from engine.methods.catalogue import get_method
    from engine.running import run_method

    images = np.load(job.inputs.datasets["ds1"].path)["train_images"]
    np.savez(tmp_path / "unlabelled.npz", test_images=images, test_labels=np.full(len(images), -1))
    dataset = job.inputs.datasets["ds1"].__class__("unl", "unlabelled", tmp_path / "unlabelled.npz", ["a", "b"])
    inputs = job.inputs.__class__(job.inputs.base_path, job.inputs.base_spec, job.inputs.task_vectors,
                                  {"unl": dataset})
    params = AtlasParams(objective="entropy", target_dataset_id="unl", epochs=1, batch_size=12)
    result = run_method(get_method("atlas"), inputs, params, Recorder().context(tmp_path / "w"))
    assert result.metrics["evaluation"] == {"datasets": {}, "unlabelled": ["unl"]}
    json.dumps(result.metrics, allow_nan=False)


def independent_trusted_set(probabilities: np.ndarray, k: int) -> set[int]:
    """Per class, by plain sorting: the images whose most probable class it is, the k most probable."""
    chosen = set()
    for c in range(probabilities.shape[1]):
        members = [i for i in range(len(probabilities)) if int(np.argmax(probabilities[i])) == c]
        members.sort(key=lambda i: (-probabilities[i, c], i))
        chosen |= set(members[:k])
    return chosen


@pytest.mark.parametrize("count, classes, per_class, k", [(50, 5, None, 10), (2500, 10, None, 100),
                                                          (40, 4, 3, 3), (7, 10, None, 0)])
def test_ufm_trusts_per_class_the_most_confident_of_the_images_assigned_to_it(count, classes, per_class, k):
    """The paper's trusted set: per class, min(N / C, 100) (or per_class) images, taken among those the zero-shot
    model assigns to the class, most probable first; never every image (the official code's slip)."""
    rng = np.random.default_rng(count)
    logits = rng.normal(size=(count, classes)) * 3
    logits[:, 0] += 1.0  # class 0 predicted more often than others: it is capped at k
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    pseudo = trusted_pseudo_labels(probabilities.argmax(1), probabilities.max(1), classes, per_class)
    assert pseudo.per_class == k
    assert set(np.flatnonzero(pseudo.trusted)) == independent_trusted_set(probabilities, k)
    assert (pseudo.labels == probabilities.argmax(1)).all()
    by_class = np.bincount(pseudo.labels[pseudo.trusted], minlength=classes)
    assert by_class.max(initial=0) <= k and pseudo.summary(classes)["by_class"] == by_class.tolist()
    if k:
        assert not pseudo.trusted.all()


def test_ufm_loss_by_hand():
    """Trusted: cross-entropy of the strong view against the trusted label. Untrusted: against the weak view's
    prediction sharpened at T = 0.5 (p^2 renormalised), counted only above 0.99 confidence."""
    strong = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    weak = torch.tensor([[0.0, 0.0], [6.0, 0.0], [0.5, 0.0]])
    labels, trusted = torch.tensor([1, 0, 0]), torch.tensor([True, False, False])
    log_strong = strong.log_softmax(1)
    p = torch.tensor([1.0, np.exp(-6.0)]) / (1 + np.exp(-6.0))
    sharp = p**2 / (p**2).sum()  # 0.99999 > 0.99: counts; the third image's (0.62 -> 0.73) does not
    expected = (-log_strong[0, 1] - (sharp * log_strong[1]).sum()) / 2
    torch.testing.assert_close(ufm_loss(strong, weak, labels, trusted), expected.float())
    assert float(ufm_loss(strong[2:], weak[2:], labels[2:], trusted[2:])) == 0.0  # nothing counts


def test_ufm_adapts_on_unlabelled_images_from_the_trusted_set(job, model, tmp_path):
    images = np.load(job.inputs.datasets["ds0"].path)["train_images"]
    np.savez(tmp_path / "unlabelled.npz", test_images=images, test_labels=np.full(len(images), -1))
    source = job.inputs.datasets["ds0"]
    dataset = source.__class__("unl", "unlabelled", tmp_path / "unlabelled.npz", source.class_names)
    inputs = job.inputs.__class__(job.inputs.base_path, job.inputs.base_spec, job.inputs.task_vectors,
                                  {"unl": dataset})
    params = AtlasParams(objective="ufm", target_dataset_id="unl", epochs=3, batch_size=12, lr=0.2)
    result = run(inputs, params, Recorder().context(tmp_path / "w"))
    # the trusted set from theta_0's probabilities, computed here with a plain zero-shot head
    head = zero_shot_head(model, source.class_names, source.templates)
    with torch.no_grad():
        logits = F.normalize(model.encode_image(preprocess_images(images, model)), dim=-1) @ head.T
    probabilities = logits.softmax(1).numpy()
    k = min(len(images) // len(source.class_names), 100)
    trusted = result.metrics["trusted"]
    assert trusted["per_class"] == k and result.metrics["chosen"]["trusted_per_class"]["value"] == k
    independent = sorted(independent_trusted_set(probabilities, k))
    assert trusted["images"] == len(independent)
    assert trusted["by_class"] == np.bincount(probabilities[independent].argmax(1),
                                              minlength=len(source.class_names)).tolist()
    assert result.metrics["chosen"]["augment"] == {"value": True, "source": "default"}  # the strong view
    assert result.metrics["chosen"]["best_epoch"]["value"] == 3  # no labels to select on
    assert np.abs(result.artifacts["coefficients"]["values"]).max() > 0.01


def test_negation_keeps_the_control(job, tmp_path):
    params = AtlasParams(objective="negation", target_dataset_id="ds0", control_dataset_id="ctrl",
                         granularity="isotropic", epochs=3, batch_size=8, lr=0.5)
    result = run(job.inputs, params, Recorder().context(tmp_path / "w"))
    curve = result.artifacts["learning_curve"]
    floor = 0.95 * curve[0]["accuracy"]["ctrl"]
    eligible = [entry for entry in curve if entry["accuracy"]["ctrl"] >= floor]
    best = min(eligible, key=lambda entry: entry["accuracy"]["ds0"])["epoch"]
    assert result.metrics["chosen"]["best_epoch"]["value"] == best
    values = np.array(result.artifacts["coefficients"]["values"])
    assert (values == values[:, :1]).all()  # isotropic: one scalar per vector, repeated per block


def test_same_seed_same_bytes_few_shot_with_augmentation(job, tmp_path):
    params = AtlasParams(target_dataset_id="ctrl", shots=2, epochs=2, batch_size=4)
    runs = [run(job.inputs, params, Recorder().context(tmp_path / name, seed=seed))
            for name, seed in [("a", 4), ("b", 4), ("c", 5)]]
    data = [r.checkpoint_path.read_bytes() for r in runs]
    assert data[0] == data[1]
    assert runs[0].artifacts == runs[1].artifacts and runs[0].artifacts != runs[2].artifacts
    assert runs[0].metrics["chosen"]["augment"] == {"value": True, "source": "default"}
    assert runs[0].metrics["train_images"] == 6


def test_cancel_between_steps(job, tmp_path):
    recorder = Recorder(cancel_after=2)
    params = AtlasParams(objective="entropy", target_dataset_id="ds1", epochs=2, batch_size=4)
    with pytest.raises(Cancelled):
        run(job.inputs, params, recorder.context(tmp_path / "w"))
    assert [p.stage for p in recorder.reports] == ["evaluation", "training", "training"]
    assert not (tmp_path / "w" / "merged.safetensors").exists()


def test_sampling_and_augmentation_helpers():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    chosen = few_shot_indices(labels, 2, np.random.default_rng(0))
    assert np.bincount(labels[chosen]).tolist() == [2, 2, 2]
    assert chosen.tolist() == few_shot_indices(labels, 2, np.random.default_rng(0)).tolist()
    stream = IndexStream(np.arange(5), np.random.default_rng(0))
    drawn = stream.take(3).tolist() + stream.take(4).tolist()
    assert sorted(drawn[:5]) == [0, 1, 2, 3, 4]  # each pass is a permutation


def test_augmentation_crops_the_raw_image_to_the_model_input(model):
    raw = np.random.default_rng(0).integers(0, 256, size=(3, 48, 40, 3), dtype=np.uint8)  # larger than 32x32
    a = augmented_pixels(raw, model, torch.Generator().manual_seed(0))
    b = augmented_pixels(raw, model, torch.Generator().manual_seed(0))
    assert a.shape == (3, 3, 32, 32) and torch.equal(a, b)
    assert not torch.equal(a, augmented_pixels(raw, model, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, preprocess_images(raw, model))  # not the evaluation's centre crop
    # A constant image stays constant whatever the crop and flip: the raw colour, normalised as usual.
    flat = np.full((2, 48, 40, 3), 200, dtype=np.uint8)
    torch.testing.assert_close(augmented_pixels(flat, model, torch.Generator().manual_seed(0)),
                               preprocess_images(flat, model), rtol=0, atol=1e-5)


def test_missing_training_split_is_a_clear_error(job, tmp_path):
    params = AtlasParams(task_datasets={"tv0": "ds0"}, epochs=1, batch_size=4, train_split="train")
    assert run(job.inputs, params, Recorder().context(tmp_path / "ok")).metrics["chosen"]["train_split"] == \
        {"value": {"ds0": "train"}, "source": "given"}
    images = np.load(job.inputs.datasets["ds0"].path)["train_images"]
    np.savez(tmp_path / "noval.npz", train_images=images, train_labels=np.zeros(len(images), dtype=np.int64))
    dataset = job.inputs.datasets["ds0"].__class__("noval", "no val", tmp_path / "noval.npz", ["a", "b"])
    inputs = job.inputs.__class__(job.inputs.base_path, job.inputs.base_spec, job.inputs.task_vectors,
                                  {"noval": dataset})
    with pytest.raises(ValueError, match="no val split to train aTLAS on"):
        run(inputs, AtlasParams(task_datasets={"tv0": "noval"}, epochs=1), Recorder().context(tmp_path / "w"))


def test_negation_stops_after_the_epoch_that_drops_the_control(job, tmp_path):
    params = AtlasParams(objective="negation", target_dataset_id="ds0", control_dataset_id="ctrl",
                         granularity="isotropic", epochs=6, batch_size=8, lr=0.5)
    result = run(job.inputs, params, Recorder().context(tmp_path / "w"))
    curve = result.artifacts["learning_curve"]
    floor = 0.95 * curve[0]["accuracy"]["ctrl"]
    dropped = [entry["epoch"] for entry in curve if entry["accuracy"]["ctrl"] < floor]
    assert dropped, "the test needs a control that drops; raise lr"
    assert result.metrics["stopped_early"] == dropped[0] == curve[-1]["epoch"] < 6


def test_few_shot_repeats_its_shots_to_ten_batches_under_a_cosine_schedule(job, tmp_path):
    params = AtlasParams(target_dataset_id="ctrl", shots=1, epochs=2, batch_size=4)
    result = run(job.inputs, params, Recorder().context(tmp_path / "w"))
    assert result.metrics["train_images"] == 3 and result.metrics["steps_per_epoch"] == 10
    curve = result.artifacts["learning_curve"]
    assert curve[1]["lr"] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 9 / 20)))
    assert result.metrics["chosen"]["schedule"] == {"value": "cosine", "source": "default"}


def test_params_schema():
    assert get_method("atlas").params is AtlasParams
    addition = AtlasParams(task_datasets={"a": "d1", "b": "d2"})
    assert addition.mode == "addition" and addition.dataset_ids() == ["d1", "d2"]
    assert addition.task_vector_ids() == ["a", "b"] and addition.granularity == "block"
    assert AtlasParams(target_dataset_id="t", shots=4).mode == "few_shot"
    negation = AtlasParams(objective="negation", target_dataset_id="t", control_dataset_id="c")
    assert negation.dataset_ids() == ["t", "c"]
    for bad in [{}, {"task_datasets": {"a": "d"}, "target_dataset_id": "t"}, {"task_datasets": {"a": "d"}, "shots": 2},
                {"objective": "negation", "target_dataset_id": "t"},
                {"objective": "entropy", "target_dataset_id": "t", "control_dataset_id": "c"}]:
        with pytest.raises(ValidationError):
            AtlasParams(**bad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_vectors_halve_the_stacks_and_compose_close_to_float32(job, model, dtype):
    from engine.methods.atlas.method import vector_dtype

    assert vector_dtype("auto", "cpu") is None and vector_dtype("auto", "cuda:0") is torch.float16
    assert vector_dtype("bfloat16", "cpu") is torch.bfloat16
    full, _ = build_composition(model, job.inputs.task_vectors, "block", "cpu")
    half, _ = build_composition(model, job.inputs.task_vectors, "block", "cpu", dtype)
    assert all(stack.dtype == dtype for stack in half.stacks.values())
    assert sum(s.numel() * s.element_size() for s in half.stacks.values()) * 2 == \
        sum(s.numel() * s.element_size() for s in full.stacks.values())
    coefficients = 0.3 * torch.randn(full.coefficient_shape, generator=torch.Generator().manual_seed(3))
    expected = naive_weights(job, coefficients, full.blocks)
    composed = half.compose(coefficients)
    for name in full.blocks:
        assert composed[name].dtype == torch.float32  # theta_0 keeps its precision
        delta, reference = composed[name] - job.state[name], expected[name] - job.state[name]
        # the task-vector part carries the half type's relative precision, theta_0 none of it
        torch.testing.assert_close(delta, reference, rtol=2e-2, atol=2e-2 * float(reference.abs().max()) + 1e-6)


def test_partitions_are_seeded_and_uniform():
    first = partition_assignment("visual.w", (64, 64), 4, seed=3)
    assert first.dtype == torch.uint8 and torch.equal(first, partition_assignment("visual.w", (64, 64), 4, seed=3))
    assert not torch.equal(first, partition_assignment("visual.w", (64, 64), 4, seed=4))
    assert not torch.equal(first, partition_assignment("visual.v", (64, 64), 4, seed=3))
    counts = torch.bincount(first.flatten().long(), minlength=4)
    assert counts.min() > 0.2 * first.numel() and counts.max() < 0.3 * first.numel()


def test_partitioned_composition_is_each_entrys_own_coefficient(job, model, tmp_path):
    """aTLAS x K: entry by entry, theta_0 + sum_t lambda[t, b, partition of the entry] * tau_t, and the gradient
    of the coefficients is that formula's (taken in float64, entry by entry)."""
    composition, _ = build_composition(model, job.inputs.task_vectors, "block", "cpu", partitions=3,
                                       partition_seed=5)
    generator = torch.Generator().manual_seed(0)
    coefficients = torch.randn(composition.coefficient_shape, generator=generator, requires_grad=True)
    assert composition.coefficient_shape == (3, len(composition.blocks), 3)
    composed = composition.compose(coefficients)
    reference = coefficients.detach().double().requires_grad_()
    taus = list(job.taus.values())
    weights = {name: torch.randn(composed[name].shape, generator=generator) for name in composition.blocks}
    loss, expected_loss = 0.0, 0.0
    for j, name in enumerate(composition.blocks):
        index = partition_assignment(name, job.state[name].shape, 3, 5).long()
        expected = job.state[name].double().clone()
        for t, tau in enumerate(taus):
            if name in tau:
                expected = expected + reference[t, j][index] * tau[name].double()
        torch.testing.assert_close(composed[name].double(), expected.detach(), rtol=1e-5, atol=1e-6)
        loss = loss + (composed[name] * weights[name]).sum()
        expected_loss = expected_loss + (expected * weights[name].double()).sum()
    loss.backward()
    expected_loss.backward()
    torch.testing.assert_close(coefficients.grad.double(), reference.grad, rtol=1e-4, atol=1e-4)


def test_partitioned_checkpoint_is_rebuilt_from_the_coefficients_alone(job, tmp_path):
    import json

    params = AtlasParams(task_datasets={"tv0": "ds0", "tv1": "ds1"}, partitions=4, epochs=2, batch_size=8, lr=0.05)
    result = run(job.inputs, params, Recorder().context(tmp_path / "w", seed=9))
    document = json.loads(json.dumps(result.artifacts["coefficients"]))  # as GET .../coefficients serves it
    assert document["partitions"] == 4 and document["partition_seed"] == 9
    values = np.array(document["partition_values"])
    assert values.shape == (3, len(document["blocks"]), 4) and np.abs(values).max() > 0
    assert np.allclose(document["values"], values.mean(axis=-1))
    assert result.metrics["chosen"]["partition_seed"] == {"value": 9, "source": "the job's seed"}
    write_checkpoint(job.inputs, document, tmp_path / "rebuilt.safetensors", Recorder().context(tmp_path / "r"))
    rebuilt, merged = load_file(str(tmp_path / "rebuilt.safetensors")), load_file(str(result.checkpoint_path))
    assert all(torch.equal(rebuilt[name], merged[name]) for name in merged)
    # and it is the composition that training evaluated
    model = build_model(SPEC)
    model.load_state_dict(job.state)
    composition, _ = build_composition(model, job.inputs.task_vectors, "block", "cpu", partitions=4,
                                       partition_seed=9)
    for name, tensor in composition.compose(torch.tensor(values, dtype=torch.float32)).items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-5, atol=1e-6)


def test_partition_params():
    assert AtlasParams(task_datasets={"a": "b"}).partitions == 1
    for bad in ({"partitions": 2, "granularity": "isotropic"}, {"partition_seed": 3}, {"partitions": 0},
                {"partitions": 65}):
        with pytest.raises(ValidationError):
            AtlasParams(task_datasets={"a": "b"}, **bad)


def test_budget_selects_per_block_the_vectors_with_the_largest_coefficient_gradient(job, model, tmp_path):
    """<dL/dtheta_b, tau_t[b]> at theta_0, as the selection computes it, equals the gradient of the composed
    model's loss with respect to lambda[t, b] at 0 (autograd through every stacked vector)."""
    from engine.heads import HeadFactory

    params = AtlasParams(task_datasets={"tv0": "ds0", "tv1": "ds1"}, vectors_per_block=1, batch_size=8)
    tasks = load_tasks(job.inputs, params, HeadFactory(model, job.inputs, Recorder().context(tmp_path / "h")))
    selected, scores = gradient_selection(model, job.inputs.task_vectors,
                                          batch_parts(params, tasks, np.random.default_rng(0)), 1, 1, "cpu")
    parts = batch_parts(params, tasks, np.random.default_rng(0))  # the same batch, drawn again
    drawn = [part.stream.take(part.count) for part in parts]
    composition, _ = build_composition(model, job.inputs.task_vectors, "block", "cpu")
    coefficients = torch.zeros(composition.coefficient_shape, requires_grad=True)
    pixels = torch.cat([preprocess_images(part.images[idx], model) for part, idx in zip(parts, drawn, strict=True)])
    features = ComposedTower(model, composition).features(coefficients, pixels)
    loss, offset = 0.0, 0
    for part, idx in zip(parts, drawn, strict=True):
        loss = loss + part_loss(part, features[offset:offset + len(idx)], idx)
        offset += len(idx)
    loss.backward()
    for j, name in enumerate(composition.blocks):
        expected = coefficients.grad[:, j].abs().double()
        assert scores[name] == pytest.approx(expected.tolist(), rel=1e-3, abs=1e-9), name
        assert selected[name] == [int(expected.argmax())]


def test_budget_holds_and_learns_only_the_selected_vectors(job, tmp_path):
    pairs = {"tv0": "ds0", "tv1": "ds1"}
    full = run(job.inputs, AtlasParams(task_datasets=pairs, epochs=1, batch_size=8), Recorder().context(tmp_path / "f"))
    budget = run(job.inputs, AtlasParams(task_datasets=pairs, epochs=1, batch_size=8, vectors_per_block=1),
                 Recorder().context(tmp_path / "b"))
    selected = budget.metrics["budget"]["selected"]
    document = budget.artifacts["coefficients"]
    ids = document["task_vectors"]
    for j, name in enumerate(document["blocks"]):
        assert len(selected[name]) == 1
        for t, tv in enumerate(ids):
            if tv not in selected[name]:
                assert document["values"][t][j] == 0.0
    assert budget.metrics["budget"]["learned_coefficients"] == len(document["blocks"])
    # three vectors, one held per block: a third of the stacks (the text-tower vector's blocks are visual too)
    assert budget.metrics["stacked_vector_bytes"] * 3 == full.metrics["stacked_vector_bytes"]
    with pytest.raises(ValidationError):
        AtlasParams(task_datasets=pairs, vectors_per_block=1, granularity="isotropic")


def test_a_budget_normalises_by_the_whole_fine_tuned_models(job, tmp_path):
    """Each task's fine-tuned reference is theta_0 + its whole tau, with or without a budget: through the
    composition, a vector not selected for a block left that block at theta_0 in its 'fine-tuned' model. Epoch 0
    is the same model in both runs, so its normalised accuracies must agree."""
    pairs = {"tv0": "ds0", "tv1": "ds1"}
    curves = [run(job.inputs, AtlasParams(task_datasets=pairs, epochs=1, batch_size=8, **budget),
                  Recorder().context(tmp_path / str(i))).artifacts["learning_curve"]
              for i, budget in enumerate([{}, {"vectors_per_block": 1}])]
    full, budget = (curve[0] for curve in curves)
    assert full["accuracy"] == budget["accuracy"]
    assert budget["normalised_accuracy"] == pytest.approx(full["normalised_accuracy"], abs=1e-12)

"""The merge-quality benchmark's --quick assets: formats, task vectors, measured accuracies."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from safetensors import safe_open

from bench.quality.build_assets import build_assets
from engine.data import load_dataset
from engine.safetensors_io import read_header


@pytest.fixture(scope="module")
def assets(quick_bench_assets):
    return quick_bench_assets


def test_files_exist_and_load_without_pickle(assets):
    assert read_header(assets.base_path).tensors
    assert json.loads((assets.root / "model_config.json").read_text()) == assets.model_config
    for task in [*assets.tasks, assets.held_out]:
        with np.load(task.dataset_path, allow_pickle=False) as data:
            assert data["class_names"].dtype.kind == "U"
            assert list(data["class_names"]) == task.class_names
            for split in ("train", "val", "test"):
                images, labels = data[f"{split}_images"], data[f"{split}_labels"]
                assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3
                assert len(images) == len(labels) > 0
                assert labels.min() >= 0 and labels.max() < len(task.class_names)
        assert set(load_dataset(task.dataset_path)) == {"train", "val", "test"}


def test_task_vectors_touch_only_visual_float_tensors(assets):
    base = read_header(assets.base_path).tensors
    assert len(assets.tasks) == 4 and assets.held_out.vector_path is None
    for task in assets.tasks:
        vector = read_header(task.vector_path).tensors
        assert vector and all(name.startswith("visual.") for name in vector)
        assert all(info.is_float and info.shape == base[name].shape for name, info in vector.items())
        with safe_open(str(task.vector_path), framework="pt") as f:
            assert any(f.get_tensor(name).abs().max() > 0 for name in vector)


def test_task_label_sets_are_distinct(assets):
    names = [tuple(task.class_names) for task in assets.tasks]
    assert len(set(names)) == len(names)


def test_measured_accuracies(assets):
    above_chance = [task.zero_shot["test"] > 1 / len(task.class_names) for task in assets.tasks]
    assert sum(above_chance) > len(assets.tasks) / 2
    for task in assets.tasks:
        assert task.fine_tuned["test"] > task.zero_shot["test"], task.name


def test_second_build_reuses_assets(assets):
    before = assets.base_path.stat().st_mtime_ns
    again = build_assets(assets.root, quick=True)
    assert again.manifest == assets.manifest
    assert assets.base_path.stat().st_mtime_ns == before


def test_disentanglement_matches_an_independent_computation(assets):
    """The manifest's cosine and cross-task change, recomputed from the files with plain torch."""
    import torch
    from safetensors.torch import load_file

    from engine.data import preprocess_images
    from engine.heads import zero_shot_head
    from engine.weights import build_model

    found = assets.manifest["disentanglement"]
    first, second = assets.tasks[:2]
    a, b = load_file(first.vector_path), load_file(second.vector_path)
    dot = sum(float((a[name].double() * b[name].double()).sum()) for name in a)
    norm_a = sum(float(t.double().square().sum()) for t in a.values()) ** 0.5
    norm_b = sum(float(t.double().square().sum()) for t in b.values()) ** 0.5
    assert found["cosine"][first.name][second.name] == pytest.approx(dot / (norm_a * norm_b), abs=1e-4)
    assert found["cosine"][first.name][first.name] == pytest.approx(1.0, abs=1e-4)

    base = load_file(assets.base_path)
    model = build_model(assets.model_spec).eval()
    model.load_state_dict(base)
    head = zero_shot_head(model, second.class_names, second.templates)
    model.load_state_dict({**base, **{name: base[name] + tau for name, tau in a.items()}})
    with np.load(second.dataset_path) as data:
        images, labels = data["val_images"], data["val_labels"]
    with torch.no_grad():
        features = model.encode_image(preprocess_images(images, model), normalize=True)
    tuned_on_first = float(((features @ head.T).argmax(1).numpy() == labels).mean())
    expected = tuned_on_first - second.zero_shot["val"]
    assert found["change_val"][first.name][second.name] == pytest.approx(expected, abs=2e-4)
    harms = [found["change_val"][x.name][y.name] for x in assets.tasks for y in assets.tasks if x is not y]
    assert found["mean_harm_val"] == pytest.approx(np.mean(harms), abs=1e-4)

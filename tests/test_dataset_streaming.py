"""Workers read datasets batch by batch from disk: the store's canonical files are memory-mapped."""
import numpy as np
import pytest

from engine.data import load_dataset, preprocess_images
from store.datasets import DatasetLimits, ingest_dataset


@pytest.fixture
def canonical(tmp_path):
    rng = np.random.default_rng(0)
    source = tmp_path / "upload.npz"
    splits = {split: (rng.integers(0, 256, (n, 24, 24, 3), dtype=np.uint8), rng.integers(0, 4, n))
              for split, n in (("train", 300), ("val", 40), ("test", 50))}
    np.savez_compressed(source, class_names=np.array(["a", "b", "c", "d"]),
                        **{f"{s}_images": i for s, (i, _) in splits.items()},
                        **{f"{s}_labels": label for s, (_, label) in splits.items()})
    out = tmp_path / "canonical.npz"
    ingest_dataset(source, "upload.npz", out, DatasetLimits(max_images=1000, max_unpacked_bytes=10**8))
    return out, splits


def test_canonical_images_are_memory_mapped_and_equal_to_a_full_read(canonical):
    path, splits = canonical
    loaded = load_dataset(path)
    with np.load(path) as full:
        for split, (images, labels) in loaded.items():
            assert isinstance(images, np.memmap) and not images.flags.writeable
            np.testing.assert_array_equal(images, full[f"{split}_images"])
            np.testing.assert_array_equal(labels, full[f"{split}_labels"])
    np.testing.assert_array_equal(loaded["train"][0], splits["train"][0])


def test_a_compressed_file_is_read_whole_instead(tmp_path):
    path = tmp_path / "compressed.npz"
    images = np.arange(2 * 8 * 8 * 3, dtype=np.uint8).reshape(2, 8, 8, 3)
    np.savez_compressed(path, test_images=images, test_labels=np.array([0, 1]))
    loaded = load_dataset(path)["test"][0]
    assert not isinstance(loaded, np.memmap)
    np.testing.assert_array_equal(loaded, images)


def test_a_mapped_batch_preprocesses_like_an_in_memory_one(canonical):
    from engine.context import ModelSpec
    from engine.weights import build_model
    from tvforge.demo import TINY_CLIP_CONFIG

    path, splits = canonical
    model = build_model(ModelSpec(config=TINY_CLIP_CONFIG))
    mapped = load_dataset(path)["val"][0]
    batch = preprocess_images(mapped[5:21], model)
    np.testing.assert_array_equal(batch.numpy(), preprocess_images(splits["val"][0][5:21], model).numpy())

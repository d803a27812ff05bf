"""store.datasets: uploads built as real files, ingested into canonical npz files."""
import io
import pickle
import struct
import tempfile
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from store.datasets import DatasetError, DatasetLimits, ingest_dataset, load_canonical

LIMITS = DatasetLimits(max_images=100, max_unpacked_bytes=20 * 1024 * 1024, resize_to=16)
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def image_bytes(color=RED, size=(8, 6), fmt="PNG", mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def write_zip(path: Path, entries: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return path


def write_npz(path: Path, compressed=False, **arrays) -> Path:
    with open(path, "wb") as f:
        (np.savez_compressed if compressed else np.savez)(f, **arrays)
    return path


def ingest(tmp_path: Path, source: Path, limits=LIMITS, class_names=None, name="upload"):
    out = tmp_path / f"{name}.canonical.npz"
    summary = ingest_dataset(source, source.name, out, limits, class_names)
    return summary, out


def refused(tmp_path: Path, source: Path, status: int, limits=LIMITS, class_names=None) -> DatasetError:
    """Ingest, expecting `status`; nothing may be left at the output path."""
    out = tmp_path / "refused.canonical.npz"
    with pytest.raises(DatasetError) as caught:
        ingest_dataset(source, source.name, out, limits, class_names)
    assert caught.value.status == status, caught.value.detail
    assert caught.value.title and caught.value.detail
    assert not out.exists()
    return caught.value


def patch_zip_header_field(path: Path, entry: str, local_offset: int, central_offset: int, value: bytes) -> None:
    """Overwrite a field of one entry in both its local header and its central directory record."""
    with zipfile.ZipFile(path) as archive:
        local_at = archive.getinfo(entry).header_offset
    raw = bytearray(path.read_bytes())
    raw[local_at + local_offset:local_at + local_offset + len(value)] = value
    central_at = raw.index(b"PK\x01\x02")
    while raw[central_at + 46:central_at + 46 + len(entry)] != entry.encode():
        central_at = raw.index(b"PK\x01\x02", central_at + 4)
    raw[central_at + central_offset:central_at + central_offset + len(value)] = value
    path.write_bytes(bytes(raw))


# ---------------------------------------------------------------- zips of image folders


def test_zip_with_splits(tmp_path):
    source = write_zip(tmp_path / "pets.zip", {
        "train/": b"",
        "train/dog/c.bmp": image_bytes(BLUE, fmt="BMP"),
        "train/cat/b.jpg": image_bytes(GREEN, fmt="JPEG"),
        "train/cat/a.png": image_bytes(RED),
        "val/cat/d.gif": image_bytes(RED, fmt="GIF"),
        "val/dog/e.webp": image_bytes(BLUE, fmt="WEBP"),
        "test/dog/f.png": image_bytes(128, mode="L"),
    })
    summary, out = ingest(tmp_path, source)
    assert summary.source_format == "zip"
    assert summary.labeled
    assert summary.class_names == ["cat", "dog"]
    assert summary.image_shape == [6, 8, 3]
    assert summary.splits == {
        "train": {"count": 3, "per_class": {"cat": 2, "dog": 1}},
        "val": {"count": 2, "per_class": {"cat": 1, "dog": 1}},
        "test": {"count": 1, "per_class": {"cat": 0, "dog": 1}},
    }
    splits = load_canonical(out)
    assert list(splits) == ["train", "val", "test"]
    images, labels = splits["train"]
    assert images.dtype == np.uint8 and images.shape == (3, 6, 8, 3)
    assert labels.dtype == np.int64 and labels.tolist() == [0, 0, 1]
    assert (images[0] == RED).all()  # sorted by class then path: cat/a.png first
    assert (images[2] == BLUE).all()
    test_images, _ = splits["test"]
    assert (test_images[0] == test_images[0, :, :, :1]).all()  # grayscale repeated into RGB
    with np.load(out, allow_pickle=False) as data:
        assert data["class_names"].dtype.kind == "U"
        assert data["class_names"].tolist() == ["cat", "dog"]


def test_zip_without_splits_takes_the_order_of_given_class_names(tmp_path):
    source = write_zip(tmp_path / "flat.zip", {
        "cat/1.png": image_bytes(RED), "dog/2.png": image_bytes(BLUE), "dog/3.png": image_bytes(BLUE),
    })
    summary, out = ingest(tmp_path, source, class_names=["dog", "cat"])
    assert summary.class_names == ["dog", "cat"]
    assert summary.splits == {"train": {"count": 3, "per_class": {"dog": 2, "cat": 1}}}
    images, labels = load_canonical(out)["train"]
    assert labels.tolist() == [0, 0, 1]
    assert (images[2] == RED).all()


def test_unlabeled_zip_ignores_folders_dotfiles_and_macos_metadata(tmp_path):
    source = write_zip(tmp_path / "loose.zip", {
        "b.png": image_bytes(BLUE), "a.png": image_bytes(RED), "sub/": b"", ".DS_Store": b"junk",
        "__MACOSX/._a.png": b"junk", ".hidden/c.png": b"junk",
    })
    summary, out = ingest(tmp_path, source)
    assert not summary.labeled and summary.class_names is None
    assert summary.splits == {"train": {"count": 2}}
    images, labels = load_canonical(out)["train"]
    assert labels.tolist() == [-1, -1]
    assert (images[0] == RED).all()
    with np.load(out, allow_pickle=False) as data:
        assert "class_names" not in data.files


def test_unlabeled_zip_with_splits_keeps_given_class_names(tmp_path):
    source = write_zip(tmp_path / "loose.zip", {"train/a.png": image_bytes(), "test/b.png": image_bytes()})
    summary, out = ingest(tmp_path, source, class_names=["cat", "dog"])
    assert not summary.labeled and summary.class_names == ["cat", "dog"]
    assert summary.splits == {"train": {"count": 1}, "test": {"count": 1}}
    assert {split: labels.tolist() for split, (_, labels) in load_canonical(out).items()} == {
        "train": [-1], "test": [-1]}


def test_mixed_sizes_are_resized(tmp_path):
    source = write_zip(tmp_path / "mixed.zip", {
        "cat/a.png": image_bytes(RED, size=(8, 6)), "dog/b.png": image_bytes(BLUE, size=(30, 40)),
    })
    summary, out = ingest(tmp_path, source)
    assert summary.image_shape == [16, 16, 3]
    images, _ = load_canonical(out)["train"]
    assert images.shape == (2, 16, 16, 3)
    assert (images[0] == RED).all() and (images[1] == BLUE).all()


def test_same_upload_gives_identical_bytes(tmp_path):
    entries = {"train/cat/a.png": image_bytes(RED), "train/dog/b.png": image_bytes(BLUE),
               "val/cat/c.png": image_bytes(GREEN)}
    first = write_zip(tmp_path / "first.zip", entries)
    reordered = write_zip(tmp_path / "reordered.zip", dict(reversed(entries.items())), zipfile.ZIP_STORED)
    _, out_first = ingest(tmp_path, first, name="first")
    _, out_again = ingest(tmp_path, first, name="again")
    _, out_reordered = ingest(tmp_path, reordered, name="reordered")
    assert out_first.read_bytes() == out_again.read_bytes() == out_reordered.read_bytes()
    with zipfile.ZipFile(out_first) as canonical:
        assert {info.date_time for info in canonical.infolist()} == {(1980, 1, 1, 0, 0, 0)}
        assert {info.compress_type for info in canonical.infolist()} == {zipfile.ZIP_STORED}


@pytest.mark.parametrize("name", ["../evil.png", "/etc/evil.png", "cat/../../evil.png", "cat\\..\\..\\evil.png",
                                  "C:/evil.png"])
def test_zip_slip_is_refused(tmp_path, name):
    source = write_zip(tmp_path / "slip.zip", {"cat/ok.png": image_bytes(), name: image_bytes()})
    error = refused(tmp_path, source, 422)
    assert error.title == "Unsafe zip entry"
    assert repr(name) in error.detail


@pytest.fixture(scope="module")
def zip_bomb(tmp_path_factory) -> Path:
    """A 300 MB run of zeros that deflates to about 300 KB, next to one real image."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("cat/ok.png", image_bytes())
        with archive.open("cat/bomb.bmp", "w") as member:
            zeros = bytes(4 * 1024 * 1024)
            for _ in range(75):
                member.write(zeros)
    return path


@pytest.mark.parametrize(("max_unpacked_bytes", "status"), [(100 * 1024**2, 413), (1024**3, 422)])
def test_zip_bomb_is_refused_quickly_and_cheaply(tmp_path, zip_bomb, max_unpacked_bytes, status):
    limits = DatasetLimits(max_images=10, max_unpacked_bytes=max_unpacked_bytes)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        error = refused(tmp_path, zip_bomb, status, limits)
    finally:
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert elapsed < 1.0
    assert peak < 10 * 1024 * 1024
    assert "cat/bomb.bmp" in error.detail or str(max_unpacked_bytes) in error.detail


def test_an_npz_is_read_a_piece_at_a_time(tmp_path):
    """144 MiB of images (deflate packs such uploads 70:1) are streamed into the canonical file: the ingest never
    holds a split whole (np.load of it did, in the API's process: 208 MiB at the peak). An array saved in
    Fortran order, whose images are not together in the file, is still taken (loaded whole, as before)."""
    rng = np.random.default_rng(0)
    images = np.zeros((1000, 224, 224, 3), np.uint8)
    images[:, ::16] = rng.integers(0, 256, (1000, 14, 224, 3), dtype=np.uint8)
    source = tmp_path / "big.npz"
    np.savez_compressed(source, images=images, labels=rng.integers(0, 3, 1000))
    del images
    limits = DatasetLimits(max_images=1000, max_unpacked_bytes=1024**3)
    tracemalloc.start()
    try:
        summary = ingest_dataset(source, "big.npz", tmp_path / "out.npz", limits)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert summary.splits["train"]["count"] == 1000
    assert peak < 48 * 1024**2, f"{peak / 2**20:.0f} MiB"
    with np.load(source) as original:
        assert np.array_equal(load_canonical(tmp_path / "out.npz")["train"][0], original["images"])
        np.savez(tmp_path / "fortran.npz", images=np.asfortranarray(original["images"][:50]),
                 labels=original["labels"][:50])
        ingest_dataset(tmp_path / "fortran.npz", "fortran.npz", tmp_path / "out-fortran.npz", limits)
        assert np.array_equal(load_canonical(tmp_path / "out-fortran.npz")["train"][0], original["images"][:50])


def test_entry_larger_than_its_header_says_is_refused(tmp_path):
    source = tmp_path / "lying.zip"
    with zipfile.ZipFile(source, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("cat/ok.png", image_bytes())
        archive.writestr("cat/lie.bmp", bytes(50 * 1024 * 1024))
    patch_zip_header_field(source, "cat/lie.bmp", 22, 24, struct.pack("<I", 1000))  # uncompressed size
    started = time.perf_counter()
    error = refused(tmp_path, source, 422)
    assert time.perf_counter() - started < 1.0
    assert "cat/lie.bmp" in error.detail


def test_encrypted_entry_is_refused(tmp_path):
    source = write_zip(tmp_path / "locked.zip", {"cat/a.png": image_bytes()})
    patch_zip_header_field(source, "cat/a.png", 6, 8, struct.pack("<H", 0x1))  # flag bit 0: encrypted
    assert "encrypted" in refused(tmp_path, source, 422).detail


def test_too_many_images(tmp_path):
    source = write_zip(tmp_path / "many.zip", {f"cat/{i}.png": image_bytes() for i in range(4)})
    refused(tmp_path, source, 413, DatasetLimits(max_images=3, max_unpacked_bytes=10**6))


def test_too_many_unpacked_bytes(tmp_path):
    source = write_zip(tmp_path / "big.zip", {f"cat/{i}.png": image_bytes() for i in range(4)})
    refused(tmp_path, source, 413, DatasetLimits(max_images=10, max_unpacked_bytes=100))


def test_image_over_the_pixel_limit(tmp_path):
    source = write_zip(tmp_path / "huge.zip", {"cat/a.png": image_bytes(size=(8, 6))})
    error = refused(tmp_path, source, 422, DatasetLimits(max_images=10, max_unpacked_bytes=10**6,
                                                         max_image_pixels=47))
    assert "cat/a.png" in error.detail


@pytest.mark.parametrize("data", [b"not an image", image_bytes()[:45]])
def test_undecodable_image_is_named(tmp_path, data):
    source = write_zip(tmp_path / "broken.zip", {"cat/a.png": image_bytes(), "cat/broken.png": data})
    assert "cat/broken.png" in refused(tmp_path, source, 422).detail


@pytest.mark.parametrize("entries", [
    {}, {"cat/": b"", ".DS_Store": b"x"},  # nothing to ingest
    {"cat/a.png": image_bytes(), "b.png": image_bytes()},  # class folders for some images only
    {"x/cat/y/a.png": image_bytes()},  # nested too deeply
])
def test_zip_layouts_that_are_not_datasets(tmp_path, entries):
    refused(tmp_path, write_zip(tmp_path / "bad.zip", entries), 422)


def test_class_names_must_match_the_folders(tmp_path):
    source = write_zip(tmp_path / "pets.zip", {"cat/a.png": image_bytes(), "dog/b.png": image_bytes()})
    assert "bird" in refused(tmp_path, source, 422, class_names=["cat", "bird"]).detail
    refused(tmp_path, source, 422, class_names=["cat", "dog", "dog"])
    (tmp_path / "refused.canonical.npz").write_bytes(b"left by the caller")  # still removed on failure
    refused(tmp_path, source, 422, class_names=[])


# ---------------------------------------------------------------- npz


def test_npz_grayscale_with_default_class_names(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    summary, out = ingest(tmp_path, write_npz(tmp_path / "gray.npz", images=images,
                                              labels=np.array([2, 0], dtype=np.uint8)))
    assert summary.source_format == "npz" and summary.labeled
    assert summary.class_names == ["0", "1", "2"]
    assert summary.splits == {"train": {"count": 2, "per_class": {"0": 1, "1": 0, "2": 1}}}
    assert summary.image_shape == [3, 4, 3]
    canonical_images, labels = load_canonical(out)["train"]
    assert canonical_images.shape == (2, 3, 4, 3)
    assert (canonical_images == images[..., None]).all()
    assert labels.dtype == np.int64 and labels.tolist() == [2, 0]


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_rgb_with_stored_class_names(tmp_path, compressed):
    images = np.random.default_rng(0).integers(0, 256, (3, 5, 5, 3), dtype=np.uint8)
    source = write_npz(tmp_path / "rgb.npz", compressed, images=images, labels=np.array([1, 1, 0]),
                       class_names=np.array(["cat", "dog"]))
    summary, out = ingest(tmp_path, source)
    assert summary.class_names == ["cat", "dog"]
    assert summary.splits["train"]["per_class"] == {"cat": 1, "dog": 2}
    canonical_images, _ = load_canonical(out)["train"]
    assert (canonical_images == images).all()


def test_npz_per_split_unlabeled_with_alpha(tmp_path):
    rgba = np.full((2, 4, 4, 4), 7, dtype=np.uint8)
    source = write_npz(tmp_path / "splits.npz", train_images=rgba, test_images=rgba[:1])
    summary, out = ingest(tmp_path, source)
    assert not summary.labeled and summary.class_names is None
    assert summary.splits == {"train": {"count": 2}, "test": {"count": 1}}
    splits = load_canonical(out)
    assert splits["test"][0].shape == (1, 4, 4, 3)
    assert splits["train"][1].tolist() == [-1, -1]


def test_npz_per_split_labeled(tmp_path):
    images = np.zeros((2, 4, 4, 1), dtype=np.uint8)
    source = write_npz(tmp_path / "splits.npz", train_images=images, train_labels=np.array([0, 1]),
                       val_images=images, val_labels=np.array([1, 1]))
    summary, _ = ingest(tmp_path, source, class_names=["cat", "dog"])
    assert summary.splits == {"train": {"count": 2, "per_class": {"cat": 1, "dog": 1}},
                              "val": {"count": 2, "per_class": {"cat": 0, "dog": 2}}}


class WouldCreateMarker:
    """Unpickling this creates the marker file: proof of whether anything unpickled it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_npz_with_object_array_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "unpickled"
    source = write_npz(tmp_path / "evil.npz", images=np.zeros((1, 2, 2), dtype=np.uint8),
                       labels=np.array([WouldCreateMarker(marker)], dtype=object))
    error = refused(tmp_path, source, 415)
    assert "pickled arrays are refused" in error.detail
    assert not marker.exists()
    with np.load(source, allow_pickle=True) as data:  # the trap is armed: unpickling would have sprung it
        data["labels"]
    assert marker.exists()


@pytest.mark.parametrize("arrays", [
    {"images": np.zeros((2, 3, 3), dtype=np.float32)},
    {"images": np.zeros((2, 3, 3, 2), dtype=np.uint8)},
    {"images": np.zeros((2, 3), dtype=np.uint8)},
    {"images": np.zeros((0, 3, 3), dtype=np.uint8)},
    {"images": np.zeros((2, 3, 3), dtype=np.uint8), "labels": np.array([0, 1, 1])},
    {"images": np.zeros((2, 3, 3), dtype=np.uint8), "labels": np.array([0.0, 1.0])},
    {"images": np.zeros((2, 3, 3), dtype=np.uint8), "labels": np.array([0, -1])},
    {"images": np.zeros((2, 3, 3), dtype=np.uint8), "labels": np.array([0, 2]), "class_names": np.array(["a", "b"])},
    {"images": np.zeros((2, 3, 3), dtype=np.uint8), "extra": np.zeros(2)},
    {"train_images": np.zeros((2, 3, 3), dtype=np.uint8), "test_images": np.zeros((2, 4, 4), dtype=np.uint8)},
    {"train_images": np.zeros((2, 3, 3), dtype=np.uint8), "train_labels": np.array([0, 1]),
     "test_images": np.zeros((2, 3, 3), dtype=np.uint8)},
])
def test_npz_content_that_is_not_a_dataset(tmp_path, arrays):
    refused(tmp_path, write_npz(tmp_path / "bad.npz", **arrays), 422)


def test_npz_with_too_many_images(tmp_path):
    source = write_npz(tmp_path / "many.npz", images=np.zeros((4, 2, 2), dtype=np.uint8))
    refused(tmp_path, source, 413, DatasetLimits(max_images=3, max_unpacked_bytes=10**6))


@settings(max_examples=25, deadline=None)
@given(count=st.integers(1, 4), height=st.integers(1, 5), width=st.integers(1, 5),
       channels=st.sampled_from([None, 1, 3, 4]), labeled=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_npz_round_trip(count, height, width, channels, labeled, seed):
    rng = np.random.default_rng(seed)
    shape = (count, height, width) + ((channels,) if channels else ())
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    arrays = {"images": images} | ({"labels": rng.integers(0, 3, count)} if labeled else {})
    expected_rgb = np.repeat(images.reshape(count, height, width, -1), 3, axis=3) if channels in (None, 1) \
        else images[..., :3]
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        summary, out = ingest(tmp_path, write_npz(tmp_path / "data.npz", **arrays))
        canonical_images, canonical_labels = load_canonical(out)["train"]
    assert summary.image_shape == [height, width, 3]
    assert (canonical_images == expected_rgb).all()
    assert canonical_labels.tolist() == (arrays["labels"].tolist() if labeled else [-1] * count)


# ---------------------------------------------------------------- formats refused outright


def test_torch_checkpoint_zip_is_refused(tmp_path):
    source = write_zip(tmp_path / "model.pt", {
        "archive/data.pkl": pickle.dumps({"weight": 1}), "archive/data/0": bytes(16), "archive/version": b"3\n",
    })
    assert "pickle" in refused(tmp_path, source, 415).detail


@pytest.mark.parametrize(("name", "content"), [
    ("data.pkl", pickle.dumps([1, 2, 3])),
    ("notes.txt", b"just some text\n"),
    ("images.npy", b"\x93NUMPY\x01\x00" + bytes(8)),
    ("empty.zip", b""),
])
def test_other_formats_are_unsupported(tmp_path, name, content):
    source = tmp_path / name
    source.write_bytes(content)
    refused(tmp_path, source, 415)


def test_truncated_zip_is_invalid(tmp_path):
    source = write_zip(tmp_path / "pets.zip", {"cat/a.png": image_bytes()})
    source.write_bytes(source.read_bytes()[:40])
    refused(tmp_path, source, 422)


def test_templates_travel_from_the_npz_or_the_form_into_the_canonical_file(tmp_path):
    limits = DatasetLimits(max_images=100, max_unpacked_bytes=10**8)
    source = tmp_path / "d.npz"
    np.savez(source, images=np.zeros((2, 4, 4, 3), np.uint8), labels=np.array([0, 1]),
             templates=np.array(["a photo of a {c}.", "a {c}, drawn."]))
    summary = ingest_dataset(source, "d.npz", tmp_path / "out.npz", limits)
    assert summary.templates == ["a photo of a {c}.", "a {c}, drawn."]
    with np.load(tmp_path / "out.npz", allow_pickle=False) as data:
        assert list(data["templates"]) == summary.templates
    given = ingest_dataset(source, "d.npz", tmp_path / "out2.npz", limits, templates=["the {c}."])
    assert given.templates == ["the {c}."]  # the form's templates take precedence
    # A format spec or a conversion would make each prompt as long as it asks ({c:>99999999}: 100M characters), or
    # fail only when a job formats it.
    for bad in (["no class name"], ["{c} and {other}"], ["{c}", "{c}"], ["{c} {c}"], ["{c:>99999999}"],
                ["{c:{}}"], ["{c!r}"]):
        with pytest.raises(DatasetError):
            ingest_dataset(source, "d.npz", tmp_path / "bad.npz", limits, templates=bad)
        assert not (tmp_path / "bad.npz").exists()


def traced_peak(call) -> int:
    """Peak bytes Python allocated while call ran (numpy's buffers included)."""
    tracemalloc.start()
    try:
        call()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize("key", ["class_names", "templates"])
def test_npz_names_are_counted_before_they_are_loaded(tmp_path, key):
    """A million short names compress to under a megabyte (and ten million to a few): refused from the array's
    header, not after turning every one into a Python string (about 70 MiB for this one, 774 MiB for ten
    million)."""
    source = tmp_path / "names.npz"
    letters = np.random.default_rng(0).choice(np.array(list("abcdefghijklmnopqrstuvwxyz")), (1_000_000, 2))
    np.savez_compressed(source, images=np.zeros((2, 4, 4, 3), np.uint8), labels=np.array([0, 1]),
                        **{key: np.char.add(letters[:, 0], letters[:, 1])})
    limits = DatasetLimits(max_images=10, max_unpacked_bytes=10**9)
    errors = []
    peak = traced_peak(lambda: errors.append(refused(tmp_path, source, 422, limits)))
    assert "1000000 entries" in errors[0].detail
    assert peak < 8 * 1024 * 1024


def test_npz_names_longer_than_a_name_are_refused_from_the_header(tmp_path):
    source = tmp_path / "long.npz"
    np.savez(source, images=np.zeros((2, 4, 4, 3), np.uint8), labels=np.array([0, 1]),
             class_names=np.array(["cat", "d" * 10_000]))
    assert "characters" in refused(tmp_path, source, 422, DatasetLimits(max_images=10,
                                                                       max_unpacked_bytes=10**8)).detail


def test_a_zip_of_more_entries_than_images_allowed_is_refused_before_zipfile_reads_them(tmp_path):
    limits = DatasetLimits(max_images=10, max_unpacked_bytes=10**8, max_classes=10)
    entries = 2 * 10 + 4 * 10 + 64 + 1  # one past what folders and macOS twins could account for
    source = write_zip(tmp_path / "many.zip", {f"c/{i}.png": b"" for i in range(entries)}, zipfile.ZIP_STORED)
    assert "more than" in refused(tmp_path, source, 413, limits).detail


def test_a_zip_whose_end_record_understates_its_entries_is_counted_by_its_directory(tmp_path):
    """zipfile reads entries until the directory's bytes run out, whatever count the end record declares."""
    limits = DatasetLimits(max_images=10, max_unpacked_bytes=10**8, max_classes=10)
    source = write_zip(tmp_path / "lying.zip", {f"c/{i}.png": b"" for i in range(500)}, zipfile.ZIP_STORED)
    data = bytearray(source.read_bytes())
    end = data.rfind(b"PK\x05\x06")
    data[end + 8:end + 12] = struct.pack("<HH", 1, 1)  # entries on this disk, entries in all
    source.write_bytes(bytes(data))
    assert len(zipfile.ZipFile(source).infolist()) == 500
    assert "more than" in refused(tmp_path, source, 413, limits).detail


def test_a_zip_whose_end_record_hides_its_own_signature_is_still_counted(tmp_path):
    """The end record's entry counts set to the bytes of its signature: a search from the end (rfind) lands inside
    the record and finds no directory, while zipfile reads the record where it is and builds every entry."""
    limits = DatasetLimits(max_images=10, max_unpacked_bytes=10**8, max_classes=10)
    source = write_zip(tmp_path / "hidden.zip", {f"c/{i}.png": b"" for i in range(500)}, zipfile.ZIP_STORED)
    data = bytearray(source.read_bytes())
    end = len(data) - 22
    data[end + 8:end + 12] = b"PK\x05\x06"  # entries on this disk, entries in all: never used by zipfile
    source.write_bytes(bytes(data))
    assert len(zipfile.ZipFile(source).infolist()) == 500
    assert "more than" in refused(tmp_path, source, 413, limits).detail


def _one_image_zip(tmp_path: Path, name: str = "cat/a.png") -> bytearray:
    return bytearray(write_zip(tmp_path / "one.zip", {name: image_bytes()}).read_bytes())


def test_zips_zipfile_cannot_open_are_invalid_not_errors(tmp_path):
    """Each of these raised out of the ingest (a 500): a zip64 locator naming another disk, an entry needing
    zip version 10.0, an entry whose local name is not the UTF-8 its flag says."""
    locator = struct.pack("<4sIQI", b"PK\x06\x07", 1, 0, 2)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0, 0, 0, 0, 0)
    multi_disk = tmp_path / "disks.zip"
    multi_disk.write_bytes(b"PK\x03\x04" + bytes(26) + locator + end)
    version = _one_image_zip(tmp_path)
    version[version.rfind(b"PK\x01\x02") + 6] = 100  # version needed to extract: 10.0
    local_name = _one_image_zip(tmp_path, "cat/\u00e9.png")
    at = local_name.find("\u00e9".encode())  # the local header's copy of the name (the first)
    local_name[at:at + 2] = b"\xff\xfe"
    for name, data in (("version.zip", version), ("name.zip", local_name)):
        (tmp_path / name).write_bytes(bytes(data))
    for source in (multi_disk, tmp_path / "version.zip", tmp_path / "name.zip"):
        refused(tmp_path, source, 422)


def test_entries_are_streamed_to_the_decoder_not_read_whole(tmp_path):
    """An 8 MiB entry that is no image is refused from its first bytes (a 512 MiB one of a 3 MB upload was read
    whole, and copied, before Pillow said so); a large real image is decoded from the stream."""
    noise = np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    big = io.BytesIO()
    Image.fromarray(noise).save(big, format="BMP")  # 3 MiB, uncompressed
    limits = DatasetLimits(max_images=10, max_unpacked_bytes=10**9, resize_to=16)
    source = write_zip(tmp_path / "big.zip", {"cat/a.png": image_bytes(), "cat/b.bmp": bytes(8 * 2**20)},
                       zipfile.ZIP_STORED)
    errors = []
    assert traced_peak(lambda: errors.append(refused(tmp_path, source, 422, limits))) < 2**20
    assert "cat/b.bmp" in errors[0].detail
    source = write_zip(tmp_path / "photo.zip", {"cat/a.bmp": big.getvalue()}, zipfile.ZIP_STORED)
    summary, out = ingest(tmp_path, source, limits)
    assert np.array_equal(load_canonical(out)["train"][0][0], noise)


def test_the_pixels_decoded_before_resizing_are_bounded_from_the_headers(tmp_path):
    """Images of mixed sizes are decoded whole, then resized: a 1-bit 7000 x 7000 PNG is 6 KB and took 0.5 s."""
    big = image_bytes(size=(300, 200), mode="1", color=1)
    source = write_zip(tmp_path / "wide.zip", {"cat/a.png": image_bytes(), "cat/b.png": big, "cat/c.png": big})
    limits = DatasetLimits(max_images=10, max_unpacked_bytes=10**8, max_source_pixels=100_000, resize_to=16)
    assert "pixels before resizing" in refused(tmp_path, source, 413, limits).detail
    ingest(tmp_path, source, DatasetLimits(max_images=10, max_unpacked_bytes=10**8, max_source_pixels=120_048,
                                           resize_to=16))


def test_class_folder_names_follow_the_class_name_rules(tmp_path):
    """Folder names skipped the 300-character rule: one of 60,000 made every stored name that wide."""
    source = write_zip(tmp_path / "long.zip", {"cat/a.png": image_bytes(), f"{'d' * 301}/b.png": image_bytes()})
    assert "300 characters" in refused(tmp_path, source, 422).detail


def test_a_negative_npz_dimension_is_refused_from_its_header(tmp_path):
    """A split of -19990 images offset another's 20000 in the image count and the decoded size."""
    def npy(shape, payload: bytes) -> bytes:
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
        return header.getvalue() + payload

    source = write_zip(tmp_path / "negative.npz", {"train_images.npy": npy((20000, 8, 8), bytes(20000 * 64)),
                                                   "val_images.npy": npy((-19990, 8, 8), b"")}, zipfile.ZIP_STORED)
    limits = DatasetLimits(max_images=20, max_unpacked_bytes=10**8, max_decoded_bytes=10**5)
    errors = []
    assert traced_peak(lambda: errors.append(refused(tmp_path, source, 422, limits))) < 2**19  # not the 1.3 MB
    assert "declares a negative dimension" in errors[0].detail

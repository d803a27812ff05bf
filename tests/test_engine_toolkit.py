"""The engine's shared toolkit: model building (weights), preprocessing (data), zero-shot heads and their cache
(heads), accuracy (metrics)."""
import json
import os
import struct
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import open_clip
import open_clip.factory
import pytest
import torch

from engine.context import ModelSpec
from engine.data import load_dataset, preprocess_images
from engine.heads import DEFAULT_TEMPLATES, get_tokenizer, image_logits, zero_shot_head
from engine.metrics import evaluate_accuracy
from engine.safetensors_io import NotSafetensors, SafetensorsError, read_header, save_tensors, torch_dtype_name
from engine.weights import build_model, load_state_dict_file

TINY_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
CLASSES = ["cat", "dog", "red square"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(ModelSpec(config=TINY_CONFIG))


def test_build_from_config_dict(model):
    assert isinstance(model, open_clip.CLIP)
    assert not model.training
    assert model.visual.image_size == (32, 32)
    assert model.context_length == 16
    again = build_model(ModelSpec(config=dict(TINY_CONFIG)))
    assert again.open_clip_name == model.open_clip_name
    assert again.state_dict().keys() == model.state_dict().keys()


def test_build_needs_exactly_one_of_architecture_and_config():
    with pytest.raises(ValueError):
        build_model(ModelSpec())
    with pytest.raises(ValueError):
        build_model(ModelSpec(architecture="ViT-B-32", config=TINY_CONFIG))


def test_only_built_models_keep_their_config_registered():
    """A config open_clip cannot build, and a meta-device validation, leave open_clip's registry as it was (the
    API validates every uploaded config so: they used to stay for the process's life); a real build keeps its
    config, whose tokenizer is looked up by name, and a concurrent validation of the same config does not take
    it away."""
    registry = open_clip.factory._MODEL_CONFIGS
    unbuildable = TINY_CONFIG | {"text_cfg": TINY_CONFIG["text_cfg"] | {"heads": 3}}  # 64 wide, 3 heads
    validated = TINY_CONFIG | {"init_logit_scale": 1.5}
    before = set(registry)
    with pytest.raises(AssertionError, match="divisible by num_heads"):
        build_model(ModelSpec(config=unbuildable), device="meta")
    assert build_model(ModelSpec(config=validated), device="meta").state_dict().keys()
    assert set(registry) == before
    built = build_model(ModelSpec(config=validated))
    assert set(registry) == before | {built.open_clip_name}
    build_model(ModelSpec(config=validated), device="meta")
    assert built.open_clip_name in registry
    assert get_tokenizer(built)(["a cat"]).shape == (1, 16)


def test_head_matches_independent_computation(model):
    head = zero_shot_head(model, CLASSES)
    with torch.no_grad():
        rows = []
        for name in CLASSES:
            embeddings = []
            for template in DEFAULT_TEMPLATES:
                tokens = open_clip.tokenize([template.replace("{c}", name)], context_length=16)
                embedding = model.encode_text(tokens)[0]
                embeddings.append(embedding / embedding.norm())
            mean = torch.stack(embeddings).mean(0)
            rows.append(mean / mean.norm() * model.logit_scale.exp())
        expected = torch.stack(rows)
    assert head.shape == (len(CLASSES), 64)
    torch.testing.assert_close(head, expected, rtol=1e-5, atol=1e-5)


def test_head_cache_hit_is_identical(model, tmp_path):
    first = zero_shot_head(model, CLASSES, cache_dir=tmp_path, cache_key="base-1")
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1
    # Perturb the model: a cache hit must not recompute.
    with torch.no_grad():
        model.text_projection.add_(1.0)
    try:
        cached = zero_shot_head(model, CLASSES, cache_dir=tmp_path, cache_key="base-1")
        recomputed = zero_shot_head(model, CLASSES, cache_dir=tmp_path, cache_key="base-2")
    finally:
        with torch.no_grad():
            model.text_projection.sub_(1.0)
    assert torch.equal(first, cached)
    assert not torch.allclose(first, recomputed)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_preprocess_shapes_and_normalisation(model):
    rgb = np.full((5, 28, 40, 3), 255, dtype=np.uint8)
    gray = np.zeros((4, 8, 8), dtype=np.uint8)
    exact = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    assert preprocess_images(rgb, model).shape == (5, 3, 32, 32)
    assert preprocess_images(gray, model).shape == (4, 3, 32, 32)
    white = preprocess_images(rgb, model)
    expected_white = (1 - torch.tensor(open_clip.OPENAI_DATASET_MEAN)) / torch.tensor(open_clip.OPENAI_DATASET_STD)
    torch.testing.assert_close(white[0, :, 10, 10], expected_white)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(3, 1, 1)
    torch.testing.assert_close(preprocess_images(exact, model)[1] * std + mean,
                               torch.from_numpy(exact[1]).permute(2, 0, 1).float() / 255)
    with pytest.raises(ValueError):
        preprocess_images(rgb.astype(np.float32), model)


def test_logits_and_accuracy_agree(model):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    head = zero_shot_head(model, CLASSES)
    with torch.no_grad():
        logits = image_logits(model, preprocess_images(images, model), head)
    assert logits.shape == (10, len(CLASSES))
    labels = logits.argmax(-1).numpy()
    assert evaluate_accuracy(model, images, labels, head, batch_size=3) == 1.0
    assert evaluate_accuracy(model, images, (labels + 1) % len(CLASSES), head) == 0.0


def test_state_dict_file_roundtrip_and_refuses_pickle(model, tmp_path):
    path = tmp_path / "base.safetensors"
    save_tensors(path, {k: v.contiguous() for k, v in model.state_dict().items()})
    loaded = load_state_dict_file(path)
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    pickled = tmp_path / "base.pt"
    torch.save(model.state_dict(), pickled)
    with pytest.raises(NotSafetensors):
        load_state_dict_file(pickled)


def test_load_dataset_reads_splits(tmp_path):
    path = tmp_path / "d.npz"
    images = np.zeros((3, 32, 32, 3), np.uint8)
    np.savez(path, train_images=images, train_labels=np.array([0, 1, 2]), test_images=images[:1],
             test_labels=np.array([1]), class_names=np.array(["a", "b", "c"]))
    splits = load_dataset(path)
    assert set(splits) == {"train", "test"}
    assert splits["train"][1].dtype == np.int64


def test_streaming_writer_hashes_and_checks_what_it_writes(tmp_path):
    import hashlib

    from engine.safetensors_io import StreamingWriter

    tensors = {"a": torch.tensor([1.0, float("inf")]), "b": torch.arange(3), "c": torch.zeros(0),
               "d": torch.tensor([[float("nan")]], dtype=torch.float16), "e": torch.ones(2, 2)}
    path = tmp_path / "w.safetensors"
    with StreamingWriter(path, [(n, torch_dtype_name(t.dtype), tuple(t.shape)) for n, t in tensors.items()],
                         {"k": "v"}) as writer:
        for name in writer.names:
            writer.write(name, tensors[name])
    assert writer.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert writer.size == path.stat().st_size
    assert writer.non_finite == ["a", "d"]


def test_streaming_writer_checks_and_writes_piece_by_piece(tmp_path, monkeypatch):
    """Pieces of 64 bytes and a writeback hint every 128: no write call is larger than a piece, the hints
    cover the file in order and leave less than 128 bytes unhinted, a NaN or Inf in a float32 or float64
    piece after finite ones is found, and the bytes and hash are the whole tensors'."""
    import hashlib

    from safetensors.torch import load_file

    import engine.safetensors_io as safetensors_io
    from engine.safetensors_io import StreamingWriter

    monkeypatch.setattr(StreamingWriter, "WRITE_PIECE", 64)
    monkeypatch.setattr(StreamingWriter, "WRITEBACK_EVERY", 128)
    hinted = []
    monkeypatch.setattr(safetensors_io, "start_writeback", lambda _fd, start, stop: hinted.append((start, stop)))
    late_nan = torch.arange(100, dtype=torch.float32)
    late_nan[97] = float("nan")
    middle_inf = torch.arange(40, dtype=torch.float64)
    middle_inf[20] = -float("inf")
    bf16_inf = torch.ones(80, dtype=torch.bfloat16)  # checked whole: no piecewise check for 16-bit floats
    bf16_inf[70] = float("inf")
    tensors = {"a_finite": torch.randn(7, 33), "b_late_nan": late_nan, "c_middle_inf": middle_inf,
               "d_bf16": bf16_inf, "e_ints": torch.arange(50), "f_finite64": torch.randn(30, dtype=torch.float64)}
    path = tmp_path / "w.safetensors"
    writer = StreamingWriter(path, [(n, torch_dtype_name(t.dtype), tuple(t.shape)) for n, t in tensors.items()])
    file, calls = writer._file, []

    class RecordedFile:
        def write(self, data):
            calls.append(len(data))
            return file.write(data)

        def __getattr__(self, name):
            return getattr(file, name)

    writer._file = RecordedFile()
    with writer:
        for name in writer.names:
            writer.write(name, tensors[name])
    assert calls and max(calls) <= 64
    assert hinted[0][0] == 0 and all(a[1] == b[0] for a, b in zip(hinted, hinted[1:], strict=False))
    assert all(stop - start >= 128 for start, stop in hinted) and writer.size - hinted[-1][1] < 128
    assert writer.non_finite == ["b_late_nan", "c_middle_inf", "d_bf16"]
    assert writer.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = load_file(path)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name].view(torch.uint8), tensor.view(torch.uint8)), name


def test_a_failing_writer_raises_instead_of_blocking_the_caller(tmp_path, monkeypatch):
    """Room for four pieces in flight; four one-piece tensors are queued and a four-piece one waits for room
    when the first write fails. The writer must release the room of the tensors it then skips, so the caller
    gets the error instead of waiting forever."""
    import threading

    import engine.safetensors_io as safetensors_io
    from engine.safetensors_io import StreamingWriter

    monkeypatch.setattr(StreamingWriter, "WRITE_PIECE", 64)
    gate = threading.Event()

    def failing_buffer(_tensor):
        gate.wait(timeout=20)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors_io, "tensor_buffer", failing_buffer)
    tensors = {**{f"small{i}": torch.ones(16) for i in range(4)}, "wide": torch.ones(64)}
    writer = StreamingWriter(tmp_path / "w.safetensors", [(n, "F32", tuple(t.shape)) for n, t in tensors.items()],
                             in_flight=4 * 64)
    assert writer._budget_pieces() == 4
    outcome = {}

    def hand_over() -> None:
        try:
            for name in writer.names:
                writer.write(name, tensors[name])
            writer.close()
        except OSError as exc:
            outcome["error"] = exc

    caller = threading.Thread(target=hand_over, daemon=True)
    caller.start()
    caller.join(timeout=1)  # the caller now waits for room for "wide"
    gate.set()
    caller.join(timeout=20)
    assert not caller.is_alive(), "write() blocked on a writer that had failed"
    assert str(outcome["error"]) == "disk full"


def test_a_failing_hasher_is_raised_not_recorded_as_a_digest(tmp_path):
    """A digest that fails on the hasher thread makes close() raise, instead of a sha256 of part of the file."""
    from engine.safetensors_io import StreamingWriter

    class FailingDigest:
        def __init__(self):
            self.calls = 0

        def update(self, _data):
            self.calls += 1
            if self.calls == 2:
                raise MemoryError("hasher failed")

    tensors = {f"t{i}": torch.ones(1000) for i in range(5)}
    writer = StreamingWriter(tmp_path / "w.safetensors", [(n, "F32", (1000,)) for n in tensors])
    writer._digest = FailingDigest()
    with pytest.raises(MemoryError, match="hasher failed"):
        for name in writer.names:
            writer.write(name, tensors[name])
        writer.close()


@pytest.mark.parametrize("shape", [[int("9" * 4299)] * 400, [1] * 65, [2**48 + 1]],
                         ids=["400 dimensions of 4299 digits", "65 dimensions", "a dimension over 2^48"])
def test_a_header_shape_is_bounded_before_its_product_is_taken(tmp_path, shape):
    """The product of 400 integers of 4299 digits took 8.6 s; a 4 MiB header would hold 50 s of it."""
    header = json.dumps({"t": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4]}}).encode()
    path = tmp_path / "shape.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    with pytest.raises(SafetensorsError, match="at most 64 dimensions"):
        read_header(path)


PREPROCESS_PEAK = """
import resource, sys
import numpy as np
from engine.context import ModelSpec
from engine.data import preprocess_images
from engine.weights import build_model
from tests.engine_jobs import TINY_CONFIG
model = build_model(ModelSpec(config=TINY_CONFIG))
images = np.zeros((64, 1000, 1000, 3), np.uint8)
images[:] = 7  # touched: its pages count before the baseline
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
preprocess_images(images, model)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_preprocessing_a_batch_of_large_images_converts_a_bounded_slice_at_a_time(model):
    """64 images of 1000 x 1000 take 768 MB in float before they are resized: converted a 256 MiB slice at a
    time, each image's result the same as converted whole."""
    import subprocess
    import sys

    import engine.data
    from engine.data import preprocess_images

    images = np.random.default_rng(0).integers(0, 256, (5, 40, 50, 3), dtype=np.uint8)
    whole = preprocess_images(images, model)
    original = engine.data.PREPROCESS_CHUNK_BYTES
    engine.data.PREPROCESS_CHUNK_BYTES = 1  # an image a slice
    try:
        assert torch.equal(preprocess_images(images, model), whole)
    finally:
        engine.data.PREPROCESS_CHUNK_BYTES = original
    grown = int(subprocess.run([sys.executable, "-c", PREPROCESS_PEAK], capture_output=True, text=True, check=True,
                               timeout=300, cwd=Path(__file__).parent.parent).stdout.split()[-1])
    assert grown < 500 * 2**20, grown

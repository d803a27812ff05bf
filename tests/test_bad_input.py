"""Hostile and malformed input over real HTTP: the right problem+json status, and nothing left behind.

Every refused request is checked twice: the answer (status, `application/problem+json`, an RFC 9457 body,
`errors` locating the field for validation failures) and the state it leaves (no new file under the blob
store's sha256/ or tmp/, no new row in any table, no side effect of a pickle being loaded).
"""
import builtins
import io
import json
import math
import pickle
import sqlite3
import struct
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from engine.safetensors_io import save_tensors
from tvforge.demo import TINY_CLIP_CONFIG

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
LIMIT = 64 * MiB  # the stack's max_upload_bytes
TABLES = ("base_models", "task_vectors", "datasets", "jobs", "job_inputs", "checkpoints")
PROBLEM_JSON = "application/problem+json"


# ---------------------------------------------------------------- helpers


class Armed:
    """Unpickling this creates `marker` (builtins.open in write mode): proof that something was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (str(self.marker), "w")


def blob_files(stack) -> set[str]:
    root = stack.root / "var" / "blobs"
    return {str(p.relative_to(root)) for sub in ("sha256", "tmp") for p in (root / sub).rglob("*") if p.is_file()}


def row_counts(stack) -> dict[str, int]:
    with sqlite3.connect(f"file:{stack.root / 'var' / 'tvforge.db'}?mode=ro", uri=True) as db:
        return {table: db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in TABLES}


def listed_ids(stack) -> dict[str, list[str]]:
    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {stack.owner_key}"}) as http:
        return {path: [item["id"] for item in http.get(path, params={"limit": 200}).json()["items"]]
                for path in ("/v1/base-models", "/v1/task-vectors", "/v1/datasets", "/v1/jobs")}


def wait_for_idle_worker(stack, timeout_s: float = 120) -> None:
    """Jobs that earlier tests queued must finish first: their checkpoints are not this block's doing."""
    deadline = time.monotonic() + timeout_s
    while True:
        with sqlite3.connect(f"file:{stack.root / 'var' / 'tvforge.db'}?mode=ro", uri=True) as db:
            active = db.execute("SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')").fetchone()[0]
        if not active:
            return
        assert time.monotonic() < deadline, f"{active} jobs still active"
        time.sleep(0.2)


@contextmanager
def leaves_nothing(stack):
    """The block must not add a blob (stored or pending), a row, or a listed resource."""
    wait_for_idle_worker(stack)
    before = (blob_files(stack), row_counts(stack), listed_ids(stack))
    yield
    after = (blob_files(stack), row_counts(stack), listed_ids(stack))
    assert after[0] == before[0], f"files left in the blob store: {sorted(after[0] - before[0])}"
    assert after[1] == before[1], f"rows added: {before[1]} -> {after[1]}"
    assert after[2] == before[2]
    pending = stack.root / "var" / "blobs" / "tmp"  # made with the API's blob store, at its first use
    assert not pending.exists() or not list(pending.iterdir())


def assert_problem(response: httpx.Response, status: int, error_loc: list | None = None) -> dict:
    assert response.status_code == status, (response.status_code, response.text[:2000])
    assert response.headers["content-type"] == PROBLEM_JSON
    body = response.json()
    assert {"type", "title", "status", "detail"} <= body.keys(), body
    assert body["status"] == status
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    if error_loc is not None:
        assert body.get("errors"), body
        locs = [[str(part) for part in err["loc"]] for err in body["errors"]]
        want = [str(part) for part in error_loc]
        assert any(loc[:len(want)] == want for loc in locs), (want, locs)
        assert all({"loc", "msg", "type"} <= err.keys() for err in body["errors"])
    return body


def post_file(http: httpx.Client, path: str, fields: dict, filename: str, content: bytes) -> httpx.Response:
    return http.post(path, data=fields, files={"file": (filename, content)})


def safetensors_bytes(tensors: dict[str, torch.Tensor], tmp_path: Path) -> bytes:
    path = tmp_path / "t.safetensors"
    save_tensors(path, {k: v.contiguous() for k, v in tensors.items()})
    data = path.read_bytes()
    path.unlink()
    return data


def zip_bytes(entries: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def png_bytes(color=(200, 10, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return buffer.getvalue()


def npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def world(stack, demo_assets):
    """What the bad requests aim at: the owner's base models and task vectors, and another owner's."""
    config = json.dumps(demo_assets.config)
    base_bytes = demo_assets.base_path.read_bytes()
    tau_bytes = demo_assets.vector_paths[0].read_bytes()
    ids = {}
    for who, key in (("own", stack.owner_key), ("other", stack.other_key)):
        with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as http:
            base = http.post("/v1/base-models", data={"name": f"{who}-base", "config": config},
                             files={"file": ("base.safetensors", base_bytes)})
            assert base.status_code == 201, base.text
            tv = http.post("/v1/task-vectors", data={"base_model_id": base.json()["id"], "name": f"{who}-tv"},
                           files={"file": ("tau.safetensors", tau_bytes)})
            assert tv.status_code == 201, tv.text
            ids[f"{who}_base"], ids[f"{who}_tv"] = base.json()["id"], tv.json()["id"]
    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {stack.owner_key}"}) as http:
        # A second base of the same architecture, with a task vector of its own (same bytes: a shared blob).
        base2 = http.post("/v1/base-models", data={"name": "own-base-2", "config": config},
                          files={"file": ("base.safetensors", base_bytes)}).json()
        tv2 = http.post("/v1/task-vectors", data={"base_model_id": base2["id"], "name": "own-tv-2"},
                        files={"file": ("tau.safetensors", tau_bytes)}).json()
    ids["own_base_2"], ids["own_tv_2"] = base2["id"], tv2["id"]
    return ids


@pytest.fixture
def http(stack):
    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {stack.owner_key}"},
                      timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def tensors(demo_assets):
    return load_file(str(demo_assets.base_path)), load_file(str(demo_assets.vector_paths[0]))


# ---------------------------------------------------------------- what a valid upload stores


def test_an_uploaded_task_vector_carries_its_top_k_cuts_and_mean_magnitudes(stack, world, demo_assets):
    """Measured once at upload (TIES reads the cuts instead of two passes over every vector per merge, STA's
    data-free masks the means instead of one)."""
    from engine.selection import file_magnitude_means, file_top_k_cuts

    with sqlite3.connect(f"file:{stack.root / 'var' / 'tvforge.db'}?mode=ro", uri=True) as db:
        cuts, means = db.execute("SELECT magnitude_cuts, magnitude_means FROM task_vectors WHERE id = ?",
                                 (world["own_tv"],)).fetchone()
    assert json.loads(cuts) == file_top_k_cuts(demo_assets.vector_paths[0])
    assert len(json.loads(cuts)) == 100
    assert json.loads(means) == file_magnitude_means(demo_assets.vector_paths[0])
    assert set(json.loads(means)) == set(load_file(str(demo_assets.vector_paths[0])))


def test_a_lora_task_vector_is_registered_with_its_rank_and_its_products_cuts(stack, world, http, tensors, tmp_path):
    """Factors are validated against the base's shapes and measured as their product, never stored dense."""
    from engine.selection import top_k_cuts
    from engine.task_vectors import TaskVectorFile

    _, tau = tensors
    matrix, factored = _lora_factors(tau, 3)
    factored[f"{matrix}.lora_A"] = torch.randn(factored[f"{matrix}.lora_A"].shape, generator=torch.Generator()
                                               .manual_seed(0)) * 0.05
    content = safetensors_bytes(factored, tmp_path)
    response = post_file(http, "/v1/task-vectors", {"base_model_id": world["own_base"], "name": "lora"},
                         "lora.safetensors", content)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["lora_rank"] == 3 and body["tensor_count"] == len(factored)
    assert body["parameter_count"] == sum(t.numel() for t in factored.values())
    (tmp_path / "lora.safetensors").write_bytes(content)
    dense = TaskVectorFile(tmp_path / "lora.safetensors").float_deltas()
    assert body["l2_norm"] == pytest.approx(math.sqrt(sum(float(t.double().square().sum()) for t in dense.values())),
                                            rel=1e-6)
    with sqlite3.connect(f"file:{stack.root / 'var' / 'tvforge.db'}?mode=ro", uri=True) as db:
        stored = db.execute("SELECT magnitude_cuts FROM task_vectors WHERE id = ?", (body["id"],)).fetchone()[0]
    flat = torch.cat([dense[name].reshape(-1) for name in sorted(dense)]).numpy()
    assert json.loads(stored) == top_k_cuts(lambda: [flat])
    assert http.get(f"/v1/task-vectors/{body['id']}").json()["lora_rank"] == 3


# ---------------------------------------------------------------- pickles are refused and never loaded


def test_the_armed_pickle_would_fire_if_loaded(tmp_path):
    """Sanity check of the probe itself: loading it does create its marker."""
    marker = tmp_path / "fired"
    pickle.loads(pickle.dumps({"w": Armed(marker)}))
    assert marker.exists()


@pytest.mark.parametrize("route,filename,protocol", [
    ("/v1/base-models", "model.pt", 4),
    ("/v1/base-models", "x.safetensors", 4),
    ("/v1/task-vectors", "model.pt", 4),
    ("/v1/task-vectors", "x.safetensors", 4),
    ("/v1/task-vectors", "x.safetensors", 0),  # protocol 0: no \x80 magic, text opcodes
    ("/v1/datasets", "data.npz", 4),
    ("/v1/datasets", "data.pkl", 2),
])
def test_a_pickle_is_415_and_never_unpickled(stack, world, http, tmp_path, route, filename, protocol):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps({"visual.proj": Armed(marker)}, protocol=protocol)
    fields = {"name": "evil", "config": json.dumps(TINY_CLIP_CONFIG), "base_model_id": world["own_base"]}
    with leaves_nothing(stack):
        assert_problem(post_file(http, route, fields, filename, payload), 415)
    assert not marker.exists(), "the service unpickled the upload"


@pytest.mark.parametrize("route,filename", [
    ("/v1/task-vectors", "tau.bin"),
    ("/v1/task-vectors", "tau.safetensors"),
    ("/v1/base-models", "base.bin"),
    ("/v1/datasets", "data.zip"),  # torch's zip container holds data.pkl
])
def test_a_torch_zip_pickle_is_415_and_never_unpickled(stack, world, http, tmp_path, route, filename):
    marker = tmp_path / "unpickled"
    path = tmp_path / "checkpoint.bin"
    torch.save({"visual.proj": torch.zeros(2), "armed": Armed(marker)}, path)
    assert path.read_bytes()[:4] == b"PK\x03\x04"
    fields = {"name": "evil", "config": json.dumps(TINY_CLIP_CONFIG), "base_model_id": world["own_base"]}
    with leaves_nothing(stack):
        assert_problem(post_file(http, route, fields, filename, path.read_bytes()), 415)
    assert not marker.exists(), "the service unpickled the upload"


def test_an_npz_with_an_object_array_is_415_and_never_unpickled(stack, http, tmp_path):
    marker = tmp_path / "unpickled"
    images = np.empty(2, dtype=object)
    images[0], images[1] = Armed(marker), {"x": 1}
    payload = npz_bytes(images=images, labels=np.zeros(2, dtype=np.int64))
    with leaves_nothing(stack):
        assert_problem(post_file(http, "/v1/datasets", {"name": "objects"}, "d.npz", payload), 415)
    assert not marker.exists(), "the service unpickled the upload"


def _with_0x80_prefix(tau: dict, tmp_path: Path) -> bytes:
    """A valid safetensors file whose 8-byte length prefix starts with 0x80, the pickle opcode PROTO."""
    path = tmp_path / "t.safetensors"
    for pad in range(0, 512, 8):
        save_tensors(path, tau, metadata={"pad": "x" * pad})
        if path.read_bytes()[:1] == b"\x80":
            return path.read_bytes()
    raise AssertionError("no padding gave a 0x80 prefix")


def test_a_safetensors_file_whose_length_starts_with_0x80_is_not_taken_for_a_pickle(stack, world, http, tensors,
                                                                                     tmp_path):
    """Regression: one header length in 32 begins with byte 0x80 and was refused as a pickle (415)."""
    content = _with_0x80_prefix(tensors[1], tmp_path)
    with leaves_nothing(stack):
        assert_problem(post_file(http, "/v1/task-vectors", {"base_model_id": world["own_base"], "name": "cut"},
                                 "tau.safetensors", content[:40]), 422)
    response = post_file(http, "/v1/task-vectors", {"base_model_id": world["own_base"], "name": "0x80"},
                         "tau.safetensors", content)
    assert response.status_code == 201, response.text


# ---------------------------------------------------------------- broken or mismatched weights


def _cut(data: bytes, where: str) -> bytes:
    return data[:-100] if where == "data" else data[:20]


def _lora_factors(tau: dict, rank: int, scale: float = 0.1, a_extra: int = 0) -> tuple[str, dict[str, torch.Tensor]]:
    """(a weight matrix of tau, tau with that matrix replaced by rank-`rank` factors; lora_A a_extra columns wide)."""
    matrix = next(n for n in sorted(tau) if n.startswith("visual.") and tau[n].dim() == 2 and min(tau[n].shape) > 2)
    out_dim, in_dim = tau[matrix].shape
    rest = {n: t for n, t in tau.items() if n != matrix}
    return matrix, rest | {f"{matrix}.lora_A": torch.full((rank, in_dim + a_extra), scale),
                           f"{matrix}.lora_B": torch.full((out_dim, rank), scale)}


def _lora_cases(tau: dict) -> dict[str, dict[str, torch.Tensor]]:
    matrix, factored = _lora_factors(tau, 2)
    return {
        "lora_A without its lora_B": {n: t for n, t in factored.items() if not n.endswith(".lora_B")},
        "lora factors of the wrong shape": _lora_factors(tau, 2, a_extra=1)[1],
        "lora rank over the matrix's": _lora_factors(tau, min(tau[matrix].shape) + 1)[1],
        "lora factors and the dense tensor": factored | {matrix: tau[matrix]},
        "lora factor holding nan": factored | {f"{matrix}.lora_A": torch.full_like(factored[f"{matrix}.lora_A"],
                                                                                  float("nan"))},
        "lora product overflowing float32": _lora_factors(tau, 2, scale=1e30)[1],
    }


def _tau_cases(base: dict, tau: dict) -> dict[str, dict[str, torch.Tensor]]:
    name = sorted(tau)[0]
    shape_name = next(n for n in sorted(tau) if tau[n].dim() >= 1 and tau[n].shape[0] > 1)
    return _lora_cases(tau) | {
        "shape mismatch": tau | {shape_name: torch.zeros(tau[shape_name].shape[0] + 1, *tau[shape_name].shape[1:])},
        "unknown key": tau | {"visual.no_such_tensor": torch.zeros(3)},
        "nan": tau | {name: torch.full_like(tau[name], float("nan"))},
        "inf": tau | {name: torch.full_like(tau[name], float("inf"))},
        "-inf in one entry": tau | {name: tau[name].flatten().index_fill(0, torch.tensor([0]), float("-inf"))
                                    .reshape(tau[name].shape)},
        "integer tensor": tau | {name: torch.ones(tau[name].shape, dtype=torch.int32)},
        "empty": {},
    }


@pytest.mark.parametrize("case", ["shape mismatch", "unknown key", "nan", "inf", "-inf in one entry",
                                  "integer tensor", "empty", "truncated data", "truncated header",
                                  "finetuned identical to base", "finetuned with nan", "lora_A without its lora_B",
                                  "lora factors of the wrong shape", "lora rank over the matrix's",
                                  "lora factors and the dense tensor", "lora factor holding nan",
                                  "lora product overflowing float32", "finetuned with integer tensors",
                                  "more tensors than a vector of the base can have",
                                  "fine-tuned weights sent as a task vector", "a task vector sent as fine-tuned"])
def test_invalid_task_vector_is_422(stack, world, http, tensors, tmp_path, case):
    base, tau = tensors
    kind = "task_vector"
    if case.startswith("truncated"):
        content = _cut(safetensors_bytes(tau, tmp_path), case.split()[1])
    elif case == "finetuned identical to base":
        content, kind = safetensors_bytes(base, tmp_path), "finetuned"
    elif case == "finetuned with nan":
        name = sorted(tau)[0]
        content, kind = safetensors_bytes(base | {name: torch.full_like(base[name], float("nan"))}, tmp_path), \
            "finetuned"
    elif case == "finetuned with integer tensors":
        name = next(n for n in sorted(base) if base[n].is_floating_point())
        content, kind = safetensors_bytes(base | {name: base[name].to(torch.int32)}, tmp_path), "finetuned"
    elif case == "fine-tuned weights sent as a task vector":  # stored as tau, a merge added theta_ft to theta_0
        content = safetensors_bytes({name: base[name] + tau[name] if name in tau else base[name] for name in base},
                                    tmp_path)
    elif case == "a task vector sent as fine-tuned":  # stored as tau - theta_0
        content, kind = safetensors_bytes(tau, tmp_path), "finetuned"
    elif case == "more tensors than a vector of the base can have":
        content = safetensors_bytes({f"visual.x{i}": torch.zeros(1) for i in range(2 * len(base) + 1)}, tmp_path)
    else:
        content = safetensors_bytes(_tau_cases(base, tau)[case], tmp_path)
    fields = {"base_model_id": world["own_base"], "name": "bad", "kind": kind}
    with leaves_nothing(stack):
        body = assert_problem(post_file(http, "/v1/task-vectors", fields, "tau.safetensors", content), 422)
    assert body["type"] == "/problems/invalid-weights"
    if case == "finetuned with integer tensors":
        assert "kind" in body["detail"], body  # not "the fine-tuned weights equal the base model"
    if case == "fine-tuned weights sent as a task vector":
        assert "looks like fine-tuned weights" in body["detail"] and "kind=finetuned" in body["detail"], body
    if case == "a task vector sent as fine-tuned":
        assert "does not look like fine-tuned weights" in body["detail"], body


@pytest.mark.parametrize("case", ["truncated data", "truncated header", "unknown key", "missing key",
                                  "shape mismatch", "nan", "integer weights", "more tensors than the model has",
                                  "more tensors than the model has, escaped"])
def test_invalid_base_model_weights_are_422(stack, world, http, tensors, tmp_path, case):
    base, _ = tensors
    name = next(n for n in sorted(base) if base[n].is_floating_point() and base[n].dim() >= 1)
    if case.startswith("truncated"):
        content = _cut(safetensors_bytes(base, tmp_path), case.split()[1])
    else:
        state = {"unknown key": base | {"bogus.weight": torch.zeros(2)},
                 "missing key": {k: v for k, v in base.items() if k != name},
                 "shape mismatch": base | {name: torch.zeros(base[name].shape[0] + 1, *base[name].shape[1:])},
                 "nan": base | {name: torch.full_like(base[name], float("nan"))},
                 # An integer tensor where the model has a float one: the base's, not a later upload's, fault.
                 "integer weights": base | {name: base[name].to(torch.int8)},
                 # Refused from a count of the header's bytes, before its JSON is parsed.
                 "more tensors than the model has": base | {f"extra.{i}": torch.zeros(1)
                                                            for i in range(len(base) + 1)},
                 # The same with the key escaped, which the count of bytes misses: counted once parsed.
                 "more tensors than the model has, escaped": base | {f"extra.{i}": torch.zeros(1)
                                                                     for i in range(len(base) + 1)}}[case]
        content = safetensors_bytes(state, tmp_path)
        if case.endswith("escaped"):
            content = _escape_data_offsets(content)
    fields = {"name": "bad-base", "config": json.dumps(TINY_CLIP_CONFIG)}
    with leaves_nothing(stack):
        body = assert_problem(post_file(http, "/v1/base-models", fields, "base.safetensors", content), 422)
    if case.startswith("more tensors"):
        assert "tensors; at most" in body["detail"], body


def _escape_data_offsets(content: bytes) -> bytes:
    """The same file with every header key data_offsets written data\\u005foffsets (the same JSON string)."""
    (length,) = struct.unpack("<Q", content[:8])
    header = content[8:8 + length].replace(b'"data_offsets"', b'"data\\u005foffsets"')
    assert json.loads(header) == json.loads(content[8:8 + length])
    return struct.pack("<Q", len(header)) + header + content[8 + length:]


# ---------------------------------------------------------------- base model form


@pytest.mark.parametrize("fields,loc", [
    ({"name": "both", "architecture": "ViT-B-32", "config": json.dumps(TINY_CLIP_CONFIG)}, ["body", "architecture"]),
    ({"name": "neither"}, ["body", "architecture"]),
    ({"name": "not-json", "config": "{embed_dim: 64,"}, ["body", "config"]),
    ({"name": "json-but-a-list", "config": "[1, 2]"}, ["body", "config"]),
    ({"name": "nan", "config": json.dumps(TINY_CLIP_CONFIG | {"quick_gelu": float("nan")})}, ["body", "config"]),
    ({"name": "inf", "config": json.dumps(TINY_CLIP_CONFIG)[:-1] + ', "quick_gelu": 1e999}'}, ["body", "config"]),
    ({"name": "deep", "config": "[" * 100_000 + "]" * 100_000}, ["body", "config"]),
    ({"name": "huge-int", "config": '{"embed_dim": 1' + "0" * 5000 + "}"}, ["body", "config"]),
    ({"config": json.dumps(TINY_CLIP_CONFIG)}, ["body", "name"]),
    ({"name": "x" * 201, "config": json.dumps(TINY_CLIP_CONFIG)}, ["body", "name"]),
])
def test_base_model_form_errors_are_422_with_errors(stack, http, demo_assets, fields, loc):
    with leaves_nothing(stack):
        body = assert_problem(post_file(http, "/v1/base-models", fields, "base.safetensors",
                                        demo_assets.base_path.read_bytes()), 422, loc)
    assert body["type"] == "/problems/validation"


@pytest.mark.parametrize(("fields", "detail"), [
    ({"name": "unknown-arch", "architecture": "NoSuchNet-42"}, "NoSuchNet-42"),
    ({"name": "unbuildable-config", "config": json.dumps({"embed_dim": "sixty-four", "vision_cfg": 7})}, "config"),
    # Unknown keys were passed on to open_clip (and a config padded with them stayed registered).
    ({"name": "padded-config", "config": json.dumps(TINY_CLIP_CONFIG | {"pad": "x" * 1000})}, "pad"),
    ({"name": "timm-tower", "config": json.dumps(TINY_CLIP_CONFIG | {"vision_cfg": TINY_CLIP_CONFIG["vision_cfg"]
                                                                     | {"timm_model_name": "resnet50"}})},
     "vision_cfg.timm_model_name"),
    ({"name": "oversized-config", "config": json.dumps(TINY_CLIP_CONFIG | {"text_cfg": TINY_CLIP_CONFIG["text_cfg"]
                                                                           | {"tokenizer_kwargs": {"x" * 20000: 1}}})},
     "bytes"),
    ({"name": "patch-size-text", "config": json.dumps(TINY_CLIP_CONFIG | {"vision_cfg": TINY_CLIP_CONFIG["vision_cfg"]
                                                                          | {"patch_size": "8"}})}, "patch_size"),
])
def test_a_model_open_clip_cannot_build_is_422(stack, http, demo_assets, fields, detail):
    with leaves_nothing(stack):
        body = assert_problem(post_file(http, "/v1/base-models", fields, "base.safetensors",
                                        demo_assets.base_path.read_bytes()), 422)
    assert detail in body["detail"], body


def test_weights_of_another_architecture_are_422(stack, http, demo_assets):
    """A valid safetensors file whose keys do not match the named architecture."""
    with leaves_nothing(stack):
        assert_problem(post_file(http, "/v1/base-models", {"name": "mismatch", "architecture": "RN50"},
                                 "base.safetensors", demo_assets.base_path.read_bytes()), 422)


# ---------------------------------------------------------------- multipart framing


@pytest.mark.parametrize("route,fields", [
    ("/v1/base-models", {"name": "no-file", "config": json.dumps(TINY_CLIP_CONFIG)}),
    ("/v1/task-vectors", {"name": "no-file", "base_model_id": "placeholder"}),
    ("/v1/datasets", {"name": "no-file"}),
])
def test_missing_file_part_is_422_naming_file(stack, world, http, route, fields):
    fields = {k: world["own_base"] if v == "placeholder" else v for k, v in fields.items()}
    with leaves_nothing(stack):
        # A multipart body with text fields only (httpx needs a files= entry to send multipart).
        response = http.post(route, data=fields, files={"not_file": ("x.txt", b"hello")})
        assert_problem(response, 422, ["body", "file"])


def test_a_file_part_without_filename_is_not_the_upload(stack, world, http):
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nds\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nplain text\r\n"
            f"--{boundary}--\r\n").encode()
    with leaves_nothing(stack):
        response = http.post("/v1/datasets", content=body,
                             headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert_problem(response, 422, ["body", "file"])


def test_two_file_parts_are_422(stack, world, http, demo_assets):
    tau = demo_assets.vector_paths[0].read_bytes()
    with leaves_nothing(stack):
        response = http.post("/v1/task-vectors", data={"name": "two", "base_model_id": world["own_base"]},
                             files=[("file", ("a.safetensors", tau)), ("file", ("b.safetensors", tau))])
        assert_problem(response, 422)


@pytest.mark.parametrize("route", ["/v1/base-models", "/v1/task-vectors", "/v1/datasets"])
@pytest.mark.parametrize("content_type,content", [
    ("application/json", b'{"name": "x"}'),
    ("application/x-www-form-urlencoded", b"name=x"),
    ("multipart/form-data", b"--x\r\n"),  # no boundary parameter
    (None, b""),
])
def test_a_body_that_is_not_multipart_is_415(stack, http, route, content_type, content):
    headers = {"Content-Type": content_type} if content_type else {}
    with leaves_nothing(stack):
        assert_problem(http.post(route, content=content, headers=headers), 415)


def test_a_malformed_multipart_body_is_4xx_problem(stack, http):
    with leaves_nothing(stack):
        response = http.post("/v1/datasets", content=b"this is not multipart at all\r\n--zz--",
                             headers={"Content-Type": "multipart/form-data; boundary=zz"})
        assert response.status_code in (400, 422), response.text
        assert_problem(response, response.status_code)


def _form(boundary: str, fields: dict[str, str], ending: str) -> bytes:
    parts = "".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
                    for name, value in fields.items())
    return (parts + ending).encode()


@pytest.mark.parametrize(("case", "status"), [("boundary over 256 bytes", 400), ("no closing boundary", 400),
                                              ("a part's header over 4 KiB", 400),
                                              ("a gigabyte after the closing boundary", 413)])
def test_multipart_framing_is_bounded_and_must_be_complete(stack, world, http, case, status):
    boundary = "x" * 300 if case.startswith("boundary") else "frame"
    fields = {"name": "framed", "base_model_id": world["own_base"]}
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    if case == "no closing boundary":
        content = _form(boundary, fields, "")
    elif case.startswith("a part's header"):
        content = _form(boundary, fields, f"--{boundary}\r\nX-Padding: {'p' * 20000}\r\n\r\nv\r\n--{boundary}--")
    elif case.startswith("a gigabyte"):
        def endless_epilogue():  # chunked: no Content-Length to refuse up front
            yield _form(boundary, fields, f"--{boundary}--\r\n")
            for _ in range(1024):
                yield bytes(MiB)
        content = endless_epilogue()
    else:
        content = _form(boundary, fields, f"--{boundary}--\r\n")
    with leaves_nothing(stack):
        assert_problem(http.post("/v1/datasets", content=content, headers=headers), status)


def test_a_json_body_is_bounded_before_the_key_is_checked(stack, http):
    """Job and evaluation bodies are read whole before the route runs: over 1 MiB is refused, announced or not,
    whoever sends it."""
    oversized = b'{"method": "ties"' + b" " * (2 * MiB) + b"}"
    with leaves_nothing(stack):
        body = assert_problem(httpx.post(f"{stack.url}/v1/jobs", content=oversized,
                                         headers={"Content-Type": "application/json"}), 413)
        assert "multipart" in body["detail"] and body["type"] == "/problems/too-large"

        def chunked():
            for start in range(0, len(oversized), 64 * 1024):
                yield oversized[start:start + 64 * 1024]

        assert_problem(http.post("/v1/evaluations", content=chunked(), headers={"Content-Type": "application/json"}),
                       413)
        # Uploads are known by their route: a JSON route's body calling itself multipart is bounded all the same.
        assert_problem(httpx.post(f"{stack.url}/v1/jobs", content=chunked(),
                                  headers={"Content-Type": "multipart/form-data; boundary=x"}), 413)


# ---------------------------------------------------------------- size limits


def _multipart_stream(boundary: str, fields: dict[str, str], filename: str, size: int, chunk: int = MiB):
    def body():
        for name, value in fields.items():
            yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").encode()
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
               f"Content-Type: application/octet-stream\r\n\r\n").encode()
        block = b"\0" * chunk
        for start in range(0, size, chunk):
            yield block[:min(chunk, size - start)]
        yield f"\r\n--{boundary}--\r\n".encode()
    return body


@pytest.mark.parametrize("route", ["/v1/task-vectors", "/v1/datasets"])
def test_an_oversized_chunked_upload_is_413_and_leaves_no_partial_file(stack, world, http, route):
    boundary = "sizeboundary"
    body = _multipart_stream(boundary, {"name": "big", "base_model_id": world["own_base"]}, "big.safetensors",
                             LIMIT + MiB)
    with leaves_nothing(stack):
        response = http.post(route, content=body(),  # a generator: no Content-Length, chunked encoding
                             headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert "content-length" not in response.request.headers
        assert response.request.headers["transfer-encoding"] == "chunked"
        assert_problem(response, 413)


def test_an_upload_announcing_more_than_the_limit_is_413_before_it_is_read(stack, world, http):
    boundary = "sizeboundary"
    size = LIMIT + 2 * MiB
    body = _multipart_stream(boundary, {"name": "big", "base_model_id": world["own_base"]}, "big.safetensors",
                             size)
    length = sum(len(part) for part in body())
    sent = 0

    def counted():
        nonlocal sent
        for part in body():
            sent += len(part)
            yield part

    with leaves_nothing(stack):
        response = http.post("/v1/task-vectors", content=counted(),
                             headers={"Content-Type": f"multipart/form-data; boundary={boundary}",
                                      "Content-Length": str(length)})
        assert response.request.headers["content-length"] == str(length)
        assert_problem(response, 413)


def test_an_oversized_form_field_is_413(stack, http):
    with leaves_nothing(stack):
        response = http.post("/v1/datasets", data={"name": "n", "class_names": "x" * (MiB + 10)},
                             files={"file": ("d.npz", b"PK")})
        assert_problem(response, 413)


# ---------------------------------------------------------------- datasets


def _bomb_zip() -> bytes:
    """One 32 MiB entry of zeros that deflates to ~32 KiB: > 200:1, inside a valid class/image layout."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("cat/ok.png", png_bytes())
        with archive.open("dog/bomb.png", "w") as member:
            zeros = b"\0" * MiB
            for _ in range(32):
                member.write(zeros)
    return buffer.getvalue()


def _bomb_npz() -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, images=np.zeros((4096, 32, 32), dtype=np.uint8), labels=np.zeros(4096, np.int64))
    return buffer.getvalue()


DATASET_CASES = {
    "parent traversal": (lambda: zip_bytes({"cat/a.png": png_bytes(), "../evil.png": png_bytes()}), 422),
    "nested traversal": (lambda: zip_bytes({"cat/../../evil.png": png_bytes()}), 422),
    "absolute path": (lambda: zip_bytes({"/etc/evil.png": png_bytes()}), 422),
    "zip bomb": (_bomb_zip, 422),
    "npz bomb": (_bomb_npz, 422),
    "not an image": (lambda: zip_bytes({"cat/a.png": b"not a png at all"}), 422),
    "empty zip": (lambda: zip_bytes({}), 422),
    "truncated zip": (lambda: zip_bytes({"cat/a.png": png_bytes(), "dog/b.png": png_bytes()})[:-30], 422),
    "plain text": (lambda: b"hello, world\n" * 10, 415),
    "single npy": (lambda: b"\x93NUMPY" + b"\0" * 100, 415),
    "npz float images": (lambda: npz_bytes(images=np.zeros((2, 4, 4), np.float32), labels=np.zeros(2, np.int64)),
                         422),
    "npz labels shape": (lambda: npz_bytes(images=np.zeros((2, 4, 4), np.uint8), labels=np.zeros(3, np.int64)),
                         422),
    "npz negative label": (lambda: npz_bytes(images=np.zeros((2, 4, 4), np.uint8),
                                             labels=np.array([0, -1], np.int64)), 422),
    "npz extra array": (lambda: npz_bytes(images=np.zeros((2, 4, 4), np.uint8), labels=np.zeros(2, np.int64),
                                          other=np.zeros(1)), 422),
}


@pytest.mark.parametrize("case", list(DATASET_CASES))
def test_a_bad_dataset_is_refused(stack, http, case):
    make, status = DATASET_CASES[case]
    with leaves_nothing(stack):
        body = assert_problem(post_file(http, "/v1/datasets", {"name": case}, "data.zip", make()), status)
    if status == 422:
        assert body["type"] == "/problems/invalid-dataset"


# the last two: a name of over 300 characters; more names than TVFORGE_MAX_DATASET_CLASSES
BAD_CLASS_NAMES = ["not json", "[]", '["a", "a"]', '{"a": 1}', json.dumps(["a", "b" * 301]),
                   json.dumps([str(i) for i in range(10_001)])]


@pytest.mark.parametrize("class_names", BAD_CLASS_NAMES)
def test_bad_class_names_are_422(stack, http, class_names):
    payload = zip_bytes({"a/x.png": png_bytes()})
    with leaves_nothing(stack):
        assert_problem(post_file(http, "/v1/datasets", {"name": "d", "class_names": class_names}, "d.zip", payload),
                       422, ["body", "class_names"])


@pytest.mark.parametrize("class_names", BAD_CLASS_NAMES[-2:])
def test_a_task_vectors_class_names_are_bounded_as_a_datasets(stack, world, http, tensors, tmp_path, class_names):
    """They had no bound on a name's length or their count but the form field's 1 MiB."""
    _, tau = tensors
    with leaves_nothing(stack):
        assert_problem(post_file(http, "/v1/task-vectors", {"base_model_id": world["own_base"], "name": "named",
                                                            "class_names": class_names},
                                 "tau.safetensors", safetensors_bytes(tau, tmp_path)), 422, ["body", "class_names"])


# ---------------------------------------------------------------- ownership


def test_a_task_vector_for_another_owners_base_is_404(stack, world, http, demo_assets):
    with leaves_nothing(stack):
        response = post_file(http, "/v1/task-vectors", {"base_model_id": world["other_base"], "name": "steal"},
                             "tau.safetensors", demo_assets.vector_paths[1].read_bytes())
        body = assert_problem(response, 404)
    assert world["other_base"] in body["detail"]


@pytest.mark.parametrize("base,vectors", [
    ("other_base", ["other_tv"]),
    ("own_base", ["other_tv"]),
    ("own_base", ["own_tv", "other_tv"]),
    ("other_base", ["own_tv"]),
    ("own_base", ["tv_00000000000000000000000000000000"]),
])
def test_a_job_naming_another_owners_resources_is_404(stack, world, http, base, vectors):
    spec = {"method": "task_arithmetic", "base_model_id": world.get(base, base),
            "task_vectors": [world.get(v, v) for v in vectors]}
    with leaves_nothing(stack):
        assert_problem(http.post("/v1/jobs", json=spec), 404)


# ---------------------------------------------------------------- job specs


def _job(world, **changes):
    spec = {"method": "task_arithmetic", "base_model_id": world["own_base"], "task_vectors": [world["own_tv"]],
            "params": {"scaling": 0.3}}
    return {k: v for k, v in (spec | changes).items() if v is not ...}


JOB_CASES = {
    "unknown method": (lambda w: _job(w, method="average_everything"), ["body", "method"]),
    "method missing": (lambda w: _job(w, method=...), ["body", "method"]),
    "unknown params field": (lambda w: _job(w, params={"scaling": 0.3, "bogus": 1}), ["body", "params", "bogus"]),
    "scaling too large": (lambda w: _job(w, params={"scaling": 11}), ["body", "params", "scaling"]),
    "scaling not a number": (lambda w: _job(w, params={"scaling": "lots"}), ["body", "params", "scaling"]),
    "ties top_k zero": (lambda w: _job(w, method="ties", params={"top_k": 0}), ["body", "params", "top_k"]),
    "params not an object": (lambda w: _job(w, params=[1, 2]), ["body", "params"]),
    "empty task_vectors": (lambda w: _job(w, task_vectors=[]), ["body", "task_vectors"]),
    "task_vectors not a list": (lambda w: _job(w, task_vectors=w["own_tv"]), ["body", "task_vectors"]),
    "duplicate task vectors": (lambda w: _job(w, task_vectors=[w["own_tv"], w["own_tv"]]), ["body", "task_vectors"]),
    "task vector of another base": (lambda w: _job(w, task_vectors=[w["own_tv"], w["own_tv_2"]]),
                                    ["body", "task_vectors", 1]),
    "params name a stray task vector": (
        lambda w: _job(w, params={"validation_datasets": {w["own_tv_2"]: "ds_00000000000000000000000000000000"}}),
        ["body", "params"]),
    "extra top-level field": (lambda w: _job(w, priority="high"), ["body", "priority"]),
    "negative seed": (lambda w: _job(w, seed=-1), ["body", "seed"]),
    "base_model_id missing": (lambda w: _job(w, base_model_id=...), ["body", "base_model_id"]),
}


@pytest.mark.parametrize("case", list(JOB_CASES))
def test_a_malformed_job_spec_is_422_locating_the_field(stack, world, http, case):
    make, loc = JOB_CASES[case]
    with leaves_nothing(stack):
        body = assert_problem(http.post("/v1/jobs", json=make(world)), 422, loc)
    assert body["type"] == "/problems/validation"


@pytest.mark.parametrize("changes,valid", [
    ({"params": {"scaling": 0.3, "bogus": 1}}, "scaling, operation, validation_datasets, control_dataset_id"),
    ({"method": "ties", "params": {"topk": 20}}, "top_k"),
    ({"priority": "high"}, "base_model_id, task_vectors, start_checkpoint_id, seed, method, params"),
])
def test_an_unknown_field_is_422_naming_the_valid_ones(stack, world, http, changes, valid):
    body = assert_problem(http.post("/v1/jobs", json=_job(world, **changes)), 422)
    assert valid in body["errors"][0]["msg"], body


@pytest.mark.parametrize("method,field,literal", [
    ("sta", "threshold", "1e999"),  # valid JSON; Python reads it as inf
    ("sta", "threshold", "Infinity"),
    ("sta", "threshold", "NaN"),
    ("task_arithmetic", "scaling", "NaN"),
    ("task_arithmetic", "scaling", "-1e999"),
    ("ties", "top_k", "NaN"),
])
def test_a_non_finite_number_in_params_is_422(stack, world, http, method, field, literal):
    content = (f'{{"method": "{method}", "base_model_id": "{world["own_base"]}", '
               f'"task_vectors": ["{world["own_tv"]}"], "params": {{"{field}": {literal}}}}}')
    with leaves_nothing(stack):
        response = http.post("/v1/jobs", content=content, headers={"Content-Type": "application/json"})
        assert_problem(response, 422, ["body", "params", field])


@pytest.mark.parametrize("content,content_type", [
    (b'{"method": "task_arithmetic", ', "application/json"),
    (b"method=task_arithmetic", "application/json"),
    (b"[1, 2, 3]", "application/json"),
    (b"", "application/json"),
    (b"\xff\xfe\x00garbage", "application/json"),
])
def test_a_job_body_that_is_not_a_json_object_is_422(stack, http, content, content_type):
    with leaves_nothing(stack):
        body = assert_problem(http.post("/v1/jobs", content=content, headers={"Content-Type": content_type}), 422)
    assert body.get("errors")
    assert all(err["loc"][0] == "body" for err in body["errors"])


@pytest.mark.parametrize("depth", [50, 900, 100_000])
def test_deeply_nested_params_are_a_4xx_problem_not_a_crash(stack, world, http, depth):
    content = (f'{{"method": "ties", "base_model_id": "{world["own_base"]}", "task_vectors": ["{world["own_tv"]}"], '
               f'"params": {{"top_k": {"[" * depth}{"]" * depth}}}}}')
    with leaves_nothing(stack):
        response = http.post("/v1/jobs", content=content, headers={"Content-Type": "application/json"})
        assert response.status_code in (400, 422), response.text[:500]
        assert_problem(response, response.status_code)


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/evaluations"])
def test_an_empty_idempotency_key_is_422_and_is_never_stored(stack, world, http, path):
    """An empty key was stored as '', and every later empty-keyed submission of the owner's got a false 409
    ('a task vector ... was deleted')."""
    body = _job(world) if path == "/v1/jobs" else {"base_model_id": world["own_base"], "datasets": []}
    for _ in range(2):
        with leaves_nothing(stack):
            assert_problem(http.post(path, json=body, headers={"Idempotency-Key": ""}), 422, ["header"])


def test_the_valid_spec_used_above_is_accepted(stack, world, http):
    """The malformed cases differ from a spec the service takes by the one defect each names."""
    response = http.post("/v1/jobs", json=_job(world))
    assert response.status_code == 202, response.text


# ---------------------------------------------------------------- evaluation specs

EVALUATION_CASES = {
    "neither checkpoint nor base": (lambda w: {"datasets": [{"dataset_id": "ds_x"}]}, 422, ["body"]),
    "both checkpoint and base": (lambda w: {"checkpoint_id": "ckpt_x", "base_model_id": w["own_base"],
                                            "datasets": [{"dataset_id": "ds_x"}]}, 422, ["body"]),
    "no datasets": (lambda w: {"base_model_id": w["own_base"], "datasets": []}, 422, ["body", "datasets"]),
    "two references": (lambda w: {"base_model_id": w["own_base"], "datasets": [
        {"dataset_id": "ds_x", "reference_task_vector_id": w["own_tv"], "reference_checkpoint_id": "ckpt_x"}]},
        422, ["body", "datasets", 0]),
    "unknown split": (lambda w: {"base_model_id": w["own_base"], "datasets": [{"dataset_id": "ds_x",
                                                                                 "split": "holdout"}]},
                      422, ["body", "datasets", 0, "split"]),
    "another owner's base": (lambda w: {"base_model_id": w["other_base"], "datasets": [{"dataset_id": "ds_x"}]},
                             404, None),
    "an unknown dataset": (lambda w: {"base_model_id": w["own_base"], "datasets": [{"dataset_id": "ds_x"}]},
                           404, None),
    # A key named like a method is a job's union tag only in a job's body.
    "an extra field named like a method": (lambda w: {"base_model_id": w["own_base"], "ties": 1,
                                                      "datasets": [{"dataset_id": "ds_x"}]}, 422, ["body", "ties"]),
}


@pytest.mark.parametrize("case", list(EVALUATION_CASES))
def test_a_malformed_evaluation_is_refused_and_leaves_nothing(stack, world, http, case):
    make, status, loc = EVALUATION_CASES[case]
    with leaves_nothing(stack):
        assert_problem(http.post("/v1/evaluations", json=make(world)), status, loc)


def _dataset(http, tmp_path, name: str, class_names: list[str] | None = None, **arrays) -> str:
    npz = tmp_path / f"{name}.npz"
    np.savez(npz, **arrays)
    fields = {"name": name} | ({"class_names": json.dumps(class_names)} if class_names else {})
    response = http.post("/v1/datasets", data=fields, files={"file": ("d.npz", npz.read_bytes())})
    assert response.status_code == 201, response.text
    return response.json()["id"]


@pytest.fixture
def odd_datasets(http, tmp_path):
    """A labelled dataset with a train split only, a labelled one with a test split only, an unlabelled one, a
    labelled one with every split, an unlabelled one without class names, and a labelled one of one class."""
    images, labels = np.zeros((4, 8, 8, 3), np.uint8), np.array([0, 1, 0, 1])
    every_split = {f"{split}_{key}": array for split in ("train", "val", "test")
                   for key, array in (("images", images), ("labels", labels))}
    two = ["a", "b"]
    one_class = {key: np.zeros_like(array) if key.endswith("labels") else array for key, array in every_split.items()}
    return {"full": _dataset(http, tmp_path, "full", two, **every_split),
            "train_only": _dataset(http, tmp_path, "train-only", two, images=images, labels=labels),
            "test_only": _dataset(http, tmp_path, "test-only", two, test_images=images, test_labels=labels),
            "unlabelled": _dataset(http, tmp_path, "unlabelled", two, images=images),
            "nameless": _dataset(http, tmp_path, "nameless", test_images=images),
            "one_class": _dataset(http, tmp_path, "one-class", ["a"], **one_class)}


def test_an_evaluation_split_the_dataset_lacks_is_422_at_submission(stack, world, http, odd_datasets):
    """Refused when posted, naming the splits there are, rather than failing on the worker."""
    body = {"base_model_id": world["own_base"], "datasets": [{"dataset_id": odd_datasets["train_only"],
                                                              "split": "test"}]}
    with leaves_nothing(stack):
        problem = assert_problem(http.post("/v1/evaluations", json=body), 422, ["body", "datasets", 0, "split"])
    assert "has train" in problem["errors"][0]["msg"]
    body = {"base_model_id": world["own_base"], "datasets": [{"dataset_id": odd_datasets["unlabelled"]}]}
    with leaves_nothing(stack):
        problem = assert_problem(http.post("/v1/evaluations", json=body), 422,
                                 ["body", "datasets", 0, "dataset_id"])
    assert "unlabelled" in problem["errors"][0]["msg"]


# (params, the dataset they name, where the 422 points inside params, what its message says); "tv" is the job's
# task vector. Each fails on the worker otherwise, after the job has waited in the queue.
DATASET_NEED_CASES = {
    "aTLAS few-shot without a train split": (
        {"method": "atlas", "params": {"target_dataset_id": "{ds}", "epochs": 1}}, "test_only",
        ["target_dataset_id"], "no train split to train aTLAS on (few_shot)"),
    "aTLAS addition on unlabelled data": (
        {"method": "atlas", "params": {"task_datasets": {"tv": "{ds}"}, "train_split": "train", "epochs": 1}},
        "unlabelled", ["task_datasets", "tv"], "needs labels to train aTLAS on (addition)"),
    "aTLAS negation's control without a val split": (
        {"method": "atlas", "params": {"objective": "negation", "target_dataset_id": "{other}",
                                       "control_dataset_id": "{ds}", "epochs": 1}},
        "train_only", ["control_dataset_id"], "no val split"),
    "aTLAS negation trained on test, with no split to select its best epoch on": (
        {"method": "atlas", "params": {"objective": "negation", "target_dataset_id": "{other}",
                                       "control_dataset_id": "{ds}", "train_split": "test", "epochs": 1}},
        "test_only", ["control_dataset_id"], "no val or train split to select the best epoch on"),
    "STA calibration on unlabelled data": (
        {"method": "sta", "params": {"calibration_datasets": {"tv": "{ds}"}}}, "unlabelled",
        ["calibration_datasets", "tv"], "needs labels to score importance on"),
    "STA calibration without a train or val split": (
        {"method": "sta", "params": {"calibration_datasets": {"tv": "{ds}"}}}, "test_only",
        ["calibration_datasets", "tv"], "no train or val split to score importance on; it has test"),
    "a lambda search without a val or train split": (
        {"method": "ties", "params": {"validation_datasets": {"tv": "{ds}"}}}, "test_only",
        ["validation_datasets", "tv"], "no val or train split to search lambda on"),
    "a negation search's unlabelled control": (
        {"method": "task_arithmetic", "params": {"operation": "negate", "validation_datasets": {"tv": "{other}"},
                                                 "control_dataset_id": "{ds}"}},
        "unlabelled", ["control_dataset_id"], "needs labels to check the control's accuracy on"),
    "aTLAS entropy on images without class names": (
        {"method": "atlas", "params": {"objective": "entropy", "target_dataset_id": "{ds}", "epochs": 1}},
        "nameless", ["target_dataset_id"], "no class names; its zero-shot head needs them"),
    "STA calibration on one class": (
        {"method": "sta", "params": {"calibration_datasets": {"tv": "{ds}"}}}, "one_class",
        ["calibration_datasets", "tv"], "1 class; at least 2 are needed to score importance on"),
}


def _named(value, names: dict[str, str]):
    """value with every "{key}" string, and every dict key "tv", replaced from names."""
    if isinstance(value, dict):
        return {names["tv"] if k == "tv" else k: _named(v, names) for k, v in value.items()}
    return value.format(**names) if isinstance(value, str) else value


@pytest.mark.parametrize("case", list(DATASET_NEED_CASES))
def test_a_dataset_the_method_cannot_use_is_422_at_submission(stack, world, http, odd_datasets, case):
    spec, dataset, loc, message = DATASET_NEED_CASES[case]
    names = {"tv": world["own_tv"], "ds": odd_datasets[dataset], "other": odd_datasets["full"]}
    body = _job(world, method=spec["method"], params=_named(spec["params"], names))
    loc = [names["tv"] if part == "tv" else part for part in loc]
    with leaves_nothing(stack):
        problem = assert_problem(http.post("/v1/jobs", json=body), 422, ["body", "params", *loc])
    assert message in problem["errors"][0]["msg"], problem


def test_a_dataset_that_meets_the_method_s_needs_is_accepted(world, http, odd_datasets):
    """The checks above refuse only what the worker would: unlabelled test images serve entropy adaptation,
    a train split serves few-shot (checked with a dry run: nothing is queued)."""
    for params in ({"objective": "entropy", "target_dataset_id": odd_datasets["unlabelled"], "epochs": 1},
                   {"target_dataset_id": odd_datasets["train_only"], "epochs": 1}):
        response = http.post("/v1/jobs", params={"dry_run": "true"},
                             json=_job(world, method="atlas", params=params))
        assert response.status_code == 200, response.text


def test_an_evaluation_reference_of_another_base_is_422(stack, world, http, tmp_path):
    npz = tmp_path / "d.npz"
    np.savez(npz, images=np.zeros((4, 8, 8, 3), np.uint8), labels=np.array([0, 1, 0, 1]))
    dataset = http.post("/v1/datasets", data={"name": "eval-ds", "class_names": '["a", "b"]'},
                        files={"file": ("d.npz", npz.read_bytes())}).json()
    body = {"base_model_id": world["own_base"],
            "datasets": [{"dataset_id": dataset["id"], "reference_task_vector_id": world["own_tv_2"]}]}
    with leaves_nothing(stack):
        assert_problem(http.post("/v1/evaluations", json=body), 422,
                       ["body", "datasets", 0, "reference_task_vector_id"])


def test_an_upload_measures_the_norm_in_float64_and_names_non_finite_tensors(tmp_path):
    """One chunked pass (engine.selection.measure_vector) against a float64 computation of the whole; its means
    and cuts are bit for bit the separate measurements' (the merges that compute them alike rely on it)."""
    import math

    import torch

    from engine.safetensors_io import save_tensors
    from engine.selection import file_magnitude_means, file_top_k_cuts, measure_vector
    from engine.streaming import CHUNK
    from engine.task_vectors import TaskVectorFile

    generator = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, CHUNK // 2 + 7, generator=generator),  # chunks that straddle rows
               "b": torch.randn(5, generator=generator).half(), "c": torch.randn(9, generator=generator).bfloat16(),
               "steps": torch.arange(4)}  # not a float: neither measured nor checked
    path = tmp_path / "v.safetensors"
    save_tensors(path, tensors)
    measured = measure_vector(TaskVectorFile(path))
    assert sorted(measured.magnitude_means) == ["a", "b", "c"]
    expected = math.sqrt(sum(float(t.double().square().sum()) for n, t in tensors.items() if n != "steps"))
    assert measured.non_finite == [] and measured.l2_norm == pytest.approx(expected, rel=1e-12)
    assert measured.magnitude_means == file_magnitude_means(path)
    assert measured.magnitude_cuts == file_top_k_cuts(path)
    tensors["a"][2, -1] = float("inf")
    tensors["c"][0] = float("nan")
    save_tensors(path, tensors)
    assert measure_vector(TaskVectorFile(path)).non_finite == ["a", "c"]
    save_tensors(path, {"d": torch.tensor([1.0, 1e39], dtype=torch.float64)})  # finite, but Inf as merges read it
    assert measure_vector(TaskVectorFile(path)).non_finite == ["d"]


def test_the_routes_exempt_from_the_json_body_limit_are_exactly_the_uploads():
    from app.limits import UPLOAD_ROUTES
    from app.main import create_app

    multipart = {(method.upper(), path) for path, operations in create_app().openapi()["paths"].items()
                 for method, operation in operations.items()
                 if "multipart/form-data" in operation.get("requestBody", {}).get("content", {})}
    assert multipart == UPLOAD_ROUTES

"""Abuse: small hostile requests that once cost the service memory, time or its own files (issue 9).

Each answer must be the right 4xx, in bounded time and memory: the API's peak resident memory
(VmHWM) is read before and after and may grow only by a bounded amount.
"""
import io
import json
import os
import socket
import struct
import threading
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.test_bad_input import TINY_CLIP_CONFIG, assert_problem, leaves_nothing

pytestmark = pytest.mark.integration
MiB = 1024 * 1024
# One owner's slow uploads and event streams outnumber the database pool's connections (test_slow_clients
# checks the per-owner cap itself).
STACK_SETTINGS = {"max_long_requests_per_owner": 64}


def peak_rss(stack) -> int:
    """The API process's peak resident memory so far, in bytes."""
    for line in Path(f"/proc/{stack.api.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.fixture
def http(stack):
    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {stack.owner_key}"},
                      timeout=60) as client:
        yield client


def post_base(http, fields: dict, content: bytes = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "):
    return http.post("/v1/base-models", data=fields, files={"file": ("base.safetensors", content)})


HUGE_CONFIGS = {
    # 9.7e9 parameters at width 16384: built on the meta device, refused by the parameter cap.
    "wide vision tower": TINY_CLIP_CONFIG | {"vision_cfg": TINY_CLIP_CONFIG["vision_cfg"] | {"width": 16384}},
    "a million layers": TINY_CLIP_CONFIG | {"vision_cfg": TINY_CLIP_CONFIG["vision_cfg"] | {"layers": 10**6}},
    "a billion patches": TINY_CLIP_CONFIG | {"vision_cfg": TINY_CLIP_CONFIG["vision_cfg"] | {"image_size": 4096,
                                                                                          "patch_size": 1}},
    "a vocabulary of 2**40": TINY_CLIP_CONFIG | {"text_cfg": TINY_CLIP_CONFIG["text_cfg"] | {"vocab_size": 2**40}},
    # open_clip takes [height, width] too; the patch count was checked for plain integers only.
    "a billion patches as [height, width]": TINY_CLIP_CONFIG | {"vision_cfg": TINY_CLIP_CONFIG["vision_cfg"]
                                                                | {"image_size": 4096, "patch_size": [1, 1]}},
    # computed in numpy on the CPU, meta device or not: 2.3 GB at width 2048, 18 GB at 16384
    "a sin-cos position embedding of 65536 patches x 16384": TINY_CLIP_CONFIG | {"vision_cfg": TINY_CLIP_CONFIG[
        "vision_cfg"] | {"image_size": 4096, "patch_size": 16, "width": 16384, "pos_embed_type": "sin_cos_2d"}},
}


@pytest.mark.parametrize("case", list(HUGE_CONFIGS))
def test_an_architecture_config_is_validated_without_allocating(stack, http, case):
    # Warm up: the first registration imports open_clip into the API (~200 MB), which is not this case's doing.
    assert_problem(post_base(http, {"name": "warm-up", "config": json.dumps(TINY_CLIP_CONFIG)}), 422)
    before = peak_rss(stack)
    started = time.monotonic()
    with leaves_nothing(stack):
        body = assert_problem(post_base(http, {"name": case, "config": json.dumps(HUGE_CONFIGS[case])}), 422)
    assert time.monotonic() - started < 10
    assert peak_rss(stack) - before < 200 * MiB
    assert "parameters" in body["detail"] or "must be a number in" in body["detail"] or "patches" in body["detail"]


HOSTILE_KWARGS = {
    # SimpleTokenizer(bpe_path=...) opened any file of the worker's
    "a tokenizer reading a server file": {"text_cfg": {"tokenizer_kwargs": {"bpe_path": "/etc/hostname"}}},
    "a layer norm on another device": {"vision_cfg": {"norm_kwargs": {"device": "cuda:7"}}},
    # passed the checks, was stored, then its response could not be serialised (500) nor the owner's list after it
    "300 nested lists": {"text_cfg": {"tokenizer_kwargs": {"x": json.loads("[" * 300 + "]" * 300)}}},
    "a dict where a name goes": {"vision_cfg": {"pool_type": {"tok": 1}}},
}


@pytest.mark.parametrize("case", list(HOSTILE_KWARGS))
def test_a_config_cannot_pass_open_clip_arbitrary_arguments(stack, http, case):
    config = {key: value | HOSTILE_KWARGS[case].get(key, {}) if isinstance(value, dict) else value
              for key, value in TINY_CLIP_CONFIG.items()}
    with leaves_nothing(stack):
        body = assert_problem(post_base(http, {"name": case, "config": json.dumps(config)}), 422)
    assert "may only set" in body["detail"] or "must be a number, string" in body["detail"], body["detail"]
    assert http.get("/v1/base-models").status_code == 200


def test_parallel_registrations_of_custom_configs_all_succeed(stack, http, demo_assets):
    """open_clip keeps its config registry in module globals, rescanned from files on each registration."""
    base = demo_assets.base_path.read_bytes()
    results = []

    def register(index: int) -> None:
        # Equal shapes, distinct configs (so each registers its own name): only the initial logit scale differs.
        config = demo_assets.config | {"init_logit_scale": 2.0 + index / 100}
        with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {stack.owner_key}"},
                          timeout=120) as client:
            results.append(post_base(client, {"name": f"parallel-{index}", "config": json.dumps(config)}, base))

    threads = [threading.Thread(target=register, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.status_code for r in results] == [201] * 8, [r.text for r in results if r.status_code != 201]


@pytest.mark.parametrize("fields", [
    {"name": "path-as-tag", "architecture": "ViT-B-32", "pretrained": "/etc/passwd"},
    {"name": "relative-path", "architecture": "ViT-B-32", "pretrained": "../../var/tvforge.db"},
    {"name": "unknown-tag", "architecture": "ViT-B-32", "pretrained": "not-a-tag"},
], ids=["absolute path", "relative path", "unknown tag"])
def test_pretrained_names_only_open_clip_tags_never_a_path(stack, http, fields):
    with leaves_nothing(stack):  # multipart form fields, no file part
        body = assert_problem(http.post("/v1/base-models", files={k: (None, v) for k, v in fields.items()}), 422)
    assert "openai" in body["detail"]  # the known tags are listed
    assert "No such file" not in body["detail"]  # and nothing says whether a path exists


@pytest.mark.parametrize("architecture", ["local-dir:/etc", "hf-hub:laion/CLIP-ViT-B-32", "no-such-model"])
def test_architecture_names_only_open_clip_models(stack, http, demo_assets, architecture):
    with leaves_nothing(stack):
        body = assert_problem(post_base(http, {"name": "schema", "architecture": architecture},
                                        demo_assets.base_path.read_bytes()), 422)
    assert "unknown open_clip architecture" in body["detail"]


def raw_safetensors(header: bytes, data: bytes = b"\0" * 4) -> bytes:
    return struct.pack("<Q", len(header)) + header + data


MALFORMED_HEADERS = {
    "a 5000-digit dimension": b'{"visual.proj":{"dtype":"F32","shape":[' + b"1" * 5000 + b'],"data_offsets":[0,4]}}',
    "JSON nested 100k deep": b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "__metadata__ not an object": b'{"__metadata__":[],"visual.proj":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
    "non-integer offsets": b'{"visual.proj":{"dtype":"F32","shape":[1],"data_offsets":[0.0,4.0]}}',
    "boolean dimension": b'{"visual.proj":{"dtype":"F32","shape":[true],"data_offsets":[0,4]}}',
}


@pytest.fixture(scope="module")
def base_id(stack, demo_assets) -> str:
    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {stack.owner_key}"},
                      timeout=60) as client:
        response = post_base(client, {"name": "abuse-base", "config": json.dumps(demo_assets.config)},
                             demo_assets.base_path.read_bytes())
    assert response.status_code == 201, response.text
    return response.json()["id"]


@pytest.mark.parametrize("case", list(MALFORMED_HEADERS))
def test_a_malformed_safetensors_header_is_422(stack, http, base_id, case):
    with leaves_nothing(stack):
        body = assert_problem(http.post("/v1/task-vectors", data={"base_model_id": base_id, "name": "bad"},
                                        files={"file": ("tau.safetensors", raw_safetensors(MALFORMED_HEADERS[case]))}),
                              422)
    assert body["type"] == "/problems/invalid-weights"


@pytest.mark.parametrize("value", ["\x00", "bm_\x00", "not-an-id"])
def test_a_list_filter_that_is_not_an_id_is_422(stack, http, value):
    """PostgreSQL refuses a NUL in a text parameter (a 500 there); every filter is checked as an id first."""
    assert_problem(http.get("/v1/task-vectors", params={"base_model_id": value}), 422, ["query", "base_model_id"])


def test_a_nul_in_a_name_is_422(stack, http, demo_assets):
    with leaves_nothing(stack):
        assert_problem(post_base(http, {"name": "nul\x00name", "config": json.dumps(demo_assets.config)},
                                 demo_assets.base_path.read_bytes()), 422, ["body", "name"])


def test_concurrent_same_bytes_uploads_and_deletes_never_strand_a_row(stack, http, base_id, demo_assets):
    """Rows are deleted while other rows with the same bytes are uploaded: every row left downloads its blob."""
    content = demo_assets.vector_paths[0].read_bytes()
    survivors, errors = [], []

    def churn(index: int) -> None:
        with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {stack.owner_key}"},
                          timeout=60) as client:
            for round_ in range(6):
                created = client.post("/v1/task-vectors", data={"base_model_id": base_id, "name": f"c{index}"},
                                      files={"file": ("tau.safetensors", content)})
                if created.status_code != 201:
                    errors.append(created.text)
                    continue
                if (index + round_) % 2:
                    deleted = client.delete(f"/v1/task-vectors/{created.json()['id']}")
                    if deleted.status_code != 204:
                        errors.append(deleted.text)
                else:
                    survivors.append(created.json()["id"])

    threads = [threading.Thread(target=churn, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[:3]
    for vector_id in survivors:
        assert http.get(f"/v1/task-vectors/{vector_id}/download").status_code == 200, vector_id


def create_and_delete_at_once(stack, base_id: str, vector_id: str) -> tuple[httpx.Response, httpx.Response]:
    """POST a job naming the vector and DELETE the vector, released together."""
    barrier = threading.Barrier(2)
    responses: dict[str, httpx.Response] = {}

    def send(name: str, method: str, path: str, body: dict | None) -> None:
        with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {stack.owner_key}"},
                          timeout=60) as client:
            barrier.wait()
            responses[name] = client.request(method, path, json=body)

    threads = [threading.Thread(target=send, args=("create", "POST", "/v1/jobs", {
                   "method": "task_arithmetic", "base_model_id": base_id, "task_vectors": [vector_id]})),
               threading.Thread(target=send, args=("delete", "DELETE", f"/v1/task-vectors/{vector_id}", None))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return responses["create"], responses["delete"]


def test_a_job_created_while_its_vector_is_deleted_never_loses_it(stack, http, base_id, demo_assets):
    """Creating a job races deleting its only task vector: either the job is refused, or the delete is; a job
    that was queued always finds its vector."""
    content = demo_assets.vector_paths[0].read_bytes()
    outcomes, queued = [], []
    for round_ in range(12):
        vector = http.post("/v1/task-vectors", data={"base_model_id": base_id, "name": f"race-{round_}"},
                           files={"file": ("tau.safetensors", content)}).json()
        created, deleted = create_and_delete_at_once(stack, base_id, vector["id"])
        outcomes.append((created.status_code, deleted.status_code))
        assert created.status_code in (202, 404, 409), created.text
        assert deleted.status_code in (204, 409), deleted.text
        if created.status_code == 202:
            queued.append(created.json()["id"])
    with stack.client() as client:
        finals = [client.wait_for_job(job_id, timeout_s=120) for job_id in queued]
    assert all(job["status"] == "succeeded" for job in finals), ([job["error"] for job in finals], outcomes)


def test_the_blob_collector_keeps_referenced_and_recent_blobs(tmp_path):
    from store.blobs import BlobStore

    blobs = BlobStore(tmp_path)
    digests = []
    for content in (b"kept: a row points here", b"recent: committed inside the grace", b"old and unreferenced"):
        path = blobs.pending_path()
        path.write_bytes(content)
        digests.append(blobs.commit_file(path).sha256)
    kept, recent, stale = digests
    for digest in (kept, stale):
        os.utime(blobs.path(digest), (time.time() - 7200, time.time() - 7200))
    assert blobs.collect_garbage(lambda: {kept}, grace_s=3600) == [stale]
    assert blobs.exists(kept) and blobs.exists(recent) and not blobs.exists(stale)
    # Committing the same bytes again refreshes a blob: a new upload of old bytes restarts its grace.
    os.utime(blobs.path(recent), (time.time() - 7200, time.time() - 7200))
    again = blobs.pending_path()
    again.write_bytes(b"recent: committed inside the grace")
    assert blobs.commit_file(again).created is False
    assert blobs.collect_garbage(lambda: set(), grace_s=3600) == [kept]


def open_slow_upload(stack) -> socket.socket:
    """A multipart upload that sends its headers and a first chunk, then nothing: a client on a bad link."""
    body_start = (b"--b\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nslow\r\n"
                  b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"d.npz\"\r\n\r\n" + b"x" * 1024)
    sock = socket.create_connection(("127.0.0.1", stack.port))
    sock.sendall(b"POST /v1/datasets HTTP/1.1\r\nHost: x\r\n"
                 + f"Authorization: Bearer {stack.owner_key}\r\n".encode()
                 + b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 10000000\r\n\r\n" + body_start)
    return sock


def test_slow_uploads_and_open_event_streams_do_not_starve_other_requests(stack, http, long_job):
    """More slow uploads and open event streams (of a running job) than the database pool has connections
    (5 + 10): every other request is still answered at once."""
    with stack.client() as client:
        job = long_job(client, epochs=500)
    uploads = [open_slow_upload(stack) for _ in range(16)]
    streams = []
    for _ in range(16):
        sock = socket.create_connection(("127.0.0.1", stack.port))
        sock.sendall(f"GET /v1/jobs/{job['id']}/events HTTP/1.1\r\nHost: x\r\n"
                     f"Authorization: Bearer {stack.owner_key}\r\n\r\n".encode())
        streams.append(sock)
    try:
        time.sleep(1)
        for _ in range(5):
            started = time.monotonic()
            response = http.get("/v1/base-models", timeout=10)
            assert response.status_code == 200, response.text
            assert time.monotonic() - started < 3
    finally:
        for sock in uploads + streams:
            sock.close()
        http.post(f"/v1/jobs/{job['id']}/cancel")


def npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def png_bytes(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_label_range_is_not_a_class_count(stack, http):
    """An npz of a few hundred bytes with labels [0, 300000] once made 300,001 class names."""
    content = npz_bytes(images=np.zeros((2, 4, 4, 3), np.uint8), labels=np.array([0, 300_000]))
    started = time.monotonic()
    with leaves_nothing(stack):
        body = assert_problem(http.post("/v1/datasets", data={"name": "labels"},
                                        files={"file": ("d.npz", content)}), 422)
    assert "at most 10000 classes" in body["detail"] and time.monotonic() - started < 5


def test_small_zips_of_large_images_are_refused_by_their_decoded_size(stack, http):
    """Four black 3000x3000 PNGs zip to tens of KB and decode to 108 MB: past the stack's 64 MiB decoded limit."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for index in range(4):
            archive.writestr(f"black/{index}.png", png_bytes(3000))
    assert len(buffer.getvalue()) < 200_000
    before = peak_rss(stack)
    with leaves_nothing(stack):
        body = assert_problem(http.post("/v1/datasets", data={"name": "bomb"},
                                        files={"file": ("d.zip", buffer.getvalue())}), 413)
    assert "decode to" in body["detail"]
    assert peak_rss(stack) - before < 50 * MiB


def test_many_large_text_fields_are_refused_before_they_fill_memory(stack, http):
    """Fields of 1 MiB each were once all held in memory before the 422 (400 of them: 397 MiB)."""
    fields = [(f"field{i}", (None, b"x" * MiB)) for i in range(40)]
    before = peak_rss(stack)
    with leaves_nothing(stack):
        assert_problem(http.post("/v1/datasets", files=fields), 413)
    assert peak_rss(stack) - before < 50 * MiB


def test_keys_can_be_listed_revoked_and_expire(stack):
    live = stack.run_cli("keys", "create", "--owner", "carol", "--name", "laptop").strip()
    expiring = stack.run_cli("keys", "create", "--owner", "carol", "--expires-in-days", "0").strip()
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        def status(key: str) -> int:
            return client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code

        assert status(live) == 200 and status(expiring) == 401  # expired the moment it was made
        listed = [line.split("\t") for line in stack.run_cli("keys", "list", "--owner", "carol").splitlines()]
        assert [row[1:4] for row in listed] == [["carol", "laptop", "live"], ["carol", "-", "live"]]
        assert live not in stack.run_cli("keys", "list")  # the secret is never shown
        assert "revoked" in stack.run_cli("keys", "revoke", listed[0][0])
        assert status(live) == 401
        assert "revoked" in stack.run_cli("keys", "list", "--owner", "carol").splitlines()[0]


def test_jobs_and_checkpoints_can_be_deleted_once_nothing_runs_on_them(stack, http, long_job, demo_assets, base_id):
    vector = http.post("/v1/task-vectors", data={"base_model_id": base_id, "name": "to-merge"},
                       files={"file": ("tau.safetensors", demo_assets.vector_paths[0].read_bytes())}).json()
    with stack.client() as client:
        merged = client.wait_for_job(client.create_job("task_arithmetic", base_id, [vector["id"]])["id"])
        checkpoint_id = merged["result"]["checkpoint_id"]
        blocker = long_job(client, epochs=500)  # keeps the one worker busy: what follows stays queued
        content = npz_bytes(images=np.zeros((4, 8, 8, 3), np.uint8), labels=np.array([0, 1, 0, 1]))
        dataset = http.post("/v1/datasets", data={"name": "eval", "class_names": '["a", "b"]'},
                            files={"file": ("d.npz", content)}).json()
        evaluation = client.create_evaluation([{"dataset_id": dataset["id"]}], checkpoint_id=checkpoint_id)
        chained = client.create_job("task_arithmetic", base_id, [vector["id"]], start_checkpoint_id=checkpoint_id)
    refused = assert_problem(http.delete(f"/v1/checkpoints/{checkpoint_id}"), 409)
    assert evaluation["id"] in refused["detail"] and chained["id"] in refused["detail"]
    refused = assert_problem(http.delete(f"/v1/jobs/{merged['id']}"), 409)  # it would take its checkpoint along
    assert refused["type"] == "/problems/in-use" and chained["id"] in refused["detail"]
    http.post(f"/v1/jobs/{evaluation['id']}/cancel")
    refused = assert_problem(http.delete(f"/v1/checkpoints/{checkpoint_id}"), 409)  # the queued merge still reads it
    assert evaluation["id"] not in refused["detail"] and chained["id"] in refused["detail"]
    assert assert_problem(http.delete(f"/v1/jobs/{blocker['id']}"), 409)["type"] == "/problems/job-active"
    for job_id in (chained["id"], blocker["id"]):
        http.post(f"/v1/jobs/{job_id}/cancel")
    with stack.client() as client:
        assert client.wait_for_job(blocker["id"], timeout_s=60)["status"] == "cancelled"
    assert http.delete(f"/v1/checkpoints/{checkpoint_id}").status_code == 204
    assert http.get(f"/v1/checkpoints/{checkpoint_id}").status_code == 404
    assert http.get(f"/v1/jobs/{merged['id']}").json()["result"]["checkpoint_id"] == checkpoint_id
    assert http.delete(f"/v1/jobs/{merged['id']}").status_code == 204
    assert http.get(f"/v1/jobs/{merged['id']}").status_code == 404
    assert http.delete(f"/v1/task-vectors/{vector['id']}").status_code == 204  # no job reads it any more


def test_the_head_cache_is_pruned_least_recently_used_first_and_stale_work_folders_go(tmp_path):
    from engine.heads import prune_head_cache
    from store.blobs import BlobStore

    cache = tmp_path / "cache"
    cache.mkdir()
    for age, name in enumerate(["new", "middle", "old"]):
        path = cache / f"head-{name}.safetensors"
        path.write_bytes(b"x" * 1000)
        os.utime(path, (time.time() - 100 * age, time.time() - 100 * age))
    assert prune_head_cache(cache, max_bytes=2000) == 1
    assert sorted(p.name for p in cache.iterdir()) == ["head-middle.safetensors", "head-new.safetensors"]

    blobs = BlobStore(tmp_path / "blobs")
    killed, running = blobs.tmp_dir / "job-killed", blobs.tmp_dir / "job-running"
    for folder in (killed, running):
        folder.mkdir()
        (folder / "merged.safetensors").write_bytes(b"partial")
    os.utime(killed, (time.time() - 2 * 86400, time.time() - 2 * 86400))
    assert blobs.clean_tmp(older_than_s=86400) == 1
    assert not killed.exists() and running.exists()

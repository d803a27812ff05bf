"""End to end over real HTTP: uvicorn, a Celery worker process and redis-server, all real."""
import hashlib
import uuid

import httpx
import pytest
from safetensors.torch import load_file

from engine.safetensors_io import save_tensors
from tvforge.client import ApiError
from tvforge.demo import run_demo

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def merged(stack, tmp_path_factory):
    """The demo run once over HTTP: its job, base model and task vectors."""
    with stack.client() as client:
        return run_demo(client, tmp_path_factory.mktemp("demo"), log=lambda _: None)


def test_demo_merges_what_theta0_plus_lambda_sum_tau_says(merged):
    assert merged["job"]["status"] == "succeeded"
    assert merged["max_abs_difference"] <= 1e-6
    assert merged["job"]["progress"]["fraction"] == 1.0


def test_job_events_stream_ends_with_the_finished_job(stack, merged):
    with stack.client() as client:
        events = list(client.events(merged["job"]["id"]))
    assert events[-1][0] == "end"
    assert events[-1][1]["status"] == "succeeded"


def test_checkpoint_download_honours_etag_range_and_if_none_match(stack, merged):
    checkpoint_id = merged["job"]["result"]["checkpoint_id"]
    with stack.client() as client:
        meta = client.get(f"/v1/checkpoints/{checkpoint_id}")
        url = f"/v1/checkpoints/{checkpoint_id}/download"
        full = client.http.get(url)
        assert full.status_code == 200
        assert hashlib.sha256(full.content).hexdigest() == meta["sha256"] == full.headers["etag"].strip('"')
        assert len(full.content) == meta["size_bytes"]
        assert "merged.safetensors" in full.headers["content-disposition"]
        part = client.http.get(url, headers={"Range": "bytes=8-107"})
        assert part.status_code == 206
        assert part.content == full.content[8:108]
        assert part.headers["content-range"] == f"bytes 8-107/{len(full.content)}"
        assert client.http.get(url, headers={"If-None-Match": full.headers["etag"]}).status_code == 304
        outside = client.http.get(url, headers={"Range": f"bytes={len(full.content) + 10}-"})
        assert outside.status_code == 416
        assert outside.headers["content-type"] == "application/problem+json"


def test_running_job_says_retry_after_and_finished_does_not(stack, merged):
    with stack.client() as client:
        response = client.http.get(f"/v1/jobs/{merged['job']['id']}")
    assert response.status_code == 200
    assert "retry-after" not in response.headers


def test_finetuned_upload_becomes_the_difference_from_the_base(stack, merged, demo_assets, tmp_path):
    base = load_file(str(demo_assets.base_path))
    tau = load_file(str(demo_assets.vector_paths[0]))
    finetuned = {name: t + tau[name] if name in tau else t for name, t in base.items()}
    path = tmp_path / "finetuned.safetensors"
    save_tensors(path, finetuned)
    with stack.client() as client:
        vector = client.upload_task_vector(merged["base_model"]["id"], "from-finetuned", path, kind="finetuned")
        stored = load_file_from(client, f"/v1/task-vectors/{vector['id']}/download", tmp_path)
    assert vector["source_kind"] == "finetuned"
    assert stored.keys() == tau.keys()
    for name, expected in tau.items():
        assert (stored[name] - expected).abs().max() <= 1e-6
    # The uploaded checkpoint's digest finds the vector again (what a client checks before uploading it twice).
    uploaded = hashlib.sha256(path.read_bytes()).hexdigest()
    assert vector["source_sha256"] == uploaded != vector["sha256"]
    with stack.client() as client:
        found = client.http.get("/v1/task-vectors", params={"source_sha256": uploaded}).json()["items"]
    assert [item["id"] for item in found] == [vector["id"]]


def load_file_from(client, url, tmp_path):
    path = tmp_path / f"{uuid.uuid4().hex}.safetensors"
    path.write_bytes(client.http.get(url).content)
    return load_file(str(path))


def test_another_owner_sees_nothing(stack, merged):
    job = merged["job"]
    paths = [f"/v1/base-models/{merged['base_model']['id']}", f"/v1/task-vectors/{merged['task_vectors'][0]['id']}",
             f"/v1/task-vectors/{merged['task_vectors'][0]['id']}/download", f"/v1/jobs/{job['id']}",
             f"/v1/jobs/{job['id']}/events", f"/v1/checkpoints/{job['result']['checkpoint_id']}",
             f"/v1/checkpoints/{job['result']['checkpoint_id']}/download"]
    with stack.client(stack.other_key) as other:
        for path in paths:
            response = other.http.get(path)
            assert response.status_code == 404, path
            assert response.headers["content-type"] == "application/problem+json"
        assert other.get("/v1/jobs")["items"] == []
        with pytest.raises(ApiError) as refused:
            other.create_job("task_arithmetic", merged["base_model"]["id"], [merged["task_vectors"][0]["id"]])
        assert refused.value.status == 404
        assert other.http.post(f"/v1/jobs/{job['id']}/cancel").status_code == 404
        assert other.http.delete(f"/v1/base-models/{merged['base_model']['id']}").status_code == 404


def test_missing_or_wrong_key_is_401(stack):
    assert httpx.get(f"{stack.url}/v1/jobs").status_code == 401
    response = httpx.get(f"{stack.url}/v1/jobs", headers={"Authorization": "Bearer nope"})
    assert response.status_code == 401
    assert response.json()["status"] == 401
    assert response.headers["www-authenticate"] == "Bearer"


def test_idempotency_key_returns_the_same_job(stack, merged):
    base_id, vectors = merged["base_model"]["id"], [v["id"] for v in merged["task_vectors"]]
    key = uuid.uuid4().hex
    with stack.client() as client:
        first = client.create_job("task_arithmetic", base_id, vectors, {"scaling": 0.1}, idempotency_key=key)
        again = client.create_job("task_arithmetic", base_id, vectors, {"scaling": 0.1}, idempotency_key=key)
        assert again["id"] == first["id"]
        with pytest.raises(ApiError) as reused:
            client.create_job("task_arithmetic", base_id, vectors, {"scaling": 0.2}, idempotency_key=key)
        assert reused.value.status == 422
        assert client.wait_for_job(first["id"])["status"] == "succeeded"


def test_same_spec_and_seed_give_the_same_checkpoint_bytes(stack, merged):
    base_id, vectors = merged["base_model"]["id"], [v["id"] for v in merged["task_vectors"]]
    with stack.client() as client:
        jobs = [client.wait_for_job(client.create_job("task_arithmetic", base_id, vectors, {"scaling": 0.3})["id"])
                for _ in range(2)]
        shas = {client.get(f"/v1/checkpoints/{j['result']['checkpoint_id']}")["sha256"] for j in jobs}
    assert len(shas) == 1


def test_lists_page_with_cursors(stack, merged):
    with stack.client() as client:
        seen, cursor = [], None
        while True:
            page = client.get("/v1/task-vectors", limit=2, **({"cursor": cursor} if cursor else {}))
            assert len(page["items"]) <= 2
            seen += [item["id"] for item in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        everything = client.get("/v1/task-vectors", limit=200)["items"]
        assert seen == [item["id"] for item in everything]
        assert len(seen) >= 3
        bad = client.http.get("/v1/task-vectors", params={"cursor": "!!!"})
        assert bad.status_code == 422


def test_deleting_a_base_model_in_use_is_409(stack, merged):
    with stack.client() as client:
        response = client.http.delete(f"/v1/base-models/{merged['base_model']['id']}")
    assert response.status_code == 409
    assert response.json()["type"] == "/problems/in-use"


def test_cancelling_a_finished_job_is_409(stack, merged):
    with stack.client() as client:
        response = client.http.post(f"/v1/jobs/{merged['job']['id']}/cancel")
    assert response.status_code == 409


def test_readyz_checks_database_broker_and_blobs(stack):
    response = httpx.get(f"{stack.url}/readyz")
    assert response.status_code == 200
    assert response.json()["checks"] == {"database": "ok", "broker": "ok", "blob_store": "ok"}


def test_api_restart_loses_nothing(stack, merged, tmp_path):
    with stack.client() as client:
        before = {path: client.get(path) for path in ("/v1/base-models", "/v1/task-vectors", "/v1/jobs")}
    stack.stop_api()
    stack.start_api()
    checkpoint_id = merged["job"]["result"]["checkpoint_id"]
    with stack.client() as client:
        after = {path: client.get(path) for path in before}
        meta = client.get(f"/v1/checkpoints/{checkpoint_id}")
        checkpoint = client.download_checkpoint(checkpoint_id, tmp_path / "again.safetensors")
    assert after == before
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == meta["sha256"]

"""Per-owner quotas on a real server: stored bytes (403, nothing kept) and jobs in flight (429, Retry-After).

No worker runs, so submitted jobs stay queued and count against the jobs quota.
"""
import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import Stack, _redis_db
from tvforge.client import ApiError

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def quota_stack(tmp_path_factory, redis_url, demo_assets):
    base = demo_assets.base_path.stat().st_size
    vector = demo_assets.vector_paths[0].stat().st_size
    # alice: room for the base and two vectors, not a third nor a checkpoint; mallory: no storage quota;
    # zoe: none at all; queuer: the base, a vector and one checkpoint (about the base's size); racer: one job.
    live = Stack(tmp_path_factory.mktemp("quotas"), f"{redis_url.rsplit('/', 1)[0]}/{next(_redis_db)}",
                 quota_storage_bytes=base + 2 * vector + 10, quota_active_jobs=2,
                 quota_overrides=json.dumps({"mallory": {"storage_bytes": None}, "zoe": {"storage_bytes": 0},
                                             "queuer": {"storage_bytes": 2 * base + vector + 10,
                                                        "active_jobs": None},
                                             "racer": {"storage_bytes": None, "active_jobs": 1}}))
    live.start_api()
    yield live
    live.stop()


def _blob_count(stack) -> int:
    return sum(1 for path in (stack.root / "var" / "blobs").rglob("*") if path.is_file())


def test_storage_quota_refuses_the_upload_that_would_pass_it_and_keeps_nothing(quota_stack, demo_assets):
    with quota_stack.client() as client:
        base = client.register_base_model("base", demo_assets.base_path, config=demo_assets.config)
        first, second, third = demo_assets.vector_paths[:3]
        kept = [client.upload_task_vector(base["id"], name, path)["id"]
                for name, path in (("one", first), ("two", second))]
        blobs = _blob_count(quota_stack)
        with pytest.raises(ApiError) as refused:
            client.upload_task_vector(base["id"], "three", third)
        assert refused.value.status == 403 and refused.value.problem["type"].endswith("quota-exceeded")
        assert "your quota is" in refused.value.problem["detail"]
        assert len(list(client.iterate("/v1/task-vectors"))) == 2 and _blob_count(quota_stack) == blobs

        # A merge's checkpoint would not fit either: refused at submission, nothing queued.
        response = client.http.post("/v1/jobs", json={"method": "task_arithmetic", "base_model_id": base["id"],
                                                      "task_vectors": kept})
        assert response.status_code == 403, response.text
        assert list(client.iterate("/v1/jobs")) == []

        client.delete(f"/v1/task-vectors/{kept[0]}")  # deleting gives the room back
        assert client.upload_task_vector(base["id"], "three", third)["name"] == "three"


def test_an_owner_with_no_room_is_refused_before_the_body_is_read(quota_stack):
    key = quota_stack.run_cli("keys", "create", "--owner", "zoe").strip()
    with socket.create_connection(("127.0.0.1", quota_stack.port), timeout=10) as conn:
        # Declares a gigabyte and sends none of it: the answer must not wait for the body.
        conn.sendall(b"POST /v1/task-vectors HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key.encode()
                     + b"\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 1000000000\r\n\r\n")
        head = conn.recv(4096).split(b"\r\n", 1)[0]
    assert head.startswith(b"HTTP/1.1 403"), head


def test_jobs_quota_answers_429_with_retry_after_and_frees_up_when_a_job_ends(quota_stack, demo_assets):
    with quota_stack.client(quota_stack.other_key) as client:
        base = client.register_base_model("base", demo_assets.base_path, config=demo_assets.config)
        vector = client.upload_task_vector(base["id"], "one", demo_assets.vector_paths[0])
        body = {"method": "task_arithmetic", "base_model_id": base["id"], "task_vectors": [vector["id"]]}
        first = client.http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "first"})
        second = client.http.post("/v1/jobs", json=body)
        assert first.status_code == second.status_code == 202
        third = client.http.post("/v1/jobs", json=body)
        assert third.status_code == 429, third.text
        assert third.headers["content-type"] == "application/problem+json"
        assert int(third.headers["retry-after"]) > 0
        assert len(list(client.iterate("/v1/jobs"))) == 2
        # Replaying a job already made queues nothing, so the quota does not refuse it.
        replay = client.http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "first"})
        assert replay.json()["id"] == first.json()["id"]
        client.cancel_job(first.json()["id"])
        assert client.http.post("/v1/jobs", json=body).status_code == 202


def _owner_with_a_vector(stack, owner: str, demo_assets) -> tuple[str, dict]:
    key = stack.run_cli("keys", "create", "--owner", owner).strip()
    with stack.client(key) as client:
        base = client.register_base_model("base", demo_assets.base_path, config=demo_assets.config)
        vector = client.upload_task_vector(base["id"], "one", demo_assets.vector_paths[0])
    return key, {"method": "task_arithmetic", "base_model_id": base["id"], "task_vectors": [vector["id"]]}


def test_the_checkpoints_of_queued_merges_count_against_the_storage_quota(quota_stack, demo_assets):
    """Room for one checkpoint admits one merge at a time, not one per request until the first is written."""
    key, body = _owner_with_a_vector(quota_stack, "queuer", demo_assets)
    with quota_stack.client(key) as client:
        first = client.http.post("/v1/jobs", json=body)
        assert first.status_code == 202, first.text
        second = client.http.post("/v1/jobs", json=body)
        assert second.status_code == 403 and "quota" in second.json()["detail"], second.text
        client.cancel_job(first.json()["id"])  # a finished job writes nothing more
        assert client.http.post("/v1/jobs", json=body).status_code == 202


def test_concurrent_submissions_cannot_pass_the_jobs_quota_together(quota_stack, demo_assets):
    """Each submission counts the owner's jobs and inserts one while holding the owner's lock: of many sent at
    once with room for one, one is queued and the rest get 429."""
    key, body = _owner_with_a_vector(quota_stack, "racer", demo_assets)
    barrier = threading.Barrier(8)

    def submit(_index: int) -> int:
        with quota_stack.client(key) as client:
            barrier.wait()
            return client.http.post("/v1/jobs", json=body).status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = sorted(pool.map(submit, range(8)))
    assert statuses == [202] + [429] * 7
    with quota_stack.client(key) as client:
        assert len(list(client.iterate("/v1/jobs"))) == 1


def test_quota_overrides_are_validated_at_start(tmp_path):
    from pydantic import ValidationError

    from tvforge.settings import Settings
    with pytest.raises(ValidationError):
        Settings(quota_overrides={"alice": {"active_jobs": -1}})
    settings = Settings(quota_storage_bytes=100, quota_active_jobs=3,
                        quota_overrides={"bob": {"active_jobs": 9}, "carol": {"storage_bytes": None}})
    from app.quotas import quota_of
    assert quota_of(settings, "alice").model_dump() == {"storage_bytes": 100, "active_jobs": 3}
    assert quota_of(settings, "bob").model_dump() == {"storage_bytes": 100, "active_jobs": 9}
    assert quota_of(settings, "carol").model_dump() == {"storage_bytes": None, "active_jobs": 3}

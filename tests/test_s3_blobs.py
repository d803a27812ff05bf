"""Blobs on an S3-compatible server (moto's server mode, a real HTTP S3 endpoint started here): the store
itself between two machines' caches, and a stack whose API and worker share nothing but the bucket."""
import hashlib
import os
import subprocess
import sys
import time

import httpx
import pytest
import torch
from safetensors.torch import load_file

from store.blobs import S3BlobStore
from tests.conftest import Stack
from tests.services import free_port, start_redis

AWS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(url, timeout=1)
            break
        except httpx.HTTPError:
            assert time.monotonic() < deadline and server.poll() is None, "moto's server did not start"
            time.sleep(0.2)
    saved = {name: os.environ.get(name) for name in AWS}
    os.environ.update(AWS)
    yield url
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    server.terminate()
    server.wait(timeout=10)
    log.close()


def _file(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def test_two_machines_share_blobs_through_the_bucket(s3_endpoint, tmp_path):
    api = S3BlobStore(tmp_path / "api", "s3://shared/blobs", s3_endpoint)
    worker = S3BlobStore(tmp_path / "worker", "s3://shared/blobs", s3_endpoint)

    pending = api.pending()
    pending.write(b"a task vector")
    assert api.commit(pending).created is True
    sha = pending.sha256
    assert worker.exists(sha) and not worker.local_path(sha).exists()
    assert worker.path(sha).read_bytes() == b"a task vector"  # fetched into the worker's cache

    path, checkpoint_sha = _file(worker.tmp_dir, "out", b"a merged checkpoint")
    assert worker.commit_file(path, checkpoint_sha).created is True
    again, _ = _file(api.tmp_dir, "again", b"a merged checkpoint")
    assert api.commit_file(again).created is False  # already stored by the other machine
    assert api.path(checkpoint_sha).read_bytes() == b"a merged checkpoint"
    assert list(api.tmp_dir.iterdir()) == [] and list(worker.tmp_dir.iterdir()) == []

    # Unreferenced past the grace period: gone from the bucket and from the collecting machine's cache;
    # the other machine drops its copy at its own next collection.
    assert worker.collect_garbage(lambda: {sha}, grace_s=0) == [checkpoint_sha]
    assert not api.exists(checkpoint_sha) and not worker.local_path(checkpoint_sha).exists()
    assert api.collect_garbage(lambda: {sha}, grace_s=0) == []
    assert not api.local_path(checkpoint_sha).exists() and api.local_path(sha).exists()
    api.delete(sha)
    assert not worker.exists(sha)


@pytest.mark.integration
def test_api_and_worker_with_separate_disks_run_a_job_through_s3(s3_endpoint, tmp_path_factory, demo_assets):
    import boto3

    redis_url, stop_redis = start_redis()
    root = tmp_path_factory.mktemp("s3-stack")
    stack = Stack(root, redis_url, blob_s3_url="s3://tvforge/blobs", blob_s3_endpoint_url=s3_endpoint)
    stack.env.update(AWS)
    stack.start_api()
    stack.env["TVFORGE_BLOB_DIR"] = str(root / "worker-disk")  # the worker's own machine
    stack.start_worker()
    try:
        with stack.client() as client:
            base = client.register_base_model("base", demo_assets.base_path, config=demo_assets.config)
            vectors = [client.upload_task_vector(base["id"], f"v{i}", path)["id"]
                       for i, path in enumerate(demo_assets.vector_paths[:2])]
            job = client.create_job("task_arithmetic", base["id"], vectors, {"scaling": 0.5})
            job = client.wait_for_job(job["id"], timeout_s=180)
            assert job["status"] == "succeeded", job.get("error")
            checkpoint = client.get_checkpoint(job["result"]["checkpoint_id"])
            merged = load_file(client.download_checkpoint(checkpoint["id"], root / "merged.safetensors"))
        base_state = load_file(demo_assets.base_path)
        taus = [load_file(path) for path in demo_assets.vector_paths[:2]]
        for name, tensor in merged.items():
            expected = base_state[name] + 0.5 * sum(tau[name] for tau in taus) if name in taus[0] else base_state[name]
            torch.testing.assert_close(tensor, expected)
        bucket = boto3.client("s3", endpoint_url=s3_endpoint)
        keys = {item["Key"] for item in bucket.list_objects_v2(Bucket="tvforge")["Contents"]}
        sha = checkpoint["sha256"]
        assert f"blobs/sha256/{sha[:2]}/{sha[2:]}" in keys  # written by the worker, read by the API
        assert (root / "worker-disk" / "sha256" / sha[:2] / sha[2:]).exists()
    finally:
        stack.stop()
        stop_redis()


def test_the_cache_drops_least_recently_used_copies_past_its_budget(s3_endpoint, tmp_path):
    import os

    store = S3BlobStore(tmp_path / "machine", "s3://cache-test/blobs", s3_endpoint, cache_max_bytes=250)
    digests = []
    for index in range(3):
        path, sha = _file(store.tmp_dir, f"f{index}", bytes([index]) * 100)
        store.commit_file(path, sha)
        digests.append(sha)
    old = store.CACHE_MIN_AGE_S + 60
    for age, sha in zip((3 * old, 2 * old, old), digests, strict=True):  # digests[0] used longest ago
        stamp = os.path.getmtime(store.local_path(sha)) - age
        os.utime(store.local_path(sha), (stamp, stamp))
    assert store.prune_cache() == 1  # 300 bytes cached, 250 allowed: the least recently used goes
    assert not store.local_path(digests[0]).exists() and store.local_path(digests[2]).exists()
    assert store.path(digests[0]).read_bytes() == bytes([0]) * 100  # still in the bucket: fetched again
    # That fetch went past the budget again; the copies used in the last CACHE_MIN_AGE_S are never dropped.
    assert not store.local_path(digests[1]).exists() and store.local_path(digests[0]).exists()


def test_a_refused_upload_leaves_its_object_to_the_collector(s3_endpoint, tmp_path):
    """Two uploads of the same bytes may both find no object and both take themselves for its creator, so a refused
    upload removes nothing on S3 (the local store can tell: tests/test_blob_store.py); the collector removes the
    object once its grace period has passed and no row references it."""
    api = S3BlobStore(tmp_path / "api", "s3://refused/blobs", s3_endpoint)
    path, sha = _file(api.tmp_dir, "alone", b"bytes only one upload has")
    refused = api.commit_file(path, sha)
    assert refused.created and api.discard(refused) is False and api.exists(sha)
    assert api.collect_garbage(lambda: set(), grace_s=0) == [sha]
    assert not api.exists(sha) and not api.local_path(sha).exists()


def test_a_running_jobs_inputs_stay_cached(s3_endpoint, tmp_path):
    """The worker's heartbeat marks its job's inputs as used (keep_fresh): its evaluation reopens them long after
    the job looked their paths up, so the cache must not have pruned them meanwhile."""
    store = S3BlobStore(tmp_path / "machine", "s3://fresh/blobs", s3_endpoint, cache_max_bytes=150)
    paths = []
    for index in range(2):
        path, sha = _file(store.tmp_dir, f"f{index}", bytes([index]) * 100)
        store.commit_file(path, sha)
        paths.append(store.local_path(sha))
    old = time.time() - store.CACHE_MIN_AGE_S - 60
    for path in paths:
        os.utime(path, (old, old))
    store.keep_fresh(paths[:1])  # the job reads the first
    assert store.prune_cache() == 1
    assert paths[0].exists() and not paths[1].exists()


def test_a_worker_waits_out_an_outage_of_the_store_instead_of_failing_its_job(s3_endpoint, tmp_path):
    """The store's answers are cut for two seconds (the upload itself arrives): the worker's commit, run through
    through_storage_outages, succeeds once they come back; a missing key is no outage and is not retried.
    (boto3's own 5 retries are turned down to 1 here, so that the outage outlasts them.)"""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError

    from store.blobs import storage_unavailable, through_storage_outages
    from tests.flaky_proxy import FlakyProxy

    store = S3BlobStore(tmp_path / "worker", "s3://flaky/blobs", s3_endpoint)
    back_at = time.monotonic() + 2.0
    proxy = FlakyProxy(int(s3_endpoint.rsplit(":", 1)[1]), lambda head: 0 if time.monotonic() < back_at else None)
    store.client = boto3.client("s3", endpoint_url=proxy.url, config=Config(retries={"max_attempts": 1}))
    try:
        path, sha = _file(store.tmp_dir, "out", b"a merged checkpoint")
        with pytest.raises(Exception) as cut:
            store.commit_file(path, sha)
        assert storage_unavailable(cut.value) and path.exists()  # nothing moved: safe to run again
        committed = through_storage_outages(lambda: store.commit_file(path, sha), retry_for_s=30)
        assert committed.sha256 == sha and store.local_path(sha).read_bytes() == b"a merged checkpoint"
        assert proxy.cuts >= 2 and time.monotonic() >= back_at
        with pytest.raises(ClientError) as missing:
            through_storage_outages(lambda: store.path("0" * 64), retry_for_s=30)
        assert not storage_unavailable(missing.value)
        try:  # raised while an outage was being handled (a time limit, say): not an outage itself
            try:
                raise cut.value
            except Exception:
                raise ValueError("not the store's") from None
        except ValueError as other:
            assert not storage_unavailable(other)
    finally:
        proxy.close()


def test_an_object_too_large_for_one_copy_request_is_touched_in_parts(s3_endpoint, tmp_path, monkeypatch):
    """Committing bytes the bucket already holds restarts the object's grace period by copying it onto itself;
    S3 takes one copy request only up to 5 GB, so a larger object is copied in parts. Here the limit is 6 MiB:
    moto, which has none, is made to refuse a larger CopyObject as S3 does, and serves the parts' copies."""
    from botocore.client import BaseClient
    from botocore.exceptions import ClientError

    store = S3BlobStore(tmp_path / "store", "s3://large/blobs", s3_endpoint)
    store.single_copy_max_bytes = 6 * 2**20
    call = BaseClient._make_api_call

    def with_a_copy_limit(self, operation, params):
        if operation == "CopyObject":
            source = params["CopySource"]
            size = self.head_object(Bucket=source["Bucket"], Key=source["Key"])["ContentLength"]
            if size > store.single_copy_max_bytes:
                raise ClientError({"Error": {"Code": "InvalidRequest", "Message": "The specified copy source is "
                                             "larger than the maximum allowable size for a copy source"}}, operation)
        return call(self, operation, params)

    monkeypatch.setattr(BaseClient, "_make_api_call", with_a_copy_limit)
    data = os.urandom(13 * 2**20)
    path, sha = _file(store.tmp_dir, "first", data)
    assert store.commit_file(path, sha).created is True
    before = store._head(sha)
    time.sleep(1.1)  # LastModified has whole seconds
    again, _ = _file(store.tmp_dir, "again", data)
    assert store.commit_file(again, sha).created is False
    after = store._head(sha)
    assert after["LastModified"] > before["LastModified"] and after["Metadata"]["touched"]
    assert after["ContentLength"] == len(data)
    store.local_path(sha).unlink()
    assert hashlib.sha256(store.path(sha).read_bytes()).hexdigest() == sha  # fetched whole from the bucket


def test_a_bucket_the_store_creates_drops_abandoned_upload_parts(s3_endpoint, tmp_path, monkeypatch):
    """A multipart upload cut off by a killed process leaves parts the collector cannot see (they are not
    objects): the bucket the store creates aborts such uploads after a day. A server that refuses the rule (MinIO
    answers MalformedXML, and purges such parts itself) still gets its bucket and a working store."""
    from botocore.client import BaseClient
    from botocore.exceptions import ClientError

    store = S3BlobStore(tmp_path / "store", "s3://fresh-bucket/blobs", s3_endpoint)
    rules = store.client.get_bucket_lifecycle_configuration(Bucket="fresh-bucket")["Rules"]
    assert [(rule["Status"], rule["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"]) for rule in rules] \
        == [("Enabled", 1)]

    call = BaseClient._make_api_call

    def as_minio(self, operation, params):
        if operation == "PutBucketLifecycleConfiguration":
            raise ClientError({"Error": {"Code": "MalformedXML", "Message": "not well-formed"}}, operation)
        return call(self, operation, params)

    monkeypatch.setattr(BaseClient, "_make_api_call", as_minio)
    refused = S3BlobStore(tmp_path / "minio", "s3://minio-like/blobs", s3_endpoint)
    pending = refused.pending()
    pending.write(b"a task vector")
    assert refused.commit(pending).created is True

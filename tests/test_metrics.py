"""/metrics in Prometheus format from a running stack: request latency by route, jobs, durations, queue, store."""
import re

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

from tvforge.demo import run_demo

pytestmark = pytest.mark.integration


def _samples(stack) -> dict:
    text = httpx.get(f"{stack.url}/metrics", timeout=10)
    assert text.status_code == 200 and text.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text.text) for s in family.samples}


def test_metrics_show_requests_jobs_durations_queue_and_store(stack, tmp_path):
    with stack.client() as client:
        summary = run_demo(client, tmp_path, log=lambda _: None)
        job_id = summary["job"]["id"]
        client.get_job(job_id)
        jobs = list(client.iterate("/v1/jobs"))
        blobs = {row["sha256"]: row["size_bytes"] for path in ("/v1/base-models", "/v1/task-vectors")
                 for row in client.iterate(path)}
        checkpoint = client.get_checkpoint(summary["job"]["result"]["checkpoint_id"])
        blobs[checkpoint["sha256"]] = checkpoint["size_bytes"]
    samples = _samples(stack)

    polls = samples[("tvforge_http_request_duration_seconds_count",
                     (("method", "GET"), ("route", "/v1/jobs/{job_id}"), ("status", "200")))]
    assert polls >= 1
    ids = re.compile(r"(job|tv|bm|ds|ckpt)_[0-9a-f]{8}")
    assert not any(ids.search(value) for (_, labels) in samples for _, value in labels)  # templates, not ids
    succeeded = sum(v for (name, labels), v in samples.items()
                    if name == "tvforge_jobs" and ("status", "succeeded") in labels)
    assert succeeded == sum(1 for j in jobs if j["status"] == "succeeded") >= 1
    # totals kept as jobs succeed: this stack's earlier modules may have deleted some of theirs since
    assert samples[("tvforge_job_duration_seconds_count", ())] >= succeeded
    assert samples[("tvforge_database_up", ())] == 1
    assert samples[("tvforge_queue_depth", (("queue", "model"),))] >= 0
    assert samples[("tvforge_queue_depth", (("queue", "tensors"),))] >= 0
    assert samples[("tvforge_blob_store_bytes", ())] >= sum(blobs.values())


def test_histogram_bucket_bounds_are_written_as_prometheus_writes_them(stack):
    """le="+Inf", never Python's "inf", which Prometheus's own parser refuses (the client's parser accepts it)."""
    text = httpx.get(f"{stack.url}/metrics", timeout=10).text
    bounds = re.findall(r'^(tvforge_\w+)_bucket\{.*?le="([^"]+)"', text, re.M)
    assert {name for name, _ in bounds} >= {"tvforge_job_duration_seconds", "tvforge_http_request_duration_seconds"}
    assert all(bound == floatToGoString(float(bound)) for _, bound in bounds), sorted(set(bounds))
    assert 'tvforge_job_duration_seconds_bucket{le="+Inf"}' in text


def test_the_job_duration_histogram_never_goes_down(stack, tmp_path):
    """Prometheus takes a falling counter for a restart: deleting a succeeded job must not take its run back."""
    with stack.client() as client:
        job = run_demo(client, tmp_path, log=lambda _: None)["job"]
        before = _samples(stack)
        client.delete(f"/v1/jobs/{job['id']}")
    after = _samples(stack)
    for name in ("tvforge_job_duration_seconds_count", "tvforge_job_duration_seconds_sum"):
        assert after[(name, ())] == before[(name, ())] > 0


def test_a_scrape_while_the_database_is_down_still_serves_latency_and_says_so(tmp_path, monkeypatch):
    """A database that cannot be opened (its folder is gone): the scrape answers, without the families read
    from it, with tvforge_database_up 0 and this process's request latency."""
    from prometheus_client import generate_latest

    from app.metrics import REGISTRY, REQUEST_SECONDS
    from tvforge.settings import get_settings

    monkeypatch.setenv("TVFORGE_DATABASE_URL", f"sqlite:///{tmp_path / 'gone' / 'tvforge.db'}")
    monkeypatch.setenv("TVFORGE_BROKER_URL", "redis://127.0.0.1:1/0")  # nothing listens: the queue is absent too
    get_settings.cache_clear()
    try:
        REQUEST_SECONDS.labels("GET", "/v1/jobs", "200").observe(0.01)
        families = {family.name: family for family in text_string_to_metric_families(
            generate_latest(REGISTRY).decode())}
    finally:
        get_settings.cache_clear()
    assert families["tvforge_database_up"].samples[0].value == 0
    assert families["tvforge_http_request_duration_seconds"].samples
    assert not {"tvforge_jobs", "tvforge_job_duration_seconds", "tvforge_blob_store_bytes"} & families.keys()

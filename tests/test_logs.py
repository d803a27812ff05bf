"""Structured logs from the real processes: JSON lines carrying the request id (the API) and the job id (the
worker)."""
import json

import httpx
import pytest

from tvforge.demo import run_demo

pytestmark = pytest.mark.integration


def _json_lines(path) -> list[dict]:
    lines = []
    for raw in path.read_text(errors="replace").splitlines():
        try:
            lines.append(json.loads(raw))
        except json.JSONDecodeError:
            continue
    return lines


def test_api_and_worker_log_json_with_request_and_job_ids(stack, tmp_path):
    with stack.client() as client:
        job = run_demo(client, tmp_path, log=lambda _: None)["job"]
    answered = httpx.get(f"{stack.url}/v1/jobs/{job['id']}", timeout=10,
                         headers={"Authorization": f"Bearer {stack.owner_key}", "X-Request-ID": "trace-42"})
    assert answered.headers["x-request-id"] == "trace-42"
    generated = httpx.get(f"{stack.url}/healthz", timeout=10).headers["x-request-id"]
    assert len(generated) == 32

    api = _json_lines(stack.root / "api.log")
    assert {"time", "level", "logger", "message"} <= set(api[-1])
    assert any(line.get("request_id") == "trace-42" and f"/v1/jobs/{job['id']}" in line["message"] for line in api)

    worker = _json_lines(stack.root / "worker0.log")
    mine = [line for line in worker if line.get("job_id") == job["id"]]
    assert any("claimed" in line["message"] for line in mine)
    assert any("succeeded" in line["message"] for line in mine)

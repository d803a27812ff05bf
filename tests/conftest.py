"""Shared fixtures: a live stack of real processes (redis-server, a Celery worker, uvicorn) and tiny assets."""
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.services import free_port
from tvforge.client import TvforgeClient
from tvforge.demo import DemoAssets, build_demo_assets

pytest_plugins = ["tests.conftest_services"]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "tvforge.cli"]


class Stack:
    """The service as it runs in production, each part its own process, on throw-away state."""

    def __init__(self, root: Path, broker_url: str, **settings):
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = os.environ | {
            "HF_HUB_OFFLINE": "1",
            "TVFORGE_DATA_DIR": str(root / "var"),
            "TVFORGE_BROKER_URL": broker_url,
            "TVFORGE_API_PORT": str(self.port),
            "TVFORGE_HEARTBEAT_INTERVAL_S": "0.5",
            "TVFORGE_HEARTBEAT_TIMEOUT_S": "4",
            "TVFORGE_REAPER_INTERVAL_S": "1",
            # API, worker and pytest share two cores here: one torch thread each avoids oversubscription.
            "TVFORGE_TORCH_THREADS": "1",
            # Tests fire requests faster than a person; the limiter has a stack of its own (test_rate_limits).
            "TVFORGE_RATE_LIMIT": "",
        } | {f"TVFORGE_{k.upper()}": str(v) for k, v in settings.items()}
        self.api: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.run_cli("migrate")
        self.owner_key = self.run_cli("keys", "create", "--owner", "alice").strip()
        self.other_key = self.run_cli("keys", "create", "--owner", "mallory").strip()

    def run_cli(self, *args: str) -> str:
        return subprocess.run([*CLI, *args], env=self.env, cwd=REPO, check=True, capture_output=True,
                              text=True, timeout=120).stdout

    def _spawn(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        # A process group of its own, so a kill takes the Celery pool children too.
        return subprocess.Popen([*CLI, *args], env=self.env, cwd=REPO, stdout=log, stderr=log,
                                start_new_session=True)

    def start_api(self) -> None:
        self.api = self._spawn("api", "api")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.api.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"the API did not start; see {self.root / 'api.log'}")

    def stop_api(self) -> None:
        self._stop(self.api)
        self.api = None

    def start_worker(self, *args: str) -> subprocess.Popen:
        worker = self._spawn(f"worker{len(self.workers)}", "worker", *args)
        self.workers.append(worker)
        return worker

    def kill_worker(self, worker: subprocess.Popen) -> None:
        """SIGKILL to the worker and its pool children at once: no chance to clean up."""
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)

    @staticmethod
    def _stop(process: subprocess.Popen | None) -> None:
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def stop(self) -> None:
        for worker in self.workers:
            self._stop(worker)
        self.stop_api()

    def client(self, key: str | None = None) -> TvforgeClient:
        return TvforgeClient(self.url, key or self.owner_key)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in self.root.glob("*.log"))


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory) -> DemoAssets:
    return build_demo_assets(tmp_path_factory.mktemp("demo-assets"))


@pytest.fixture(scope="session")
def quick_bench_assets(tmp_path_factory):
    """The quality benchmark's --quick assets (a pre-trained tiny CLIP, task vectors, datasets), built once.

    TVFORGE_TEST_ASSETS_DIR names a folder to keep them in between runs (the build is cached by its
    config's hash there); by default they go to a temporary folder.
    """
    from bench.quality.build_assets import build_assets

    folder = os.environ.get("TVFORGE_TEST_ASSETS_DIR")
    return build_assets(Path(folder) if folder else tmp_path_factory.mktemp("bench-assets"), quick=True)


@pytest.fixture(scope="module")
def registered(stack, quick_bench_assets):
    """The assets uploaded over HTTP: {task name: (task vector id, dataset id)} and the base model id."""
    assets = quick_bench_assets
    with stack.client() as client:
        base = client.register_base_model("bench-base", assets.base_path, config=assets.model_config)
        ids = {}
        for task in assets.tasks:
            vector = client.upload_task_vector(base["id"], task.name, task.vector_path, class_names=task.class_names)
            dataset = client.upload_dataset(task.name, task.dataset_path, class_names=task.class_names)
            ids[task.name] = (vector["id"], dataset["id"])
    return base["id"], ids


_redis_db = iter(range(1, 16))


@pytest.fixture(scope="module")
def stack(request, tmp_path_factory, redis_url) -> Iterator[Stack]:
    """API + one worker, on fresh state and a Redis database of their own; a test module's STACK_SETTINGS
    (settings by field name, as Stack takes them) are added."""
    settings = {"max_upload_bytes": 64 * 1024 * 1024, "max_dataset_decoded_bytes": 64 * 1024 * 1024}
    settings |= getattr(request.module, "STACK_SETTINGS", {})
    live = Stack(tmp_path_factory.mktemp("stack"), f"{redis_url.rsplit('/', 1)[0]}/{next(_redis_db)}", **settings)
    live.start_api()
    live.start_worker()
    yield live
    live.stop()


def register_long_job_inputs(client: TvforgeClient, demo_assets: DemoAssets, folder: Path) -> dict:
    """A tiny base, its task vectors and a small random target dataset, registered over HTTP: the inputs of a
    long aTLAS entropy job. Returns their ids."""
    rng = np.random.default_rng(0)
    dataset_path = folder / "target.npz"
    np.savez(dataset_path, images=rng.integers(0, 256, (48, 32, 32, 3), dtype=np.uint8),
             labels=rng.integers(0, 3, 48), class_names=np.array(["red", "green", "blue"]))
    base = client.register_base_model("lifecycle-base", demo_assets.base_path, config=demo_assets.config)
    vectors = [client.upload_task_vector(base["id"], f"v{i}", p)["id"] for i, p in enumerate(demo_assets.vector_paths)]
    return {"base": base["id"], "vectors": vectors, "dataset": client.upload_dataset("target", dataset_path)["id"]}


def submit_long_job(client: TvforgeClient, ids: dict, epochs: int) -> dict:
    return client.create_job("atlas", ids["base"], ids["vectors"], {
        "objective": "entropy", "target_dataset_id": ids["dataset"], "epochs": epochs, "batch_size": 8})


@pytest.fixture(scope="module")
def long_job(stack, demo_assets, tmp_path_factory):
    """A factory of real, long aTLAS jobs (entropy minimisation for many epochs) on the tiny assets."""
    with stack.client() as client:
        ids = register_long_job_inputs(client, demo_assets, tmp_path_factory.mktemp("lifecycle"))
    return lambda client, epochs: submit_long_job(client, ids, epochs)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Attach the stack's process logs to a failing test's report."""
    outcome = yield
    report = outcome.get_result()
    live = item.funcargs.get("stack") if hasattr(item, "funcargs") else None
    if report.failed and isinstance(live, Stack):
        report.sections.append(("stack logs", live.logs()))

"""Remake the README's dashboard screenshot: an aTLAS task-addition job on the quality benchmark's --quick
assets (4 tasks), run by a real stack and shown by the dashboard in headless chromium.

    python -m tests.dashboard_screenshot [docs/dashboard-job.png]
"""
import sys
import tempfile
from pathlib import Path

from bench.quality.build_assets import build_assets
from tests.conftest import REPO, Stack
from tests.services import start_redis
from tests.test_dashboard import render


def main(out: Path) -> None:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        assets = build_assets(root / "assets", quick=True)
        redis_url, stop_redis = start_redis()
        stack = Stack(root, redis_url)
        try:
            stack.start_api()
            stack.start_worker()
            with stack.client() as client:
                base = client.register_base_model("tiny-clip (quick bench)", assets.base_path,
                                                  config=assets.model_config)
                vectors, datasets = [], {}
                for task in assets.tasks:
                    vectors.append(client.upload_task_vector(base["id"], task.name, task.vector_path)["id"])
                    datasets[vectors[-1]] = client.upload_dataset(task.name, task.dataset_path,
                                                                  templates=task.templates)["id"]
                job = client.create_job("atlas", base["id"], vectors, {"task_datasets": datasets, "epochs": 10})
                job = client.wait_for_job(job["id"], timeout_s=900)
                assert job["status"] == "succeeded", job["error"]
            render(f"{stack.url}/ui/#/jobs/{job['id']}?key={stack.owner_key}", screenshot=str(out.resolve()))
        finally:
            stack.stop()
            stop_redis()
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "docs" / "dashboard-job.png")

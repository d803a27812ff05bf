"""The demo's TIES merge through the Python SDK: register the base, upload the vectors, estimate, merge, download.

    tvforge demo-assets examples/assets
    python examples/sdk_merge.py examples/assets examples/merged/

The server and key are found as the CLI finds them (TVFORGE_URL / TVFORGE_API_KEY, the config file, else the
embedded service `tvforge up` runs here).
"""
import sys
from pathlib import Path

from tvforge.client import TvforgeClient
from tvforge.demo import TINY_CLIP_CONFIG


def main(assets: Path, dest: str) -> Path:
    with TvforgeClient.from_config() as client:
        base = client.register_base_model("tiny-clip", assets / "base.safetensors", config=TINY_CLIP_CONFIG)
        vectors = [client.upload_task_vector(base["id"], path.stem, path)["id"]
                   for path in sorted(assets.glob("task_vector_*.safetensors"))]
        params = {"top_k": 20, "merge": "sum"}
        dry_run = client.estimate_job("ties", base["id"], vectors, params)  # validated and costed, not queued
        print(f"estimated peak: {dry_run['estimate']['peak_gib']} GiB")
        job = client.wait_for_job(client.create_job("ties", base["id"], vectors, params)["id"])
        if job["status"] != "succeeded":
            raise SystemExit(f"job {job['id']} {job['status']}: {job['error']}")
        print(f"result: {job['result']}")
        return client.download_checkpoint(job["result"]["checkpoint_id"], dest)  # checks the sha256


if __name__ == "__main__":
    print(main(Path(sys.argv[1]), sys.argv[2]))

"""Jobs through a real Celery worker whose device is CUDA: what issue 11 asks of a GPU. scripts/device_checks.sh
runs this on the device machine; where CUDA is absent it is skipped.

aTLAS (autocast to float16 with loss scaling, vectors held in float16), STA (Taylor importance from gradients) and
TSV-M (its SVDs on the device, engine.spectral.on_device; its alpha searched by evaluating there), each submitted
over HTTP on the quality benchmark's --quick assets: the service must say the checkpoint was made on the worker's
device, and the checkpoint and its accuracies must be what the engine computes in this process on that device from
the same inputs, parameters and seed. GPU kernels need not repeat bit for bit (atomic additions in some backward
passes), so on CUDA the comparison allows float rounding and two images' worth of accuracy where the CPU's is
exact. The same job is also run on the CPU, and both devices' accuracies go to the JSON file TVFORGE_CHECK_OUT
names: what mixed precision changes.

TVFORGE_CHECK_DEVICE=cpu runs these checks on the CPU: how the checks themselves are tested without a GPU.
TVFORGE_CHECK_REQUIRE_CUDA=1 (scripts/device_checks.sh) makes a missing GPU fail them instead of skipping them.
"""
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.http_jobs import assert_same_tensors, engine_inputs, job_params, run_directly, run_over_http

DEVICE = os.environ.get("TVFORGE_CHECK_DEVICE", "cuda")
STACK_SETTINGS = {"device": DEVICE}
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available()
                       and not os.environ.get("TVFORGE_CHECK_REQUIRE_CUDA"),
                       reason="no CUDA device here: scripts/device_checks.sh runs these on the device machine"),
]
RECORD = os.environ.get("TVFORGE_CHECK_OUT")


def assert_close_tensors(path: Path, expected: Path) -> None:
    """Bit for bit on the CPU. On CUDA each entry within 1e-4 of its tensor's largest, but for at most 0.1% of
    the model's entries: a rounding difference can flip a discrete choice, such as an STA mask entry at its
    threshold."""
    if not DEVICE.startswith("cuda"):
        assert_same_tensors(path, expected)
        return
    got, want = load_file(str(path)), load_file(str(expected))
    assert got.keys() == want.keys()
    far = {name: int(((got[name].double() - want[name].double()).abs()
                      > 1e-4 * float(want[name].abs().max()) + 1e-12).sum())
           for name in want if want[name].is_floating_point()}
    assert all(torch.equal(got[name], want[name]) for name in want if not want[name].is_floating_point())
    entries = sum(tensor.numel() for tensor in want.values())
    assert sum(far.values()) <= 1e-3 * entries, {name: count for name, count in far.items() if count}


def accuracies(metrics: dict) -> dict[str, float]:
    return {name: entry["accuracy"] for name, entry in metrics["evaluation"]["datasets"].items()}


def assert_close_accuracies(served: dict, computed: dict) -> None:
    """Equal on the CPU; on CUDA within two images of each evaluation split."""
    assert served["datasets"].keys() == computed["datasets"].keys()
    for name, entry in served["datasets"].items():
        images = 2 if DEVICE.startswith("cuda") else 0
        assert abs(entry["accuracy"] - computed["datasets"][name]["accuracy"]) <= images / entry["images"] + 1e-9, \
            (name, entry, computed["datasets"][name])


@pytest.mark.parametrize("method", ["atlas", "sta", "tsv_m"])
def test_worker_makes_the_checkpoint_on_its_device(method, stack, registered, quick_bench_assets, tmp_path):
    base_id, ids = registered
    params = job_params(method, {tv: ds for tv, ds in ids.values()})
    final, _, _ = run_over_http(stack, base_id, ids, method, params, tmp_path / "http.safetensors")
    with stack.client() as client:
        checkpoint = client.get(f"/v1/checkpoints/{final['result']['checkpoint_id']}")
    assert checkpoint["contents"]["device"] == DEVICE

    inputs = engine_inputs(quick_bench_assets, ids)
    threads = int(stack.env["TVFORGE_TORCH_THREADS"])
    direct = run_directly(method, params, inputs, tmp_path / "direct", threads, device=DEVICE)
    assert_close_tensors(tmp_path / "http.safetensors", direct.checkpoint_path)
    assert_close_accuracies(final["result"]["metrics"]["evaluation"], direct.metrics["evaluation"])

    if RECORD:
        on_cpu = run_directly(method, params, inputs, tmp_path / "cpu", threads)
        path = Path(RECORD)
        record = json.loads(path.read_text()) if path.exists() else {}
        task_of = {dataset: task for task, (_, dataset) in ids.items()}
        served = accuracies(final["result"]["metrics"])
        record[method] = {"device": DEVICE, "accuracy": {task_of[ds]: value for ds, value in served.items()},
                          "cpu_accuracy": {task_of[ds]: value for ds, value in accuracies(on_cpu.metrics).items()},
                          "metrics": {key: value for key, value in final["result"]["metrics"].items()
                                      if key != "evaluation"}}
        path.write_text(json.dumps(record, indent=2, default=str) + "\n")

"""Jobs through the HTTP API on the quality benchmark's --quick assets, and the same jobs run by the engine in
the test's process (conftest's `registered` uploads the assets): helpers that test_methods_e2e and test_gpu
share."""
from pathlib import Path

import torch
from safetensors.torch import load_file

from engine.context import DatasetInput, JobContext, MergeInputs, TaskVectorInput
from engine.methods.catalogue import get_method
from engine.running import run_method


def engine_inputs(assets, ids, vector_paths: dict[str, Path] | None = None) -> MergeInputs:
    """The same inputs as the job's, read from the asset files (or vector_paths, by task vector id) instead of
    the service's blob store."""
    tasks = {task.name: task for task in assets.tasks}
    return MergeInputs(
        base_path=assets.base_path, base_spec=assets.model_spec,
        task_vectors=[TaskVectorInput(tv, name, (vector_paths or {}).get(tv, tasks[name].vector_path),
                                      tasks[name].class_names)
                      for name, (tv, _) in ids.items()],
        datasets={ds: DatasetInput(ds, name, tasks[name].dataset_path, tasks[name].class_names, tasks[name].templates)
                  for name, (_, ds) in ids.items()})


def run_over_http(stack, base_id, ids, method, params, download_to: Path, start_checkpoint_id: str | None = None):
    """Submit, follow the job's Server-Sent Events to the end, download the checkpoint."""
    with stack.client() as client:
        job = client.create_job(method, base_id, [tv for tv, _ in ids.values()], params, seed=7,
                                start_checkpoint_id=start_checkpoint_id)
        events = list(client.events(job["id"]))
        final = events[-1][1]
        assert final["status"] == "succeeded", final["error"]
        client.download_checkpoint(final["result"]["checkpoint_id"], download_to)
        coefficients = client.http.get(f"/v1/jobs/{job['id']}/coefficients")
    return final, events, coefficients


def run_directly(method, params, inputs, workdir: Path, threads: int, device: str = "cpu"):
    """The engine in this process, with the worker's thread count (reductions sum in thread-dependent order)."""
    spec = get_method(method)
    workdir.mkdir()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    context = JobContext(workdir=workdir, seed=7, device=device)
    try:
        return run_method(spec, inputs, spec.params.model_validate(params), context)
    finally:
        torch.set_num_threads(previous)


def assert_same_tensors(path: Path, expected: Path) -> None:
    """Tensor for tensor, bit for bit (the files' headers differ: the service adds its metadata)."""
    got, want = load_file(str(path)), load_file(str(expected))
    assert got.keys() == want.keys()
    different = [name for name in want if not torch.equal(got[name], want[name])]
    assert not different, different[:5]


def job_params(method: str, task_datasets: dict[str, str]) -> dict:
    if method == "sta":
        return {"calibration_datasets": task_datasets, "calibration_samples": 64}
    if method == "atlas":
        return {"task_datasets": task_datasets, "epochs": 2, "batch_size": 32}
    if method == "dare":  # the seeded drop, TIES-style, lambda searched
        return {"combine": "ties", "validation_datasets": task_datasets}
    return {"validation_datasets": task_datasets}  # tsv_m, iso_c, iso_cts: alpha searched

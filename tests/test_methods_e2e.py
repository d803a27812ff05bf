"""STA, aTLAS, DARE, TSV-M, Iso-C and Iso-CTS jobs on the benchmark's assets, through the HTTP API and a real
Celery worker.

Each downloaded checkpoint must be what the engine computes directly from the same inputs,
parameters and seed, and so must its accuracies.
"""

import pytest
import torch
from safetensors.torch import load_file

from engine.context import JobContext
from engine.evaluator import EvalTarget
from engine.methods.catalogue import METHODS
from engine.running import evaluate_checkpoint
from tests.http_jobs import assert_same_tensors, engine_inputs, job_params, run_directly, run_over_http

pytestmark = pytest.mark.integration


LORA_RANK = 8


@pytest.fixture(scope="module")
def registered_lora(stack, registered, quick_bench_assets, tmp_path_factory):
    """Rank-8 LoRA task vectors (the benchmark's: truncated SVDs of the assets' image-tower transformer matrices,
    every other tensor dense) uploaded over HTTP: {task name: (task vector id, dataset id)} and each vector's file
    by id."""
    from bench.quality.run import lora_task_vector

    base_id, ids = registered
    folder = tmp_path_factory.mktemp("lora")
    lora_ids, paths = {}, {}
    with stack.client() as client:
        for task in quick_bench_assets.tasks:
            path = lora_task_vector(task, LORA_RANK, folder).path
            vector = client.upload_task_vector(base_id, f"{task.name}-lora", path, class_names=task.class_names)
            assert vector["lora_rank"] == LORA_RANK and vector["parameter_count"] < path.stat().st_size
            lora_ids[task.name] = (vector["id"], ids[task.name][1])
            paths[vector["id"]] = path
    return base_id, lora_ids, paths


@pytest.mark.parametrize("method", ["sta", "atlas", "dare", "tsv_m", "iso_c", "iso_cts"])
def test_http_job_reproduces_the_engine(method, stack, registered, quick_bench_assets, tmp_path):
    base_id, ids = registered
    task_datasets = {tv: ds for tv, ds in ids.values()}
    params = job_params(method, task_datasets)

    final, events, coefficients = run_over_http(stack, base_id, ids, method, params, tmp_path / "http.safetensors")
    inputs = engine_inputs(quick_bench_assets, ids)
    direct = run_directly(method, params, inputs, tmp_path / "direct", int(stack.env["TVFORGE_TORCH_THREADS"]))

    progress = [job["progress"] for event, job in events if event == "progress" and job["status"] == "running"]
    assert any(p["stage"] and p["total"] > 0 for p in progress), progress
    assert_same_tensors(tmp_path / "http.safetensors", direct.checkpoint_path)
    context = JobContext(workdir=tmp_path)
    targets = [EvalTarget(ds, tv) for tv, ds in task_datasets.items()]
    over_http = evaluate_checkpoint(inputs, tmp_path / "http.safetensors", targets, context)
    in_engine = evaluate_checkpoint(inputs, direct.checkpoint_path, targets, context)
    assert over_http == in_engine
    assert all(0.0 <= entry["accuracy"] <= 1.0 and entry["split"] == "test" for entry in over_http["datasets"].values())
    # The job reports the same evaluation of its own checkpoint (the engine's run_method did it).
    assert final["result"]["metrics"]["evaluation"] == over_http
    assert direct.metrics["evaluation"] == over_http

    if method == "atlas":
        assert coefficients.status_code == 200
        body = coefficients.json()
        assert body["task_vectors"] == [tv for tv, _ in ids.values()]
        assert len(body["values"]) == len(ids)
        assert all(len(row) == len(body["blocks"]) for row in body["values"])
    else:
        assert coefficients.status_code == 404
    if method == "sta":
        assert final["result"]["metrics"]["importance_source"] == {tv: "taylor" for tv in task_datasets}
    if method in ("dare", "tsv_m", "iso_c", "iso_cts"):
        assert final["result"]["metrics"]["chosen"]["scaling"]["source"].startswith("search on val")
        assert final["result"]["metrics"]["chosen"] == direct.metrics["chosen"]


@pytest.mark.parametrize("variant", ["partitions", "budget", "ufm"])
def test_atlas_variants_over_http(variant, stack, registered, quick_bench_assets, tmp_path):
    """aTLAS x K, under a memory budget and UFM test-time adaptation, through a worker: the same bytes as the
    engine; x K's checkpoint is rebuilt from the coefficients the API serves, alone."""
    from engine.methods.atlas.method import write_checkpoint

    base_id, ids = registered
    task_datasets = {tv: ds for tv, ds in ids.values()}
    target = next(iter(task_datasets.values()))
    params = {"partitions": {"task_datasets": task_datasets, "epochs": 1, "batch_size": 32, "partitions": 2},
              "budget": {"task_datasets": task_datasets, "epochs": 1, "batch_size": 32, "vectors_per_block": 1},
              "ufm": {"objective": "ufm", "target_dataset_id": target, "epochs": 1, "batch_size": 32}}[variant]
    final, _, coefficients = run_over_http(stack, base_id, ids, "atlas", params, tmp_path / "http.safetensors")
    inputs = engine_inputs(quick_bench_assets, ids)
    direct = run_directly("atlas", params, inputs, tmp_path / "direct", int(stack.env["TVFORGE_TORCH_THREADS"]))
    assert_same_tensors(tmp_path / "http.safetensors", direct.checkpoint_path)
    metrics = final["result"]["metrics"]
    if variant == "partitions":
        served = coefficients.json()
        document = {key: served[key] for key in ("task_vectors", "blocks", "values", "granularity")} | served["extra"]
        assert document["partitions"] == 2 and document["partition_seed"] == 7  # the job's seed
        write_checkpoint(inputs, document, tmp_path / "rebuilt.safetensors", JobContext(workdir=tmp_path))
        assert_same_tensors(tmp_path / "rebuilt.safetensors", tmp_path / "http.safetensors")
    elif variant == "budget":
        assert all(len(chosen) == 1 for chosen in metrics["budget"]["selected"].values())
    else:
        assert metrics["trusted"]["images"] > 0 and metrics["mode"] == "ufm"


def lora_job_params(method: str, task_datasets: dict[str, str]) -> dict:
    """Each method at its defaults (no search: one merge each); aTLAS one short epoch."""
    return {"atlas": {"task_datasets": task_datasets, "epochs": 1, "batch_size": 32}}.get(method, {})


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_merges_lora_task_vectors_over_http(method, stack, registered_lora, quick_bench_assets,
                                                          tmp_path):
    """LoRA vectors registered over HTTP, merged by each method through a worker: the downloaded checkpoint is
    what the engine computes from the same factor files, and differs from the base."""
    base_id, ids, paths = registered_lora
    task_datasets = {tv: ds for tv, ds in ids.values()}
    params = lora_job_params(method, task_datasets)
    final, _, _ = run_over_http(stack, base_id, ids, method, params, tmp_path / "http.safetensors")
    inputs = engine_inputs(quick_bench_assets, ids, paths)
    direct = run_directly(method, params, inputs, tmp_path / "direct", int(stack.env["TVFORGE_TORCH_THREADS"]))
    assert_same_tensors(tmp_path / "http.safetensors", direct.checkpoint_path)
    merged, base = load_file(str(tmp_path / "http.safetensors")), load_file(str(quick_bench_assets.base_path))
    factored = {name.removesuffix(".lora_A") for name in load_file(str(next(iter(paths.values()))))
                if name.endswith(".lora_A")}
    if method == "atlas":  # its best epoch may be the zero-shot one: check that the worker stacked factors instead
        dense_bytes = len(ids) * 4 * sum(base[name].numel() for name in base if name.startswith("visual."))
        assert final["result"]["metrics"]["stacked_vector_bytes"] < dense_bytes / 2
    else:
        assert any(not torch.equal(merged[name], base[name]) for name in factored), "no factored tensor changed"


def test_atlas_chained_onto_an_iso_cts_checkpoint_over_http(stack, registered, quick_bench_assets, tmp_path):
    """A job names an earlier job's checkpoint as its start: aTLAS learns from the Iso-CTS merge, the checkpoint is
    the engine's from the same start, accuracies stay normalised by theta_0 + tau_t, and the start checkpoint
    cannot be deleted under a queued job or come from another base model."""
    from dataclasses import replace

    base_id, ids = registered
    task_datasets = {tv: ds for tv, ds in ids.values()}
    first, _, _ = run_over_http(stack, base_id, ids, "iso_cts", {}, tmp_path / "iso_cts.safetensors")
    start_id = first["result"]["checkpoint_id"]
    params = {"task_datasets": task_datasets, "epochs": 1, "batch_size": 32}
    final, _, coefficients = run_over_http(stack, base_id, ids, "atlas", params, tmp_path / "chained.safetensors",
                                           start_id)
    assert final["start_checkpoint_id"] == start_id and coefficients.json()["start_checkpoint_id"] == start_id
    inputs = replace(engine_inputs(quick_bench_assets, ids), start_path=tmp_path / "iso_cts.safetensors")
    direct = run_directly("atlas", params, inputs, tmp_path / "direct", int(stack.env["TVFORGE_TORCH_THREADS"]))
    assert_same_tensors(tmp_path / "chained.safetensors", direct.checkpoint_path)
    plain = run_directly("atlas", params, engine_inputs(quick_bench_assets, ids), tmp_path / "plain",
                         int(stack.env["TVFORGE_TORCH_THREADS"]))
    assert final["result"]["metrics"]["evaluation"] == direct.metrics["evaluation"]
    assert final["result"]["metrics"]["evaluation"]["datasets"] != plain.metrics["evaluation"]["datasets"]
    with stack.client() as client:
        card = client.http.get(f"/v1/checkpoints/{final['result']['checkpoint_id']}/card").json()
        markdown = client.http.get(f"/v1/checkpoints/{final['result']['checkpoint_id']}/card?format=markdown").text
        start_sha = client.http.get(f"/v1/checkpoints/{start_id}").json()["sha256"]
    assert card["inputs"]["start_checkpoint"] == {"sha256": start_sha} and card["start_checkpoint_id"] == start_id
    assert f"| start checkpoint (merged onto) | {start_id} | `{start_sha}` |" in markdown

    with stack.client() as client:
        other = client.register_base_model("other-base", quick_bench_assets.base_path,
                                           config=quick_bench_assets.model_config)
        other_vector = client.upload_task_vector(other["id"], "other", quick_bench_assets.tasks[0].vector_path)
        response = client.http.post("/v1/jobs", json={"method": "task_arithmetic", "base_model_id": other["id"],
                                                      "task_vectors": [other_vector["id"]],
                                                      "start_checkpoint_id": start_id})
        assert response.status_code == 422 and response.json()["errors"][0]["loc"] == ["body", "start_checkpoint_id"]
        response = client.http.post("/v1/jobs", json={"method": "task_arithmetic", "base_model_id": base_id,
                                                      "task_vectors": [next(iter(task_datasets))],
                                                      "start_checkpoint_id": "ckpt_none"})
        assert response.status_code == 404

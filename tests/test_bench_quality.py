"""The merge-quality benchmark, --quick: one run, then its measured structure and sanity."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from safetensors.torch import load_file

from engine.context import ModelSpec
from engine.data import load_dataset
from engine.heads import zero_shot_head
from engine.methods.catalogue import get_method
from engine.metrics import evaluate_accuracy
from engine.safetensors_io import read_header
from engine.weights import build_model, load_state_dict_file

REPO = Path(__file__).resolve().parents[1]
ADDITION_ROWS = ["zero-shot", "fine-tuned", "task arithmetic (lambda searched)", "TIES (lambda searched)",
                 "TIES (defaults", "STA (lambda searched)", "STA (defaults", "DARE (lambda searched)",
                 "TSV-M (alpha searched)", "TSV-M (defaults", "Iso-C (alpha searched)", "Iso-CTS (alpha searched)",
                 "Iso-CTS (defaults", "aTLAS", "aTLAS isotropic"]
NEGATION_ROWS = ["zero-shot", "task arithmetic negate", "STA forget (lambda searched)", "STA forget (defaults",
                 "aTLAS negation"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, quick_bench_assets):
    """The benchmark on the session's --quick assets, which it finds already built (their config's hash): the
    build is tests/test_bench_assets.py's to check, and took 100 s a second time."""
    root = tmp_path_factory.mktemp("quality")
    out = root / "quality.json"
    completed = subprocess.run(
        [sys.executable, "-m", "bench.quality.run", "--quick", "--assets", str(quick_bench_assets.base_path.parent),
         "--out", str(out), "--workdir", str(root / "work")],
        cwd=REPO, env=os.environ | {"HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return {"result": json.loads(out.read_text()), "stdout": completed.stdout, "out": out}


def row(rows: list[dict], prefix: str) -> dict:
    """The row labelled prefix, else the one row whose label starts with it."""
    matches = [r for r in rows if r["row"] == prefix] or [r for r in rows if r["row"].startswith(prefix)]
    assert len(matches) == 1, (prefix, [r["row"] for r in rows])
    return matches[0]


def is_fraction(value) -> bool:
    return isinstance(value, float | int) and 0.0 <= value <= 1.0


def composition_records(result: dict) -> list[dict]:
    """Every record of a job the engine ran (each wrote a checkpoint)."""
    tables = result["tables"]
    records = [r for r in tables["addition"]["rows"] if r["method"] and "per_task" not in r]
    records += [r for r in tables["addition"]["rows"] for r in r.get("per_task", [])]
    records += [r for r in tables["negation"]["rows"] if r["method"]]
    for r in tables["few_shot"]["rows"]:
        records += list(r["runs"].values()) if "runs" in r else ([r] if r["method"] else [])
    return records


def test_json_round_trips_and_markdown_printed(run):
    result = run["result"]
    assert json.loads(json.dumps(result)) == result
    assert json.loads(run["out"].read_text()) == result
    assert result["markdown"] in run["stdout"]
    for heading in ("1. Task addition", "2. Negation", "3. Few-shot"):
        assert heading in result["markdown"]
    machine = result["machine"]
    assert machine["cpu_count"] >= 1 and machine["torch_threads"] >= 1 and machine["torch"]
    assert result["timings"]["total_s"] > 0


def test_addition_table(run):
    table = run["result"]["tables"]["addition"]
    tasks = table["tasks"]
    assert len(tasks) >= 2
    assert len(table["rows"]) == len(ADDITION_ROWS)
    for prefix in ADDITION_ROWS:
        r = row(table["rows"], prefix)
        assert set(r["accuracy"]) == set(tasks)
        assert all(is_fraction(v) for v in r["accuracy"].values()), r
        assert is_fraction(r["mean_accuracy"])
        assert math.isclose(r["mean_accuracy"], sum(r["accuracy"].values()) / len(tasks))
        assert r["mean_normalised_accuracy"] >= 0
        assert r["method_s"] >= 0 and r["eval_s"] > 0


def test_fine_tuned_beats_zero_shot_on_every_task(run):
    rows = run["result"]["tables"]["addition"]["rows"]
    zero_shot, finetuned = row(rows, "zero-shot"), row(rows, "fine-tuned")
    for task, accuracy in finetuned["accuracy"].items():
        assert accuracy > zero_shot["accuracy"][task], task
    assert finetuned["mean_normalised_accuracy"] == pytest.approx(1.0)


def test_atlas_keeps_its_best_validation_epoch(run):
    """The best epoch is chosen on val among all epochs, epoch 0 (zero-shot) included, so it is never worse there."""
    atlas = row(run["result"]["tables"]["addition"]["rows"], "aTLAS")
    curve = atlas["learning_curve"]
    best = atlas["metrics"]["chosen"]["best_epoch"]["value"]
    assert curve[best]["mean_normalised_accuracy"] == max(entry["mean_normalised_accuracy"] for entry in curve)
    assert curve[best]["mean_normalised_accuracy"] >= curve[0]["mean_normalised_accuracy"]


def test_ordering_margins_are_paired_bootstrap_intervals_around_the_observed_difference(run):
    table = run["result"]["tables"]["addition"]
    rows = {r["row"]: r for r in table["rows"]}
    assert len(table["ordering"]) == 5 and len(table["newer_merges"]) == 4
    for margin in table["ordering"] + table["newer_merges"]:
        better, worse = rows[margin["better"]], rows[margin["worse"]]
        observed = better["mean_normalised_accuracy"] - worse["mean_normalised_accuracy"]
        assert margin["difference"] == pytest.approx(observed)
        low, high = margin["ci95"]
        assert low <= high and margin["holds"] == (low > 0)
        assert low - 1e-9 <= margin["difference"] <= high + 1e-9 or high - low < 0.02


def test_negation_table(run):
    table = run["result"]["tables"]["negation"]
    assert table["targets"] and table["control"] not in table["targets"]
    for target in table["targets"]:
        rows = [r for r in table["rows"] if r["target"] == target]
        assert len(rows) == len(NEGATION_ROWS)
        for prefix in NEGATION_ROWS:
            r = row(rows, prefix)
            assert r["control"] == table["control"]
            assert is_fraction(r["target_accuracy"]) and is_fraction(r["control_accuracy"])
            if r["method"]:
                assert r["task_vectors"] == [target]  # only the forgotten task's vector


def test_few_shot_table(run):
    table = run["result"]["tables"]["few_shot"]
    assert table["target"] not in table["task_vectors"]
    zero_shot = row(table["rows"], "zero-shot")
    few = row(table["rows"], "aTLAS few-shot")
    entropy = row(table["rows"], "aTLAS entropy (")
    for label, margin in few["margins"].items():
        assert margin["difference"] == pytest.approx(few["accuracy"][label] - zero_shot["accuracy"]["zero-shot"])
    assert is_fraction(zero_shot["accuracy"]["zero-shot"])
    assert set(few["accuracy"]) == {f"{k}-shot" for k in table["shots"]}
    assert all(is_fraction(v) for v in few["accuracy"].values())
    assert {run["params"]["shots"] for run in few["runs"].values()} == set(table["shots"])
    ufm = row(table["rows"], "aTLAS UFM (")
    for record, objective in [(entropy, "entropy"), (ufm, "ufm")]:
        assert is_fraction(record["accuracy"]["unlabelled"])
        assert record["params"]["objective"] == objective
        assert record["margin"]["difference"] == pytest.approx(record["accuracy"]["unlabelled"]
                                                               - zero_shot["accuracy"]["zero-shot"])
    assert ufm["metrics"]["trusted"]["images"] > 0


def test_every_row_names_valid_params_and_is_timed(run):
    records = composition_records(run["result"])
    assert len(records) >= 10
    for record in records:
        get_method(record["method"]).params(**record["params"])  # what ran is a valid job spec
        assert record["method_s"] > 0


def test_each_checkpoint_is_a_full_state_dict(run):
    result = run["result"]
    assert result["checkpoints_kept"]
    base = read_header(Path(result["assets"]["root"]) / "base.safetensors").tensors
    for record in composition_records(result):
        path = Path(record["checkpoint"])
        header = read_header(path).tensors
        assert set(header) == set(base), path
        state = load_file(str(path))
        for name, info in base.items():
            assert header[name].dtype == info.dtype and tuple(header[name].shape) == tuple(info.shape), name
            if state[name].is_floating_point():
                assert state[name].isfinite().all(), (path, name)
        assert record["checkpoint_check"] == {"tensors": len(base), "same_names_dtypes_shapes_as_base": True,
                                              "finite": True}


def test_accuracies_agree_with_a_plain_load_state_dict_evaluation(run):
    """The benchmark's evaluator (weights swapped in place) gives what a fresh model loaded from the file gives."""
    result = run["result"]
    root = Path(result["assets"]["root"])
    manifest = json.loads((root / "manifest.json").read_text())
    model = build_model(ModelSpec(config=json.loads((root / manifest["model_config"]).read_text())))
    model.load_state_dict(load_state_dict_file(root / manifest["base"]))
    heads = {t["name"]: zero_shot_head(model, t["class_names"], t["templates"]) for t in manifest["tasks"]}
    ties = row(result["tables"]["addition"]["rows"], "TIES (lambda searched)")
    model.load_state_dict(load_state_dict_file(Path(ties["checkpoint"])))
    measured = {t["name"]: evaluate_accuracy(model, *load_dataset(root / t["dataset"])["test"], heads[t["name"]])
                for t in manifest["tasks"]}
    assert measured == pytest.approx(ties["accuracy"])


def test_atlas_variants_trade_memory_for_coefficients(run):
    table = run["result"]["tables"]["atlas_variants"]
    default, budget, partitioned, lora = table["rows"]
    assert budget["params"]["vectors_per_block"] == 1 and partitioned["params"]["partitions"] == 2
    assert lora["lora_rank"] == 4 and lora["params"] == default["params"]
    # rank-4 factors of 128-wide matrices: the transformer's stacks shrink by more than half
    assert lora["metrics"]["stacked_vector_bytes"] < default["metrics"]["stacked_vector_bytes"] / 2
    assert lora["metrics"]["coefficients"] == default["metrics"]["coefficients"]
    held = {r["row"]: r["metrics"]["stacked_vector_bytes"] for r in table["rows"]}
    assert held[budget["row"]] * len(table["tasks"]) == held[default["row"]]
    # partitions regroup the same stacks, padded to each block's largest partition, with an int32 position per
    # entry (as many bytes as one float32 vector)
    positions = held[default["row"]] // len(table["tasks"])
    assert held[default["row"]] + positions < held[partitioned["row"]] < 1.1 * (held[default["row"]] + positions)
    assert partitioned["metrics"]["coefficients"] == 2 * default["metrics"]["coefficients"]
    learned = budget["metrics"]["budget"]["learned_coefficients"]
    assert learned * len(table["tasks"]) == default["metrics"]["coefficients"]
    for r in table["rows"]:
        assert is_fraction(r["mean_accuracy"]) and r["mean_normalised_accuracy"] > 0
    assert all(r.get("lora_rank") is None for r in (budget, partitioned))

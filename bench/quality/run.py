"""Merge quality (benchmarks.md section 1): every composition method on the benchmark's tiny-CLIP assets.

    python -m bench.quality.run [--quick] [--assets DIR] [--out bench/out/quality.json]

One command: build (or reuse: they are cached by a hash of their configuration) the assets of
bench.quality.build_assets, run every composition through engine.running.run_method (exactly what
a worker runs), evaluate each written checkpoint on every task's test split with the engine's
Evaluator (the code the evaluation service and merge jobs report with), print markdown tables
and write them as JSON with each row's parameters, chosen values, timings and the machine.

Data use, as in the papers: the task vectors were fine-tuned on `train`; every search and best-epoch
selection uses `val`; aTLAS addition and negation train on `val` (data the vectors never saw), STA
calibrates on `train` (its importance is measured at the fine-tuned weights); every reported accuracy
is on `test`. Every margin between two rows comes with a paired bootstrap 95% interval over test
images (the same resampled images for both rows and for the fine-tuned reference).

Tables:
1. Task addition over all tasks with vectors: zero-shot, each fine-tuned model on its own task,
   task arithmetic, TIES and STA with lambda searched on val, TIES and STA at their data-free
   defaults (lambda 1), aTLAS, aTLAS isotropic; then the papers' ordering with intervals.
2. Negation: per target task (its vector alone), one control task.
3. Few-shot (k shots per class of the held-out task's train split) and unlabelled test-time
   adaptation (entropy, and UFM's trusted pseudo-labels) on the held-out task, with every other task's vector.
4. (full run) STA ablation at lambda 1: threshold 1, 2, 3, 4, 6, 8 and per-tensor density 0.05, 0.1, 0.2.
5. aTLAS accuracy against the memory of its stacked vectors: under a memory budget (1 or 2 vectors per
   block, chosen by the gradient at lambda = 0), with 4 partitions per block (aTLAS x K), and on LoRA
   task vectors of rank 4 and 16 (each vector's image-tower transformer matrices replaced by their best
   rank-r approximation as lora_A / lora_B factors: what a LoRA of that rank could at best hold, not a
   LoRA fine-tune).

Threads: 1 by default (tiny matmuls: a second thread on this shared 2-core box only adds contention).
Everything is seeded (JobContext.seed 0, torch.manual_seed(0) before each runner, bootstrap seed 0).
"""
import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.quality.assets import Assets, TaskAssets  # noqa: E402
from bench.quality.build_assets import build_assets  # noqa: E402
from bench.quality.tables import render_markdown  # noqa: E402
from engine.context import REPORT_SPLITS, DatasetInput, JobContext, MergeInputs, TaskVectorInput  # noqa: E402
from engine.evaluator import EvalTarget, Evaluator  # noqa: E402
from engine.methods.catalogue import get_method  # noqa: E402
from engine.metrics import CONTROL_KEPT, mean_normalised_accuracy, normalised  # noqa: E402
from engine.running import run_method  # noqa: E402
from engine.safetensors_io import check_finite, read_header  # noqa: E402

SEED = 0
UNLABELLED_SUFFIX = "-unlabelled"


@dataclass(frozen=True)
class RunConfig:
    """What the benchmark sets beyond the methods' defaults. The full run uses every default; --quick
    shortens training so the suite can run it."""

    atlas_addition_epochs: int | None  # None: the method's default (20)
    atlas_few_shot_epochs: int | None  # None: 10
    atlas_entropy_epochs: int | None  # entropy and UFM; None: 10
    negation_targets: int  # how many target tasks (each with the same control)
    shots: tuple[int, ...]
    sta_ablation: bool
    bootstrap_samples: int
    # table 5: (row, params beside addition's, LoRA rank of the task vectors or None for the dense ones)
    atlas_variants: tuple[tuple[str, dict, int | None], ...] = ()


# aTLAS under a memory budget (b vectors held per block, the paper's gradient selection), aTLAS x K, and aTLAS
# on LoRA task vectors.
ATLAS_VARIANTS = (("memory budget: 1 vector per block", {"vectors_per_block": 1}, None),
                  ("memory budget: 2 vectors per block", {"vectors_per_block": 2}, None),
                  ("x 4 partitions per block", {"partitions": 4}, None),
                  ("LoRA task vectors, rank 4", {}, 4),
                  ("LoRA task vectors, rank 16", {}, 16))


FULL = RunConfig(atlas_addition_epochs=None, atlas_few_shot_epochs=None, atlas_entropy_epochs=None,
                 negation_targets=3, shots=(1, 4, 16), sta_ablation=True, bootstrap_samples=2000,
                 atlas_variants=ATLAS_VARIANTS)
QUICK = RunConfig(atlas_addition_epochs=4, atlas_few_shot_epochs=3, atlas_entropy_epochs=2, negation_targets=1,
                  shots=(1, 4), sta_ablation=False, bootstrap_samples=200,
                  atlas_variants=(ATLAS_VARIANTS[0], ("x 2 partitions per block", {"partitions": 2}, None),
                                  ATLAS_VARIANTS[3]))

NOTES = [
    "Every row is a checkpoint written by engine.running.run_method (a worker's code path), evaluated with the "
    "engine's Evaluator on each task's test split; fine-tuned = theta_0 + tau_t written by task arithmetic at "
    "lambda 1.",
    "Data: vectors fine-tuned on train; searches and best epochs on val; aTLAS addition and negation train on val, "
    "STA calibrates on train; reports on test.",
    "Margins: paired bootstrap over test images (the same resampled images for both rows and the fine-tuned "
    "reference), 95% percentile interval.",
    "Negation: each target's own task vector only; control = the task the base model classifies best relative "
    "to chance whose class names share no word with the target's.",
    "Test-time adaptation sees only the held-out task's test images without labels (a dataset whose one split has "
    "labels -1), so it keeps its last epoch.",
]
STA_ABLATION = [{"threshold": t} for t in (1.0, 2.0, 3.0, 4.0, 6.0, 8.0)] + [{"density": d} for d in (0.05, 0.1, 0.2)]


# ---------------------------------------------------------------------------------------------- inputs

def task_vector_input(task: TaskAssets) -> TaskVectorInput:
    return TaskVectorInput(id=task.name, name=task.name, path=task.vector_path, class_names=task.class_names)


def dataset_input(task: TaskAssets) -> DatasetInput:
    return DatasetInput(id=task.name, name=task.name, path=task.dataset_path, class_names=task.class_names,
                        templates=task.templates)


def merge_inputs(assets: Assets, vectors: list[TaskAssets], extra: dict[str, DatasetInput] | None = None
                 ) -> MergeInputs:
    datasets = {t.name: dataset_input(t) for t in [*assets.tasks, assets.held_out]}
    return MergeInputs(assets.base_path, assets.model_spec, [task_vector_input(t) for t in vectors],
                       {**datasets, **(extra or {})})


def lora_task_vector(task: TaskAssets, rank: int, folder: Path) -> TaskVectorInput:
    """The task's vector with each image-tower transformer matrix replaced by its best rank-`rank` approximation
    (truncated SVD, in float64) as engine.task_vectors' lora_A / lora_B factors; every other tensor dense."""
    import torch
    from safetensors.torch import load_file

    from engine.safetensors_io import save_tensors
    from engine.task_vectors import LORA_A, LORA_B

    path = folder / f"{task.name}-lora{rank}.safetensors"
    if not path.exists():
        tensors = {}
        for name, tau in load_file(str(task.vector_path)).items():
            if name.startswith("visual.transformer.") and tau.ndim == 2 and min(tau.shape) > rank:
                u, s, vh = torch.linalg.svd(tau.double(), full_matrices=False)
                tensors[name + LORA_B] = (u[:, :rank] * s[:rank]).float().contiguous()
                tensors[name + LORA_A] = vh[:rank].float().contiguous()
            else:
                tensors[name] = tau
        save_tensors(path, tensors)
    return TaskVectorInput(id=task.name, name=task.name, path=path, class_names=task.class_names)


def unlabelled_dataset(task: TaskAssets, folder: Path) -> DatasetInput:
    """The task's test images as the only split, labels -1: test-time adaptation sees no label at all
    (no labelled split to pick an epoch with either, so the runner keeps the last epoch)."""
    with np.load(task.dataset_path, allow_pickle=False) as data:
        images = data["test_images"]
    path = folder / f"{task.name}{UNLABELLED_SUFFIX}.npz"
    np.savez(path, train_images=images, train_labels=np.full(len(images), -1, dtype=np.int64))
    return DatasetInput(id=task.name + UNLABELLED_SUFFIX, name=task.name + UNLABELLED_SUFFIX, path=path,
                        class_names=task.class_names, templates=task.templates)


# ---------------------------------------------------------------------------------------------- running

class Bench:
    """Runs engine methods in their own work folders and scores their checkpoints on test splits."""

    def __init__(self, assets: Assets, workdir: Path, config: RunConfig):
        self.assets, self.workdir, self.config = assets, workdir, config
        self.cache_dir = workdir / "head-cache"
        self.counter = 0
        ctx = JobContext(workdir=workdir / "eval", cache_dir=self.cache_dir, seed=SEED)
        self.evaluator = Evaluator(merge_inputs(assets, assets.tasks), ctx)
        self.base_header = {name: (info.dtype, tuple(info.shape))
                            for name, info in read_header(assets.base_path).tensors.items()}
        self.correct: dict[tuple[str, str], np.ndarray] = {}  # (row label, task) -> per test image, in memory

    def run(self, method: str, inputs: MergeInputs, params: dict, label: str) -> dict:
        """Run one composition as a worker does (engine.running.run_method); returns its record."""
        spec = get_method(method)
        validated = spec.params(**params)
        self.counter += 1
        folder = self.workdir / "jobs" / f"{self.counter:02d}-{label}"
        folder.mkdir(parents=True, exist_ok=True)
        ctx = JobContext(workdir=folder, cache_dir=self.cache_dir, seed=SEED)
        torch.manual_seed(SEED)
        started = time.perf_counter()
        result = run_method(spec, inputs, validated, ctx)
        seconds = time.perf_counter() - started
        record = {"method": method, "params": validated.model_dump(mode="json", exclude_unset=True),
                  "task_vectors": [tv.id for tv in inputs.task_vectors],
                  "checkpoint": str(result.checkpoint_path), "method_s": round(seconds, 2),
                  "metrics": {k: v for k, v in result.metrics.items() if k not in ("search", "evaluation")},
                  "checkpoint_check": self.check_checkpoint(result.checkpoint_path)}
        if "learning_curve" in result.artifacts:  # selection-split accuracy per epoch (epoch 0: zero-shot)
            record["learning_curve"] = [
                {"epoch": e["epoch"], "loss": e["loss"], "mean_normalised_accuracy": e.get("mean_normalised_accuracy"),
                 "accuracy": e["accuracy"]} for e in result.artifacts["learning_curve"]]
        return record

    def check_checkpoint(self, path: Path) -> dict:
        """A full state dict with the base's names, dtypes and shapes, every float finite."""
        header = read_header(path)
        names = {name: (info.dtype, tuple(info.shape)) for name, info in header.tensors.items()}
        return {"tensors": len(names), "same_names_dtypes_shapes_as_base": names == self.base_header,
                "finite": not check_finite(path, header)}

    def score(self, label: str, checkpoint: Path | None, names: list[str]) -> tuple[dict[str, float], float]:
        """Test accuracy per task of a checkpoint (None: the base model); keeps per-image correctness under label."""
        started = time.perf_counter()
        if checkpoint is None:
            self.evaluator.use_base()
        else:
            self.evaluator.use_checkpoint(checkpoint)
        report = self.evaluator.report([EvalTarget(name) for name in names], REPORT_SPLITS, keep_predictions=True)
        self.evaluator.use_base()
        accuracy = {}
        for name, entry in report["datasets"].items():
            assert entry["split"] == "test", (name, entry["split"])
            self.correct[(label, name)] = entry["correct"]
            accuracy[name] = entry["accuracy"]
        return accuracy, time.perf_counter() - started

    def margin(self, better: str, worse: str, names: list[str], reference: str | None = None) -> dict:
        """Paired bootstrap of mean (normalised, when reference names the fine-tuned row) test accuracy of
        `better` minus `worse`: the observed difference and its 95% percentile interval."""
        rng = np.random.default_rng(SEED)
        samples = self.config.bootstrap_samples
        differences = np.zeros(samples)
        observed = 0.0
        for name in names:
            a, b = self.correct[(better, name)], self.correct[(worse, name)]
            ref = self.correct[(reference, name)] if reference else np.ones_like(a)
            index = rng.integers(0, len(a), size=(samples, len(a)))
            ref_acc = np.maximum(ref[index].mean(axis=1), 1e-12)
            differences += (a[index].mean(axis=1) - b[index].mean(axis=1)) / ref_acc
            observed += (a.mean() - b.mean()) / max(ref.mean(), 1e-12)
        differences /= len(names)
        low, high = np.percentile(differences, [2.5, 97.5])
        return {"better": better, "worse": worse, "difference": float(observed / len(names)),
                "ci95": [float(low), float(high)], "holds": bool(low > 0), "bootstrap_samples": samples,
                "normalised": reference is not None}


def with_scores(record: dict, accuracy: dict[str, float], finetuned: dict[str, float] | None = None) -> dict:
    record["accuracy"] = accuracy
    record["mean_accuracy"] = float(np.mean(list(accuracy.values())))
    if finetuned is not None:
        record["normalised_accuracy"] = {n: normalised(accuracy[n], finetuned[n]) for n in accuracy}
        record["mean_normalised_accuracy"] = mean_normalised_accuracy(accuracy, finetuned)
    return record


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- tables

FINETUNED = "fine-tuned (each on its own task)"
# The papers' ordering on task addition, as (better, worse) row labels.
ORDERING = [("aTLAS", "STA (lambda searched)"), ("aTLAS", "TIES (lambda searched)"),
            ("STA (lambda searched)", "task arithmetic (lambda searched)"),
            ("TIES (lambda searched)", "task arithmetic (lambda searched)"),
            ("task arithmetic (lambda searched)", "zero-shot")]
# The newer training-free merges against the baselines users compare with (TSV-M and Iso-CTS are reported
# at least as good as TIES with a searched lambda, and ahead of task arithmetic, on the papers' benchmark).
NEWER_MERGES = [("TSV-M (alpha searched)", "TIES (lambda searched)"),
                ("Iso-CTS (alpha searched)", "TIES (lambda searched)"),
                ("TSV-M (alpha searched)", "task arithmetic (lambda searched)"),
                ("Iso-CTS (alpha searched)", "task arithmetic (lambda searched)")]


def addition_table(bench: Bench, config: RunConfig) -> dict:
    assets = bench.assets
    names = [t.name for t in assets.tasks]
    inputs = merge_inputs(assets, assets.tasks)
    by_task = {n: n for n in names}
    rows: list[dict] = []

    accuracy, eval_s = bench.score("zero-shot", None, names)
    zero_shot = {"row": "zero-shot", "method": None, "params": {}, "method_s": 0.0, "eval_s": round(eval_s, 2)}

    finetuned, ft_s, ft_eval = {}, 0.0, 0.0
    ft_records = []
    for task in assets.tasks:  # theta_0 + tau_t, written by the engine's task arithmetic at lambda 1
        record = bench.run("task_arithmetic", merge_inputs(assets, [task]), {"scaling": 1.0}, f"finetuned-{task.name}")
        acc, seconds = bench.score(FINETUNED, Path(record["checkpoint"]), [task.name])
        finetuned[task.name] = acc[task.name]
        ft_s += record["method_s"]
        ft_eval += seconds
        ft_records.append(record)
    rows.append(with_scores(zero_shot, accuracy, finetuned))
    rows.append(with_scores({"row": FINETUNED, "method": "task_arithmetic",
                             "params": {"scaling": 1.0, "task_vectors": "one at a time"},
                             "method_s": round(ft_s, 2), "eval_s": round(ft_eval, 2), "per_task": ft_records},
                            finetuned, finetuned))
    log(f"  zero-shot mean {rows[0]['mean_accuracy']:.3f}, fine-tuned mean {rows[1]['mean_accuracy']:.3f}")

    atlas = {"task_datasets": by_task}
    if config.atlas_addition_epochs:
        atlas["epochs"] = config.atlas_addition_epochs
    plan = [
        ("task arithmetic (lambda searched)", "task_arithmetic", {"validation_datasets": by_task}),
        ("TIES (lambda searched)", "ties", {"validation_datasets": by_task}),
        ("TIES (defaults, lambda 1)", "ties", {}),
        ("STA (lambda searched)", "sta", {"calibration_datasets": by_task, "validation_datasets": by_task}),
        ("STA (defaults, lambda 1)", "sta", {"calibration_datasets": by_task}),
        ("DARE (lambda searched)", "dare", {"validation_datasets": by_task}),
        ("TSV-M (alpha searched)", "tsv_m", {"validation_datasets": by_task}),
        ("TSV-M (defaults, alpha 1)", "tsv_m", {}),
        ("Iso-C (alpha searched)", "iso_c", {"validation_datasets": by_task}),
        ("Iso-CTS (alpha searched)", "iso_cts", {"validation_datasets": by_task}),
        ("Iso-CTS (defaults, alpha 1)", "iso_cts", {}),
        ("aTLAS", "atlas", atlas),
        ("aTLAS isotropic", "atlas", {**atlas, "granularity": "isotropic"}),
    ]
    for label, method, params in plan:
        record = bench.run(method, inputs, params, method)
        accuracy, eval_s = bench.score(label, Path(record["checkpoint"]), names)
        record.update(row=label, eval_s=round(eval_s, 2))
        rows.append(with_scores(record, accuracy, finetuned))
        log(f"  {label}: mean {record['mean_accuracy']:.3f}, normalised {record['mean_normalised_accuracy']:.3f}"
            f" ({record['method_s']:.1f}s + eval {eval_s:.1f}s)")
    ordering = [bench.margin(better, worse, names, reference=FINETUNED) for better, worse in ORDERING]
    newer = [bench.margin(better, worse, names, reference=FINETUNED) for better, worse in NEWER_MERGES]
    return {"tasks": names, "finetuned_accuracy": finetuned, "rows": rows, "ordering": ordering,
            "newer_merges": newer}


def negation_tasks(assets: Assets, count: int) -> tuple[str, list[str]]:
    """Control: the task the base model classifies best relative to chance (what negation must keep);
    targets: the next best `count` whose class names share no word with the control's."""
    def lift(task: TaskAssets) -> float:
        chance = 1 / len(task.class_names)
        return (task.zero_shot["val"] - chance) / (1 - chance)

    ranked = sorted(assets.tasks, key=lift, reverse=True)
    control = ranked[0]
    words = {w for name in control.class_names for w in name.split()}
    targets = [t.name for t in ranked[1:] if not (words & {w for n in t.class_names for w in n.split()})]
    return control.name, targets[:count]


def negation_table(bench: Bench, config: RunConfig) -> dict:
    assets = bench.assets
    control, targets = negation_tasks(assets, config.negation_targets)
    rows = []
    base_acc, base_s = bench.score("zero-shot", None, [*targets, control])
    for target in targets:
        inputs = merge_inputs(assets, [assets.task(target)])
        rows.append({"target": target, "control": control, "row": "zero-shot", "method": None, "params": {},
                     "method_s": 0.0, "eval_s": round(base_s, 2),
                     "target_accuracy": base_acc[target], "control_accuracy": base_acc[control]})
        plan = [
            ("task arithmetic negate (lambda searched)", "task_arithmetic",
             {"operation": "negate", "validation_datasets": {target: target}, "control_dataset_id": control}),
            ("STA forget (lambda searched)", "sta",
             {"calibration_datasets": {target: target}, "forget": [target], "validation_datasets": {target: target},
              "control_dataset_id": control}),
            ("STA forget (defaults, lambda 1)", "sta", {"calibration_datasets": {target: target}, "forget": [target]}),
            ("aTLAS negation", "atlas", {"objective": "negation", "target_dataset_id": target,
                                         "control_dataset_id": control}),
        ]
        for label, method, params in plan:
            record = bench.run(method, inputs, params, f"negate-{target}-{method}")
            accuracy, eval_s = bench.score(f"{label} / {target}", Path(record["checkpoint"]), [target, control])
            record.update(target=target, control=control, row=label, eval_s=round(eval_s, 2),
                          target_accuracy=accuracy[target], control_accuracy=accuracy[control])
            rows.append(record)
            log(f"  {target} / {label}: target {accuracy[target]:.3f}, control {accuracy[control]:.3f}"
                f" ({record['method_s']:.1f}s)")
    for row in rows:
        zero = base_acc[row["control"]]
        row["control_kept"] = row["control_accuracy"] / zero if zero > 0 else 0.0
        row["control_at_least_0.95"] = row["control_accuracy"] >= CONTROL_KEPT * zero
    return {"control": control, "targets": targets, "control_zero_shot": base_acc[control], "rows": rows}


def few_shot_table(bench: Bench, config: RunConfig) -> dict:
    assets = bench.assets
    held = assets.held_out.name
    unlabelled = unlabelled_dataset(assets.held_out, bench.workdir)
    inputs = merge_inputs(assets, assets.tasks, {unlabelled.id: unlabelled})
    base_acc, base_s = bench.score("zero-shot", None, [held])
    rows = [{"row": "zero-shot", "method": None, "params": {}, "method_s": 0.0, "eval_s": round(base_s, 2),
             "accuracy": {"zero-shot": base_acc[held]}}]
    few = {"row": "aTLAS few-shot", "method": "atlas", "accuracy": {}, "runs": {}, "method_s": 0.0, "eval_s": 0.0,
           "margins": {}}
    for shots in config.shots:
        params = {"target_dataset_id": held, "shots": shots}
        if config.atlas_few_shot_epochs:
            params["epochs"] = config.atlas_few_shot_epochs
        record = bench.run("atlas", inputs, params, f"few-shot-{shots}")
        label = f"{shots}-shot"
        accuracy, eval_s = bench.score(label, Path(record["checkpoint"]), [held])
        record.update(eval_s=round(eval_s, 2), accuracy=accuracy[held])
        few["runs"][str(shots)] = record
        few["accuracy"][label] = accuracy[held]
        few["margins"][label] = bench.margin(label, "zero-shot", [held])
        few["method_s"] = round(few["method_s"] + record["method_s"], 2)
        few["eval_s"] = round(few["eval_s"] + eval_s, 2)
        log(f"  {label}: {accuracy[held]:.3f} ({record['method_s']:.1f}s)")
    rows.append(few)
    for objective, label in [("entropy", "aTLAS entropy (unlabelled test images)"),
                             ("ufm", "aTLAS UFM (unlabelled test images)")]:
        params = {"objective": objective, "target_dataset_id": unlabelled.id}
        if config.atlas_entropy_epochs:
            params["epochs"] = config.atlas_entropy_epochs
        record = bench.run("atlas", inputs, params, objective)
        accuracy, eval_s = bench.score(objective, Path(record["checkpoint"]), [held])
        record.update(row=label, eval_s=round(eval_s, 2), accuracy={"unlabelled": accuracy[held]},
                      margin=bench.margin(objective, "zero-shot", [held]))
        rows.append(record)
        log(f"  {objective}: {accuracy[held]:.3f} ({record['method_s']:.1f}s)")
    chance = 1 / len(assets.held_out.class_names)
    return {"target": held, "chance": chance, "shots": list(config.shots),
            "task_vectors": [t.name for t in assets.tasks], "rows": rows}


def sta_ablation_table(bench: Bench, addition: dict) -> dict:
    assets = bench.assets
    names = addition["tasks"]
    finetuned = addition["finetuned_accuracy"]
    inputs = merge_inputs(assets, assets.tasks)
    default_threshold = get_method("sta").params().threshold
    default = next(r for r in addition["rows"] if r["row"] == "STA (defaults, lambda 1)")
    rows = []
    for setting in STA_ABLATION:
        if setting == {"threshold": default_threshold}:
            rows.append({**default, "row": f"threshold {default_threshold:g} (default)"})
            continue
        params = {"calibration_datasets": {n: n for n in names}, **setting}
        key, value = next(iter(setting.items()))
        record = bench.run("sta", inputs, params, f"sta-{key}-{value:g}")
        accuracy, eval_s = bench.score(f"STA {key} {value:g}", Path(record["checkpoint"]), names)
        record.update(row=f"{key} {value:g}", eval_s=round(eval_s, 2))
        rows.append(with_scores(record, accuracy, finetuned))
        log(f"  STA {key} {value:g}: normalised {record['mean_normalised_accuracy']:.3f},"
            f" density {mean_mask_density(record):.3f}")
    return {"tasks": names, "rows": rows}


def atlas_variants_table(bench: Bench, addition: dict, config: RunConfig) -> dict:
    """aTLAS task addition as in table 1, against the memory its stacked vectors hold: the default, under a memory
    budget, and with K partitions per block."""
    assets = bench.assets
    names, finetuned = addition["tasks"], addition["finetuned_accuracy"]
    inputs = merge_inputs(assets, assets.tasks)
    default = next(r for r in addition["rows"] if r["row"] == "aTLAS")
    rows = [{**default, "row": "every vector, one coefficient per block (table 1)"}]
    for label, extra, lora_rank in config.atlas_variants:
        params = {**default["params"], **extra}
        vectors = inputs
        if lora_rank is not None:
            vectors = replace(inputs, task_vectors=[lora_task_vector(task, lora_rank, bench.workdir)
                                                    for task in assets.tasks])
        record = bench.run("atlas", vectors, params, f"atlas-{label}")
        record["lora_rank"] = lora_rank
        accuracy, eval_s = bench.score(f"aTLAS {label}", Path(record["checkpoint"]), names)
        record.update(row=label, eval_s=round(eval_s, 2))
        rows.append(with_scores(record, accuracy, finetuned))
        log(f"  aTLAS {label}: normalised {record['mean_normalised_accuracy']:.3f}, "
            f"{record['metrics']['stacked_vector_bytes'] / 2**20:.2f} MiB of vectors")
    return {"tasks": names, "rows": rows}


def mean_mask_density(record: dict) -> float:
    return float(np.mean(list(record["metrics"]["mask_density"].values())))


# ---------------------------------------------------------------------------------------------- main

def machine_info(threads: int) -> dict:
    import open_clip

    return {
        "cpu_count": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)), "torch_threads": threads,
        "torch": torch.__version__, "open_clip": open_clip.__version__, "numpy": np.__version__,
        "python": platform.python_version(), "platform": platform.platform(), "processor": platform.processor(),
        "device": "cpu", "load_average_at_start": list(os.getloadavg()),
    }


def asset_summary(assets: Assets, reused: bool) -> dict:
    return {"root": str(assets.root), "config_hash": assets.manifest["config_hash"], "reused": reused,
            "build_timings": assets.manifest.get("timings"), "build_threads": assets.manifest.get("threads"),
            "regime": assets.manifest.get("regime"),
            "tasks": {t.name: {"classes": len(t.class_names), "zero_shot": t.zero_shot, "fine_tuned": t.fine_tuned,
                               "tau_ratio": t.tau_ratio} for t in [*assets.tasks, assets.held_out]},
            "held_out": assets.held_out.name, "disentanglement": assets.manifest.get("disentanglement")}


def run_benchmark(assets_dir: Path, quick: bool, workdir: Path, threads: int = 1) -> dict:
    config = QUICK if quick else FULL
    torch.set_num_threads(threads)
    info = machine_info(threads)
    started = time.perf_counter()
    log(f"assets: {assets_dir} ({'quick' if quick else 'full'})")
    try:
        previous_hash = json.loads((assets_dir / "manifest.json").read_text()).get("config_hash")
    except (FileNotFoundError, json.JSONDecodeError):
        previous_hash = None
    assets = build_assets(assets_dir, quick=quick, threads=threads)
    torch.set_num_threads(threads)  # build_assets sets it only when it builds
    assets_s = time.perf_counter() - started
    reused = previous_hash == assets.manifest["config_hash"]
    log(f"assets ready in {assets_s:.0f}s")
    bench = Bench(assets, workdir, config)
    timings = {"assets_s": round(assets_s, 1)}
    tables = {}
    builds = [("addition", lambda: addition_table(bench, config)), ("negation", lambda: negation_table(bench, config)),
              ("few_shot", lambda: few_shot_table(bench, config))]
    if config.sta_ablation:
        builds.append(("sta_ablation", lambda: sta_ablation_table(bench, tables["addition"])))
    if config.atlas_variants:
        builds.append(("atlas_variants", lambda: atlas_variants_table(bench, tables["addition"], config)))
    for name, build in builds:
        log(f"{name}:")
        clock = time.perf_counter()
        tables[name] = build()
        timings[f"{name}_s"] = round(time.perf_counter() - clock, 1)
    timings["total_s"] = round(time.perf_counter() - started, 1)
    info["load_average_at_end"] = list(os.getloadavg())
    result = {"benchmark": "merge_quality", "quick": quick, "seed": SEED, "assets": asset_summary(assets, reused),
              "config": asdict(config), "machine": info, "timings": timings, "tables": tables, "notes": NOTES}
    result["markdown"] = render_markdown(result)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="quick assets, fewer epochs/targets/shots (~3 min)")
    parser.add_argument("--assets", type=Path, default=None,
                        help="assets folder (default bench/assets, or bench/assets/quick with --quick)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (default bench/out/quality.json, or quality-quick.json with --quick)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the jobs' checkpoints here (default: a temporary folder, deleted)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: fastest for this tiny model on a shared CPU)")
    args = parser.parse_args(argv)
    assets_dir = args.assets or Path("bench/assets/quick" if args.quick else "bench/assets")
    out = args.out or Path("bench/out/quality-quick.json" if args.quick else "bench/out/quality.json")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tvforge-quality-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        result = run_benchmark(assets_dir, args.quick, workdir, args.threads)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    result["checkpoints_kept"] = args.workdir is not None  # else the recorded checkpoint paths are gone
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(result["markdown"])
    print(f"\nwritten to {out}; total {result['timings']['total_s']:.0f}s")


if __name__ == "__main__":
    main()

"""Build the merge-quality benchmark's assets: datasets, a tiny pre-trained CLIP, task vectors.

    python -m bench.quality.build_assets --out bench/assets [--quick]

Pipeline (both papers' setting, in miniature): pre-train a tiny open_clip CLIP
contrastively on captions made from class names, over the pretrain splits of
all tasks but the held-out one; build each task's zero-shot head from the text
tower and the task's own prompt templates; fine-tune the image tower per task
through that frozen head with small AdamW steps; store tau_t = theta_t - theta_0
over visual.* float tensors, and record how large each is next to theta_0.

Everything is seeded (same bytes on the same machine and thread count). The
output directory is keyed by a hash of the build configuration: a second call
with the same configuration returns the existing assets.
"""
import argparse
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from bench.quality.assets import MANIFEST, Assets, load_assets
from bench.quality.tasks import SplitSizes, TaskData, build_task
from bench.quality.training import finetune_visual, pretrain_contrastive
from engine.context import ModelSpec
from engine.heads import zero_shot_head
from engine.metrics import evaluate_accuracy
from engine.safetensors_io import save_tensors
from engine.weights import build_model, file_sha256

# Bump when the code changes what a configuration produces, so cached assets are rebuilt.
ASSET_FORMAT_VERSION = 3

MODEL_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 128, "layers": 3, "head_width": 32},
    "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
ALL_TASKS = ("mnist", "digits", "textiles", "shapes", "gratings", "colours", "textures", "dot_counts")


@dataclass(frozen=True)
class BuildConfig:
    tasks: tuple[str, ...]
    held_out: str
    sizes: SplitSizes  # per task; a real source too small for them shrinks (tasks._split_counts)
    held_out_sizes: SplitSizes
    pretrain_steps: int
    finetune_steps: int
    pretrain_lr: float = 1e-3
    pretrain_batch: int = 128
    finetune_lr: float = 1e-4
    finetune_batch: int = 64
    finetune_weight_decay: float = 0.1  # the papers' AdamW setting
    finetune_max_shift: int = 2  # random translation, the one augmentation valid for every task
    pretrain_max_shift: int = 2
    pretrain_captioned: int | None = None  # per task, how many pretrain images have captions (None: all)
    pretrain_ssl_weight: float = 0.0  # > 0: SimCLR on every pretrain image besides the captions (SLIP)
    seed: int = 0
    model_config: dict = field(default_factory=lambda: MODEL_CONFIG)

    def digest(self) -> str:
        payload = json.dumps({"version": ASSET_FORMAT_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


# The papers' regime in miniature (README.md, "Merge quality", says how it was chosen): 1200 steps of
# contrastive pre-training over a small pool of each task (80 images: the papers' CLIP saw web data, not
# its tasks' training sets) give a generalist whose zero-shot is above chance on every task but about
# 0.7 of a specialist's (the papers' ViT-B/32: about 0.53); 300 AdamW steps at lr 1e-4 (wd 0.1) then move
# the image tower by 2-3% of its norm. A pool of 2000 left zero-shot at 0.86 of fine-tuned (no room for
# any method to differ); 150 and 100 at 0.75 and 0.73; 60 put three tasks near chance.
FULL = BuildConfig(
    tasks=ALL_TASKS, held_out="colour_digits",
    sizes=SplitSizes(pretrain=80, train=2000, val=500, test=500),
    held_out_sizes=SplitSizes(pretrain=0, train=1000, val=500, test=500),
    pretrain_steps=1200, finetune_steps=300,
)
# For the test suite: few fine-tuning steps at a larger lr (it needs vectors, not the papers' step
# sizes); pre-training batches of 64 reached better zero-shot than 128 in the same time (.44 vs .26).
QUICK = BuildConfig(
    tasks=("digits", "shapes", "gratings", "colours"), held_out="colour_digits",
    sizes=SplitSizes(pretrain=500, train=500, val=200, test=200),
    held_out_sizes=SplitSizes(pretrain=0, train=200, val=200, test=200),
    pretrain_steps=500, pretrain_batch=64, finetune_steps=80, finetune_lr=3e-4,
)


def _save_dataset(path: Path, task: TaskData) -> None:
    arrays = {}
    for split in ("train", "val", "test"):
        images, labels = task.splits[split]
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    np.savez_compressed(path, class_names=np.array(task.class_names, dtype=np.str_),
                        templates=np.array(task.phrasing.templates, dtype=np.str_), **arrays)


def _vector_size(vector: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict:
    """||tau|| / ||theta_visual|| over all of the vector's tensors, and the largest per-tensor ratio."""
    squared = sum(float(tau.double().square().sum()) for tau in vector.values())
    base_squared = sum(float(base[name].double().square().sum()) for name in vector)
    per_tensor = {name: float(tau.double().norm() / base[name].double().norm()) for name, tau in vector.items()}
    largest = max(per_tensor, key=per_tensor.get)
    return {"tau_ratio": round((squared / base_squared) ** 0.5, 5),
            "max_tensor_ratio": {"tensor": largest, "ratio": round(per_tensor[largest], 5)}}


def _disentanglement(vectors: dict[str, dict[str, torch.Tensor]], zero_shot_val: dict[str, float],
                     cross_val: dict[str, dict[str, float]]) -> dict:
    """How much the task vectors leave each other's tasks alone: an asset property, no merge involved.

    Task arithmetic needs both (Ortiz-Jimenez et al. 2023, "weight disentanglement"): vectors nearly
    orthogonal, and each fine-tuned model close to zero-shot on the other tasks. `change_val[a][b]` is
    the val accuracy on task b of the model fine-tuned on a, minus zero-shot (the held-out task
    included); the mean harm is over pairs of tasks with vectors: adding N vectors adds N-1 such
    changes to each task's own gain, to first order.
    """
    names = list(vectors)
    flat = {name: torch.cat([tau.flatten().double() for tau in vectors[name].values()]) for name in names}
    cosine = {a: {b: round(float(flat[a] @ flat[b] / (flat[a].norm() * flat[b].norm())), 4) for b in names}
              for a in names}
    change = {a: {b: round(cross_val[a][b] - zero_shot_val[b], 4) for b in cross_val[a]} for a in names}
    gain = {a: change[a][a] for a in names}
    off_diagonal = [cosine[a][b] for a in names for b in names if a != b]
    harms = [change[a][b] for a in names for b in names if a != b]
    return {"cosine": cosine, "mean_off_diagonal_cosine": round(float(np.mean(off_diagonal)), 4),
            "own_gain_val": gain, "change_val": change, "mean_harm_val": round(float(np.mean(harms)), 4),
            "mean_own_gain_val": round(float(np.mean(list(gain.values()))), 4)}


def _accuracies(model: torch.nn.Module, task: TaskData, head: torch.Tensor) -> dict[str, float]:
    return {split: round(evaluate_accuracy(model, *task.splits[split], head), 4) for split in ("val", "test")}


def _existing(out: Path, digest: str) -> Assets | None:
    """The assets in out if a finished build of this configuration is there (the manifest is written last)."""
    try:
        assets = load_assets(out)
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None
    paths = [assets.base_path, *(t.dataset_path for t in [*assets.tasks, assets.held_out]),
             *(t.vector_path for t in assets.tasks)]
    if assets.manifest.get("config_hash") == digest and all(p.exists() for p in paths):
        return assets
    return None


def _remove_previous_build(out: Path) -> None:
    """Delete the files a previous manifest lists (and the manifest first, so a half build never looks done)."""
    manifest_path = out / MANIFEST
    try:
        previous = json.loads(manifest_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return
    manifest_path.unlink()
    entries = [*previous.get("tasks", []), previous.get("held_out") or {}]
    files = [previous.get("base"), previous.get("model_config")]
    files += [entry.get(key) for entry in entries for key in ("dataset", "task_vector")]
    for name in filter(None, files):
        (out / name).unlink(missing_ok=True)


def build_assets(out: Path, quick: bool = False, config: BuildConfig | None = None, threads: int = 1) -> Assets:
    """Build (or reuse) the assets in out.

    One torch thread by default: this model is too small to gain from more, and on a CPU
    shared with other jobs two threads ran the --quick build 4.5x slower (415 s vs 91 s).
    """
    config = config or (QUICK if quick else FULL)
    out = Path(out)
    digest = config.digest()
    if (assets := _existing(out, digest)) is not None:
        return assets
    torch.set_num_threads(threads)
    _remove_previous_build(out)
    (out / "datasets").mkdir(parents=True, exist_ok=True)
    (out / "task_vectors").mkdir(exist_ok=True)
    timings: dict[str, object] = {}
    started = time.perf_counter()

    tasks = [build_task(name, config.sizes, config.seed) for name in config.tasks]
    held_out = build_task(config.held_out, config.held_out_sizes, config.seed)
    for task in [*tasks, held_out]:
        _save_dataset(out / "datasets" / f"{task.name}.npz", task)
    timings["datasets_s"] = round(time.perf_counter() - started, 1)

    clock = time.perf_counter()
    torch.manual_seed(config.seed)
    model = build_model(ModelSpec(config=config.model_config))
    losses = pretrain_contrastive(model, tasks, config.pretrain_steps, config.pretrain_batch, config.pretrain_lr,
                                  config.seed, max_shift=config.pretrain_max_shift,
                                  captioned=config.pretrain_captioned, ssl_weight=config.pretrain_ssl_weight)
    base_state = {name: tensor.detach().clone().contiguous() for name, tensor in model.state_dict().items()}
    save_tensors(out / "base.safetensors", base_state)
    (out / "model_config.json").write_text(json.dumps(config.model_config, indent=2))
    base_sha256 = file_sha256(out / "base.safetensors")
    timings["pretrain_s"] = round(time.perf_counter() - clock, 1)

    clock = time.perf_counter()
    heads = {task.name: zero_shot_head(model, task.class_names, task.phrasing.templates)
             for task in [*tasks, held_out]}
    zero_shot = {task.name: _accuracies(model, task, heads[task.name]) for task in [*tasks, held_out]}
    timings["zero_shot_eval_s"] = round(time.perf_counter() - clock, 1)

    visual_names = [name for name, tensor in base_state.items()
                    if name.startswith("visual.") and tensor.is_floating_point()]
    fine_tuned, vector_sizes, finetune_s, vectors, cross_val = {}, {}, {}, {}, {}
    for index, task in enumerate(tasks):
        clock = time.perf_counter()
        model.load_state_dict(base_state)
        images, labels = task.splits["train"]
        finetune_visual(model, images, labels, heads[task.name], config.finetune_steps, config.finetune_batch,
                        config.finetune_lr, config.finetune_weight_decay, seed=config.seed + 1 + index,
                        desc=task.name, max_shift=config.finetune_max_shift)
        tuned = model.state_dict()
        vector = {name: (tuned[name] - base_state[name]).contiguous() for name in visual_names}
        save_tensors(out / "task_vectors" / f"{task.name}.safetensors", vector,
                     metadata={"task": task.name, "base_sha256": base_sha256})
        vector_sizes[task.name] = _vector_size(vector, base_state)
        # measure theta_0 + tau, exactly what a consumer of the files reconstructs
        model.load_state_dict({**base_state, **{name: base_state[name] + vector[name] for name in visual_names}})
        fine_tuned[task.name] = _accuracies(model, task, heads[task.name])
        cross_val[task.name] = {other.name: evaluate_accuracy(model, *other.splits["val"], heads[other.name])
                                for other in [*tasks, held_out]}
        vectors[task.name] = vector
        finetune_s[task.name] = round(time.perf_counter() - clock, 1)
    timings["finetune_s"] = finetune_s
    timings["total_s"] = round(time.perf_counter() - started, 1)

    def entry(task: TaskData, has_vector: bool) -> dict:
        return {
            "name": task.name,
            "class_names": task.class_names,
            "templates": task.phrasing.templates,
            "dataset": f"datasets/{task.name}.npz",
            "task_vector": f"task_vectors/{task.name}.safetensors" if has_vector else None,
            "split_sizes": {split: len(labels) for split, (_, labels) in task.splits.items()},
            "chance": round(1 / len(task.class_names), 4),
            "zero_shot": zero_shot[task.name],
            "fine_tuned": fine_tuned[task.name] if has_vector else None,
            **(vector_sizes[task.name] if has_vector else {"tau_ratio": None, "max_tensor_ratio": None}),
        }

    manifest = {
        "config_hash": digest,
        "quick": config == QUICK,
        "build_config": asdict(config),
        "base": "base.safetensors",
        "base_sha256": base_sha256,
        "model_config": "model_config.json",
        "tasks": [entry(task, True) for task in tasks],
        "held_out": entry(held_out, False),
        "mean_test_accuracy": {
            "zero_shot": round(float(np.mean([zero_shot[t.name]["test"] for t in tasks])), 4),
            "fine_tuned": round(float(np.mean([fine_tuned[t.name]["test"] for t in tasks])), 4),
        },
        "disentanglement": _disentanglement(vectors, {name: accs["val"] for name, accs in zero_shot.items()},
                                            cross_val),
        "pretrain_loss": {"first": round(losses[0], 4), "last": round(float(np.mean(losses[-20:])), 4)},
        "timings": timings,
        "threads": torch.get_num_threads(),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return load_assets(out)


def _print_summary(assets: Assets) -> None:
    print(f"{'task':<14}{'chance':>7}{'zero-shot val/test':>20}{'fine-tuned val/test':>21}{'tau ratio':>11}"
          f"{'max tensor ratio':>18}")
    for task, entry in zip([*assets.tasks, assets.held_out], [*assets.manifest["tasks"], assets.manifest["held_out"]],
                           strict=True):
        zero_shot = f"{task.zero_shot['val']:.3f}/{task.zero_shot['test']:.3f}"
        tuned, ratio, largest = "held out", "", ""
        if task.fine_tuned:
            tuned = f"{task.fine_tuned['val']:.3f}/{task.fine_tuned['test']:.3f}"
            ratio = f"{entry['tau_ratio']:.2%}"
            largest = f"{entry['max_tensor_ratio']['ratio']:.1%}"
        print(f"{task.name:<14}{entry['chance']:>7.3f}{zero_shot:>20}{tuned:>21}{ratio:>11}{largest:>18}")
    means = assets.manifest["mean_test_accuracy"]
    print(f"mean test accuracy of the tasks: zero-shot {means['zero_shot']:.3f}, fine-tuned {means['fine_tuned']:.3f}")
    found = assets.manifest["disentanglement"]
    print(f"task vectors: mean pairwise cosine {found['mean_off_diagonal_cosine']:+.3f}; a fine-tuned model gains "
          f"{found['mean_own_gain_val']:+.3f} on its own task (val) and changes each other task by "
          f"{found['mean_harm_val']:+.3f} on average")
    print("timings:", json.dumps(assets.manifest["timings"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/assets"))
    parser.add_argument("--quick", action="store_true", help="4 tasks, few steps: for the test suite")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: fastest for this tiny model on a shared CPU)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _print_summary(build_assets(args.out, quick=args.quick, threads=args.threads))


if __name__ == "__main__":
    main()

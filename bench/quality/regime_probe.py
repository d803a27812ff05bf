"""Probe an asset regime for weight disentanglement before any merge method runs on it.

    python -m bench.quality.regime_probe --out /tmp/probe-w256 --set model.vision_cfg.width=256
    python -m bench.quality.regime_probe --out bench/assets            # the current regime (FULL)

Builds (or reuses) the assets of FULL with the given overrides, then measures on val, per task vector:
its own gain and its mean change on the other tasks at lambda 0.25/0.5/0.75/1 (the manifest holds
lambda 1), the same for a random direction with the vector's per-tensor norms (is the harm the
vector's, or any perturbation's?), and, with --groups, each parameter group of one vector applied
alone (stem, each block's attention and MLP, the output head). docs/benchmark-regime.md records
what these found.
"""
import argparse
import ast
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from bench.quality.assets import Assets
from bench.quality.build_assets import FULL, build_assets
from bench.quality.tasks import SplitSizes
from engine.heads import zero_shot_head
from engine.metrics import evaluate_accuracy
from engine.weights import build_model

SCALES = (0.25, 0.5, 0.75, 1.0)


def configured(overrides: list[str]):
    """FULL with `path=value` overrides: model.<config path>, sizes.<split>, or a BuildConfig field."""
    config, model, sizes = FULL, json.loads(json.dumps(FULL.model_config)), dataclasses.asdict(FULL.sizes)
    fields = {}
    for item in overrides:
        path, _, text = item.partition("=")
        value = ast.literal_eval(text)
        head, _, rest = path.partition(".")
        if head == "model":
            *parents, leaf = rest.split(".")
            node = model
            for key in parents:
                node = node[key]
            node[leaf] = value
        elif head == "sizes":
            sizes[rest] = value
        else:
            fields[path] = value
    return dataclasses.replace(config, model_config=model, sizes=SplitSizes(**sizes), **fields)


class Probe:
    def __init__(self, assets: Assets):
        self.assets, self.tasks = assets, assets.tasks
        self.base = load_file(assets.base_path)
        self.model = build_model(assets.model_spec).eval()
        self.model.load_state_dict(self.base)
        self.data = {t.name: np.load(t.dataset_path) for t in self.tasks}
        self.heads = {t.name: zero_shot_head(self.model, t.class_names, t.templates) for t in self.tasks}
        self.zero_shot = self.accuracies({})

    def accuracies(self, delta: dict[str, torch.Tensor]) -> np.ndarray:
        self.model.load_state_dict({**self.base, **{k: self.base[k] + v for k, v in delta.items()}})
        return np.array([evaluate_accuracy(self.model, self.data[t.name]["val_images"], self.data[t.name]["val_labels"],
                                           self.heads[t.name]) for t in self.tasks])

    def gain_and_harm(self, index: int, delta: dict[str, torch.Tensor]) -> tuple[float, float]:
        change = self.accuracies(delta) - self.zero_shot
        return float(change[index]), float(np.delete(change, index).mean())


def _group(name: str) -> str:
    if ".resblocks." in name:
        block = name.split("resblocks.")[1].split(".")[0]
        return f"block {block} " + ("mlp" if ".mlp." in name else "attention" if ".attn." in name else "norms")
    return "head (ln_post, proj)" if name.startswith(("visual.ln_post", "visual.proj")) else "stem"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="assets folder (built if missing)")
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                        help="override FULL: model.vision_cfg.width=256, sizes.pretrain=400, finetune_steps=150")
    parser.add_argument("--groups", metavar="TASK", help="also apply this task's vector one parameter group at a time")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    assets = build_assets(args.out, config=configured(args.set))
    found = assets.manifest["disentanglement"]
    print(f"mean pairwise cosine {found['mean_off_diagonal_cosine']:+.3f}; lambda 1: own gain "
          f"{found['mean_own_gain_val']:+.3f}, mean change on each other task {found['mean_harm_val']:+.3f}")
    probe, generator = Probe(assets), torch.Generator().manual_seed(0)
    totals = {"vector": [], "random": []}
    for index, task in enumerate(probe.tasks):
        vector = load_file(task.vector_path)
        noise = {name: torch.randn(tau.shape, generator=generator) for name, tau in vector.items()}
        random = {name: n * (vector[name].norm() / n.norm()) for name, n in noise.items()}
        curve = [probe.gain_and_harm(index, {k: s * v for k, v in vector.items()}) for s in SCALES]
        control = probe.gain_and_harm(index, random)
        totals["vector"].append(curve)
        totals["random"].append(control)
        print(f"{task.name:<12} gain/harm at lambda " + "  ".join(f"{s}: {g:+.3f}/{h:+.3f}" for s, (g, h)
                                                                in zip(SCALES, curve, strict=True))
              + f"  | random direction {control[0]:+.3f}/{control[1]:+.3f}")
    curves = np.array(totals["vector"])  # [task, scale, (gain, harm)]
    print("mean share of lambda 1's gain at " + ", ".join(
        f"{s}: {share:.2f}" for s, share in zip(SCALES, (curves[:, :, 0] / curves[:, -1:, 0]).mean(0), strict=True)))
    print(f"random directions: mean change on the other tasks {np.mean([h for _, h in totals['random']]):+.4f}")
    if args.groups:
        index = [t.name for t in probe.tasks].index(args.groups)
        vector = load_file(probe.tasks[index].vector_path)
        for group in sorted({_group(name) for name in vector}):
            gain, harm = probe.gain_and_harm(index, {k: v for k, v in vector.items() if _group(k) == group})
            print(f"{args.groups} {group:<22} own {gain:+.3f}  others {harm:+.3f}")


if __name__ == "__main__":
    main()

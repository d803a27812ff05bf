"""aTLAS's training step against a plain fine-tuning step of the same model on the same batch.

    python -m bench.atlas_step [--model ViT-B-32] [--vectors 8] [--batch 16] [--steps 8] [--threads 2]
                               [--device cuda] [--amp] [--partitions 64]

On a randomly initialised open_clip image tower with random task vectors, times (median of --steps rounds,
the variants interleaved, after one warm-up step each) and measures the memory of:
- fine-tuning: forward and backward of the image tower with every weight trainable (the floor);
- aTLAS: the engine's step (engine.methods.atlas.method.Composition: theta_0 plus one tensordot per block
  over the stacked vectors, then torch.func.functional_call), gradients to the coefficients only; and the
  same with the vectors held in bfloat16 (AtlasParams.vector_dtype);
- per-vector composition: the same step with each block composed by a Python loop over the task vectors
  (sum of coefficient x vector tensor, vectors kept as separate tensors), the way fredzzhang/atlas's
  weighted image encoder composes; a re-implementation of that strategy for a side-by-side time, not
  the official code itself;
- with --partitions K: aTLAS x K, each block's entries in K seeded partitions with a coefficient each, composed as
  the engine composes them (PartitionedStack: one batched matmul per block, whatever K).
With --amp every variant's forward pass runs under engine.metrics.autocast, as the engine trains aTLAS
(float16 on CUDA; on the CPU it changes nothing). On CUDA one more variant holds the vectors in float16, the
engine's default there (AtlasParams.vector_dtype auto), and each variant's peak CUDA memory is measured. The
loss scaling that goes with float16 is left out of every variant alike: one multiply of the loss and of the
gradients.
Prints a table and writes JSON. CPU only here; on a GPU pass --device cuda.
"""
import argparse
import json
import os
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call

from engine.methods.atlas.method import TOWER, Composition, PartitionedStack, partition_assignment
from engine.metrics import autocast


def _anon_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def _interleaved(steps: dict[str, object], rounds: int, device: str) -> dict[str, float]:
    """Median seconds of each step, timed in turn round after round (after one warm-up each), so a drift
    in the machine's speed falls on every variant alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():
        step()
    for _ in range(rounds):
        for name, step in steps.items():
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            started = time.perf_counter()
            step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def _step_peak_mib(step) -> float:
    """CUDA memory one step allocates at its peak beyond what was allocated before it (activations,
    composed weights, gradients), MiB."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - before) / 2**20, 1)


def main() -> None:
    import open_clip

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--vectors", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="forward passes under the engine's autocast")
    parser.add_argument("--partitions", type=int, default=1, help="also time aTLAS x K with this many partitions")
    parser.add_argument("--out", type=Path, default=Path("bench/results/atlas_step.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = open_clip.create_model(args.model, pretrained=None).to(args.device).eval()
    size = model.visual.image_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    pixels = torch.randn(args.batch, 3, *size, device=args.device)
    target = torch.randn(args.batch, model.visual.output_dim, device=args.device)
    anon_model = _anon_mib()

    def precision():
        return autocast(args.device) if args.amp else nullcontext()

    def loss_of(features: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(F.normalize(features.float(), dim=-1), F.normalize(target, dim=-1))

    # 1. fine-tuning: every image-tower weight trainable
    def finetune_step() -> None:
        model.visual.requires_grad_(True)
        model.visual.zero_grad(set_to_none=True)
        with precision():
            features = model.visual(pixels)
        loss_of(features).backward()
        model.visual.zero_grad(set_to_none=True)
        model.requires_grad_(False)

    model.requires_grad_(False)

    # 2. aTLAS as the engine runs it
    tower = {name: p for name, p in model.named_parameters() if name.startswith(TOWER)}
    blocks = sorted(tower)
    stacks = {name: 0.01 * torch.randn((args.vectors, *tower[name].shape), device=args.device) for name in blocks}
    stacks_mib = round(sum(t.numel() * t.element_size() for t in stacks.values()) / 2**20, 1)
    composition = Composition(blocks, {name: tower[name].detach() for name in blocks}, stacks, "block", args.vectors)
    coefficients = torch.zeros(composition.coefficient_shape, device=args.device, requires_grad=True)

    def run(composed: dict[str, torch.Tensor]) -> None:
        coefficients.grad = None
        weights = {name[len(TOWER):]: tensor for name, tensor in composed.items()}
        with precision():
            features = functional_call(model.visual, weights, (pixels,))
        loss_of(features).backward()


    # 2b. the same with the vectors held in bfloat16 (AtlasParams.vector_dtype)
    half_stacks = {name: stack.to(torch.bfloat16) for name, stack in stacks.items()}
    half = Composition(blocks, composition.base, half_stacks, "block", args.vectors)
    half_mib = round(sum(t.numel() * t.element_size() for t in half_stacks.values()) / 2**20, 1)


    # 3. the per-vector loop (vectors as separate tensors: views of the same stacks, no extra memory)
    per_vector = [{name: stacks[name][t] for name in blocks} for t in range(args.vectors)]

    def loop_compose() -> dict[str, torch.Tensor]:
        composed = {}
        for j, name in enumerate(blocks):
            total = tower[name].detach()
            for t in range(args.vectors):
                total = total + coefficients[t, j] * per_vector[t][name]
            composed[name] = total
        return composed

    steps = {"finetune": finetune_step, "atlas": lambda: run(composition.compose(coefficients)),
             "bfloat16": lambda: run(half.compose(coefficients)), "loop": lambda: run(loop_compose())}
    on_cuda = args.device.startswith("cuda")
    if args.partitions > 1:  # 2d. aTLAS x K, the stacks regrouped by partition (the original ones stay for 2.)
        partitioned = {name: PartitionedStack.of(stacks[name], partition_assignment(
            name, tower[name].shape, args.partitions, 0).to(args.device), args.partitions) for name in blocks}
        by_partition = Composition(blocks, composition.base, {}, "block", args.vectors, args.partitions,
                                   partitioned=partitioned)
        partition_coefficients = torch.zeros(by_partition.coefficient_shape, device=args.device, requires_grad=True)

        def partitioned_step() -> None:
            partition_coefficients.grad = None
            weights = {name[len(TOWER):]: t for name, t in by_partition.compose(partition_coefficients).items()}
            with precision():
                features = functional_call(model.visual, weights, (pixels,))
            loss_of(features).backward()

        steps["partitioned"] = partitioned_step
    if on_cuda:  # 2c. float16, the engine's default on CUDA
        fp16 = Composition(blocks, composition.base, {name: s.to(torch.float16) for name, s in stacks.items()},
                           "block", args.vectors)
        steps["float16"] = lambda: run(fp16.compose(coefficients))
    timed = _interleaved(steps, args.steps, args.device)
    finetune_s, atlas_s, half_s, loop_s = (timed[k] for k in ("finetune", "atlas", "bfloat16", "loop"))
    step_peaks = {name: _step_peak_mib(step) for name, step in steps.items()} if on_cuda else {}

    parameters = sum(p.numel() for p in tower.values())
    result = {
        "model": args.model, "device": args.device, "threads": args.threads, "batch": args.batch,
        "vectors": args.vectors, "image_tower_parameters": parameters, "steps_timed": args.steps,
        "finetune_step_s": round(finetune_s, 3), "atlas_step_s": round(atlas_s, 3),
        "per_vector_loop_step_s": round(loop_s, 3), "atlas_bfloat16_step_s": round(half_s, 3),
        "stacked_vectors_bfloat16_mib": half_mib,
        "atlas_over_finetune": round(atlas_s / finetune_s, 2), "loop_over_finetune": round(loop_s / finetune_s, 2),
        "process_anonymous_mib_with_model": anon_model, "stacked_vectors_mib": stacks_mib, "amp": args.amp,
    }
    if args.partitions > 1:
        result |= {"partitions": args.partitions, "atlas_partitioned_step_s": round(timed["partitioned"], 3),
                   "atlas_partitioned_over_finetune": round(timed["partitioned"] / finetune_s, 2)}
    if on_cuda:
        result |= {"atlas_float16_step_s": round(timed["float16"], 3),
                   "atlas_float16_over_finetune": round(timed["float16"] / finetune_s, 2),
                   "cuda_device": torch.cuda.get_device_name(), "cuda_step_peak_mib": step_peaks}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"| step ({args.model}, {args.vectors} vectors, batch {args.batch}, {args.device}, {args.threads} threads) "
          f"| median s | x fine-tuning |\n|---|---|---|\n"
          f"| fine-tuning (forward + backward, all weights) | {finetune_s:.3f} | 1.00 |\n"
          f"| aTLAS (engine: tensordot per block) | {atlas_s:.3f} | {atlas_s / finetune_s:.2f} |\n"
          f"| aTLAS, vectors held in bfloat16 | {half_s:.3f} | {half_s / finetune_s:.2f} |\n"
          f"| aTLAS, per-vector loop composition | {loop_s:.3f} | {loop_s / finetune_s:.2f} |"
          + (f"\n| aTLAS x {args.partitions} partitions per block | {timed['partitioned']:.3f} | "
             f"{timed['partitioned'] / finetune_s:.2f} |" if args.partitions > 1 else "")
          + (f"\n| aTLAS, vectors held in float16 | {timed['float16']:.3f} | {timed['float16'] / finetune_s:.2f} |"
             if on_cuda else "")
          + f"\n\nAutocast: {'float16 on CUDA' if args.amp and on_cuda else 'none'}. "
          f"Stacked task vectors: {stacks_mib} MiB in fp32 ({args.vectors} x {parameters:,} parameters), "
          f"{half_mib} MiB in bfloat16."
          + (f" Device {result['cuda_device']}; each step's peak of CUDA memory above what it found allocated, MiB: "
             f"{step_peaks}." if step_peaks else ""))


if __name__ == "__main__":
    main()

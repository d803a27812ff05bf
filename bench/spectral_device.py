"""Spectral merges per device: TSV-M, Iso-C and Iso-CTS of ViT-B/32's weight matrices on the CPU and on CUDA.

    python -m bench.spectral_device [--vectors 8] [--repeats 3] [--threads N] [--out PATH]

One transformer block of ViT-B/32's image tower has four weight matrices (attention in-projection
2304 x 768, out-projection 768 x 768, MLP 3072 x 768 and 768 x 3072); the tower has twelve such blocks, and
they are nearly all of a spectral merge's time (bench/results/merge_cost_spectral.json). For N random
task-vector slices of each matrix (0.01 x randn, float32, as bench.merge_cost's vectors), the CPU and, where
present, CUDA run engine.spectral's merge of the block as a job on that device runs it (on_device): the
slices' copies to the device and the merged matrix's copy back are timed with it.

Reported: the median over --repeats after one warm-up (CUDA synchronised); that times 12 as the tower's
estimate; each device's largest difference from the CPU's merge, relative to the CPU merge's largest entry
(the SVDs differ in rounding and in the signs of singular pairs, which the merges cancel). This says whether
a GPU worker should take these merges' SVDs on its GPU.
"""
import json
import os
import statistics
import time
from functools import partial
from pathlib import Path

import torch
import typer

from engine.spectral import iso_c_merge, iso_cts_merge, on_device, tsv_merge

BLOCK_MATRICES = {"attn.in_proj_weight": (2304, 768), "attn.out_proj.weight": (768, 768),
                  "mlp.c_fc.weight": (3072, 768), "mlp.c_proj.weight": (768, 3072)}
TOWER_BLOCKS = 12
MERGES = {"tsv_m": tsv_merge, "iso_c": iso_c_merge,
          "iso_cts": partial(iso_cts_merge, common_space_fraction=0.8)}  # the reference's default


def _synchronise(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _merge_block(merge, slices: dict[str, list[torch.Tensor]], device: str) -> dict[str, torch.Tensor]:
    """The block's matrices merged as a job on `device` merges them (engine.spectral.on_device)."""
    return {name: on_device(merge, device)(matrices) for name, matrices in slices.items()}


def main(vectors: int = typer.Option(8, help="task vectors N"),
         repeats: int = typer.Option(3), threads: int = typer.Option(os.cpu_count() or 1),
         out: Path = typer.Option(Path("bench/results/spectral_device.json"))) -> None:
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    slices = {name: [0.01 * torch.randn(shape, generator=generator) for _ in range(vectors)]
              for name, shape in BLOCK_MATRICES.items()}
    wanted = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]  # the CPU first: the reference
    rows = []
    for method, merge in MERGES.items():
        reference = None
        for device in wanted:
            merged = _merge_block(merge, slices, device)  # warm-up: cuSOLVER's and MKL's workspaces
            times = []
            for _ in range(repeats):
                _synchronise(device)
                started = time.perf_counter()
                merged = _merge_block(merge, slices, device)
                _synchronise(device)
                times.append(time.perf_counter() - started)
            reference = reference if reference is not None else merged
            relative = max(float((merged[n] - reference[n]).abs().max() / reference[n].abs().max()) for n in merged)
            block_s = statistics.median(times)
            rows.append({"method": method, "device": device, "block_s": round(block_s, 4),
                         "tower_estimate_s": round(block_s * TOWER_BLOCKS, 2),
                         "max_relative_difference_from_cpu": relative})
    name = torch.cuda.get_device_name() if "cuda" in wanted else None
    result = {"vectors": vectors, "threads": threads, "repeats": repeats, "torch": torch.__version__,
              "cuda_device": name, "block_matrices": BLOCK_MATRICES, "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"| method | device | one block, s | tower (x{TOWER_BLOCKS}), s | max rel. difference from CPU |\n"
          "|---|---|---|---|---|")
    for row in rows:
        device = f"cuda ({name})" if row["device"] == "cuda" else f"cpu ({threads} threads)"
        print(f"| {row['method']} | {device} | {row['block_s']:.3f} | {row['tower_estimate_s']:.1f} | "
              f"{row['max_relative_difference_from_cpu']:.1e} |")
    print(f"\nN = {vectors} task vectors; torch {torch.__version__}; JSON in {out}")


if __name__ == "__main__":
    typer.run(main)

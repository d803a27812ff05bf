"""Merge cost: training-free merges over N task vectors of ViT-B/32 size.

For N = 2, 8 task vectors (random tensors with the shapes of ViT-B/32's image tower) and the full
ViT-B/32 base, each merge runs in a fresh process with one torch thread, imports done before the clock
starts, and the measurements are interleaved (bound, each method; repeated) and reported as medians:
- wall time of the merge alone, and its ratio to the time of simply reading the N + 1 inputs once and
  writing one output of the base's size, fsync included (the bound, measured the same way in the same run);
- peak anonymous memory (the process's own, sampled every 5 ms) and peak total RSS. Inputs are
  memory-mapped, so total RSS also counts page-cache pages of the inputs, which the kernel can
  drop at any time; anonymous memory is what must not grow with N.

    python -m bench.merge_cost [--counts 2,8] [--repeats 3] [--methods task_arithmetic,ties,sta]
"""
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import typer

CHUNK = 16 * 1024 * 1024


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class PeakSampler(threading.Thread):
    """Samples this process's anonymous RSS; the kernel keeps no high-water mark for it."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_anon_kib = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.005):
            self.peak_anon_kib = max(self.peak_anon_kib, _status_kib("RssAnon"))

    def stop(self) -> dict:
        self._done.set()
        self.join()
        return {"peak_anon_mib": self.peak_anon_kib / 1024, "peak_rss_mib": _status_kib("VmHWM") / 1024}


def make_inputs(folder: Path, architecture: str, count: int) -> tuple[Path, list[Path]]:
    import torch

    from engine.context import ModelSpec
    from engine.safetensors_io import save_tensors
    from engine.weights import build_model

    base_path = folder / "base.safetensors"
    if not base_path.exists():
        torch.manual_seed(0)
        model = build_model(ModelSpec(architecture=architecture))
        save_tensors(base_path, {k: v.detach().contiguous() for k, v in model.state_dict().items()})
    shapes = {}
    from safetensors import safe_open

    with safe_open(str(base_path), framework="pt") as base:
        for name in base.keys():  # noqa: SIM118 - safe_open is not a dict
            if name.startswith("visual."):
                shapes[name] = base.get_slice(name).get_shape()
    vector_paths = []
    for index in range(count):
        path = folder / f"tau_{index}.safetensors"
        if not path.exists():
            generator = torch.Generator().manual_seed(index + 1)
            save_tensors(path, {name: 1e-3 * torch.randn(shape, generator=generator) for name, shape in shapes.items()})
        vector_paths.append(path)
    return base_path, vector_paths


def child_merge(method: str, architecture: str, base_path: str, vector_paths: list[str], out_dir: str) -> dict:
    import torch

    from engine.context import JobContext, MergeInputs, ModelSpec, TaskVectorInput
    from engine.methods.catalogue import get_method

    torch.set_num_threads(1)
    spec = get_method(method)
    runner = spec.runner()  # imported before the clock starts: the merge is timed, not torch's import
    inputs = MergeInputs(Path(base_path), ModelSpec(architecture=architecture),
                         [TaskVectorInput(f"tv{i}", f"tv{i}", Path(p)) for i, p in enumerate(vector_paths)])
    sampler = PeakSampler()
    sampler.start()
    start = time.perf_counter()
    runner(inputs, spec.params(), JobContext(workdir=Path(out_dir)))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, **sampler.stop()}


def child_copy(base_path: str, vector_paths: list[str], out_dir: str) -> dict:
    """The bound: read every input once, write one output of the base's size."""
    sampler = PeakSampler()
    sampler.start()
    start = time.perf_counter()
    buffer = bytearray(CHUNK)
    for path in [*vector_paths, base_path]:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass
    with open(base_path, "rb", buffering=0) as source, open(Path(out_dir) / "copy.bin", "wb") as out:
        while n := source.readinto(buffer):
            out.write(memoryview(buffer)[:n])
        out.flush()
        os.fsync(out.fileno())
    seconds = time.perf_counter() - start
    return {"seconds": seconds, **sampler.stop()}


def _in_child(kind: str, *args: str) -> dict:
    """Runs one measurement in a fresh interpreter, so peaks are not inherited from earlier runs."""
    code = (f"import json, sys; from bench.merge_cost import child_{kind}; "
            f"print(json.dumps(child_{kind}(*json.loads(sys.argv[1]))))")
    result = subprocess.run([sys.executable, "-c", code, json.dumps(list(args))], check=True, capture_output=True,
                            text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(counts: str = typer.Option("2,8"), architecture: str = typer.Option("ViT-B-32"),
         methods: str = typer.Option("task_arithmetic,ties,sta"), repeats: int = typer.Option(3, min=1),
         workdir: Path = typer.Option(None, help="Where inputs are generated (default: a temp dir)."),
         out: Path = typer.Option(Path("bench/results/merge_cost.json"))) -> None:
    folder = workdir or Path(tempfile.mkdtemp(prefix="tvforge-merge-cost-"))
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for count in sorted(int(c) for c in counts.split(",")):
        base_path, vector_paths = make_inputs(folder, architecture, count)
        paths = [str(p) for p in vector_paths]
        runs: dict[str, list[dict]] = {"bound": [], **{m: [] for m in methods.split(",")}}
        with tempfile.TemporaryDirectory(dir=folder) as scratch:
            _in_child("copy", str(base_path), paths, scratch)  # warm the page cache for both sides alike
            for _ in range(repeats):
                runs["bound"].append(_in_child("copy", str(base_path), paths, scratch))
                for method in methods.split(","):
                    runs[method].append(_in_child("merge", method, architecture, str(base_path), paths, scratch))
                    for leftover in Path(scratch).glob("*.safetensors"):
                        leftover.unlink()
        bound = statistics.median(r["seconds"] for r in runs["bound"])
        for method in methods.split(","):
            seconds = statistics.median(r["seconds"] for r in runs[method])
            rows.append({"method": method, "task_vectors": count, "architecture": architecture, "seconds": seconds,
                         "runs_seconds": [round(r["seconds"], 3) for r in runs[method]],
                         "peak_anon_mib": max(r["peak_anon_mib"] for r in runs[method]),
                         "peak_rss_mib": max(r["peak_rss_mib"] for r in runs[method]),
                         "bound_seconds": bound, "ratio_to_bound": seconds / bound,
                         "input_mib": sum(Path(p).stat().st_size for p in [*paths, base_path]) / 2**20})
    header = "| method | N | inputs (MiB) | time (s) | bound (s) | time / bound | peak anon (MiB) | peak RSS (MiB) |"
    lines = [header, "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['method']} | {r['task_vectors']} | {r['input_mib']:.0f} | {r['seconds']:.2f} | "
                     f"{r['bound_seconds']:.2f} | {r['ratio_to_bound']:.2f} | {r['peak_anon_mib']:.0f} | "
                     f"{r['peak_rss_mib']:.0f} |")
    table = "\n".join(lines)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                           "torch_threads": 1, "repeats": repeats},
                               "rows": rows, "table": table}, indent=2) + "\n")
    typer.echo(table)


if __name__ == "__main__":
    typer.run(main)

"""Threads per job on a CPU worker that runs several jobs at once.

    python -m bench.worker_threads [--concurrency 2] [--methods ties,iso_c] [--repeats 3] [--out PATH]

A worker started with `--concurrency C` forks C pool processes. torch's default gives each of them every
core, so C jobs at once run C x cores threads on the machine's cores. This runs C merges of the same kind
at once, each in a fresh process as a pool process runs it (bench.merge_cost's child_merge: the engine's
code path, inputs with ViT-B/32's shapes, page cache warm), once with torch's default threads in each and
once with cores // C; and, as the yardstick, one merge alone with the default. The variants are
interleaved, --repeats times. Reported per variant: the median over repeats of the time until the last of
the C merges finished (the makespan), and of each merge's own time.
"""
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import typer

from bench.merge_cost import _quiesce, make_inputs

VECTORS = {"ties": 8, "task_arithmetic": 8, "sta": 8, "dare": 8, "iso_c": 2, "tsv_m": 2, "iso_cts": 2}


def _start(method: str, base_path: Path, paths: list[str], scratch: Path, threads: int) -> subprocess.Popen:
    out_dir = tempfile.mkdtemp(prefix="out", dir=scratch)
    code = ("import json, sys; from bench.merge_cost import child_merge; "
            "print(json.dumps(child_merge(*json.loads(sys.argv[1]))))")
    arguments = [method, "ViT-B-32", str(base_path), paths, out_dir, str(threads)]
    return subprocess.Popen([sys.executable, "-c", code, json.dumps(arguments)], stdout=subprocess.PIPE,
                            text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})


def _run_together(method: str, base_path: Path, paths: list[str], scratch: Path, threads: int,
                  count: int) -> dict:
    """count merges started together; each reports its own time once its imports are done."""
    for out_dir in scratch.glob("out*"):  # the last run's outputs: every run writes new files, as jobs do
        shutil.rmtree(out_dir)
    _quiesce(str(scratch), [base_path, *map(Path, paths)])
    started = time.perf_counter()
    children = [_start(method, base_path, paths, scratch, threads) for _ in range(count)]
    seconds = []
    for child in children:
        stdout, _ = child.communicate()
        if child.returncode:
            raise RuntimeError(f"{method} with {threads} threads exited {child.returncode}")
        seconds.append(json.loads(stdout.strip().splitlines()[-1])["seconds"])
    return {"merge_seconds": seconds, "makespan_seconds": max(seconds),
            "wall_with_imports_seconds": time.perf_counter() - started}


def main(concurrency: int = typer.Option(2, min=2), methods: str = typer.Option("ties,iso_c"),
         repeats: int = typer.Option(3, min=1),
         out: Path = typer.Option(Path("bench/results/worker_threads.json"))) -> None:
    import torch

    cores = len(os.sched_getaffinity(0))
    default_threads = torch.get_num_threads()
    split = max(1, cores // concurrency)
    variants = [("alone, default threads", 1, 0), (f"{concurrency} at once, default threads", concurrency, 0),
                (f"{concurrency} at once, {split} thread(s) each", concurrency, split)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="tvforge-threads-") as scratch_dir:
        scratch = Path(scratch_dir)
        inputs = scratch / "inputs"
        inputs.mkdir()
        for method in methods.split(","):
            base_path, vector_paths = make_inputs(inputs, "ViT-B-32", VECTORS[method])
            paths = [str(path) for path in vector_paths]
            runs: dict[str, list[dict]] = {name: [] for name, _, _ in variants}
            for _ in range(repeats):
                for name, count, threads in variants:
                    runs[name].append(_run_together(method, base_path, paths, scratch, threads, count))
            for name, count, threads in variants:
                rows.append({
                    "method": method, "vectors": VECTORS[method], "variant": name, "jobs": count,
                    "threads_each": threads or default_threads,
                    "makespan_seconds": statistics.median(run["makespan_seconds"] for run in runs[name]),
                    "merge_seconds": statistics.median(s for run in runs[name] for s in run["merge_seconds"]),
                    "runs": runs[name]})
    print(f"{cores} cores; torch's default: {default_threads} threads")
    print("| method | N | variant | threads each | makespan (s) | each merge (s) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['method']} | {row['vectors']} | {row['variant']} | {row['threads_each']} | "
              f"{row['makespan_seconds']:.2f} | {row['merge_seconds']:.2f} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cores": cores, "default_threads": default_threads, "concurrency": concurrency,
                               "repeats": repeats, "torch": torch.__version__, "platform": platform.platform(),
                               "rows": rows}, indent=2))


if __name__ == "__main__":
    typer.run(main)

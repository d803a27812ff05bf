"""Merge cost: training-free merges over N task vectors of ViT-B/32 size, beside what users compare with.

For N = 2, 8, 16 task vectors (random tensors with the shapes of ViT-B/32's image tower) and the full
ViT-B/32 base, each merge runs in a fresh process with torch's default threads (--threads to change),
imports done before the clock starts, and the measurements are interleaved (bound, each method; repeated;
before each, the last output removed, the disk synced and the inputs read into the page cache) and reported
as medians, with the ratio of the best runs beside them (on a VM whose I/O stalls a run now and then, the
least disturbed run of each):
- wall time of the merge alone, and its ratio to the time of simply reading the N + 1 inputs once and
  writing one output of the base's size, fsync included (the bound, measured the same way in the same run,
  written as tvforge's writer writes: 1 MiB calls, writeback started every 8 MiB); beside it, the time to
  sha256 an output of that size alone, which every tvforge merge does (the checkpoint's digest) and the
  bound and the comparisons do not;
- peak anonymous memory (the process's own, sampled every 5 ms; "growth" is above the process's memory
  before the merge started: interpreter, torch) and peak total RSS. Inputs are memory-mapped, so total
  RSS also counts page-cache pages of the inputs, which the kernel can drop at any time; anonymous
  memory is what must not grow with N;
- in the JSON only, the CPU time of each merge (user and system, all threads, the memory sampler's reads of
  /proc included), to tell a day of slower compute from a day of more waiting.

Beside tvforge's methods (the engine's code path, as a worker runs it, with the top-k cuts that each task
vector's upload measured; the upload's cost per vector is reported apart), rows to compare with:
- `script`: the in-memory task arithmetic a researcher writes (safetensors load_file of every file,
  sum, save_file, then fsync as the others do);
- `ties_no_upload_cuts`: tvforge's TIES for vectors whose upload did not measure their top-k cuts (older
  rows, or a top_k that is not a whole percent): it measures them itself, two passes over each vector;
- `fusionbench_ties`: TIES as FusionBench's ties_merging_utils computes it (every task vector flattened
  into one [N, P] matrix, kthvalue per row for the global top-k, sign election and disjoint mean over the
  matrix), then save_file and fsync. Its memory grows with N (about 4 copies of the matrix); it runs for
  N <= --fusionbench-max 8, since at 16 it would need more memory than this machine's 24 GiB;
- `mergekit_task_arithmetic`, `mergekit_ties`: mergekit's own merge methods (its registry's task_arithmetic
  and ties, GeneralizedTaskArithmeticMerge.merge_group) tensor by tensor over the base and each fine-tuned
  model, in the environment scripts/mergekit_env.sh makes (left out where it is absent).

    python -m bench.merge_cost [--counts 2,8,16] [--repeats 3] [--methods task_arithmetic,ties,script]
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
        self.start_anon_kib = _status_kib("RssAnon")
        self.peak_anon_kib = self.start_anon_kib
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.005):
            self.peak_anon_kib = max(self.peak_anon_kib, _status_kib("RssAnon"))

    def stop(self) -> dict:
        self._done.set()
        self.join()
        return {"peak_anon_mib": self.peak_anon_kib / 1024, "peak_rss_mib": _status_kib("VmHWM") / 1024,
                "anon_growth_mib": (self.peak_anon_kib - self.start_anon_kib) / 1024}


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


def _threads(threads: str) -> None:
    import torch

    if int(threads):
        torch.set_num_threads(int(threads))


def _timed(work) -> dict:
    """Wall time, and the CPU time the process spent in it (user and kernel, all threads, the memory sampler's
    reads of /proc included: about 1% of a core): on a day when a merge is slower, more CPU time for the same work
    points at the machine's compute, the same CPU time at waiting (the disk, another process)."""
    sampler = PeakSampler()
    sampler.start()
    before = os.times()
    start = time.perf_counter()
    work()
    seconds = time.perf_counter() - start
    after = os.times()
    return {"seconds": seconds, "cpu_user_seconds": after.user - before.user,
            "cpu_system_seconds": after.system - before.system, **sampler.stop()}


def _save_synced(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def child_merge(method: str, architecture: str, base_path: str, vector_paths: list[str], out_dir: str,
                threads: str) -> dict:
    """One merge as a worker runs it: the task vectors carry the top-k cuts (TIES) or per-tensor mean magnitudes
    (STA) their upload measured (timed apart, per vector, as upload_cuts_seconds / upload_means_seconds), except
    for ties_no_upload_cuts, which measures the cuts in the merge."""
    import dataclasses

    from engine.context import JobContext, MergeInputs, ModelSpec, TaskVectorInput
    from engine.kernels import warm_up
    from engine.methods.catalogue import get_method
    from engine.selection import file_magnitude_means, file_top_k_cuts

    _threads(threads)
    with_cuts = method == "ties"  # the one method that reads them
    spec = get_method(method.removesuffix("_no_upload_cuts"))
    runner = spec.runner()  # imported before the clock starts: the merge is timed, not torch's import
    warm_up()  # as a worker does when its process starts
    inputs = MergeInputs(Path(base_path), ModelSpec(architecture=architecture),
                         [TaskVectorInput(f"tv{i}", f"tv{i}", Path(p)) for i, p in enumerate(vector_paths)])
    upload_cuts = upload_means = 0.0
    if with_cuts:
        start = time.perf_counter()
        vectors = [dataclasses.replace(tv, magnitude_cuts=file_top_k_cuts(tv.path)) for tv in inputs.task_vectors]
        upload_cuts = (time.perf_counter() - start) / len(vectors)
        inputs = dataclasses.replace(inputs, task_vectors=vectors)
    if method == "sta":
        start = time.perf_counter()
        vectors = [dataclasses.replace(tv, magnitude_means=file_magnitude_means(tv.path))
                   for tv in inputs.task_vectors]
        upload_means = (time.perf_counter() - start) / len(vectors)
        inputs = dataclasses.replace(inputs, task_vectors=vectors)
    measured = _timed(lambda: runner(inputs, spec.params(), JobContext(workdir=Path(out_dir))))
    return measured | {"upload_cuts_seconds": upload_cuts, "upload_means_seconds": upload_means}


def child_script(base_path: str, vector_paths: list[str], out_dir: str, threads: str) -> dict:
    """The in-memory script: load every file whole, sum the vectors, add to the base, save."""
    from safetensors.torch import load_file

    _threads(threads)

    def work() -> None:
        merged = load_file(base_path)
        for path in vector_paths:
            for name, tau in load_file(path).items():
                merged[name] = merged[name] + 0.3 * tau
        _save_synced(merged, Path(out_dir) / "script.safetensors")
    return _timed(work)


def child_fusionbench_ties(base_path: str, vector_paths: list[str], out_dir: str, threads: str) -> dict:
    """TIES as FusionBench's fusion_bench/method/ties_merging/ties_merging_utils.py computes it: state_dict_to_vector,
    topk_values_mask (kthvalue per row), resolve_sign (ties broken by the majority sign), disjoint_merge (mean),
    vector_to_state_dict; then theta_0 + 0.3 * merged."""
    import torch
    from safetensors.torch import load_file

    _threads(threads)

    def work() -> None:
        vectors = [load_file(path) for path in vector_paths]
        names = sorted(vectors[0])
        matrix = torch.stack([torch.cat([v[name].reshape(-1) for name in names]) for v in vectors])
        del vectors
        keep = matrix.shape[1] - int(matrix.shape[1] * 20 / 100)
        kth, _ = matrix.abs().kthvalue(keep, dim=1, keepdim=True)
        matrix = matrix * (matrix.abs() >= kth)
        sign = torch.sign(matrix.sum(dim=0))
        sign[sign == 0] = torch.sign(sign.sum())
        selected = matrix * torch.where(sign > 0, matrix > 0, matrix < 0)
        merged = selected.sum(dim=0) / torch.clamp((selected != 0).sum(dim=0).float(), min=1)
        del matrix, selected
        out, offset = load_file(base_path), 0
        for name in names:
            count = out[name].numel()
            out[name] = out[name] + 0.3 * merged[offset:offset + count].view_as(out[name])
            offset += count
        _save_synced(out, Path(out_dir) / "fusionbench.safetensors")
    return _timed(work)


# tvforge's default parameters in mergekit's terms: task arithmetic as weight 0.3 per model (lambda 0.3 on the
# sum); TIES as top 20% kept (density 0.2), sign election by sum, disjoint mean (normalize), lambda 1. mergekit
# trims each tensor on its own (tvforge's trim_scope tensor; its default trims over the whole vector).
MERGEKIT_PARAMETERS = {
    "task_arithmetic": {"weight": 0.3, "density": 1.0, "normalize": False},
    "ties": {"weight": 1.0, "density": 0.2, "normalize": True},
}


def child_mergekit(method: str, base_path: str, vector_paths: list[str], out_dir: str, threads: str) -> dict:
    """mergekit's own merge method (mergekit.merge_methods registry: GeneralizedTaskArithmeticMerge.merge_group) over
    each tensor, as mergekit's executor runs it: the base's tensor and each fine-tuned model's (theta_0 + tau,
    what mergekit reads from a fine-tuned checkpoint), merged one tensor at a time; outputs kept until saved in one
    save_file (mergekit's writer holds a shard of up to 5 GB), then fsync. Runs under scripts/mergekit_env.sh's
    interpreter."""
    from mergekit.merge_methods.base import TensorGroup
    from mergekit.merge_methods.registry import get
    from safetensors import safe_open

    _threads(threads)
    merge = get(method)
    shared = MERGEKIT_PARAMETERS[method]

    def work() -> None:
        out = {}
        with safe_open(base_path, framework="pt") as base_file:
            vectors = [safe_open(path, framework="pt") for path in vector_paths]
            names = [set(v.keys()) for v in vectors]  # noqa: SIM118 - safe_open is not a dict
            for name in sorted(base_file.keys()):  # noqa: SIM118
                base = base_file.get_tensor(name)
                present = [v for v, held in zip(vectors, names, strict=True) if name in held]
                if not present or not base.is_floating_point():
                    out[name] = base
                    continue
                group = TensorGroup.from_tensors([base, *(base + v.get_tensor(name) for v in present)], base_index=0)
                ids = [entry.id for entry in group.non_base]
                out[name] = merge.merge_group(group, weight=dict.fromkeys(ids, shared["weight"]),
                                              density=dict.fromkeys(ids, shared["density"]),
                                              normalize=shared["normalize"], rescale=False, int8_mask=False,
                                              **{"lambda": 1.0})
        _save_synced(out, Path(out_dir) / f"mergekit_{method}.safetensors")
    return _timed(work)


def _read_through(path: str | Path, buffer: bytearray, digest=None) -> None:
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            if digest is not None:
                digest.update(memoryview(buffer)[:n])


def child_copy(base_path: str, vector_paths: list[str], out_dir: str) -> dict:
    """The bound: read every input once, write one new output of the base's size (a copy of the base). It
    writes as tvforge's StreamingWriter does (calls of WRITE_PIECE bytes, writeback started every
    WRITEBACK_EVERY), so that it stays a floor for tvforge's merges; it neither checks nor hashes."""
    from engine.safetensors_io import StreamingWriter, start_writeback

    def work() -> None:
        buffer = bytearray(StreamingWriter.WRITE_PIECE)
        for path in vector_paths:
            _read_through(path, buffer)
        with open(base_path, "rb", buffering=0) as source, \
                open(Path(out_dir) / "copy.safetensors", "wb", buffering=0) as out:
            size = written_back = 0
            while n := source.readinto(buffer):
                out.write(memoryview(buffer)[:n])
                size += n
                if size - written_back >= StreamingWriter.WRITEBACK_EVERY:
                    start_writeback(out.fileno(), written_back, size)
                    written_back = size
            os.fsync(out.fileno())
    return _timed(work)


def child_sha256(base_path: str) -> dict:
    """sha256 of the base's bytes from the page cache, alone: what every tvforge merge computes of its output
    (the checkpoint's digest) and the bound and the script do not."""
    import hashlib

    def work() -> None:
        digest, buffer = hashlib.sha256(), bytearray(1 << 20)
        _read_through(base_path, buffer, digest)
    return _timed(work)


def _quiesce(scratch: str, inputs: list[Path]) -> None:
    """Before each measurement: the last run's output removed, so every run writes a new file as a job does
    (truncating it would put its page-cache teardown, about 0.1 s for 605 MB, on the clock); everything
    written so far flushed, so no run waits on another's writeback; and every input read once, so every run
    starts with them in the page cache (FusionBench-style TIES's 4-14 GB pushes some of them out)."""
    for leftover in Path(scratch).glob("*.safetensors"):
        leftover.unlink()
    os.sync()
    buffer = bytearray(CHUNK)
    for path in inputs:
        _read_through(path, buffer)


def _in_child(kind: str, *args: str, python: str = sys.executable) -> dict:
    """Runs one measurement in a fresh interpreter, so peaks are not inherited from earlier runs."""
    code = (f"import json, sys; from bench.merge_cost import child_{kind}; "
            f"print(json.dumps(child_{kind}(*json.loads(sys.argv[1]))))")
    result = subprocess.run([python, "-c", code, json.dumps(list(args))], check=True, capture_output=True,
                            text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    return json.loads(result.stdout.strip().splitlines()[-1])


COMPARISONS = ("script", "fusionbench_ties")  # the rows that are not tvforge methods
MERGEKIT_ROWS = {"mergekit_task_arithmetic": "task_arithmetic", "mergekit_ties": "ties"}


def _measure(method: str, architecture: str, base_path: Path, paths: list[str], scratch: str, threads: int,
             mergekit_python: str) -> dict:
    if method in COMPARISONS:
        return _in_child(method, str(base_path), paths, scratch, str(threads))
    if method in MERGEKIT_ROWS:
        return _in_child("mergekit", MERGEKIT_ROWS[method], str(base_path), paths, scratch, str(threads),
                         python=mergekit_python)
    return _in_child("merge", method, architecture, str(base_path), paths, scratch, str(threads))


def main(counts: str = typer.Option("2,8,16"), architecture: str = typer.Option("ViT-B-32"),
         methods: str = typer.Option("task_arithmetic,ties,ties_no_upload_cuts,sta,dare,script,fusionbench_ties,"
                                     "mergekit_task_arithmetic,mergekit_ties"),
         repeats: int = typer.Option(5, min=1),
         threads: int = typer.Option(0, min=0, help="torch threads in each merge (0: torch's default, as the worker)"),
         fusionbench_max: int = typer.Option(8, help="largest N for fusionbench_ties (its memory grows with N)"),
         mergekit_python: Path = typer.Option(
             Path(".venv-mergekit/bin/python"),
             help="scripts/mergekit_env.sh's interpreter; without it the mergekit rows are left out"),
         workdir: Path = typer.Option(None, help="Where inputs are generated (default: a temp dir)."),
         out: Path = typer.Option(Path("bench/results/merge_cost.json"))) -> None:
    has_mergekit = mergekit_python.exists() and subprocess.run(
        [str(mergekit_python), "-c", "import mergekit.merge_methods.registry"], capture_output=True).returncode == 0
    folder = workdir or Path(tempfile.mkdtemp(prefix="tvforge-merge-cost-"))
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for count in sorted(int(c) for c in counts.split(",")):
        base_path, vector_paths = make_inputs(folder, architecture, count)
        paths = [str(p) for p in vector_paths]
        chosen = [m for m in methods.split(",") if not (m == "fusionbench_ties" and count > fusionbench_max)
                  and not (m in MERGEKIT_ROWS and not has_mergekit)]
        runs: dict[str, list[dict]] = {"bound": [], "sha256": [], **{m: [] for m in chosen}}
        with tempfile.TemporaryDirectory(dir=folder) as scratch:
            _in_child("copy", str(base_path), paths, scratch)  # warm the page cache for both sides alike
            for _ in range(repeats):
                _quiesce(scratch, [base_path, *vector_paths])
                runs["bound"].append(_in_child("copy", str(base_path), paths, scratch))
                runs["sha256"].append(_in_child("sha256", str(base_path)))
                for method in chosen:
                    _quiesce(scratch, [base_path, *vector_paths])
                    runs[method].append(_measure(method, architecture, base_path, paths, scratch, threads,
                                                 str(mergekit_python)))
        bound = statistics.median(r["seconds"] for r in runs["bound"])
        best_bound = min(r["seconds"] for r in runs["bound"])
        for method in chosen:
            seconds = statistics.median(r["seconds"] for r in runs[method])
            best = min(r["seconds"] for r in runs[method])
            rows.append({"method": method, "task_vectors": count, "architecture": architecture, "seconds": seconds,
                         "runs_seconds": [round(r["seconds"], 3) for r in runs[method]],
                         "cpu_user_seconds": statistics.median(r["cpu_user_seconds"] for r in runs[method]),
                         "cpu_system_seconds": statistics.median(r["cpu_system_seconds"] for r in runs[method]),
                         "bound_runs_seconds": [round(r["seconds"], 3) for r in runs["bound"]],
                         "best_seconds": best, "best_bound_seconds": best_bound,
                         "best_ratio_to_bound": best / best_bound,
                         "peak_anon_mib": max(r["peak_anon_mib"] for r in runs[method]),
                         "anon_growth_mib": max(r["anon_growth_mib"] for r in runs[method]),
                         "peak_rss_mib": max(r["peak_rss_mib"] for r in runs[method]),
                         "bound_seconds": bound, "ratio_to_bound": seconds / bound,
                         "output_sha256_seconds": statistics.median(r["seconds"] for r in runs["sha256"]),
                         "upload_cuts_seconds_per_vector": statistics.median(r.get("upload_cuts_seconds", 0.0)
                                                                             for r in runs[method]),
                         "upload_means_seconds_per_vector": statistics.median(r.get("upload_means_seconds", 0.0)
                                                                              for r in runs[method]),
                         "input_mib": sum(Path(p).stat().st_size for p in [*paths, base_path]) / 2**20})
    header = ("| method | N | inputs (MiB) | time (s) | bound (s) | time / bound | best / best bound | peak anon (MiB) "
              "| anon growth (MiB) | peak RSS (MiB) | upload stats (s per vector) |")
    lines = [header, "|" + "---|" * 11]
    for r in rows:
        upload = {"ties": r["upload_cuts_seconds_per_vector"], "sta": r["upload_means_seconds_per_vector"]}
        cuts = f"{upload[r['method']]:.2f}" if r["method"] in upload else "-"
        lines.append(f"| {r['method']} | {r['task_vectors']} | {r['input_mib']:.0f} | {r['seconds']:.2f} | "
                     f"{r['bound_seconds']:.2f} | {r['ratio_to_bound']:.2f} | {r['best_ratio_to_bound']:.2f} | "
                     f"{r['peak_anon_mib']:.0f} | "
                     f"{r['anon_growth_mib']:.0f} | {r['peak_rss_mib']:.0f} | {cuts} |")
    table = "\n".join(lines)
    out.parent.mkdir(parents=True, exist_ok=True)
    import torch

    out.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                           "torch": torch.__version__,
                                           "torch_threads": threads or torch.get_num_threads(), "repeats": repeats},
                               "rows": rows, "table": table}, indent=2) + "\n")
    typer.echo(table)
    for count in sorted({r["task_vectors"] for r in rows}):
        first = next(r for r in rows if r["task_vectors"] == count)
        bound_runs = first["bound_runs_seconds"]
        typer.echo(f"N = {count}: bound {first['bound_seconds']:.2f} s "
                   f"(runs {min(bound_runs):.2f}-{max(bound_runs):.2f} s), "
                   f"sha256 of the output alone {first['output_sha256_seconds']:.2f} s")


if __name__ == "__main__":
    typer.run(main)

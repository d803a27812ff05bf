"""Streaming merges over memory-mapped safetensors: one output tensor in memory at a time."""
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from safetensors import safe_open

from engine.context import JobContext, Progress, WrittenFile
from engine.safetensors_io import Header, StreamingWriter, read_header
from engine.task_vectors import TaskVectorFile

T = TypeVar("T")


class VectorSlices(Sequence):
    """The task vectors' slices of one tensor (float32, None where a vector lacks it), each read from
    its memory map (or computed from its LoRA factors) only when indexed: a merge that walks them once
    holds one slice at a time. A merge that works chunk by chunk reads them through float32_readers
    instead, without any whole-tensor copy."""

    def __init__(self, vectors: list[TaskVectorFile], name: str, shape: tuple[int, ...]):
        self.vectors, self.name, self.shape = vectors, name, shape

    def __len__(self) -> int:
        return len(self.vectors)

    def has(self, index: int) -> bool:
        return self.name in self.vectors[index].names

    def __getitem__(self, index: int) -> torch.Tensor | None:
        return self.vectors[index].tensor(self.name) if self.has(index) else None

    def reader(self, index: int) -> "Float32Reader | None":
        return partial(self.vectors[index].float32, self.name) if self.has(index) else None


# (start, stop) -> entries start:stop of a tensor, flattened, as a float32 numpy array
Float32Reader = Callable[[int, int], np.ndarray]


def float32_readers(taus: Sequence[torch.Tensor | None]) -> tuple[tuple[int, ...], list[Float32Reader | None]]:
    """(the tensor's shape, a flat float32 reader per vector or None): memory-mapped views for a
    merge's VectorSlices, float32 copies of in-memory tensors otherwise (tests, references)."""
    if isinstance(taus, VectorSlices):
        return taus.shape, [taus.reader(index) for index in range(len(taus))]
    present = [tau for tau in taus if tau is not None]
    if not present:
        raise ValueError("no task vector has this tensor")
    flat = [None if tau is None else tau.detach().float().contiguous().view(-1).numpy() for tau in taus]
    return tuple(present[0].shape), [None if f is None else (lambda a, b, f=f: f[a:b]) for f in flat]


# (name, base tensor in float32, the vectors' slices) -> merged float32
TensorMerge = Callable[[str, torch.Tensor, Sequence[torch.Tensor | None]], torch.Tensor]


# Entries a chunked merge handles at a time: its running sums (a few per entry) stay in cache while each
# task vector's slice of the chunk is added, so each vector is read once and the sums never go to memory.
CHUNK = 1 << 16

_pool: ThreadPoolExecutor | None = None
_pool_threads = 0


def in_chunks(numel: int, work: Callable[[int, int], T]) -> list[T]:
    """work(start, stop) over consecutive CHUNK-aligned ranges covering 0..numel, one range per thread
    (torch's thread count: the worker's setting), for work whose heavy parts release the GIL (numba
    kernels, numpy ufuncs). Results in range order; a small tensor is one range on the calling thread."""
    global _pool, _pool_threads
    threads = max(1, torch.get_num_threads())
    chunks = -(-numel // CHUNK)
    if threads == 1 or chunks < 2:
        return [work(0, numel)]
    if _pool is None or _pool_threads != threads:
        _pool, _pool_threads = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="merge"), threads
    per_thread = -(-chunks // threads)
    bounds = [(min(numel, i * per_thread * CHUNK), min(numel, (i + 1) * per_thread * CHUNK)) for i in range(threads)]
    return list(_pool.map(lambda span: work(*span), [b for b in bounds if b[0] < b[1]]))


@contextmanager
def open_vectors(base_path: Path, vector_paths: list[Path]) -> Iterator[tuple]:
    """(base handle, a TaskVectorFile per vector), memory-mapped for the duration."""
    with safe_open(str(base_path), framework="pt") as base:
        yield base, [TaskVectorFile(path) for path in vector_paths]


def merged_tensor_names(header: Header, vectors: list[TaskVectorFile]) -> list[str]:
    """The base's floating-point tensors that at least one vector changes, sorted: what a merge computes."""
    return sorted(name for name, info in header.tensors.items()
                  if info.is_float and any(name in vector.names for vector in vectors))


def merge_streaming(onto_path: Path, vector_paths: list[Path], out_path: Path,
                    merge: TensorMerge, ctx: JobContext, stage: str = "merging") -> int:
    """Write out_path = merge(onto, vectors) tensor by tensor; returns the number of tensors written.

    onto is what the merge adds to: theta_0 (the base file), or a start checkpoint of the same model
    (MergeInputs.onto_path). Tensors absent from every vector and non-float tensors are copied from it unchanged.
    """
    header = read_header(onto_path)
    entries = [(name, info.dtype, info.shape) for name, info in header.tensors.items()]
    with open_vectors(onto_path, vector_paths) as (base, vectors), \
            StreamingWriter(out_path, entries, ctx.metadata) as writer:
        total = len(writer.names)
        for step, name in enumerate(writer.names, start=1):
            ctx.check_cancel()
            base_tensor = base.get_tensor(name)
            if base_tensor.is_floating_point() and any(name in vector.names for vector in vectors):
                slices = VectorSlices(vectors, name, tuple(base_tensor.shape))
                merged = merge(name, base_tensor.float(), slices).to(base_tensor.dtype)
            else:
                merged = base_tensor
            writer.write(name, merged)
            ctx.report(Progress(stage, step, total))
    ctx.written[out_path] = WrittenFile(writer.sha256, writer.size, writer.non_finite)
    return total


# (name, the vectors' slices) -> the merged task vector of that tensor, float32
DeltaMerge = Callable[[str, Sequence[torch.Tensor | None]], torch.Tensor]


def collect_deltas(base_path: Path, vector_paths: list[Path], delta: DeltaMerge, ctx: JobContext,
                   stage: str = "merging_vectors") -> dict[str, torch.Tensor]:
    """The merged task vector of every tensor the vectors change, in memory: what a lambda search scales.

    Memory is one model's worth of float32, whatever the number of vectors (read one slice at a time).
    """
    deltas = {}
    header = read_header(base_path)
    with open_vectors(base_path, vector_paths) as (_base, vectors):
        names = merged_tensor_names(header, vectors)
        for step, name in enumerate(names, start=1):
            ctx.check_cancel()
            shape = header.tensors[name].shape
            deltas[name] = delta(name, VectorSlices(vectors, name, shape))
            ctx.report(Progress(stage, step, len(names)))
    return deltas

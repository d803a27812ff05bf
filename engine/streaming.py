"""Streaming merges over memory-mapped safetensors: one output tensor in memory at a time."""
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from engine.context import JobContext, Progress
from engine.safetensors_io import StreamingWriter, read_header

# (name, base tensor in float32, [task vector tensors in float32, None where absent]) -> merged float32
TensorMerge = Callable[[str, torch.Tensor, list[torch.Tensor | None]], torch.Tensor]


def merge_streaming(base_path: Path, vector_paths: list[Path], out_path: Path,
                    merge: TensorMerge, ctx: JobContext, stage: str = "merging") -> int:
    """Write out_path = merge(base, vectors) tensor by tensor; returns the number of tensors written.

    Tensors absent from every vector and non-float tensors are copied from the base unchanged.
    """
    header = read_header(base_path)
    entries = [(name, info.dtype, info.shape) for name, info in header.tensors.items()]
    with ExitStack() as stack:
        base = stack.enter_context(safe_open(str(base_path), framework="pt"))
        vectors = [stack.enter_context(safe_open(str(p), framework="pt")) for p in vector_paths]
        vector_keys = [set(v.keys()) for v in vectors]
        writer = stack.enter_context(StreamingWriter(out_path, entries, ctx.metadata))
        total = len(writer.names)
        for step, name in enumerate(writer.names, start=1):
            ctx.check_cancel()
            base_tensor = base.get_tensor(name)
            taus = [v.get_tensor(name).float() if name in keys else None
                    for v, keys in zip(vectors, vector_keys, strict=True)]
            if base_tensor.is_floating_point() and any(t is not None for t in taus):
                merged = merge(name, base_tensor.float(), taus).to(base_tensor.dtype)
            else:
                merged = base_tensor
            writer.write(name, merged)
            ctx.report(Progress(stage, step, total))
        return total

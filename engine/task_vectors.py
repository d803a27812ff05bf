"""Task vector files: dense tensors, or low-rank (LoRA) factors materialised one block of rows at a time.

A task vector is a safetensors file over the base model's tensor names. A weight matrix W of shape
(out, in) may instead be given as two factors named `<W's name>.lora_A` (rank, in) and
`<W's name>.lora_B` (out, rank), meaning tau[W] = lora_B @ lora_A (fold any LoRA alpha / rank scaling
into lora_B). Dense and factored tensors mix freely in one file; a tensor is given one way, not both.

Every reader here yields the dense task vector's values. A factored tensor is computed in fixed blocks of
rows (the same blocks whatever range is asked for), so a chunk costs one block or two, the whole tensor is
never needed for a chunk, and a chunk read and a whole-tensor read give the same bits.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.safetensors_io import Header, MappedTensors, SafetensorsError, TensorInfo, read_header

LORA_A, LORA_B = ".lora_A", ".lora_B"
LORA_BLOCK_ENTRIES = 1 << 16  # entries of the dense product computed per block of rows


@dataclass(frozen=True)
class LoraFactors:
    a: str  # the (rank, in) factor's name in the file
    b: str  # the (out, rank) factor's name
    shape: tuple[int, int]  # the dense tensor's (out, in)
    rank: int


@dataclass(frozen=True)
class Layout:
    """Which base tensors a task vector file changes, and how: stored dense, or as LoRA factors."""

    dense: dict[str, TensorInfo]
    factors: dict[str, LoraFactors]

    @property
    def names(self) -> set[str]:
        return set(self.dense) | set(self.factors)

    @property
    def max_rank(self) -> int | None:
        return max((f.rank for f in self.factors.values()), default=None)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.factors[name].shape if name in self.factors else self.dense[name].shape


def layout(header: Header, base: dict[str, TensorInfo] | None = None) -> Layout:
    """The file's layout from its header alone (nothing is read). With the base's header entries, a name the
    base has is always a dense tensor and a factor pair must name a base tensor of the product's shape.
    Raises SafetensorsError naming what is wrong."""
    dense: dict[str, TensorInfo] = {}
    halves: dict[str, dict[str, TensorInfo]] = {}
    for name, info in header.tensors.items():
        suffix = name[-len(LORA_A):]
        if suffix in (LORA_A, LORA_B) and (base is None or name not in base):
            halves.setdefault(name[:-len(LORA_A)], {})[suffix] = info
        else:
            dense[name] = info
    factors: dict[str, LoraFactors] = {}
    for target, pair in sorted(halves.items()):
        if len(pair) != 2:
            have, lacks = (LORA_A, LORA_B) if LORA_A in pair else (LORA_B, LORA_A)
            raise SafetensorsError(f"{target}{have} has no {target}{lacks}")
        a, b = pair[LORA_A], pair[LORA_B]
        if not (a.is_float and b.is_float):
            raise SafetensorsError(f"LoRA factors of {target} must be floating point")
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
            raise SafetensorsError(f"LoRA factors of {target} must be lora_A (rank, in) and lora_B (out, rank), "
                                   f"got {list(a.shape)} and {list(b.shape)}")
        rank, shape = a.shape[0], (b.shape[0], a.shape[1])
        if target in dense:
            raise SafetensorsError(f"{target} is given both dense and as LoRA factors")
        if base is not None:
            if target not in base:
                raise SafetensorsError(f"LoRA factors name {target}, which the base model does not have")
            if base[target].shape != shape:
                raise SafetensorsError(f"LoRA factors of {target} give shape {list(shape)}, the base model's is "
                                       f"{list(base[target].shape)}")
        if not 1 <= rank <= min(shape):
            raise SafetensorsError(f"LoRA rank of {target} is {rank}; it must be in [1, {min(shape)}]")
        factors[target] = LoraFactors(f"{target}{LORA_A}", f"{target}{LORA_B}", shape, rank)
    return Layout(dense, factors)


class TaskVectorFile:
    """A task vector file's dense values, memory-mapped: whole tensors (tensor) or flat float32 ranges
    (float32), and a factored tensor's factors (lora) for callers that compose them without the product."""

    def __init__(self, path: Path, header: Header | None = None, base: dict[str, TensorInfo] | None = None):
        self.path = path
        self.header = header or read_header(path)
        self.layout = layout(self.header, base)
        self.mapped = MappedTensors(path, self.header)

    @property
    def names(self) -> set[str]:
        return self.layout.names

    def shape(self, name: str) -> tuple[int, ...]:
        return self.layout.shape(name)

    def float32(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Entries start:stop of the dense tensor, flattened, as float32 (a read-only view where the file
        holds the tensor dense in float32)."""
        factors = self.layout.factors.get(name)
        if factors is None:
            return self.mapped.float32(name, start, stop)
        out_dim, in_dim = factors.shape
        stop = out_dim * in_dim if stop is None else min(stop, out_dim * in_dim)
        if stop <= start:
            return np.empty(0, np.float32)
        rows_per_block = max(1, LORA_BLOCK_ENTRIES // in_dim)
        first_block, last_block = start // in_dim // rows_per_block, (stop - 1) // in_dim // rows_per_block
        a = self.mapped.float32(factors.a).reshape(factors.rank, in_dim)
        row_start = first_block * rows_per_block
        row_stop = min(out_dim, (last_block + 1) * rows_per_block)
        b = self.mapped.float32(factors.b, row_start * factors.rank, row_stop * factors.rank).reshape(-1, factors.rank)
        product = np.empty((row_stop - row_start, in_dim), np.float32)
        for row in range(0, row_stop - row_start, rows_per_block):
            np.matmul(b[row:row + rows_per_block], a, out=product[row:row + rows_per_block])
        offset = row_start * in_dim
        return product.reshape(-1)[start - offset:stop - offset]

    def tensor(self, name: str) -> torch.Tensor:
        """The dense tensor in float32 (one tensor materialised)."""
        values = self.float32(name)
        if not values.flags.writeable:  # a view of the read-only map
            values = values.copy()
        return torch.from_numpy(values).view(self.shape(name))

    def lora(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(lora_B (out, rank), lora_A (rank, in)) in float32 for a factored tensor, None for a dense one."""
        factors = self.layout.factors.get(name)
        if factors is None:
            return None
        b = self.mapped.float32(factors.b).reshape(factors.shape[0], factors.rank)
        a = self.mapped.float32(factors.a).reshape(factors.rank, factors.shape[1])
        return torch.from_numpy(b.copy()), torch.from_numpy(a.copy())

    def float_names(self) -> list[str]:
        """The floating-point tensors the file changes, sorted."""
        return sorted(name for name in self.names if name in self.layout.factors or self.layout.dense[name].is_float)

    def float_deltas(self, names: set[str] | dict | None = None) -> dict[str, torch.Tensor]:
        """Every floating-point tensor the file changes (among `names`, if given), dense, in float32."""
        return {name: self.tensor(name) for name in self.float_names() if names is None or name in names}

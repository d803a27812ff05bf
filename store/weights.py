"""Validation of uploaded weight files against a base model, and fine-tuned -> task vector conversion.

Everything here reads safetensors headers first and tensors one at a time,
so a multi-gigabyte upload is checked without loading it whole.
"""
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from engine.context import ModelSpec
from engine.safetensors_io import (
    DTYPES,
    Header,
    MappedTensors,
    NotSafetensors,
    SafetensorsError,
    StreamingWriter,
    TensorInfo,
    check_finite,
    read_header,
    torch_dtype,
    torch_dtype_name,
)
from engine.selection import measure_vector
from engine.task_vectors import TaskVectorFile
from store.errors import RejectedInput

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
MAX_NAMES_IN_DETAIL = 5
# An open_clip model's header is tens to hundreds of KiB (ViT-bigG: about 0.2 MiB); its parsed objects take tens
# of times that (a 14 MiB header of 250k tiny entries: 192 MiB), so an upload's is bounded well below
# safetensors' own 100 MiB.
MAX_UPLOAD_HEADER_BYTES = 4 * 1024 * 1024


class WeightsError(RejectedInput):
    slug = "invalid-weights"


@dataclass(frozen=True)
class TensorCounts:
    tensor_count: int
    parameter_count: int
    visual_parameter_count: int
    text_parameter_count: int


def _names(names) -> str:
    names = sorted(names)
    more = f" and {len(names) - MAX_NAMES_IN_DETAIL} more" if len(names) > MAX_NAMES_IN_DETAIL else ""
    return ", ".join(names[:MAX_NAMES_IN_DETAIL]) + more


def read_weights_header(path: Path, filename: str, max_tensors: int) -> Header:
    """Header of an uploaded safetensors file; 415 for pickle or other formats, 422 for a broken one or one
    listing more than max_tensors tensors (what the model it belongs to can hold)."""
    if filename.lower().endswith(PICKLE_SUFFIXES):
        raise WeightsError(415, f"{filename!r} looks like a pickle checkpoint; only safetensors is accepted.")
    try:
        return read_header(path, max_tensors, MAX_UPLOAD_HEADER_BYTES)
    except NotSafetensors as exc:
        raise WeightsError(415, f"Only safetensors files are accepted: {exc}.") from None
    except SafetensorsError as exc:
        raise WeightsError(422, f"Invalid safetensors file: {exc}.") from None


def expected_state(spec: ModelSpec, max_parameters: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Names, dtypes and shapes of the model's state dict, built on the meta device (no weights allocated);
    422 for a config out of bounds or a model of more than max_parameters."""
    from engine.weights import build_model

    try:
        model = build_model(spec, device="meta")
    except Exception as exc:  # open_clip raises RuntimeError, KeyError, ValueError ... for bad configs
        raise WeightsError(422, f"open_clip cannot build this model: {exc}") from None
    state = {name: (torch_dtype_name(t.dtype), tuple(t.shape)) for name, t in model.state_dict().items()}
    parameters = sum(math.prod(shape) for _, shape in state.values())
    if parameters > max_parameters:
        raise WeightsError(422, f"The model has {parameters:,} parameters; this service takes at most "
                                f"{max_parameters:,} (TVFORGE_MAX_MODEL_PARAMETERS).")
    return state


def _require_finite(path: Path, header: Header) -> None:
    bad = check_finite(path, header)
    if bad:
        raise WeightsError(422, f"Tensors hold NaN or Inf: {_names(bad)}.")


def validate_base(path: Path, header: Header, expected: dict[str, tuple[str, tuple[int, ...]]]) -> TensorCounts:
    missing = expected.keys() - header.tensors.keys()
    unknown = header.tensors.keys() - expected.keys()
    if unknown:
        raise WeightsError(422, f"Keys unknown to the architecture: {_names(unknown)}.")
    if missing:
        raise WeightsError(422, f"Keys missing for the architecture: {_names(missing)}.")
    wrong = [n for n, info in header.tensors.items() if info.shape != expected[n][1]]
    if wrong:
        n = wrong[0]
        raise WeightsError(422, f"Shapes differ from the architecture for {_names(wrong)} "
                                f"(e.g. {n}: {list(header.tensors[n].shape)} vs {list(expected[n][1])}).")
    # Any float width is taken (bf16 and fp16 checkpoints are common); an integer weight is not a model's.
    kind_differs = [n for n, info in header.tensors.items() if info.is_float != DTYPES[expected[n][0]][1]]
    if kind_differs:
        n = kind_differs[0]
        raise WeightsError(422, f"Tensors are not of the architecture's kind (floating point or integer) for "
                                f"{_names(kind_differs)} (e.g. {n}: {header.tensors[n].dtype}, the architecture "
                                f"has {expected[n][0]}).")
    _require_finite(path, header)
    return counts(header)


def counts(header: Header) -> TensorCounts:
    visual = sum(t.numel for n, t in header.tensors.items() if n.startswith("visual."))
    total = header.parameter_count
    return TensorCounts(len(header.tensors), total, visual, total - visual)


def _check_against_base(tensors: dict[str, TensorInfo], base: Header) -> None:
    unknown = tensors.keys() - base.tensors.keys()
    if unknown:
        raise WeightsError(422, f"Keys unknown to the base model: {_names(unknown)}.")
    wrong = [n for n, info in tensors.items() if info.shape != base.tensors[n].shape]
    if wrong:
        n = wrong[0]
        raise WeightsError(422, f"Shapes differ from the base model for {_names(wrong)} "
                                f"(e.g. {n}: {list(tensors[n].shape)} vs {list(base.tensors[n].shape)}).")


@dataclass(frozen=True)
class TaskVectorStats:
    l2_norm: float
    magnitude_cuts: list[float]  # engine.selection.PERCENTS' global cuts, so that TIES need not measure them
    magnitude_means: dict[str, float]  # mean |tau| per tensor, so that STA's data-free masks read each vector once
    lora_rank: int | None  # the largest rank of its LoRA factors; None for a dense vector


def _checked_vector_file(path: Path, header: Header, base: Header) -> TaskVectorFile:
    """The file as a task vector of the base, its LoRA factors, keys and shapes checked from the header."""
    try:
        vector = TaskVectorFile(path, header, base.tensors)
    except SafetensorsError as exc:
        raise WeightsError(422, f"Invalid LoRA factors: {exc}.") from None
    _check_against_base(vector.layout.dense, base)
    return vector


def validate_task_vector(path: Path, header: Header, base: Header) -> TaskVectorStats:
    """Checks a task vector (dense tensors and/or LoRA factors, engine.task_vectors) against its base from the
    header alone, then its values chunk by chunk; returns its L2 norm, top-k cuts, mean magnitudes and LoRA rank."""
    if not header.tensors:
        raise WeightsError(422, "The file holds no tensors.")
    vector = _checked_vector_file(path, header, base)
    not_float = [n for n, info in vector.layout.dense.items() if not (info.is_float and base.tensors[n].is_float)]
    not_float += [n for n in vector.layout.factors if not base.tensors[n].is_float]
    if not_float:
        raise WeightsError(422, f"Task vectors cover floating-point tensors only: {_names(not_float)}.")
    measured = measure_vector(vector)
    if measured.non_finite:
        raise WeightsError(422, f"Tensors hold NaN or Inf (in float32, as merges read them): "
                                f"{_names(measured.non_finite)}.")
    return TaskVectorStats(measured.l2_norm, measured.magnitude_cuts, measured.magnitude_means,
                           vector.layout.max_rank)


# A fine-tuned model's 1-D tensors (LayerNorm gains and biases) stay close to the base's; a task vector's are
# differences, about as far from the base's as the base's are from zero. Measured on the quality benchmark's eight
# fine-tuned tiny CLIPs (distance_from_base): weights 0.19-0.39% from the base's, their task vectors 100.0%. A file
# under this relative distance is weights; at or over it, a difference.
WEIGHTS_DISTANCE_BELOW = 0.5
KIND_CHECK_MAX_ENTRIES = 1 << 16  # per tensor: the 1-D tensors of a CLIP are its widths, a few thousand entries


def distance_from_base(path: Path, header: Header, base_path: Path, base: Header) -> float | None:
    """||x - theta_0|| / ||theta_0|| over the small 1-D float tensors stored dense in both files; None without any
    (a LoRA-only vector) or when it is not finite (the NaN and Inf checks say why). Keys and shapes are checked
    against the base first (from the header)."""
    vector = _checked_vector_file(path, header, base)
    base_tensors = MappedTensors(base_path, base)
    names = [name for name, info in vector.layout.dense.items()
             if len(info.shape) == 1 and info.numel <= KIND_CHECK_MAX_ENTRIES and info.is_float
             and base.tensors[name].is_float]
    apart = squared = 0.0
    for name in names:
        theta_0 = base_tensors.float32(name).astype(np.float64)
        apart += float(np.sum((vector.float32(name) - theta_0) ** 2))
        squared += float(np.sum(theta_0 ** 2))
    distance = math.sqrt(apart / squared) if squared > 0 else math.nan
    return distance if math.isfinite(distance) else None


def check_kind(path: Path, header: Header, base_path: Path, base: Header, kind: str) -> None:
    """Refuses a file that is not what kind says: fine-tuned weights sent as a task vector were stored as tau (a
    merge then added theta_ft itself to theta_0), and a task vector sent as fine-tuned weights became tau - theta_0."""
    distance = distance_from_base(path, header, base_path, base)
    if distance is None:
        return
    if kind == "task_vector" and distance < WEIGHTS_DISTANCE_BELOW:
        raise WeightsError(422, f"This file looks like fine-tuned weights, not a task vector: its LayerNorm and "
                                f"bias tensors are within {distance:.1%} of the base model's, where a task vector "
                                f"holds differences from them. Upload it with kind=finetuned (`--finetuned`): the "
                                f"service then stores tau = theta_ft - theta_0.")
    if kind == "finetuned" and distance >= WEIGHTS_DISTANCE_BELOW:
        raise WeightsError(422, f"This file does not look like fine-tuned weights of this base model: its LayerNorm "
                                f"and bias tensors are {distance:.0%} of the base's norm away from the base's, where "
                                f"fine-tuning moves them little. A task vector is uploaded with "
                                f"kind=task_vector; weights fine-tuned from another model need that base model.")


# Entries of a tensor's rows that the conversion holds at a time (as float64: 2 MiB per operand). At 1 << 20
# (8 MiB per operand) the API's anonymous peak while converting a ViT-B/32 checkpoint was 84-89 MiB above its
# start, at 1 << 18 41 MiB, in the same time (3.5 s; bench/service.py).
CONVERT_ROWS_ENTRIES = 1 << 18
CONVERSION_IN_FLIGHT = 16 << 20  # bytes of task vector handed to the writer and not yet hashed


def _row_pieces(handle, name: str, shape: tuple[int, ...]) -> Iterator[torch.Tensor]:
    """A tensor of an open safetensors file read a few whole rows at a time (about CONVERT_ROWS_ENTRIES
    entries), so no piece is a whole large tensor; a 0-d tensor in one piece."""
    if not shape:
        yield handle.get_tensor(name)
        return
    rows = handle.get_slice(name)
    step = max(1, CONVERT_ROWS_ENTRIES // max(1, math.prod(shape[1:])))
    for start in range(0, shape[0], step):
        yield rows[start:start + step]


def finetuned_to_task_vector(path: Path, header: Header, base_path: Path, base: Header, out: Path) -> None:
    """tau = theta_ft - theta_0 over the floating-point tensors fine-tuning changed, written streaming.

    Two passes: the first finds which tensors changed (so the output header is known up front),
    the second writes their differences one at a time. Both read the two files a few rows at a time; the
    difference is taken in float64 and rounded once to the tensor's dtype (exact for float16 inputs), and
    only the tensor being written is held whole.
    """
    if not header.tensors:
        raise WeightsError(422, "The file holds no tensors.")
    _check_against_base(header.tensors, base)
    kind_differs = [n for n, info in header.tensors.items() if info.is_float != base.tensors[n].is_float]
    if kind_differs:
        raise WeightsError(422, f"Tensors of the fine-tuned checkpoint are not of the base model's kind (floating "
                                f"point or integer): {_names(kind_differs)}.")
    _require_finite(path, header)
    changed: list[tuple[str, str, tuple[int, ...]]] = []
    with safe_open(str(path), framework="pt") as ft, safe_open(str(base_path), framework="pt") as b0:
        for name, info in header.tensors.items():
            if info.is_float and base.tensors[name].is_float and any(
                    not torch.equal(tuned, original) for tuned, original in
                    zip(_row_pieces(ft, name, info.shape), _row_pieces(b0, name, info.shape), strict=True)):
                changed.append((name, info.dtype, info.shape))
        if not changed:
            raise WeightsError(422, "The fine-tuned weights equal the base model: the task vector would be empty.")
        # The API runs this: with the writer's default 64 MiB in flight, the conversion's anonymous growth in
        # bench.service was 91 MiB (42-51 with the earlier two-tensor queues); with 16 MiB, 31 MiB.
        with StreamingWriter(out, changed, in_flight=CONVERSION_IN_FLIGHT) as writer:
            for name, dtype, shape in sorted(changed):  # the order the writer lays them out
                tau = torch.empty(shape, dtype=torch_dtype(dtype))
                flat, offset = tau.view(-1), 0
                for tuned, original in zip(_row_pieces(ft, name, shape), _row_pieces(b0, name, shape), strict=True):
                    flat[offset:offset + tuned.numel()] = (tuned.double() - original.double()).reshape(-1)
                    offset += tuned.numel()
                writer.write(name, tau)

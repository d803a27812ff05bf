"""Safetensors reading, validation and streaming writing.

Headers are parsed and checked here before any tensor is touched, so a
truncated or hostile file is refused without being mapped. Writing streams one
tensor at a time (the header is known up front from names, dtypes and shapes),
so producing a merged model never holds more than one tensor in memory.
"""
import ctypes
import hashlib
import json
import math
import os
import queue
import struct
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# safetensors dtype -> (bytes per element, is floating point)
DTYPES: dict[str, tuple[int, bool]] = {
    "F64": (8, True), "F32": (4, True), "F16": (2, True), "BF16": (2, True),
    "I64": (8, False), "I32": (4, False), "I16": (2, False), "I8": (1, False),
    "U8": (1, False), "BOOL": (1, False),
}
MAX_HEADER_BYTES = 100 * 1024 * 1024
# Before a shape's product is taken: its cost grows with the square of its integers' digits (one tensor of 400
# dimensions of 4299 digits each took 8.6 s). torch takes at most 64 dimensions; a file of 2^48 bytes is 256 TiB.
MAX_RANK, MAX_DIMENSION = 64, 1 << 48
PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # raw pickle protocol 2+, torch's zip container


class SafetensorsError(ValueError):
    """A file that claims to be safetensors but is malformed."""


class NotSafetensors(SafetensorsError):
    """A file of another format altogether (pickle, zip, text ...)."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_float(self) -> bool:
        return DTYPES[self.dtype][1]


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int = 0  # file offset of the first tensor's bytes (TensorInfo offsets count from here)

    @property
    def parameter_count(self) -> int:
        return sum(t.numel for t in self.tensors.values())


def _is_count(value) -> bool:
    """A non-negative JSON integer (JSON's true and false are not counts, though Python's bool is an int)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_header(path: Path, max_tensors: int | None = None, max_header_bytes: int = MAX_HEADER_BYTES) -> Header:
    """Parse and validate a safetensors header against the file's real size.

    max_tensors, max_header_bytes: for files from outside (uploads), bounds checked before the JSON is parsed,
    whose objects take tens of times the header's bytes."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise NotSafetensors("not a safetensors file (too short)")
        # The prefix is a little-endian length, so its first byte may well be 0x80 (any length of
        # 128 mod 256): the pickle and zip magics only name what a file is once it fails as safetensors.
        foreign = prefix.startswith(PICKLE_MAGIC)
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len == 0 or header_len > MAX_HEADER_BYTES:
            raise NotSafetensors("not a safetensors file (pickle or zip container)" if foreign
                                 else "not a safetensors file (implausible header length)")
        if header_len > max_header_bytes:
            raise SafetensorsError(f"the header is {header_len} bytes; at most {max_header_bytes} are taken")
        raw = f.read(header_len)
    if len(raw) < header_len:
        if foreign and not raw.lstrip().startswith(b"{"):
            raise NotSafetensors("not a safetensors file (pickle or zip container)")
        raise SafetensorsError("file truncated inside the header")
    if not raw.lstrip().startswith(b"{"):
        raise NotSafetensors("not a safetensors file (pickle or zip container)" if foreign
                             else "not a safetensors file (header is not JSON)")
    # Every tensor entry names its data_offsets: the entries, counted before parsing (an escaped name is counted
    # after it, below; the header's size bounds what that parse can cost).
    if max_tensors is not None and (entries := raw.count(b'"data_offsets"')) > max_tensors:
        raise SafetensorsError(f"the header lists {entries} tensors; at most {max_tensors} are expected")
    try:
        parsed = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, and integers of over 4300 digits
        raise SafetensorsError(f"header is not valid JSON: {exc}") from None
    except RecursionError:
        raise SafetensorsError("header is not valid JSON: nested too deeply") from None
    if not isinstance(parsed, dict):
        raise SafetensorsError("header is not a JSON object")
    metadata = parsed.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError("__metadata__ must map strings to strings")
    if max_tensors is not None and len(parsed) > max_tensors:  # the count above misses escaped key names
        raise SafetensorsError(f"the header lists {len(parsed)} tensors; at most {max_tensors} are expected")

    tensors: dict[str, TensorInfo] = {}
    for name, entry in parsed.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise SafetensorsError(f"tensor {name!r}: malformed header entry") from None
        if dtype not in DTYPES:
            raise SafetensorsError(f"tensor {name!r}: unsupported dtype {dtype!r}")
        if len(shape) > MAX_RANK or not all(_is_count(d) and d <= MAX_DIMENSION for d in shape):
            raise SafetensorsError(f"tensor {name!r}: malformed shape (at most {MAX_RANK} dimensions, each at most "
                                   f"2^48)")
        if not (_is_count(start) and _is_count(end) and start <= end):
            raise SafetensorsError(f"tensor {name!r}: malformed data offsets")
        if end - start != math.prod(shape) * DTYPES[dtype][0]:
            raise SafetensorsError(f"tensor {name!r}: byte range does not match dtype and shape")
        tensors[name] = TensorInfo(dtype, shape, start, end)

    data_len = size - 8 - header_len
    spans = sorted((t.start, t.end) for t in tensors.values())
    position = 0
    for start, end in spans:
        if start != position:
            raise SafetensorsError("tensor data is not contiguous (overlap or hole)")
        position = end
    if position > data_len:
        raise SafetensorsError(f"file truncated: header needs {position} data bytes, file has {data_len}")
    if position != data_len:
        raise SafetensorsError("trailing bytes after the last tensor")
    return Header(tensors, metadata, 8 + header_len)


def all_finite(tensor) -> bool:
    """No NaN and no infinity in a float tensor, in one pass without a temporary: a compiled loop for
    float32 and float64, else torch's aminmax (NaN propagates through min and max, and an infinity is one
    of them); isfinite().all() makes a bool copy and was about 30x slower."""
    import torch

    if not tensor.numel():
        return True
    if tensor.dtype in (torch.float32, torch.float64) and tensor.is_contiguous() and tensor.device.type == "cpu":
        from engine.kernels import all_finite as compiled

        return bool(compiled(tensor.detach().reshape(-1).numpy()))
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def check_finite(path: Path, header: Header) -> list[str]:
    """Names of floating-point tensors holding NaN or Inf, read one tensor at a time."""
    from safetensors import safe_open

    bad = []
    with safe_open(str(path), framework="pt") as f:
        for name, info in header.tensors.items():
            if info.is_float and info.numel and not all_finite(f.get_tensor(name)):
                bad.append(name)
    return bad


# safetensors float dtype -> the numpy dtype its bytes are read as (bfloat16 as its raw 16 bits)
_NUMPY_FLOATS = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}


class MappedTensors:
    """A safetensors file's float tensors as flat float32 slices of one read-only memory map.

    A float32 tensor's slice is a view of the file's pages (no copy, nothing read until used); other
    float dtypes are converted slice by slice, so a caller walking a tensor in chunks never holds more
    than one chunk of it. bfloat16 converts exactly: its 16 bits are the high half of a float32's.
    """

    def __init__(self, path: Path, header: Header | None = None):
        import numpy as np

        self.header = header or read_header(path)
        # a plain ndarray over the map: slicing a np.memmap runs Python code (__array_finalize__) per slice
        self._map = np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray) if path.stat().st_size else None

    def float32(self, name: str, start: int = 0, stop: int | None = None):
        import numpy as np

        info = self.header.tensors[name]
        if not info.is_float:
            raise TypeError(f"tensor {name!r} is {info.dtype}, not floating point")
        stop = info.numel if stop is None else min(stop, info.numel)
        if stop <= start:
            return np.empty(0, np.float32)
        size = DTYPES[info.dtype][0]
        offset = self.header.data_start + info.start + start * size
        raw = self._map[offset:offset + (stop - start) * size].view(_NUMPY_FLOATS[info.dtype])
        if info.dtype == "BF16":
            return (raw.astype(np.uint32) << 16).view(np.float32)
        if info.dtype == "F32":
            return raw
        with np.errstate(over="ignore"):  # a float64 beyond float32's range reads as Inf, which callers refuse
            return raw.astype(np.float32)


def _sync_file_range():
    """libc's sync_file_range where there is one (Linux; Python's os module lacks it), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    return call


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # start writeback of the range's dirty pages; do not wait for it


def start_writeback(fd: int, start: int, stop: int) -> None:
    """Ask the kernel to start writing bytes start:stop of a file to disk now, without waiting, so that the
    fsync at the end finds little left to do: the disk works while the writer still computes. A hint only:
    a no-op where the call does not exist or fails."""
    if _SYNC_FILE_RANGE is not None and stop > start:
        _SYNC_FILE_RANGE(fd, start, stop - start, _SYNC_FILE_RANGE_WRITE)


# torch dtype -> the numpy dtype a tensor's little-endian bytes are checked as, a piece at a time (the
# compiled check reads native floats, so elsewhere a float tensor is checked whole, before the byte swap)
_PIECEWISE_FINITE = {"torch.float32": "<f4", "torch.float64": "<f8"} if sys.byteorder == "little" else {}


class StreamingWriter:
    """Writes a safetensors file tensor by tensor, in the order the header lists them.

    The header is fixed up front, with names sorted, so the same tensors always
    give the same bytes. The file's sha256 and the names of float tensors holding NaN or Inf
    are taken from the bytes as they are written, so nobody reads the file again for them.

    Checking and writing run on a writer thread and hashing on a hasher thread, overlapped with each
    other and with whatever computes the next tensor (all of them release the GIL); a budget (IN_FLIGHT
    unless given) bounds the bytes handed over and not yet hashed. A tensor handed to write() must not be
    modified afterwards. A failure on either thread is raised by the next write() or by close().
    """

    # Bytes handed to write() and not yet hashed (a tensor larger than this passes alone). Queues of two
    # tensors each left the hasher, the slowest stage, idle a third of the time. Task arithmetic of two
    # ViT-B/32 vectors, interleaved runs in one process: median 0.69-0.71 s with those queues; 0.74 s with
    # 16 MiB, 0.65-0.66 s with 32, 64 or 128 MiB.
    IN_FLIGHT = 64 << 20
    # Bytes per write call. On this project's VMs (ext4, Linux 6.18, a balloon that reports free 2 MiB blocks
    # to the host: page_reporting_order 9) calls of 2 MiB and more ran 4-10x slower in about half the runs,
    # the time inside the kernel's copy into the page cache: likely 2 MiB folios taken from memory the host
    # had discarded. A 605 MB file in 9 MiB calls: 0.13-1.47 s; in 1 MiB calls: 0.13-0.18 s (ten runs each).
    WRITE_PIECE = 1 << 20  # a multiple of 8, so that every piece of a float64 tensor is whole floats
    # Bytes written between two start_writeback calls (checked after each piece): the fsync in close() then
    # waits for the last few MiB and not for the whole file (task arithmetic of two ViT-B/32 vectors,
    # interleaved runs in one process: median 0.98 -> 0.76 s, of which fsync was 0.25-0.3 s).
    WRITEBACK_EVERY = 8 << 20

    def __init__(self, path: Path, entries: Iterable[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None, in_flight: int | None = None):
        """in_flight: the bytes handed over and not yet hashed, IN_FLIGHT if None (a process whose memory
        matters more than the write's speed, such as the API, passes less)."""
        self.path = path
        self._in_flight = self.IN_FLIGHT if in_flight is None else in_flight
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = dict(sorted(metadata.items()))
        offset = 0
        self._order: list[tuple[str, str, tuple[int, ...]]] = []
        for name, dtype, shape in sorted(entries):
            nbytes = math.prod(shape) * DTYPES[dtype][0]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            self._order.append((name, dtype, tuple(shape)))
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._digest = hashlib.sha256()
        prefix = struct.pack("<Q", len(raw)) + raw
        self._file.write(prefix)
        self._digest.update(prefix)
        self.size = len(prefix)
        self._written_back = 0
        self.non_finite: list[str] = []
        self._next = 0
        self._failure: BaseException | None = None
        self._budget = threading.Semaphore(self._budget_pieces())  # in write pieces
        self._to_write: queue.Queue = queue.Queue()
        self._to_hash: queue.Queue = queue.Queue()
        self._threads = [threading.Thread(target=self._write_queued, name="safetensors-writer", daemon=True),
                         threading.Thread(target=self._hash_queued, name="safetensors-hasher", daemon=True)]
        for thread in self._threads:
            thread.start()

    def _write_queued(self) -> None:
        """Checks a float tensor for NaN/Inf and writes its bytes, piece by piece where its dtype allows, so
        that each piece is checked while the write has it in cache (a pass of its own over each tensor took
        0.1 s per 605 MB)."""
        from engine.kernels import all_finite as finite_array

        while (item := self._to_write.get()) is not None:
            name, tensor, pieces = item
            if self._failure is not None:
                self._budget.release(pieces)  # so that write() never blocks on a dead writer
                continue
            try:
                pieces_as = _PIECEWISE_FINITE.get(str(tensor.dtype))
                finite = pieces_as is not None or not tensor.is_floating_point() or all_finite(tensor)
                buffer = tensor_buffer(tensor)
                for start in range(0, len(buffer), self.WRITE_PIECE):
                    piece = buffer[start:start + self.WRITE_PIECE]
                    if pieces_as is not None and finite:
                        finite = bool(finite_array(piece.view(pieces_as)))
                    self._file.write(piece)
                    self.size += len(piece)
                    if self.size - self._written_back >= self.WRITEBACK_EVERY:
                        self._file.flush()  # the header and short tails wait in the file object's buffer
                        start_writeback(self._file.fileno(), self._written_back, self.size)
                        self._written_back = self.size
                if not finite:
                    self.non_finite.append(name)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                self._failure = exc
                self._budget.release(pieces)
                continue
            self._to_hash.put((buffer, pieces))
        self._to_hash.put(None)

    def _hash_queued(self) -> None:
        while (item := self._to_hash.get()) is not None:
            buffer, pieces = item
            try:
                if self._failure is None:
                    self._digest.update(buffer)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                self._failure = exc
            finally:
                self._budget.release(pieces)

    def _budget_pieces(self, nbytes: int | None = None) -> int:
        """The in-flight budget in write pieces, or what a tensor of nbytes takes of it (at least one, at most
        all)."""
        whole = max(1, self._in_flight // self.WRITE_PIECE)
        return whole if nbytes is None else max(1, min(whole, -(-nbytes // self.WRITE_PIECE)))

    def _stop(self) -> None:
        if self._threads[0].is_alive():
            self._to_write.put(None)
        for thread in self._threads:
            thread.join()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    @property
    def sha256(self) -> str:
        """The sha256 of the bytes written so far (the whole file once closed)."""
        return self._digest.hexdigest()

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self._order]

    def write(self, name: str, tensor) -> None:
        self._raise_failure()
        expected_name, dtype, shape = self._order[self._next]
        if name != expected_name:
            raise ValueError(f"expected tensor {expected_name!r} next, got {name!r}")
        if tuple(tensor.shape) != shape or torch_dtype_name(tensor.dtype) != dtype:
            raise ValueError(f"tensor {name!r}: got {tensor.dtype} {tuple(tensor.shape)}, header says {dtype} {shape}")
        pieces = self._budget_pieces(tensor.numel() * tensor.element_size())
        for _ in range(pieces):
            self._budget.acquire()
        self._to_write.put((name, tensor, pieces))
        self._next += 1

    def close(self) -> None:
        self._stop()
        if self._failure is not None or self._next != len(self._order):
            self._file.close()
            self._raise_failure()
            raise ValueError(f"only {self._next} of {len(self._order)} tensors written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        self._stop()
        self._file.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> "StreamingWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


_TORCH_NAMES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}


def torch_dtype_name(dtype) -> str:
    return _TORCH_NAMES[str(dtype).removeprefix("torch.")]


def torch_dtype(name: str):
    import torch

    return {v: getattr(torch, k) for k, v in _TORCH_NAMES.items()}[name]


def tensor_buffer(tensor):
    """The little-endian raw bytes of a CPU tensor as a flat uint8 array, without a copy where the tensor is
    already contiguous and little-endian (bfloat16 through a 16-bit view)."""
    import numpy as np
    import torch

    t = tensor.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    array = t.numpy()
    return np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"), copy=False)).reshape(-1).view(np.uint8)


def save_tensors(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Write a small dict of tensors in the same deterministic layout as StreamingWriter."""
    entries = [(n, torch_dtype_name(t.dtype), tuple(t.shape)) for n, t in tensors.items()]
    with StreamingWriter(path, entries, metadata) as writer:
        for name in writer.names:
            writer.write(name, tensors[name])


__all__ = [
    "DTYPES", "Header", "MappedTensors", "NotSafetensors", "SafetensorsError", "StreamingWriter", "TensorInfo",
    "all_finite", "check_finite", "read_header", "save_tensors", "start_writeback", "tensor_buffer", "torch_dtype",
    "torch_dtype_name",
]

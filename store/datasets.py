"""Dataset ingestion: an uploaded zip of image folders or an .npz in, one canonical .npz out.

The canonical file is an uncompressed npz holding `<split>_images` (uint8
[N,H,W,3]), `<split>_labels` (int64 [N], -1 when unlabeled) for each split
present, `class_names` (fixed-width unicode) when names are known, and
`templates` (the dataset's zero-shot prompt templates) when given. It loads
with allow_pickle=False, and the same upload always gives the same bytes.

Uploads are untrusted: nothing is extracted to disk, zip entries are read in
memory one at a time with the inflated bytes counted, pickles are never loaded,
and only a fixed set of image decoders is used.

Statuses: 415 for formats we do not take (pickles, torch checkpoints, anything
that is not a zip or an npz); 413 for size limits the uploader can meet by
sending less (unpacked bytes, image count); 422 for everything wrong with the
content, including unsafe entry names and entries compressed beyond any
plausible image (a zip bomb is malformed content, not a big dataset).
"""
import io
import math
import os
import re
import string
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from store.errors import RejectedInput

SPLITS = ("train", "val", "test")
MAX_COMPRESSION_RATIO = 200
# Entries smaller than this cannot hurt whatever their ratio, and a blank BMP
# legitimately deflates about 1000:1, so the ratio is only checked above it.
RATIO_CHECK_MIN_BYTES = 1024 * 1024
ENTRY_BUFFER = 64 * 1024  # an image entry's read-ahead: Pillow reads its header in small pieces
WRITE_CHUNK_BYTES = 64 * 1024 * 1024
# Decoders we accept; Image.open would otherwise also try formats such as EPS,
# which runs Ghostscript.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF", "PPM")
# A fixed entry timestamp keeps the canonical bytes independent of when they were written.
CANONICAL_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")
MAX_TEMPLATES = 100
MAX_TEMPLATE_LENGTH = 300
MAX_CLASS_NAME_LENGTH = 300


class DatasetError(RejectedInput):
    """An upload that cannot become a dataset; status, title and detail make the problem response."""

    slug = "invalid-dataset"

    def __init__(self, status: int, title: str, detail: str):
        super().__init__(status, detail, title)


def _unsupported(detail: str) -> DatasetError:
    return DatasetError(415, "Unsupported dataset format", detail)


def _pickled(detail: str) -> DatasetError:
    return DatasetError(415, "Pickled data refused", detail)


def _invalid(detail: str) -> DatasetError:
    return DatasetError(422, "Invalid dataset", detail)


def _too_large(detail: str) -> DatasetError:
    return DatasetError(413, "Dataset too large", detail)


@dataclass(frozen=True)
class DatasetLimits:
    max_images: int
    max_unpacked_bytes: int  # inflated bytes read from a zip
    max_decoded_bytes: int = 4 * 1024**3  # the canonical images, N x H x W x 3, checked before decoding
    max_classes: int = 10_000  # labels lie in [0, max_classes)
    max_image_pixels: int = 50_000_000
    # the pixels of a zip's images as stored, before resizing: the decoding work (a 6 KB 1-bit PNG of 7000x7000
    # took 0.5 s to decode and resize, and thousands fit in a few megabytes)
    max_source_pixels: int = 20_000_000_000
    resize_to: int = 224


def _check_decoded(count: int, height: int, width: int, limits: DatasetLimits, channels: int = 3) -> None:
    """channels: an npz split is loaded as stored (RGBA: 4) before it is written as RGB."""
    decoded = count * height * width * max(3, channels)
    if decoded > limits.max_decoded_bytes:
        raise _too_large(f"{count} images of {height}x{width} decode to {decoded} bytes; the limit is "
                         f"{limits.max_decoded_bytes}.")


@dataclass(frozen=True)
class DatasetSummary:
    source_format: str  # "zip" or "npz"
    labeled: bool
    class_names: list[str] | None
    splits: dict[str, dict]  # {"train": {"count": 120, "per_class": {"cat": 60, ...}}}; no per_class if unlabeled
    image_shape: list[int]  # [H, W, 3]
    templates: list[str] | None = None


def check_templates(templates: list, source: str) -> None:
    """Zero-shot prompt templates: 1-100 distinct strings, each naming the class once as {c} and nothing else."""
    if not templates or len(templates) > MAX_TEMPLATES or len(set(templates)) != len(templates):
        raise _invalid(f"{source} must be 1 to {MAX_TEMPLATES} distinct strings.")
    for template in templates:
        if not isinstance(template, str) or len(template) > MAX_TEMPLATE_LENGTH or "\x00" in template:
            raise _invalid(f"{source}: each template is a string of at most {MAX_TEMPLATE_LENGTH} characters.")
        try:
            fields = [(field, spec, conversion) for _, field, spec, conversion in string.Formatter().parse(template)
                      if field is not None]
        except ValueError as exc:
            raise _invalid(f"{source}: {template!r} is not a valid template ({exc}).") from None
        # A format spec or conversion ({c:>99999999}) would make each prompt as long as it asks, or fail at
        # evaluation time: only the bare field.
        if fields != [("c", "", None)]:
            raise _invalid(f"{source}: {template!r} must contain {{c}} (the class name) exactly once and no "
                           f"other {{...}} field, format spec or conversion.")


def ingest_dataset(source: Path, filename: str, out_path: Path, limits: DatasetLimits,
                   class_names: list[str] | None = None, templates: list[str] | None = None) -> DatasetSummary:
    """Check the upload at `source` and write its canonical npz to `out_path` (fsynced).

    templates given here take precedence over a `templates` array in an npz upload.
    Raises DatasetError; on any failure nothing is left at out_path.
    """
    try:
        if class_names is not None:
            _check_class_names(class_names, "class_names", limits.max_classes)
            class_names = list(class_names)
        if templates is not None:
            check_templates(templates, "templates")
            templates = list(templates)
        with open(out_path, "wb") as out:
            summary = _ingest(Path(source), filename, out, limits, class_names, templates)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        Path(out_path).unlink(missing_ok=True)
        raise
    return summary


def load_canonical(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Splits of a canonical npz: {split: (uint8 images [N,H,W,3], int64 labels [N], -1 = unlabeled)}."""
    with np.load(path, allow_pickle=False) as data:
        return {split: (data[f"{split}_images"], data[f"{split}_labels"])
                for split in SPLITS if f"{split}_images" in data.files}


def _ingest(source: Path, filename: str, out: BinaryIO, limits: DatasetLimits,
            class_names: list[str] | None, templates: list[str] | None) -> DatasetSummary:
    _require_zip_container(source, filename)
    # zipfile builds an object per entry (about 0.8 KiB with ours) before anything can be counted: the
    # archive's own count comes first. Room for one folder entry per class and split, and for a macOS
    # archive's __MACOSX twin of every image.
    most_entries = 2 * limits.max_images + 4 * limits.max_classes + 64
    if (entries := _zip_entry_count(source, most_entries)) is not None and entries > most_entries:
        raise _too_large(f"the archive holds more than {most_entries} entries ({limits.max_images} images are "
                         "taken).")
    try:
        archive = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError) as exc:  # the last: a zip version
        raise _invalid(f"{filename!r} is not a readable zip archive: {exc}") from None
    with archive, _CanonicalWriter(out) as writer:
        files = [info for info in archive.infolist() if not info.is_dir()]
        if any(info.filename.endswith(".pkl") for info in files):
            raise _pickled(f"{filename!r} contains pickled data (a PyTorch checkpoint has data.pkl); "
                           "pickles are never loaded. Upload a zip of images or an npz.")
        if files and all(info.filename.endswith(".npy") for info in files):
            return _ingest_npz(source, archive, files, writer, limits, class_names, templates)
        return _ingest_image_zip(archive, files, writer, limits, class_names, templates)


CENTRAL_ENTRY = struct.Struct("<4s4B4HL2L5H2L")  # fixed part of a central directory entry (46 bytes)


def _zip_entry_count(source: Path, most: int) -> int | None:
    """How many entries the archive's central directory holds, counted by walking it (its declared count may
    lie: zipfile reads entries until the directory's bytes run out), stopping past `most`; None where zipfile
    would find no directory (it then names the problem)."""
    with open(source, "rb") as f:
        # The directory is found exactly as zipfile finds it (its own functions: the end record, a zip64 record
        # or not, data before the archive), so that what is counted here is what zipfile would read.
        try:
            record = zipfile._EndRecData(f)
        except (OSError, zipfile.BadZipFile, struct.error):  # zipfile then names the problem
            return None
        if not record:
            return None
        directory_end = record[zipfile._ECD_LOCATION]
        if record[zipfile._ECD_SIGNATURE] == zipfile.stringEndArchive64:
            directory_end -= zipfile.sizeEndCentDir64 + zipfile.sizeEndCentDir64Locator
        position = directory_end - record[zipfile._ECD_SIZE]
        if position < 0:
            return None
        f.seek(position)
        count = 0
        while position < directory_end and count <= most:
            fixed = f.read(CENTRAL_ENTRY.size)
            if len(fixed) < CENTRAL_ENTRY.size or fixed[:4] != b"PK\x01\x02":
                return count  # zipfile stops here too, refusing the archive after as many entries
            entry = CENTRAL_ENTRY.unpack(fixed)
            variable = entry[12] + entry[13] + entry[14]  # name, extra field, comment
            position = f.seek(variable, os.SEEK_CUR)
            count += 1
        return count


def _require_zip_container(source: Path, filename: str) -> None:
    """Both accepted formats are zip containers; name what anything else looks like."""
    with open(source, "rb") as f:
        head = f.read(8)
    if head.startswith(ZIP_MAGICS):
        return
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise _pickled(f"{filename!r} is a pickle; pickles are never loaded. Upload a zip of images or an npz.")
    if head.startswith(b"\x93NUMPY"):
        raise _unsupported(f"{filename!r} is a single .npy array; upload an .npz with images and labels.")
    raise _unsupported(f"{filename!r} is neither a zip of image folders nor an .npz.")


def _check_entries(entries: list[zipfile.ZipInfo], limits: DatasetLimits) -> None:
    """Refuse from the headers alone what would be too big to read; reading counts bytes as well."""
    declared = sum(info.file_size for info in entries)
    if declared > limits.max_unpacked_bytes:
        raise _too_large(f"the archive unpacks to {declared} bytes; the limit is {limits.max_unpacked_bytes}.")
    for info in entries:
        if info.flag_bits & 0x1:
            raise _invalid(f"zip entry {info.filename!r} is encrypted.")
        if info.file_size >= RATIO_CHECK_MIN_BYTES and info.file_size > MAX_COMPRESSION_RATIO * info.compress_size:
            raise DatasetError(422, "Zip bomb refused",
                               f"zip entry {info.filename!r} claims {info.file_size} bytes from "
                               f"{info.compress_size} compressed (more than {MAX_COMPRESSION_RATIO}:1).")


class _UnpackBudget:
    """Counts bytes as they are inflated, so a header that understates sizes cannot pass the limit."""

    def __init__(self, limit: int):
        self.limit = limit
        self.spent = 0

    def spend(self, n: int) -> None:
        self.spent += n
        if self.spent > self.limit:
            raise _too_large(f"the archive unpacks to more than {self.limit} bytes.")


class _CountedEntry(io.RawIOBase):
    """A zip entry read as a stream (Pillow takes it as a file): nothing is held whole but the decoded image, and
    every inflated byte is spent from the budget as it is read (a re-read after a seek back counts again)."""

    def __init__(self, member: BinaryIO, budget: _UnpackBudget):
        super().__init__()
        self.member, self.budget = member, budget

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.member.read(len(buffer))
        self.budget.spend(len(data))
        buffer[:len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.member.seek(offset, whence)

    def tell(self) -> int:
        return self.member.tell()

    def close(self) -> None:
        self.member.close()
        super().close()


# What zipfile raises for an entry it cannot inflate (a local name that is not UTF-8: ValueError)
ZIP_ENTRY_ERRORS = (zipfile.BadZipFile, zlib.error, NotImplementedError, EOFError, OSError, ValueError)


@contextmanager
def _open_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, budget: _UnpackBudget) -> Iterator[BinaryIO]:
    try:
        member = archive.open(info)
    except ZIP_ENTRY_ERRORS as exc:
        raise _invalid(f"zip entry {info.filename!r} could not be read: {exc}") from None
    with io.BufferedReader(_CountedEntry(member, budget), ENTRY_BUFFER) as entry:
        yield entry


def _check_class_names(names: list[str], source: str, max_classes: int) -> None:
    if len(names) > max_classes:
        raise _invalid(f"{source} has {len(names)} names; at most {max_classes} classes are taken.")
    if not names or any(not isinstance(name, str) or not name or "\x00" in name for name in names):
        raise _invalid(f"{source} must be a non-empty list of non-empty strings.")
    if any(len(name) > MAX_CLASS_NAME_LENGTH for name in names):
        raise _invalid(f"{source}: each name is at most {MAX_CLASS_NAME_LENGTH} characters.")
    if len(set(names)) != len(names):
        raise _invalid(f"{source} has duplicates.")


def _split_summary(labels: np.ndarray, class_names: list[str] | None, labeled: bool) -> dict:
    summary: dict = {"count": int(len(labels))}
    if labeled:
        counts = np.bincount(labels, minlength=len(class_names))
        summary["per_class"] = {name: int(count) for name, count in zip(class_names, counts, strict=True)}
    return summary


class _CanonicalWriter:
    """Writes the canonical npz member by member: stored, not compressed, with fixed entry headers."""

    def __init__(self, out: BinaryIO):
        self._zip = zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True)

    @contextmanager
    def array(self, key: str, dtype: np.dtype, shape: tuple[int, ...]) -> Iterator[BinaryIO]:
        """A stream taking the C-order bytes of one array, behind its .npy header."""
        info = zipfile.ZipInfo(f"{key}.npy", date_time=CANONICAL_ZIP_TIME)
        with self._zip.open(info, "w", force_zip64=True) as member:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                      "shape": tuple(int(n) for n in shape)}
            np.lib.format.write_array_header_1_0(member, header)
            yield member

    def write(self, key: str, values: np.ndarray) -> None:
        with self.array(key, values.dtype, values.shape) as member:
            member.write(np.ascontiguousarray(values).tobytes())

    def __enter__(self) -> "_CanonicalWriter":
        return self

    def __exit__(self, *exc) -> None:
        self._zip.close()


# ---------------------------------------------------------------- zip of image folders


@dataclass(frozen=True)
class _ImageEntry:
    info: zipfile.ZipInfo
    path: str  # normalised, "/"-separated
    split: str
    class_folder: str | None


def _entry_parts(name: str) -> list[str] | None:
    """Path components of an entry, or None for one that holds no image (folders, dotfiles, __MACOSX)."""
    unified = name.replace("\\", "/")
    if unified.startswith("/") or WINDOWS_DRIVE.match(unified) or ".." in unified.split("/"):
        # Never extracted, but an archive carrying such names is hostile or broken either way.
        raise DatasetError(422, "Unsafe zip entry",
                           f"zip entry {name!r} points outside the archive (absolute path or '..').")
    if unified.endswith("/"):
        return None
    parts = [part for part in unified.split("/") if part not in ("", ".")]
    if not parts or parts[0] == "__MACOSX" or any(part.startswith(".") for part in parts):
        return None
    return parts


def _image_entries(files: list[zipfile.ZipInfo]) -> list[_ImageEntry]:
    located = [(info, parts) for info in files if (parts := _entry_parts(info.filename)) is not None]
    if not located:
        raise _invalid("the archive holds no images.")
    # Split folders only when every image sits under one; otherwise "train" is just a class name.
    split_layout = all(len(parts) >= 2 and parts[0] in SPLITS for _, parts in located)
    entries, seen = [], set()
    for info, parts in located:
        split, rest = (parts[0], parts[1:]) if split_layout else ("train", parts)
        if len(rest) > 2:
            raise _invalid(f"zip entry {info.filename!r} is nested too deeply; "
                           "expected [train|val|test/]class/image or [train|val|test/]image.")
        path = "/".join(parts)
        if path in seen:
            raise _invalid(f"zip entry {info.filename!r} appears more than once.")
        seen.add(path)
        entries.append(_ImageEntry(info, path, split, rest[0] if len(rest) == 2 else None))
    if len({entry.class_folder is None for entry in entries}) > 1:
        raise _invalid("some images are in class folders and some are not; use class folders for all "
                       "(labeled) or for none (unlabeled).")
    return entries


def _probe_image(entry: BinaryIO, name: str, limits: DatasetLimits) -> tuple[int, int]:
    """Width and height from the image header, without decoding the pixels (or reading them)."""
    try:
        with Image.open(entry, formats=IMAGE_FORMATS) as image:
            size = image.size
    except DatasetError:  # the unpack budget, spent while Pillow read
        raise
    except Image.DecompressionBombError as exc:
        raise DatasetError(422, "Image too large", f"zip entry {name!r}: {exc}") from None
    except Image.UnidentifiedImageError:
        raise _invalid(f"zip entry {name!r} is not an image in a supported format "
                       f"({', '.join(IMAGE_FORMATS)}).") from None
    except Exception as exc:  # Pillow's plugins, and zipfile under them, raise many exception types
        raise _invalid(f"zip entry {name!r} is not a decodable image: {exc}") from None
    if size[0] * size[1] > limits.max_image_pixels:
        raise DatasetError(422, "Image too large", f"zip entry {name!r} is {size[0]}x{size[1]}, more than "
                                                   f"{limits.max_image_pixels} pixels.")
    return size


def _decode_image(entry: BinaryIO, name: str, size: tuple[int, int]) -> bytes:
    """RGB bytes of the image at `size` (width, height), resized bilinearly when it differs."""
    try:
        with Image.open(entry, formats=IMAGE_FORMATS) as image:
            rgb = image.convert("RGB")
    except DatasetError:
        raise
    except Exception as exc:  # as in _probe_image
        raise _invalid(f"zip entry {name!r} could not be decoded: {exc}") from None
    if rgb.size != size:
        rgb = rgb.resize(size, Image.Resampling.BILINEAR)
    return rgb.tobytes()


def _write_names(writer: _CanonicalWriter, class_names: list[str] | None, templates: list[str] | None) -> None:
    for key, values in (("class_names", class_names), ("templates", templates)):
        if values is not None:
            writer.write(key, np.array(values, dtype=str))


def _ingest_image_zip(archive: zipfile.ZipFile, files: list[zipfile.ZipInfo], writer: _CanonicalWriter,
                      limits: DatasetLimits, class_names: list[str] | None,
                      templates: list[str] | None) -> DatasetSummary:
    entries = _image_entries(files)
    if len(entries) > limits.max_images:
        raise _too_large(f"the archive holds {len(entries)} images; the limit is {limits.max_images}.")
    _check_entries([entry.info for entry in entries], limits)

    labeled = entries[0].class_folder is not None
    if labeled:
        folders = sorted({entry.class_folder for entry in entries})
        _check_class_names(folders, "the archive's class folders", limits.max_classes)
        if class_names is not None and set(class_names) != set(folders):
            raise _invalid(f"class_names {sorted(class_names)} do not match the class folders {folders}.")
        class_names = class_names or folders
    label_of = {name: label for label, name in enumerate(class_names or [])}

    def label(entry: _ImageEntry) -> int:
        return label_of[entry.class_folder] if labeled else -1

    # Sorted by split, class, then path: the same upload always gives the same bytes.
    entries.sort(key=lambda entry: (SPLITS.index(entry.split), label(entry), entry.path))

    # First pass: headers only, so the output size is known before anything is decoded.
    budget = _UnpackBudget(limits.max_unpacked_bytes)
    probed = []
    for entry in entries:
        with _open_entry(archive, entry.info, budget) as stream:
            probed.append(_probe_image(stream, entry.path, limits))
    if (source_pixels := sum(w * h for w, h in probed)) > limits.max_source_pixels:
        raise _too_large(f"the images hold {source_pixels} pixels before resizing; the limit is "
                         f"{limits.max_source_pixels}.")
    sizes = set(probed)
    width, height = sizes.pop() if len(sizes) == 1 else (limits.resize_to, limits.resize_to)
    _check_decoded(len(entries), height, width, limits)

    budget = _UnpackBudget(limits.max_unpacked_bytes)
    splits = {}
    for split in SPLITS:
        in_split = [entry for entry in entries if entry.split == split]
        if not in_split:
            continue
        with writer.array(f"{split}_images", np.uint8, (len(in_split), height, width, 3)) as member:
            for entry in in_split:
                with _open_entry(archive, entry.info, budget) as stream:
                    member.write(_decode_image(stream, entry.path, (width, height)))
        labels = np.array([label(entry) for entry in in_split], dtype=np.int64)
        writer.write(f"{split}_labels", labels)
        splits[split] = _split_summary(labels, class_names, labeled)
    _write_names(writer, class_names, templates)
    return DatasetSummary("zip", labeled, class_names, splits, [height, width, 3], templates)


# ---------------------------------------------------------------- npz


def _npy_header(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from a member's .npy header: checked before np.load allocates anything."""
    try:
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(member)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(member)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
    except (ValueError, SyntaxError, zipfile.BadZipFile, zlib.error, NotImplementedError, EOFError,
            OSError) as exc:
        raise _invalid(f"npz member {info.filename!r} is not a readable .npy array: {exc}") from None
    if any(side < 0 for side in shape):  # numpy's header reader takes them; they would offset other counts
        raise _invalid(f"npz member {info.filename!r} declares a negative dimension: shape {list(shape)}.")
    if dtype.hasobject:
        raise _pickled(f"npz member {info.filename!r} is an object array, which only pickle can load; "
                       "pickled arrays are refused. Save plain numeric arrays.")
    if math.prod(shape) * dtype.itemsize > info.file_size:
        raise _invalid(f"npz member {info.filename!r} declares shape {shape} but holds fewer bytes.")
    return shape, dtype


def _npz_layout(keys: set[str]) -> dict[str, tuple[str, str]]:
    """{split: (images key, labels key)} for the splits the keys describe."""
    if "images" in keys:
        layout = {"train": ("images", "labels")}
    else:
        layout = {split: (f"{split}_images", f"{split}_labels") for split in SPLITS if f"{split}_images" in keys}
    if not layout:
        raise _invalid("the npz has no 'images' array (nor train_images, val_images, test_images).")
    allowed = {"class_names", "templates"} | {key for pair in layout.values() for key in pair}
    if unknown := keys - allowed:
        raise _invalid(f"the npz has unexpected arrays {sorted(unknown)}; expected {sorted(allowed)}.")
    return layout


def _check_npz_headers(headers: dict[str, tuple[tuple[int, ...], np.dtype]], layout: dict[str, tuple[str, str]],
                       limits: DatasetLimits) -> tuple[int, int]:
    """Validate dtypes and shapes before loading; returns the common (height, width)."""
    image_sizes = set()
    for images_key, labels_key in layout.values():
        shape, dtype = headers[images_key]
        if dtype != np.uint8:
            raise _invalid(f"{images_key} must be uint8, got {dtype}.")
        if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 3, 4)):
            raise _invalid(f"{images_key} must be [N,H,W] or [N,H,W,C] with C in 1, 3, 4; got shape {list(shape)}.")
        if 0 in shape:
            raise _invalid(f"{images_key} is empty (shape {list(shape)}).")
        if shape[1] * shape[2] > limits.max_image_pixels:
            raise DatasetError(422, "Image too large", f"{images_key} images are {shape[1]}x{shape[2]}, more "
                                                       f"than {limits.max_image_pixels} pixels.")
        image_sizes.add(shape[1:3])
        if labels_key in headers:
            labels_shape, labels_dtype = headers[labels_key]
            if labels_dtype.kind not in "iu":
                raise _invalid(f"{labels_key} must be integers, got {labels_dtype}.")
            if labels_shape != shape[:1]:
                raise _invalid(f"{labels_key} has shape {list(labels_shape)}; expected [{shape[0]}] "
                               f"to match {images_key}.")
    if len(image_sizes) > 1:
        raise _invalid(f"splits have different image sizes {sorted(image_sizes)}.")
    if len({labels_key in headers for _, labels_key in layout.values()}) > 1:
        raise _invalid("some splits have labels and some do not.")
    for key, most, longest in (("class_names", limits.max_classes, MAX_CLASS_NAME_LENGTH),
                               ("templates", MAX_TEMPLATES, MAX_TEMPLATE_LENGTH)):
        if key in headers:
            shape, dtype = headers[key]
            if dtype.kind not in "US" or len(shape) != 1:
                raise _invalid(f"{key} must be a 1-D string array, got {dtype} of shape {list(shape)}.")
            # Checked here, before the array is loaded and turned into Python strings (a small, well-compressed
            # member can hold millions of them). Unicode arrays take 4 bytes a character, UTF-8 up to 4.
            if shape[0] > most:
                raise _invalid(f"{key} has {shape[0]} entries; at most {most} are taken.")
            if dtype.itemsize > 4 * longest:
                raise _invalid(f"{key} are stored as strings of {dtype.itemsize} bytes; each is at most "
                               f"{longest} characters.")
    count = sum(headers[images_key][0][0] for images_key, _ in layout.values())
    if count > limits.max_images:
        raise _too_large(f"the npz holds {count} images; the limit is {limits.max_images}.")
    height, width = image_sizes.pop()
    channels = max(shape[3] if len(shape) == 4 else 1 for shape in (headers[key][0] for key, _ in layout.values()))
    _check_decoded(count, height, width, limits, channels)
    return height, width


def _to_rgb(images: np.ndarray) -> np.ndarray:
    """[n,H,W] or [n,H,W,C] uint8 to [n,H,W,3]: gray repeated, alpha dropped (as Pillow's RGB conversion does)."""
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[3] == 1:
        return np.repeat(images, 3, axis=3)
    return images[..., :3]


def _image_rows(archive: zipfile.ZipFile, info: zipfile.ZipInfo, shape: tuple[int, ...], per_read: int,
                load_whole: Callable[[], np.ndarray]) -> Iterator[np.ndarray]:
    """A uint8 image member's rows, per_read images at a time, decompressed as they are read: np.load held the
    whole split (a 14 MiB deflated upload of 1 GB of images took 1 GB of the API's memory)."""
    row_bytes = math.prod(shape[1:])
    try:
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            _, fortran_order, _ = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)(member)
            if not fortran_order:
                for start in range(0, shape[0], per_read):
                    count = min(per_read, shape[0] - start)
                    data = member.read(count * row_bytes)
                    if len(data) != count * row_bytes:
                        raise EOFError("the member ends before its declared shape")
                    yield np.frombuffer(data, dtype=np.uint8).reshape(count, *shape[1:])
                while member.read(WRITE_CHUNK_BYTES):  # to the end, where zipfile checks the CRC
                    pass
                return
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise _invalid(f"npz array {info.filename.removesuffix('.npy')!r} could not be read: {exc}") from None
    # Fortran order (np.save writes it for an array that is Fortran- and not C-contiguous): an image's pixels are
    # not together in the file, so the array is loaded whole, as before (within the decoded-bytes limit).
    images = load_whole()
    for start in range(0, shape[0], per_read):
        yield images[start:start + per_read]


def _ingest_npz(source: Path, archive: zipfile.ZipFile, files: list[zipfile.ZipInfo], writer: _CanonicalWriter,
                limits: DatasetLimits, class_names: list[str] | None,
                templates: list[str] | None) -> DatasetSummary:
    members = {info.filename.removesuffix(".npy"): info for info in files}
    layout = _npz_layout(set(members))
    _check_entries(files, limits)
    headers = {key: _npy_header(archive, info) for key, info in members.items()}
    height, width = _check_npz_headers(headers, layout, limits)
    labeled = all(labels_key in headers for _, labels_key in layout.values())

    try:
        data = np.load(source, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise _invalid(f"the npz could not be read: {exc}") from None
    with data:
        def load(key: str) -> np.ndarray:
            try:
                return data[key]
            except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
                raise _invalid(f"npz array {key!r} could not be read: {exc}") from None

        labels = {split: load(labels_key) if labeled else None for split, (_, labels_key) in layout.items()}
        def strings(key: str) -> list[str]:
            stored = load(key)
            try:
                return [str(value) if stored.dtype.kind == "U" else value.decode() for value in stored]
            except UnicodeDecodeError:
                raise _invalid(f"{key} in the npz are not valid UTF-8.") from None

        if class_names is None and "class_names" in headers:
            class_names = strings("class_names")
            _check_class_names(class_names, "class_names in the npz", limits.max_classes)
        if templates is None and "templates" in headers:
            templates = strings("templates")
            check_templates(templates, "templates in the npz")
        if labeled:
            lowest = min(int(values.min()) for values in labels.values())
            highest = max(int(values.max()) for values in labels.values())
            if lowest < 0:
                raise _invalid(f"labels must be >= 0; found {lowest}.")
            if highest >= limits.max_classes:
                raise _invalid(f"labels go up to {highest}; at most {limits.max_classes} classes are taken.")
            if class_names is None:
                class_names = [str(label) for label in range(highest + 1)]
            elif highest >= len(class_names):
                raise _invalid(f"labels go up to {highest} but there are only {len(class_names)} class names.")

        splits = {}
        for split, (images_key, _) in layout.items():
            shape = headers[images_key][0]
            count = shape[0]
            # zipfile inflates and joins what it reads in buffers of their own: at about 5x a piece, 8 MiB pieces
            # peaked at 39 MiB for a deflated split of 1000 images at 224 pixels, 144 MiB (loaded whole: 208 MiB)
            per_read = max(1, 8 * 2**20 // (height * width * 3))
            with writer.array(f"{split}_images", np.uint8, (count, height, width, 3)) as member:
                for rows in _image_rows(archive, members[images_key], shape, per_read,
                                        lambda key=images_key: load(key)):
                    member.write(np.ascontiguousarray(_to_rgb(rows)).data.cast("B"))  # no copy to bytes
            split_labels = labels[split].astype(np.int64) if labeled else np.full(count, -1, dtype=np.int64)
            writer.write(f"{split}_labels", split_labels)
            splits[split] = _split_summary(split_labels, class_names, labeled)
    _write_names(writer, class_names, templates)
    return DatasetSummary("npz", labeled, class_names, splits, [height, width, 3], templates)

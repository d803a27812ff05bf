"""Datasets as the engine reads them, and CLIP's image preprocessing.

Canonical form (the store converts every upload to it): one .npz holding, for each split
present among train/val/test, `<split>_images` (uint8 [N,H,W,3] or [N,H,W]) and
`<split>_labels` (int64 [N]; -1 marks an unlabelled image). Class names and prompt
templates travel beside it (DatasetInput).

Which split serves what, unless a method's params name one:
- selection (a searched lambda, aTLAS's best epoch): val, else train (engine.context.SELECTION_SPLITS);
- reported accuracy: test, else val, else train (engine.context.REPORT_SPLITS).
Every reported accuracy names the split it was measured on.
"""
import struct
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from engine.context import INFERENCE_INPUT_BYTES, SPLITS, DatasetInput, MergeInputs, TaskVectorInput

Split = tuple[np.ndarray, np.ndarray]  # uint8 images [N,H,W,C], int64 labels [N]


def _mapped_member(path: Path, archive: zipfile.ZipFile, name: str) -> np.ndarray | None:
    """A read-only memory map of an uncompressed .npy member of a zip, or None if it cannot be mapped.

    The store writes canonical datasets uncompressed (ZIP_STORED), so a member's array bytes sit
    contiguously in the file after its local header and .npy header: batches are then read from
    disk (the page cache) as they are indexed, instead of the whole split into memory.
    """
    info = archive.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if local[:4] != b"PK\x03\x04":
            return None
        name_length, extra_length = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_length + extra_length)
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read(f)
        offset = f.tell()
    if fortran_order or dtype.hasobject or offset + dtype.itemsize * int(np.prod(shape)) > path.stat().st_size:
        return None
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=offset)


def load_dataset(path: Path) -> dict[str, Split]:
    """Splits of a canonical .npz: {split: (uint8 images, int64 labels)} for the splits present.

    Images are memory-mapped where the file allows it (the store's canonical files always do), so a
    split of any size costs no memory until its batches are read; labels are read whole.
    """
    path = Path(path)
    splits = {}
    with np.load(path, allow_pickle=False) as data, zipfile.ZipFile(path) as archive:
        for split in SPLITS:
            if f"{split}_images" in data and f"{split}_labels" in data:
                images = _mapped_member(path, archive, f"{split}_images.npy")
                if images is None:
                    images = data[f"{split}_images"]
                if images.dtype != np.uint8:
                    raise ValueError(f"{split}_images must be uint8, got {images.dtype}")
                splits[split] = (images, data[f"{split}_labels"].astype(np.int64))
    return splits


def split_sizes(path: Path) -> dict[str, int]:
    """Number of entries per split of a canonical .npz, reading only the labels."""
    with np.load(path, allow_pickle=False) as data:
        return {split: len(data[f"{split}_labels"]) for split in SPLITS
                if f"{split}_images" in data and f"{split}_labels" in data}


def image_side(path: Path) -> int:
    """The larger side of a canonical .npz's images, from the stored array's header only."""
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if name.endswith("_images.npy"):
                with archive.open(name) as member:
                    version = np.lib.format.read_magic(member)
                    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                            else np.lib.format.read_array_header_2_0)
                    shape = read(member)[0]
                    return max(shape[1:3]) if len(shape) >= 3 else 0
    return 0


def pick_split(sizes: dict[str, int], order: Iterable[str], dataset_name: str) -> str:
    """The first non-empty split in order, given the size of each split."""
    order = list(order)
    for split in order:
        if sizes.get(split):
            return split
    raise ValueError(f"dataset {dataset_name!r} has none of the splits {order}")


def is_labelled(split: Split) -> bool:
    return bool(len(split[1])) and bool((split[1] >= 0).all())


def _preprocess_cfg(model: torch.nn.Module) -> dict:
    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    size = cfg.get("size", getattr(model.visual, "image_size", 224))
    if isinstance(size, int):
        size = (size, size)
    return {
        "size": tuple(size),
        "mean": cfg.get("mean", open_clip.OPENAI_DATASET_MEAN),
        "std": cfg.get("std", open_clip.OPENAI_DATASET_STD),
    }


PREPROCESS_CHUNK_BYTES = 256 * 2**20  # float pixels of a batch's slice before resizing
FLOAT32_BYTES = 4


def preprocess_images(images_uint8: np.ndarray, model: torch.nn.Module) -> torch.Tensor:
    """uint8 [N,H,W,3] or [N,H,W] -> normalised float [N,3,S,S] as open_clip's eval transform does.

    Resize the shortest side to S (bicubic, antialiased), centre-crop, scale to [0, 1], normalise
    with the model's mean and std (OpenAI CLIP's unless its config says otherwise).
    """
    array = np.asarray(images_uint8)
    if array.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {array.dtype}")
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [N,H,W,3] or [N,H,W], got {tuple(np.asarray(images_uint8).shape)}")
    # In float the batch takes 12 bytes a pixel, before resizing (256 images of 2360 x 2360: 17 GB) and after
    # (256 small images resized to 4096 x 4096: 51 GB): converted a bounded slice at a time, each image's result
    # the same, and written into the batch as it is made (a concatenation held every slice beside their copy).
    height, width = _preprocess_cfg(model)["size"]
    resized = _resized_size(array.shape[1:3], (height, width))
    largest = max(array.shape[1] * array.shape[2], resized[0] * resized[1])
    step = max(1, PREPROCESS_CHUNK_BYTES // (3 * FLOAT32_BYTES * largest))
    if len(array) <= step:
        return _preprocess_slice(array, model, resized)
    batch = torch.empty((len(array), 3, height, width))
    for start in range(0, len(array), step):
        batch[start:start + step] = _preprocess_slice(array[start:start + step], model, resized)
    return batch


def images_per_batch(batch_size: int, model: torch.nn.Module) -> int:
    """batch_size, or fewer where that many of the model's inputs would pass INFERENCE_INPUT_BYTES."""
    height, width = _preprocess_cfg(model)["size"]
    return max(1, min(batch_size, INFERENCE_INPUT_BYTES // (3 * FLOAT32_BYTES * height * width)))


def _resized_size(source: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """Shortest side to the target's, aspect kept (then centre-cropped to the target)."""
    (in_h, in_w), (height, width) = source, target
    scale = max(height / in_h, width / in_w)
    return max(height, round(in_h * scale)), max(width, round(in_w * scale))


def _preprocess_slice(array: np.ndarray, model: torch.nn.Module, resized: tuple[int, int]) -> torch.Tensor:
    # a memory-mapped split's pages are read-only, and torch wants memory it may write to: copied
    images = torch.from_numpy(array if array.flags.writeable else np.array(array))
    # Channels first in memory before resizing (the same values): resized from the permuted view, the pixels
    # came out channels-last, and the contiguous() after normalising copied the whole batch once more.
    pixels = images.permute(0, 3, 1, 2).contiguous().float().div_(255.0).expand(-1, 3, -1, -1)
    height, width = _preprocess_cfg(model)["size"]
    in_h, in_w = pixels.shape[-2:]
    if (in_h, in_w) != (height, width):
        pixels = F.interpolate(pixels, size=resized, mode="bicubic", align_corners=False, antialias=True)
        top, left = (resized[0] - height) // 2, (resized[1] - width) // 2
        pixels = pixels[:, :, top:top + height, left:left + width].clamp_(0.0, 1.0)
    return normalise_pixels(pixels, model)


def normalise_pixels(pixels: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """[N,3,S,S] pixels in [0, 1] -> the model's input (mean and std of its preprocessing)."""
    cfg = _preprocess_cfg(model)
    mean = torch.tensor(cfg["mean"], dtype=pixels.dtype).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"], dtype=pixels.dtype).view(1, 3, 1, 1)
    return (pixels - mean).div_(std).contiguous()  # one new tensor, not two


@dataclass
class Task:
    """A dataset with its zero-shot head, and the task vector it belongs to (None for targets and controls)."""

    dataset: DatasetInput
    splits: dict[str, Split]
    head: torch.Tensor
    task_vector_id: str | None = None

    @property
    def name(self) -> str:
        return self.dataset.id

    @property
    def sizes(self) -> dict[str, int]:
        return {name: len(labels) for name, (_, labels) in self.splits.items()}

    def split_name(self, order: Iterable[str]) -> str:
        return pick_split(self.sizes, order, self.dataset.name)

    def split(self, order: Iterable[str]) -> Split:
        return self.splits[self.split_name(order)]

    def has_labelled(self, order: Iterable[str]) -> bool:
        """Whether one of the splits in order exists, and the first such is labelled."""
        order = list(order)
        return any(self.sizes.get(name) for name in order) and is_labelled(self.split(order))


def task_vector_by_id(inputs: MergeInputs, task_vector_id: str) -> TaskVectorInput:
    for tv in inputs.task_vectors:
        if tv.id == task_vector_id:
            return tv
    raise ValueError(f"task vector {task_vector_id!r} is not among the job's task vectors")


def dataset_by_id(inputs: MergeInputs, dataset_id: str) -> DatasetInput:
    dataset = inputs.datasets.get(dataset_id)
    if dataset is None:
        raise ValueError(f"dataset {dataset_id!r} is not among the job's datasets")
    return dataset


def class_names_of(dataset: DatasetInput, task_vector: TaskVectorInput | None = None) -> list[str]:
    """The dataset's class names, else those registered with its task vector."""
    class_names = dataset.class_names or (task_vector.class_names if task_vector else None)
    if not class_names:
        raise ValueError(f"dataset {dataset.name!r} has no class names, needed for its zero-shot head")
    return list(class_names)


def load_task(inputs: MergeInputs, dataset_id: str, heads, task_vector: TaskVectorInput | None = None) -> Task:
    """A dataset's splits and its zero-shot head (heads: engine.heads.HeadFactory)."""
    dataset = dataset_by_id(inputs, dataset_id)
    class_names = class_names_of(dataset, task_vector)
    splits = load_dataset(dataset.path)
    for split, (_, labels) in splits.items():
        if len(labels) and labels.max() >= len(class_names):
            raise ValueError(f"dataset {dataset.name!r} ({split}): label {labels.max()} but "
                             f"{len(class_names)} class names")
    head = heads(class_names, dataset.templates)
    return Task(dataset, splits, head, task_vector.id if task_vector else None)

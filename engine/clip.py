"""open_clip utilities shared by the engine: building models, zero-shot heads, evaluation.

Classification follows both papers: frozen zero-shot heads built from the text
tower and class names, applied to L2-normalised image features. A head depends
only on the base model and the class list, so it can be cached on disk.
"""
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from engine.context import ModelSpec
from engine.safetensors_io import read_header, save_tensors

# "{c}" is replaced by the class name.
DEFAULT_TEMPLATES: list[str] = [
    "a photo of a {c}.",
    "a photo of the {c}.",
    "an image of a {c}.",
    "a picture of a {c}.",
    "a close-up photo of a {c}.",
]
SPLITS = ("train", "val", "test")


def config_model_name(config: dict) -> str:
    """Registry name for a custom config: the same config always gets the same name."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    return f"tvforge-{digest}"


def _register_config(config: dict) -> str:
    name = config_model_name(config)
    if name not in open_clip.list_models():
        # open_clip registers configs from files; the registry keeps them after the file is gone.
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{name}.json"
            path.write_text(json.dumps(config))
            open_clip.add_model_config(path)
        if name not in open_clip.list_models():
            raise ValueError("model config needs embed_dim, vision_cfg and text_cfg")
    return name


def build_model(spec: ModelSpec, device: str = "cpu") -> torch.nn.Module:
    """A randomly initialised open_clip model in eval mode; weights are loaded by the caller.

    device="meta" gives names, dtypes and shapes without allocating any weights.
    """
    if (spec.architecture is None) == (spec.config is None):
        raise ValueError("give exactly one of architecture and config")
    name = spec.architecture if spec.architecture is not None else _register_config(spec.config)
    model = open_clip.create_model(name, pretrained=None, device=device)
    model.open_clip_name = name  # the tokenizer is looked up by this name
    return model.eval()


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors state dict; the header is validated first, so pickles are refused."""
    read_header(Path(path))
    return load_file(str(path))


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


def preprocess_images(images_uint8: np.ndarray, model: torch.nn.Module) -> torch.Tensor:
    """uint8 [N,H,W,3] or [N,H,W] -> normalised float [N,3,S,S] as open_clip's eval transform does.

    Resize the shortest side to S (bicubic), centre-crop, normalise with the model's mean and std.
    """
    images = torch.as_tensor(np.asarray(images_uint8))
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    if images.ndim == 3:
        images = images.unsqueeze(-1)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [N,H,W,3] or [N,H,W], got {tuple(images.shape)}")
    pixels = images.permute(0, 3, 1, 2).float().div_(255.0).expand(-1, 3, -1, -1)
    cfg = _preprocess_cfg(model)
    height, width = cfg["size"]
    in_h, in_w = pixels.shape[-2:]
    if (in_h, in_w) != (height, width):
        scale = max(height / in_h, width / in_w)
        resized = (max(height, round(in_h * scale)), max(width, round(in_w * scale)))
        pixels = F.interpolate(pixels, size=resized, mode="bicubic", align_corners=False, antialias=True)
        top, left = (resized[0] - height) // 2, (resized[1] - width) // 2
        pixels = pixels[:, :, top:top + height, left:left + width].clamp_(0.0, 1.0)
    mean = torch.tensor(cfg["mean"], dtype=pixels.dtype).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"], dtype=pixels.dtype).view(1, 3, 1, 1)
    return ((pixels - mean) / std).contiguous()


def get_tokenizer(model: torch.nn.Module):
    """The tokenizer matching a model made by build_model (open_clip's default BPE otherwise)."""
    name = getattr(model, "open_clip_name", None)
    if name is not None:
        return open_clip.get_tokenizer(name)
    context_length = getattr(model, "context_length", 77)
    return lambda texts: open_clip.tokenize(texts, context_length=context_length)


def _head_cache_path(cache_dir: Path, cache_key: str, class_names: list[str], templates: list[str]) -> Path:
    payload = json.dumps([cache_key, list(class_names), list(templates)]).encode()
    return Path(cache_dir) / f"head-{hashlib.sha256(payload).hexdigest()}.safetensors"


@torch.no_grad()
def zero_shot_head(model: torch.nn.Module, class_names: list[str], templates: list[str] = DEFAULT_TEMPLATES,
                   device: str = "cpu", cache_dir: Path | None = None, cache_key: str | None = None) -> torch.Tensor:
    """[C, D] head: per class the re-normalised mean of normalised template embeddings, times logit_scale.exp().

    With cache_dir and cache_key (which must identify the base model's weights) the head is
    read from / written to cache_dir, keyed by the key, the class names and the templates.
    """
    cache_path = None
    if cache_dir is not None and cache_key is not None:
        cache_path = _head_cache_path(cache_dir, cache_key, class_names, templates)
        if cache_path.exists():
            return load_file(str(cache_path))["head"].to(device)

    tokenizer = get_tokenizer(model)
    was_training = model.training
    model.eval()
    rows = []
    for name in class_names:
        tokens = tokenizer([template.format(c=name) for template in templates]).to(device)
        embeddings = model.encode_text(tokens, normalize=True)
        rows.append(F.normalize(embeddings.mean(dim=0), dim=-1))
    model.train(was_training)
    head = torch.stack(rows) * model.logit_scale.exp()

    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so concurrent jobs never read a half-written head.
        fd, tmp_name = tempfile.mkstemp(dir=cache_path.parent, suffix=".tmp")
        os.close(fd)
        save_tensors(Path(tmp_name), {"head": head.detach().float().cpu().contiguous()})
        os.replace(tmp_name, cache_path)
    return head


def image_logits(model: torch.nn.Module, pixel_batch: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """[N, C] logits: L2-normalised image features times the (already scaled) head."""
    features = model.encode_image(pixel_batch, normalize=True)
    return features @ head.to(features.dtype).T


@torch.no_grad()
def evaluate_accuracy(model: torch.nn.Module, images_uint8: np.ndarray, labels: np.ndarray, head: torch.Tensor,
                      batch_size: int = 256, device: str = "cpu") -> float:
    """Top-1 accuracy of model + head on uint8 images, in eval mode (the mode is restored after)."""
    if len(images_uint8) == 0:
        raise ValueError("no images to evaluate")
    was_training = model.training
    model.eval().to(device)
    head = head.to(device)
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    correct = 0
    for start in range(0, len(images_uint8), batch_size):
        pixels = preprocess_images(images_uint8[start:start + batch_size], model).to(device)
        predictions = image_logits(model, pixels, head).argmax(dim=-1).cpu()
        correct += int((predictions == labels[start:start + batch_size]).sum())
    model.train(was_training)
    return correct / len(images_uint8)


def load_dataset(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Splits of a canonical .npz: {split: (uint8 images [N,H,W,3], int64 labels)} for the splits present."""
    splits = {}
    with np.load(path, allow_pickle=False) as data:
        for split in SPLITS:
            if f"{split}_images" in data and f"{split}_labels" in data:
                images = data[f"{split}_images"]
                if images.dtype != np.uint8:
                    raise ValueError(f"{split}_images must be uint8, got {images.dtype}")
                splits[split] = (images, data[f"{split}_labels"].astype(np.int64))
    return splits


__all__ = [
    "DEFAULT_TEMPLATES", "build_model", "config_model_name", "evaluate_accuracy", "get_tokenizer", "image_logits",
    "load_dataset", "load_state_dict_file", "preprocess_images", "zero_shot_head",
]

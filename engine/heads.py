"""Zero-shot classification heads, as both papers use them.

For each class, the prompt templates are filled with the class name, embedded by the
frozen text tower and L2-normalised; their mean, normalised again, is the class's row.
The head is those rows times logit_scale.exp(), applied to L2-normalised image features.
A dataset may bring its own templates (the papers use per-dataset templates); otherwise
DEFAULT_TEMPLATES are used. A head depends only on the base model, the class names and
the templates, so it is cached on disk under that key.
"""
import hashlib
import json
import os
import tempfile
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from engine.context import DEFAULT_TEMPLATES, JobContext, MergeInputs
from engine.safetensors_io import save_tensors
from engine.weights import file_sha256


def get_tokenizer(model: torch.nn.Module):
    """The tokenizer matching a model made by engine.weights.build_model (open_clip's default BPE otherwise)."""
    name = getattr(model, "open_clip_name", None)
    if name is not None:
        return open_clip.get_tokenizer(name)
    context_length = getattr(model, "context_length", 77)
    return lambda texts: open_clip.tokenize(texts, context_length=context_length)


def _head_cache_path(cache_dir: Path, cache_key: str, class_names: list[str], templates: list[str]) -> Path:
    payload = json.dumps([cache_key, list(class_names), list(templates)]).encode()
    return Path(cache_dir) / f"head-{hashlib.sha256(payload).hexdigest()}.safetensors"


@torch.no_grad()
def zero_shot_head(model: torch.nn.Module, class_names: list[str], templates: list[str] | None = None,
                   device: str = "cpu", cache_dir: Path | None = None, cache_key: str | None = None) -> torch.Tensor:
    """[C, D] head: per class the re-normalised mean of normalised template embeddings, times logit_scale.exp().

    With cache_dir and cache_key (which must identify the base model's weights) the head is
    read from / written to cache_dir, keyed by the key, the class names and the templates.
    """
    templates = list(templates or DEFAULT_TEMPLATES)
    cache_path = None
    if cache_dir is not None and cache_key is not None:
        cache_path = _head_cache_path(cache_dir, cache_key, class_names, templates)
        if cache_path.exists():
            head = load_file(str(cache_path))["head"].to(device)
            os.utime(cache_path)  # recently used: prune_head_cache drops the least recently used first
            return head

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


def prune_head_cache(cache_dir: Path, max_bytes: int) -> int:
    """Remove the least recently used cached heads until the cache holds at most max_bytes; returns how many."""
    files = sorted((p for p in Path(cache_dir).glob("head-*.safetensors")), key=lambda p: p.stat().st_mtime)
    total = sum(p.stat().st_size for p in files)
    removed = 0
    for path in files:
        if total <= max_bytes:
            break
        total -= path.stat().st_size
        path.unlink(missing_ok=True)
        removed += 1
    return removed


class HeadFactory:
    """Zero-shot heads of the base model, cached under ctx.cache_dir keyed by the base file's content."""

    def __init__(self, model: torch.nn.Module, inputs: MergeInputs, ctx: JobContext):
        self.model, self.ctx = model, ctx
        self.cache_key = None
        if ctx.cache_dir is not None:
            spec = inputs.base_spec.architecture or json.dumps(inputs.base_spec.config, sort_keys=True)
            self.cache_key = f"{spec}:{file_sha256(inputs.base_path)}"

    def __call__(self, class_names: list[str], templates: list[str] | None = None) -> torch.Tensor:
        return zero_shot_head(self.model, class_names, templates, device=self.ctx.device,
                              cache_dir=self.ctx.cache_dir, cache_key=self.cache_key)


def image_logits(model: torch.nn.Module, pixel_batch: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """[N, C] logits: L2-normalised image features times the (already scaled) head."""
    features = model.encode_image(pixel_batch, normalize=True)
    return features @ head.to(features.dtype).T

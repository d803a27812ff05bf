"""Building open_clip models and loading weights: the base model, task vectors, merged checkpoints."""
import contextlib
import hashlib
import json
import math
import tempfile
import threading
from pathlib import Path

import open_clip
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from engine.context import MergeInputs, ModelSpec
from engine.safetensors_io import read_header
from engine.task_vectors import TaskVectorFile


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# Bounds on the numbers of an open_clip config that drive a model's size or the time to build it,
# checked before anything is built (a config is user input: one number can ask for terabytes).
CONFIG_BOUNDS: dict[str, tuple[int, int]] = {
    "embed_dim": (1, 16384), "width": (1, 16384), "layers": (1, 128), "heads": (1, 512),
    "head_width": (1, 4096), "patch_size": (1, 1024), "image_size": (1, 4096), "context_length": (1, 4096),
    "vocab_size": (1, 1_000_000), "mlp_ratio": (1, 16),
}
MAX_PATCHES = 65536

_registry_lock = threading.Lock()
_config_dir: Path | None = None


def config_model_name(config: dict) -> str:
    """Registry name for a custom config: the same config always gets the same name."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    return f"tvforge-{digest}"


def check_config(config: dict) -> None:
    """Refuse a config whose sizes are out of CONFIG_BOUNDS, before anything is built (ValueError)."""
    if not isinstance(config, dict) or not all(isinstance(config.get(k), dict) for k in ("vision_cfg", "text_cfg")):
        raise ValueError("model config needs embed_dim, vision_cfg and text_cfg")
    for where, values in (("", config), ("vision_cfg.", config["vision_cfg"]), ("text_cfg.", config["text_cfg"])):
        for key, (low, high) in CONFIG_BOUNDS.items():
            value = values.get(key)
            for number in (value if isinstance(value, list | tuple) else [value]):
                if number is None:
                    continue
                if not isinstance(number, int | float) or isinstance(number, bool) or not low <= number <= high:
                    raise ValueError(f"{where}{key} must be a number in [{low}, {high}], got {number!r}")
    vision = config["vision_cfg"]
    size, patch = vision.get("image_size", 224), vision.get("patch_size", 16)
    sides = size if isinstance(size, list | tuple) else [size, size]
    if isinstance(patch, int | float) and math.prod(max(1, int(side // patch)) for side in sides) > MAX_PATCHES:
        raise ValueError(f"vision_cfg asks for more than {MAX_PATCHES} patches per image")


def _register_config(config: dict) -> str:
    """open_clip registers configs from files, rescanning all of them on each registration: the files live in
    one directory for the process's lifetime, and a lock keeps concurrent registrations apart."""
    global _config_dir
    name = config_model_name(config)
    with _registry_lock:
        if name not in open_clip.list_models():
            if _config_dir is None:
                _config_dir = Path(tempfile.mkdtemp(prefix="tvforge-configs-"))
            path = _config_dir / f"{name}.json"
            path.write_text(json.dumps(config))
            open_clip.add_model_config(path)
        if name not in open_clip.list_models():
            raise ValueError("model config needs embed_dim, vision_cfg and text_cfg")
    return name


def check_architecture(name: str) -> None:
    """Only open_clip's own model names: no 'hf-hub:' or 'local-dir:' schema that would read elsewhere."""
    if ":" in name or name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {name!r}")


def build_model(spec: ModelSpec, device: str = "cpu") -> torch.nn.Module:
    """A randomly initialised open_clip model in eval mode; weights are loaded by the caller.

    device="meta" gives names, dtypes and shapes without allocating any weights: the model is
    constructed under torch.device("meta"), so not even a transient CPU copy is made.
    """
    if (spec.architecture is None) == (spec.config is None):
        raise ValueError("give exactly one of architecture and config")
    if spec.architecture is not None:
        check_architecture(spec.architecture)
        name = spec.architecture
    else:
        check_config(spec.config)
        name = _register_config(spec.config)
    with torch.device("meta") if device == "meta" else contextlib.nullcontext():
        model = open_clip.create_model(name, pretrained=None, device=device)
    model.open_clip_name = name  # the tokenizer is looked up by this name
    return model.eval()


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors state dict; the header is validated first, so pickles are refused."""
    read_header(Path(path))
    return load_file(str(path))


def load_base_model(inputs: MergeInputs, device: str) -> torch.nn.Module:
    """The base open_clip model with theta_0 loaded, every weight frozen, in eval mode, on device."""
    model = build_model(inputs.base_spec)
    model.load_state_dict(load_state_dict_file(inputs.base_path))
    model.requires_grad_(False)
    return model.to(device).eval()


def load_float_deltas(path: Path, model_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A task vector's floating-point tensors that the model has, dense (LoRA factors multiplied out), float32."""
    return TaskVectorFile(path).float_deltas(model_tensors)


class InPlaceWeights:
    """Sets a model's tensors to origin + scale * delta in place, the origin read from its file: theta_0, or a
    start checkpoint (chaining) for the weights a merge is written onto.

    Re-reading the origin from its memory map keeps one model copy in memory,
    and restores it exactly (no drift from adding and subtracting deltas).
    """

    def __init__(self, model: torch.nn.Module, base_path: Path, start_path: Path | None = None):
        self.tensors = model.state_dict(keep_vars=True)
        self.base_path, self.start_path = base_path, start_path
        self._start_names = set(read_header(start_path).tensors) & set(self.tensors) if start_path else set()
        self._touched: set[str] = set()  # tensors that differ from theta_0

    @torch.no_grad()
    def load(self, deltas: dict[str, torch.Tensor], scale: float = 1.0, onto_start: bool = True) -> None:
        """origin + scale * deltas, the origin being the start checkpoint if there is one and onto_start, else
        theta_0; restore() returns to theta_0."""
        from_start = onto_start and self.start_path is not None
        origin = self.start_path if from_start else self.base_path
        set_now = set(deltas) | (self._start_names if from_start else set())
        with safe_open(str(origin), framework="pt") as source:
            for name in sorted(self._touched | set_now):
                value = source.get_tensor(name).float()
                if name in deltas:
                    value = value + scale * deltas[name]
                self.tensors[name].copy_(value)
        self._touched = set_now

    @torch.no_grad()
    def load_checkpoint(self, path: Path) -> None:
        """Every tensor from a full state dict (a merged checkpoint); restore() returns to theta_0."""
        with safe_open(str(path), framework="pt") as checkpoint:
            names = checkpoint.keys()  # a safe_open handle is not iterable
            for name in names:
                if name in self.tensors:
                    self.tensors[name].copy_(checkpoint.get_tensor(name))
                    self._touched.add(name)

    def restore(self) -> None:
        self.load({}, onto_start=False)

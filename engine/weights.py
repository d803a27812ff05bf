"""Building open_clip models and loading weights: the base model, task vectors, merged checkpoints."""
import contextlib
import dataclasses
import hashlib
import inspect
import json
import math
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import open_clip
import open_clip.factory
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
# A fixed sin-cos position embedding is computed in numpy on the CPU even for a meta-device build (patches x width
# float64 values and their temporaries, about 21 bytes each: 0.7 GB at 65536 patches x 512); ViT-bigG at 448
# pixels would need 1.7e6.
MAX_SIN_COS_ENTRIES = 1 << 22
# The config values that are dicts, passed to open_clip's layers and tokenizer as keyword arguments: only keys
# that change arithmetic, never a path (SimpleTokenizer's bpe_path opens any file), a device or a dtype
# (LayerNorm's).
KWARGS_ALLOWED: dict[str, dict[str, tuple]] = {
    "act_kwargs": {"approximate": ("none", "tanh")},
    "norm_kwargs": {"eps": (int, float), "elementwise_affine": (bool,), "bias": (bool,)},
    "tokenizer_kwargs": {"clean": ("lower", "whitespace", "canonicalize")},
}
POS_EMBED_TYPES = ("learnable", "sin_cos_2d")
MAX_CONFIG_BYTES = 16 * 1024  # ViT-bigG's config is under 1 KiB
# Towers built by timm or Hugging Face, and Hugging Face tokenizers, load code and files from elsewhere (and would
# read a path given as a model name; the service runs offline): a custom config uses open_clip's own towers and
# tokenizer only. That leaves out open_clip's CLIPA and "worldwide" configs, whose tokenizers come from the Hub.
FOREIGN_TOWER_KEYS = {"timm_model_name", "timm_model_pretrained", "hf_model_name", "hf_model_pretrained",
                      "hf_tokenizer_name"}
CONFIG_KEYS = {
    "": (set(inspect.signature(open_clip.model.CLIP.__init__).parameters) - {"self", "cast_dtype", "output_dict"})
        | {"custom_text"},
    "vision_cfg.": {field.name for field in dataclasses.fields(open_clip.model.CLIPVisionCfg)} - FOREIGN_TOWER_KEYS,
    "text_cfg.": {field.name for field in dataclasses.fields(open_clip.model.CLIPTextCfg)} - FOREIGN_TOWER_KEYS,
}

_registry_lock = threading.Lock()
_config_holds: Counter[str] = Counter()  # registrations in progress or kept, by name


def config_model_name(config: dict) -> str:
    """Registry name for a custom config: the same config always gets the same name."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    return f"tvforge-{digest}"


def check_config(config: dict) -> None:
    """Refuse a config whose sizes are out of CONFIG_BOUNDS, before anything is built (ValueError)."""
    if not isinstance(config, dict) or not all(isinstance(config.get(k), dict) for k in ("vision_cfg", "text_cfg")):
        raise ValueError("model config needs embed_dim, vision_cfg and text_cfg")
    if len(json.dumps(config)) > MAX_CONFIG_BYTES:
        raise ValueError(f"model config is over {MAX_CONFIG_BYTES} bytes as JSON")
    for where, values in (("", config), ("vision_cfg.", config["vision_cfg"]), ("text_cfg.", config["text_cfg"])):
        unknown = sorted(set(values) - CONFIG_KEYS[where] - {"vision_cfg", "text_cfg"})
        if foreign := [key for key in unknown if key in FOREIGN_TOWER_KEYS]:
            raise ValueError(f"model config names towers or a tokenizer from timm or the Hugging Face Hub "
                             f"({', '.join(where + key for key in foreign)}); this service builds open_clip's own "
                             f"and does not load code or files from elsewhere")
        if "multimodal_cfg" in unknown:
            raise ValueError("model config is a CoCa model's (multimodal_cfg); only CLIP models are supported")
        if unknown:
            raise ValueError(f"model config has keys open_clip's CLIP does not take: "
                             f"{', '.join(where + key for key in unknown)}")
        _check_values(where, values)
        for key, (low, high) in CONFIG_BOUNDS.items():
            value = values.get(key)
            for number in (value if isinstance(value, list | tuple) else [value]):
                if number is None:
                    continue
                if not isinstance(number, int | float) or isinstance(number, bool) or not low <= number <= high:
                    raise ValueError(f"{where}{key} must be a number in [{low}, {high}], got {number!r}")
    vision = config["vision_cfg"]
    image = _pair(vision.get("image_size", 224), "image_size")
    if vision.get("patch_size", 16) is None:  # a ResNet tower: no patches
        return
    patch = _pair(vision.get("patch_size", 16), "patch_size")
    patches = math.prod(max(1, side // step) for side, step in zip(image, patch, strict=True))
    if patches > MAX_PATCHES:
        raise ValueError(f"vision_cfg asks for more than {MAX_PATCHES} patches per image")
    if vision.get("pos_embed_type", "learnable") not in POS_EMBED_TYPES:
        raise ValueError(f"vision_cfg.pos_embed_type must be one of {', '.join(POS_EMBED_TYPES)}")
    if vision.get("pos_embed_type") == "sin_cos_2d" and patches * vision.get("width", 768) > MAX_SIN_COS_ENTRIES:
        raise ValueError(f"vision_cfg's sin-cos position embedding would hold {patches * vision.get('width', 768):,} "
                         f"values (patches x width), over {MAX_SIN_COS_ENTRIES:,}: it is computed on the CPU")


def _check_values(where: str, values: dict) -> None:
    """Every value a plain number, string, boolean or null, or a short list of numbers (open_clip's [height,
    width] and ResNet layer counts), except the keyword-argument dicts, whose keys and values are listed."""
    for key, value in values.items():
        if key in ("vision_cfg", "text_cfg") and not where:
            continue
        if key in KWARGS_ALLOWED and isinstance(value, dict):
            allowed = KWARGS_ALLOWED[key]
            for name, argument in value.items():
                if name not in allowed:
                    raise ValueError(f"{where}{key} may only set {', '.join(allowed)}, not {name!r}")
                if not _admits(allowed[name], argument):
                    kinds = ", ".join(k.__name__ if isinstance(k, type) else repr(k) for k in allowed[name])
                    raise ValueError(f"{where}{key}.{name} must be one of {kinds}, got {argument!r}")
            continue
        scalars = value if isinstance(value, list) and len(value) <= 4 else [value]
        if not all(item is None or isinstance(item, str | int | float | bool) for item in scalars):
            raise ValueError(f"{where}{key} must be a number, string, boolean or a list of at most 4 numbers")


def _admits(kinds: tuple, value) -> bool:
    """A value of one of these types (a boolean is no number here), or one of these strings."""
    if all(isinstance(kind, type) for kind in kinds):
        return isinstance(value, kinds) and isinstance(value, bool) == (bool in kinds)
    return isinstance(value, str) and value in kinds


def _pair(value, key: str) -> tuple[int, int]:
    """An image or patch size: one integer, or [height, width] (open_clip takes both)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if (isinstance(value, list | tuple) and len(value) == 2
            and all(isinstance(side, int) and not isinstance(side, bool) for side in value)):
        return value[0], value[1]
    raise ValueError(f"vision_cfg.{key} must be an integer or two integers [height, width], got {value!r}")


@contextlib.contextmanager
def _registered_config(config: dict, keep: bool) -> Iterator[str]:
    """The config in open_clip's registry while the block runs, under its config_model_name; kept afterwards
    only if keep and the block succeeded (a built model's tokenizer is looked up by that name). Registrations
    are counted, so a concurrent build of the same config keeps it until the last one ends: otherwise every
    config refused at upload (one that open_clip cannot build, or over the parameter cap) and every meta-device
    validation would stay in the registry for the process's life.

    Directly into open_clip's dict, under a lock: its add_model_config takes a file and re-reads every file
    registered before it, so each registration cost more than the last."""
    name = config_model_name(config)
    with _registry_lock:
        if _config_holds[name] == 0 and name not in open_clip.factory._MODEL_CONFIGS:
            open_clip.factory._MODEL_CONFIGS[name] = json.loads(json.dumps(config))
        _config_holds[name] += 1
    released = not keep
    try:
        yield name
    except BaseException:
        released = True
        raise
    finally:
        if released:
            with _registry_lock:
                _config_holds[name] -= 1
                if _config_holds[name] == 0:
                    del _config_holds[name]
                    open_clip.factory._MODEL_CONFIGS.pop(name, None)


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
        registered = contextlib.nullcontext(spec.architecture)
    else:
        check_config(spec.config)
        # a meta-device model only validates shapes: nothing will tokenize with it
        registered = _registered_config(spec.config, keep=device != "meta")
    with registered as name, torch.device("meta") if device == "meta" else contextlib.nullcontext():
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

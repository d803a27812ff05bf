"""What a method receives besides its parameters: inputs on disk, a device, and the job's channels."""
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# A canonical dataset's splits, and which serves what unless a method's params name one (engine.data).
SPLITS = ("train", "val", "test")
SELECTION_SPLITS = ("val", "train")  # a searched lambda, aTLAS's best epoch
REPORT_SPLITS = ("test", "val", "train")  # reported accuracy
# The float32 inputs of one inference batch at most: a model of large images is run on fewer images at a time
# (256 images at 4096 pixels a side would be 51 GB). engine.data.images_per_batch; engine.cost counts it.
INFERENCE_INPUT_BYTES = 256 * 2**20

# The zero-shot prompts of a dataset that brings none (engine.heads); "{c}" is replaced by the class name.
DEFAULT_TEMPLATES: list[str] = [
    "a photo of a {c}.",
    "a photo of the {c}.",
    "an image of a {c}.",
    "a picture of a {c}.",
    "a close-up photo of a {c}.",
]


class Cancelled(Exception):
    """Raised by JobContext.check_cancel when the job's owner asked to cancel."""


@dataclass(frozen=True)
class ModelSpec:
    """How to build the base model: an open_clip architecture name or a full open_clip config."""

    architecture: str | None = None
    config: dict | None = None


@dataclass(frozen=True)
class TaskVectorInput:
    id: str
    name: str
    path: Path
    class_names: list[str] | None = None
    magnitude_cuts: list[float] | None = None  # global top-k cuts for engine.selection.PERCENTS, if measured
    magnitude_means: dict[str, float] | None = None  # mean |tau| per tensor (engine.selection), if measured


@dataclass(frozen=True)
class DatasetInput:
    """A dataset in its canonical form (engine.data): an .npz with <split>_images and <split>_labels, and
    its class names and prompt templates (None: DEFAULT_TEMPLATES)."""

    id: str
    name: str
    path: Path
    class_names: list[str] | None = None
    templates: list[str] | None = None


@dataclass(frozen=True)
class MergeInputs:
    base_path: Path
    base_spec: ModelSpec
    task_vectors: list[TaskVectorInput]
    datasets: dict[str, DatasetInput] = field(default_factory=dict)
    # chaining: a full state dict of the same model (an earlier merge) that the merge is written onto instead of
    # theta_0; task vectors stay tau_t = theta_t - theta_0 and fine-tuned references theta_0 + tau_t
    start_path: Path | None = None

    @property
    def onto_path(self) -> Path:
        """The weights a merge adds its delta to: the start checkpoint, else theta_0."""
        return self.start_path or self.base_path


@dataclass
class Progress:
    stage: str
    step: int = 0
    total: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.total) if self.total else 0.0


@dataclass
class JobContext:
    workdir: Path
    cache_dir: Path | None = None  # survives across jobs (zero-shot heads); None disables caching
    device: str = "cpu"
    seed: int = 0
    report: Callable[[Progress], None] = lambda progress: None
    is_cancelled: Callable[[], bool] = lambda: False
    metadata: dict[str, str] = field(default_factory=dict)
    written: dict[Path, "WrittenFile"] = field(default_factory=dict)  # checkpoints the engine wrote, by path

    def check_cancel(self) -> None:
        """Call between steps: raises Cancelled once the owner asked to stop."""
        if self.is_cancelled():
            raise Cancelled()


@dataclass(frozen=True)
class WrittenFile:
    """Facts about a checkpoint taken while it was written: its sha256, size and non-finite float tensors."""

    sha256: str
    size: int
    non_finite: list[str]


@dataclass
class MethodResult:
    """A method's output: the merged full state dict on disk, metrics, and JSON artifacts by name."""

    checkpoint_path: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict)
    checkpoint_sha256: str | None = None  # set by run_method when the engine hashed the file as it wrote it

"""What a job will cost a worker, from its spec and the sizes of its inputs alone (nothing is loaded): the images
it pushes through the image tower and its peak memory. The API refuses a job over the service's bounds and
answers dry runs with these numbers; a worker refuses a job that would not fit its device. Pure arithmetic.

Memory of a training step follows Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", section 4.1): a transformer layer keeps s*b*h*(34 + 5*a*s/h) bytes of 16-bit
activations for the backward pass (s tokens, b batch, h width, a heads); in float32 that doubles.
"""
import math
from dataclasses import asdict, dataclass

from engine.context import DEFAULT_TEMPLATES, INFERENCE_INPUT_BYTES, REPORT_SPLITS, SELECTION_SPLITS

FLOAT32 = 4
# The formula counts a fused fp16 layer; open_clip's eager float32 layers keep more (a 4-layer, width-256 tower at
# batch 128 kept 850 MiB where the formula, doubled for float32, gives 665): a factor of 1.5 covers it.
EAGER_FP32_FACTOR = 1.5
INFERENCE_INPUT_COPIES = 3
SEARCH_POINTS = 30  # the largest lambda grid of the training-free methods (TSV-M, Iso-C, Iso-CTS: 0.1..3.0)
# The process before any tensor: python, torch, open_clip and the engine imported measure 0.74 GiB of RSS on
# the development machine (torch 2.14, CPU), and twice that on another install of the same versions; the
# default leaves some slack over the first. Workers pass their own (refuse_if_too_large).
RUNTIME_BYTES = 900 * 2**20
# aTLAS composes every stacked task-vector entry each step (forward, and the backward to the coefficients). Counted
# as images: an image costs about one token's pass per image-tower parameter, and a composed entry the cost of 16
# of those, 46 with K > 1 partitions (engine.methods.atlas.method.PartitionedStack), the most measured on this
# machine's CPU: ViT-B/32, 8 vectors, batch 16 (bench/results/atlas_step.json), the composition took 2.6 images'
# time at K = 1 and 7.3 at K = 64; the test suite's tiny tower (17 tokens), 64 vectors, batch 2: 19 and 55 images'
# time (factors 5 and 12). It is memory-bound, so far above its share of the arithmetic.
COMPOSED_ENTRY_COST, PARTITIONED_ENTRY_COST = 16, 46
# A LoRA block's composed multiply-add (forward, backward, and with K partitions the candidates' gather) against
# an image's pass per tower parameter: 3072 x 768, 8 vectors of rank 16, took 5.6e-11 s a multiply-add at K = 1
# and 4.1e-11 at K = 64 on this machine's CPU; a ViT-B/32 fine-tuning step of 16 images 1.92 s, 2.7e-11 s per
# image, parameter and token (bench/results/atlas_step.json).
LORA_MAC_COST = 2.1
FORWARD_COMPOSITION_SHARE = 0.4  # a composition without the backward, of one with it: 0.34-0.39 measured
# ViT image-tower blocks: 12 tensors per residual layer, 8 around them (patch embedding, class and positional
# embeddings, the two layer norms, the projection).
BLOCKS_PER_LAYER, OTHER_BLOCKS = 12, 8


@dataclass(frozen=True)
class TowerShape:
    """The image tower's size; tokens/width/heads/layers are None for a tower that is not a ViT."""

    parameters: int  # every parameter of the model (theta_0 is held whole)
    visual_parameters: int
    image_size: int
    tokens: int | None = None
    width: int | None = None
    heads: int | None = None
    layers: int | None = None

    @classmethod
    def from_config(cls, config: dict, parameters: int, visual_parameters: int) -> "TowerShape":
        """From an open_clip model config (its vision_cfg)."""
        vision = config.get("vision_cfg", {})
        height, width_px = _sides(vision.get("image_size", 224))
        image_size = max(height, width_px)  # a rectangle is costed as its larger square: an upper bound
        if vision.get("timm_model_name") or not isinstance(vision.get("layers"), int) or not vision.get("patch_size"):
            return cls(parameters, visual_parameters, image_size)
        patch_height, patch_width = _sides(vision["patch_size"])
        width = vision.get("width", 768)
        return cls(parameters, visual_parameters, image_size,
                   tokens=(height // patch_height) * (width_px // patch_width) + 1,
                   width=width, heads=max(1, width // vision.get("head_width", 64)), layers=vision["layers"])

    @property
    def work_per_parameter(self) -> int:
        """At least how many times an image uses each image-tower weight: a ViT's tokens; a convolutional tower
        applies each weight at every position of its feature map, which shrinks to image / 32 on a side at the
        last stage. A lower bound, so what is counted per parameter against images (aTLAS's composition) is not
        undercounted: RN50 at 224 pixels gives 49, where its forward pass takes about 100 multiply-adds a
        parameter."""
        return self.tokens if self.tokens is not None else max(1, (self.image_size // 32) ** 2)

    def activation_bytes(self, batch: int) -> int:
        """float32 activations kept for backward by a batch through the tower."""
        if self.tokens is None:  # not a transformer: scale by parameters, as a ViT of that size would
            return batch * 64 * self.visual_parameters // 1000
        s, h, a = self.tokens, self.width, self.heads
        return int(EAGER_FP32_FACTOR * 2 * s * batch * h * (34 + 5 * a * s / h) * self.layers)

    def image_bytes(self, images: int) -> int:
        return images * 3 * self.image_size**2 * FLOAT32

    def inference_input_bytes(self, batch: int) -> int:
        """An inference batch's preprocessed inputs and their temporaries (engine.data.preprocess_images), the
        batch cut to INFERENCE_INPUT_BYTES (engine.data.images_per_batch). Measured: a 512-pixel tower's
        evaluation of 256 small images grew the process by 2.2x its batches' inputs (85 images, 255 MiB; before
        the batch was cut and the copies removed, by 3.1x the inputs of 256 images: 2.3 GiB)."""
        return INFERENCE_INPUT_COPIES * min(self.image_bytes(batch), max(self.image_bytes(1), INFERENCE_INPUT_BYTES))


def _sides(size) -> tuple[int, int]:
    """open_clip's image and patch sizes: one integer, or [height, width] (engine.weights.check_config)."""
    return (size[0], size[1]) if isinstance(size, list | tuple) else (size, size)


@dataclass(frozen=True)
class JobEstimate:
    # through the model: images through the image tower (training steps and evaluations together), the prompts
    # of every zero-shot head through the text tower (class names x templates, once per dataset), and aTLAS's
    # composition of the task vectors each step, as the images that would take its time (composition_images)
    images: int
    peak_bytes: int
    composition_images: int = 0

    def as_dict(self) -> dict:
        return asdict(self) | {"peak_gib": round(self.peak_bytes / 2**30, 2)}


def dataset_bytes(split_sizes: dict[str, dict[str, int]], image_side: int) -> int:
    """The job's datasets held in memory as uint8 images (every split of every dataset)."""
    return sum(count for sizes in split_sizes.values() for count in sizes.values()) * 3 * image_side**2


def head_prompts(label_sets: dict[str, tuple[int, int | None]]) -> int:
    """Prompts through the text tower for the datasets' zero-shot heads: dataset id -> (classes, templates, None
    for the default ones); a head cached from an earlier job costs nothing, but the estimate cannot know."""
    return sum(classes * (templates or len(DEFAULT_TEMPLATES)) for classes, templates in label_sets.values())


def first_split(sizes: dict[str, int], order: tuple[str, ...]) -> int:
    return next((sizes[s] for s in order if sizes.get(s)), 0)


def target_images(targets: list[tuple[str, str | None]], split_sizes: dict[str, dict[str, int]],
                  order: tuple[str, ...], references: bool = False) -> int:
    """Images of one evaluation of every (dataset, task vector) target on its split: each target is its own
    pass, though several name one dataset; references: also each task vector's fine-tuned reference pass."""
    return sum(first_split(split_sizes.get(dataset_id, {}), order) * (1 + (references and tv is not None))
               for dataset_id, tv in targets)


def stacked_entries(shape: TowerShape, vector_parameters: list[int], vectors_per_block: int | None) -> int:
    """At most how many task-vector values aTLAS stacks: each vector's image-tower share, which is no more than
    the tower or than the values its file stores (LoRA factors, not their products); a memory budget of b
    vectors per block stacks at most b towers' worth."""
    entries = sum(min(shape.visual_parameters, stored) for stored in vector_parameters)
    if vectors_per_block is not None:
        entries = min(entries, vectors_per_block * shape.visual_parameters)
    return entries


def partition_padding(shape: TowerShape, partitions: int) -> int:
    """aTLAS x K: at most how many zeros PartitionedStack pads one vector's image tower with (each block's
    partitions padded to its largest). A partition of a block of n entries holds about n / K, rarely over
    n / K + 4 sqrt(n / K) + 4; summed over B blocks that is at most 4 sqrt(B n K) + 4 B K (Cauchy-Schwarz).
    Measured: 1.5% of ViT-B/32's tower at K = 64 (this bound: 4.2%), 22% of the tiny tower's (bound: 60%). A
    tower that is not a ViT is bounded by its own size."""
    if partitions == 1:
        return 0
    if shape.layers is None:
        return shape.visual_parameters
    blocks = BLOCKS_PER_LAYER * shape.layers + OTHER_BLOCKS
    return int(4 * math.sqrt(blocks * shape.visual_parameters * partitions) + 4 * blocks * partitions)


def atlas_estimate(params, shape: TowerShape, vector_parameters: list[int], split_sizes: dict[str, dict[str, int]],
                   dataset_side: int, label_sets: dict[str, tuple[int, int | None]],
                   runtime_bytes: int = RUNTIME_BYTES, lora_ranks: list[int | None] = ()) -> JobEstimate:
    """aTLAS: epochs x steps x batch training images (forward and backward), every epoch's selection
    evaluation, and memory for theta_0, the stacked vectors, the composed tower, a batch's activations and
    the datasets."""
    recipe = params.recipe
    epochs = params.epochs or recipe.epochs
    order = params.train_order
    mode = params.mode
    batch = params.batch_size
    target_classes = label_sets.get(params.target_dataset_id, (0, None))[0] if params.target_dataset_id else 0
    if mode == "addition":
        tasks = max(1, len(params.task_datasets))
        per_task = max(1, batch // tasks)
        batch = max(batch, per_task * tasks)  # every task gives at least one image a step
        train = [first_split(split_sizes.get(ds, {}), order) for ds in params.task_datasets.values()]
        steps = min((math.ceil(n / per_task) for n in train if n), default=0)
    elif mode == "few_shot":
        size = first_split(split_sizes.get(params.target_dataset_id, {}), order)
        shots = min(size, params.shots * max(1, target_classes)) if params.shots else size
        steps = max(10, math.ceil(shots / batch))
    else:
        size = first_split(split_sizes.get(params.target_dataset_id, {}), order)
        steps = math.ceil(size / max(1, batch // (2 if mode == "negation" else 1)))
    targets = params.evaluation_targets()
    selection = target_images(targets, split_sizes, SELECTION_SPLITS)
    references = target_images(targets, split_sizes, SELECTION_SPLITS, references=True) - selection
    reports = target_images(targets, split_sizes, REPORT_SPLITS, references=True)
    # ufm also passes every step's images unaugmented (its targets) and labels the whole split once first
    views = 2 if mode == "ufm" else 1
    labelling = first_split(split_sizes.get(params.target_dataset_id, {}), order) if mode == "ufm" else 0
    stacked = stacked_entries(shape, vector_parameters, params.vectors_per_block)
    padding = math.ceil(stacked / shape.visual_parameters) * partition_padding(shape, params.partitions)
    entry_cost = PARTITIONED_ENTRY_COST if params.partitions > 1 else COMPOSED_ENTRY_COST
    composition = math.ceil(entry_cost * (stacked + padding) / (shape.visual_parameters * shape.work_per_parameter))
    # LoRA vectors compose as products, K candidates of a block with K partitions: rank multiply-adds per entry
    # of the blocks they cover (at most the tower), each for K
    lora_work = params.partitions * sum(rank for rank in lora_ranks if rank)
    composition += math.ceil(LORA_MAC_COST * lora_work / shape.work_per_parameter)
    # forward-only compositions (a third to two fifths of a step's, measured): each selection target's every
    # epoch and the zero-shot's, addition's fine-tuned references, ufm's weak view each step and its labelling
    forward_compositions = ((epochs + 1) * len(targets) + (len(params.task_datasets) if mode == "addition" else 0)
                            + (epochs * steps + 1 if mode == "ufm" else 0))
    composition_images = epochs * steps * composition + math.ceil(FORWARD_COMPOSITION_SHARE * composition
                                                                  * forward_compositions)
    images = (epochs * steps * views * batch + composition_images + labelling + (epochs + 1) * selection
              + references + reports + head_prompts(label_sets))
    # the device is not known here: auto counts float32, the CPU's (CUDA's fp16 stacks take half)
    vector_bytes = 2 if params.vector_dtype in ("bfloat16", "float16") else FLOAT32
    # aTLAS x K: the stacks' padding, an int32 position per image-tower entry (the backward keeps the same
    # tensor), and while the stacks are regrouped one block's copy and its int64 indices, 5 an entry (bounded here
    # by one layer's share); a LoRA vector's block composes K candidates instead, and a vector that stores fewer
    # values than the tower may be one.
    partition_bytes = 0
    if params.partitions > 1:
        layer_share = max(1, shape.layers or 1)
        partition_bytes = (padding * vector_bytes + 4 * shape.visual_parameters
                           + (stacked * vector_bytes + 5 * 8 * shape.visual_parameters) // layer_share)
        if any(stored < shape.visual_parameters for stored in vector_parameters):
            partition_bytes += params.partitions * FLOAT32 * shape.visual_parameters // layer_share
    # ufm passes the weak view without gradient while the strong view's activations are kept: its images and at
    # most one layer's intermediates at a time (measured: 90 MiB over entropy's peak where one layer of the
    # 4-layer, width-256 tower at batch 128 counts 238).
    weak_view = shape.image_bytes(batch) + shape.activation_bytes(batch) // max(1, shape.layers or 1) \
        if mode == "ufm" else 0
    # Training and evaluation batches do not overlap: the larger of the two (an evaluation keeps no activations
    # for backward, about a quarter of a training batch's per image).
    batches = max(shape.activation_bytes(batch) + shape.image_bytes(batch) + weak_view,
                  shape.activation_bytes(params.eval_batch_size) // 4 + shape.image_bytes(params.eval_batch_size))
    peak = (runtime_bytes + shape.parameters * FLOAT32 + stacked * vector_bytes
            + 2 * shape.visual_parameters * FLOAT32 + partition_bytes + batches
            + dataset_bytes(split_sizes, dataset_side))
    return JobEstimate(images, peak, composition_images)


def search_estimate(params, shape: TowerShape, split_sizes: dict[str, dict[str, int]], grid: int,
                    dataset_side: int, runtime_bytes: int = RUNTIME_BYTES) -> JobEstimate:
    """A training-free merge: one model and one merged vector in memory; a lambda search evaluates every grid
    point on each target's val split (after each fine-tuned reference once), then the report splits once."""
    targets = params.evaluation_targets()
    searched = target_images(targets, split_sizes, SELECTION_SPLITS) if grid else 0
    references = target_images(targets, split_sizes, SELECTION_SPLITS, references=True) - searched if grid else 0
    reports = target_images(targets, split_sizes, REPORT_SPLITS, references=True)
    eval_batch = 256
    peak = (runtime_bytes + 2 * shape.parameters * FLOAT32 + shape.visual_parameters * FLOAT32
            + shape.activation_bytes(eval_batch) // 4 + shape.inference_input_bytes(eval_batch)
            + dataset_bytes(split_sizes, dataset_side))
    return JobEstimate(grid * searched + references + reports, peak)


def evaluation_estimate(items: list[tuple[str, str | None, bool]], shape: TowerShape,
                        split_sizes: dict[str, dict[str, int]], dataset_side: int,
                        label_sets: dict[str, tuple[int, int | None]],
                        runtime_bytes: int = RUNTIME_BYTES) -> JobEstimate:
    """An evaluation job: each (dataset, split or None for the report order, has a reference) passes its split
    once, and once more through its reference model; memory as a merge's evaluation (one model at a time)."""
    images = sum(first_split(split_sizes.get(dataset_id, {}), (split,) if split else REPORT_SPLITS)
                 * (1 + has_reference) for dataset_id, split, has_reference in items) + head_prompts(label_sets)
    eval_batch = 256
    peak = (runtime_bytes + 2 * shape.parameters * FLOAT32 + shape.visual_parameters * FLOAT32
            + shape.activation_bytes(eval_batch) // 4 + shape.inference_input_bytes(eval_batch)
            + dataset_bytes(split_sizes, dataset_side))
    return JobEstimate(images, peak)


def estimate_job(method: str, params, shape: TowerShape, vector_parameters: list[int],
                 split_sizes: dict[str, dict[str, int]], dataset_side: int,
                 label_sets: dict[str, tuple[int, int | None]], runtime_bytes: int = RUNTIME_BYTES,
                 lora_ranks: list[int | None] | None = None) -> JobEstimate:
    """The estimate of a `method` job with these params over task vectors storing these numbers of values (their
    files' parameter counts; lora_ranks: each one's largest LoRA rank, None for a dense one) and datasets of these
    split sizes (dataset id -> {split: images}) and label sets (dataset id -> (classes, templates or None)), whose
    images are dataset_side pixels square; runtime_bytes: the process before any tensor (a worker knows its own;
    the default is this machine's)."""
    if method == "atlas":
        return atlas_estimate(params, shape, vector_parameters, split_sizes, dataset_side, label_sets,
                              runtime_bytes, lora_ranks or [])
    grid = SEARCH_POINTS if getattr(params, "validation_datasets", None) else 0
    estimate = search_estimate(params, shape, split_sizes, grid, dataset_side, runtime_bytes)
    estimate = JobEstimate(estimate.images + head_prompts(label_sets), estimate.peak_bytes)
    calibrated = len(getattr(params, "calibration_datasets", {}) or {})
    if calibrated:  # STA: forward and backward over the calibration samples of each calibrated vector
        micro = params.micro_batch_size
        estimate = JobEstimate(estimate.images + calibrated * params.calibration_samples,
                               estimate.peak_bytes + shape.activation_bytes(micro) + shape.parameters * FLOAT32)
    return estimate

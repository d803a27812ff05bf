"""aTLAS (arXiv 2407.02880): learn one scaling coefficient per (task vector, parameter block).

theta(Lambda)[b] = theta_0[b] + sum_t Lambda[t, b] * tau_t[b] over the image tower's
parameter tensors (blocks). Each block's task vectors are stacked once into a
[n_vectors, *shape] tensor, so composing is one tensordot per block, and the
forward pass runs the frozen image tower with the composed tensors through
torch.func.functional_call. Only Lambda (zero-initialised: training starts at
the pre-trained model) requires grad. Task-vector tensors outside the image
tower get no gradient from image classification with frozen text heads; they
are not composed and stay at theta_0 (counted in metrics["uncomposed_tensors"]).

Chaining (MergeInputs.start_path, e.g. an Iso-CTS result): the composition starts from that checkpoint,
theta(Lambda) = theta_start + sum_t Lambda[t, b] * tau_t[b], and the checkpoint is written onto it; the
fine-tuned references that normalise accuracies stay theta_0 + tau_t, and the heads come from theta_0.

Training follows fredzzhang/atlas (learn_task_addition.py, learn_few_shots.py,
learn_task_negation.py): AdamW (weight decay 0.1), gradient-norm clip 1.0, fp16
autocast with loss scaling on CUDA; the schedule, the epoch length and the split
trained on per mode are in params.RECIPES. Every epoch (and before the first,
epoch 0 = zero-shot) is evaluated on the selection split (val, else train), and the
best epoch's coefficients are kept: addition by mean normalised accuracy, few-shot
entropy and UFM by target accuracy (without labelled data: the last epoch),
negation by the lowest target accuracy whose control accuracy stays >= 0.95 x
zero-shot control. Ties go to the earlier epoch.

UFM (learn_ufm.py, test-time adaptation without labels) as the paper describes it: the zero-shot model
labels the unlabelled images; per class, the k = min(N / C, 100) images it assigns to that class with the
highest probability are trusted with that label; every image's loss is the cross-entropy of its augmented
(strong) view against a target: the trusted label, or else its unaugmented (weak) view's prediction
sharpened with temperature 0.5, counted only where that target is over 0.99 confident (FixMatch). The
official code marks every image trusted (trusted_bool[ids_c] = 1 with ids_c the last class's full
ordering), selects by a class's probability whatever the image's predicted class, divides k by 10, and
multiplies the probabilities by 0.5 where a temperature was meant, which renormalisation undoes; here the
trusted set is what the paper says, and sharpening is p^(1/T) renormalised.

Deliberate deviation: the official code clips gradients before unscaling them
(scaler.unscale_ follows clip_grad_norm_), so on CUDA it clips loss-scaled
gradients, which nearly always fires; here gradients are unscaled first, so the
clip bounds the true gradient norm as intended.
"""
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

from engine.context import (
    SELECTION_SPLITS,
    JobContext,
    MergeInputs,
    MethodResult,
    Progress,
    TaskVectorInput,
)
from engine.data import (
    Task,
    images_per_batch,
    is_labelled,
    load_task,
    normalise_pixels,
    preprocess_images,
    task_vector_by_id,
)
from engine.heads import HeadFactory
from engine.methods.atlas.params import AtlasParams
from engine.metrics import (
    accuracy,
    autocast,
    chosen,
    control_kept,
    given_or_default,
    mean_normalised_accuracy,
    normalised,
)
from engine.streaming import merge_streaming
from engine.task_vectors import TaskVectorFile
from engine.weights import InPlaceWeights, load_base_model, load_float_deltas

TOWER = "visual."
CROP_SCALE = (0.5, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
FEW_SHOT_MIN_BATCHES = 10  # the official code repeats the k shots until an epoch has at least 10 batches
UFM_THRESHOLD = 0.99  # learn_ufm.py: an untrusted image counts once its sharpened target is this confident
UFM_TEMPERATURE = 0.5  # learn_ufm.py's "temp sharp"
UFM_MAX_TRUSTED = 100  # the paper's k = min(N / C, 100)
SELECTION_BATCHES = 10  # memory budget: training batches the selection's gradient is averaged over


def partition_assignment(name: str, shape: Sequence[int], partitions: int, seed: int) -> torch.Tensor:
    """aTLAS x K: which of the K partitions each entry of block `name` belongs to (uint8, uniform), drawn from a
    generator seeded by (seed, the block's name), so that the seed alone rebuilds every block's partition."""
    generator = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return torch.from_numpy(generator.integers(0, partitions, size=tuple(shape), dtype=np.uint8))


@dataclass
class LowRankStack:
    """A block's LoRA task vectors side by side: sum_t c_t B_t A_t = (B * c[owner]) @ A, one matmul whatever
    the number of vectors, and only the factors held (rank x (out + in) per vector, not out x in)."""

    b: torch.Tensor  # (out, total rank): every vector's lora_B, concatenated along the rank
    a: torch.Tensor  # (total rank, in): every vector's lora_A, stacked along the rank
    owner: torch.Tensor  # (total rank,) long: the stack slot each rank column belongs to

    @property
    def nbytes(self) -> int:
        return self.b.numel() * self.b.element_size() + self.a.numel() * self.a.element_size()

    def delta(self, column: torch.Tensor) -> torch.Tensor:
        return (self.b * column[self.owner].to(self.b.dtype)) @ self.a


class _Unpadded(torch.autograd.Function):
    """flat.index_select(0, position) for a position that repeats no entry, whose backward copies the gradient
    back in place. Indexing with autograd's own backward (an accumulating index_put) composed a 768 x 3072 block
    of 8 vectors at K = 64 in 38 ms on this machine's 2 CPUs, this in 22 ms (the block at K = 1: 9 ms)."""

    @staticmethod
    def forward(ctx, flat: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(position)
        ctx.size = flat.numel()
        return flat.index_select(0, position)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (position,) = ctx.saved_tensors
        return grad.new_zeros(ctx.size).index_copy_(0, position.long(), grad), None


@dataclass(frozen=True)
class PartitionedStack:
    """aTLAS x K: a block's stacked vectors regrouped by partition, [K, slots, m] (m: the largest partition's
    entries; the others are padded with zeros), so that the whole composition is one batched matmul (partition k:
    its coefficients times its entries) and one gather back to the block's shape: the work of one composition
    whatever K. K tensordots over the whole block and a [K, *shape] candidate, as the engine did before, cost K
    times it: with 64 vectors at batch 128 on the test suite's tiny tower a K = 64 step took 397 ms against 44 at
    K = 1; now 53 against 49 (ViT-B/32, 8 vectors, batch 16: 1.46x a fine-tuning step, K = 1 1.16x;
    bench/atlas_step.py). Gathering each entry's coefficients, or a tensordot per partition, costs no K either
    but ran 2-8x slower than this."""

    stack: torch.Tensor  # [K, slots, m]
    position: torch.Tensor  # int32 [entries]: where each entry of the block sits in the flattened [K, m]
    shape: tuple[int, ...]

    @classmethod
    def of(cls, stack: torch.Tensor, assignment: torch.Tensor, partitions: int) -> "PartitionedStack":
        flat = assignment.flatten().long()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=partitions)
        width = int(counts.max())
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(order)  # each entry's place among its partition's entries
        rank[order] = torch.arange(len(order), device=order.device) - starts[flat[order]]
        slots = stack.shape[0]
        grouped = stack.new_zeros(partitions, slots, width)
        grouped[flat, :, rank] = stack.reshape(slots, -1).T  # each entry's vector values into its place
        return cls(grouped, (flat * width + rank).to(torch.int32), tuple(stack.shape[1:]))

    @property
    def nbytes(self) -> int:
        return self.stack.numel() * self.stack.element_size() + self.position.numel() * 4

    def delta(self, columns: torch.Tensor) -> torch.Tensor:
        """sum_t columns[t, partition of the entry] * tau_t, entry by entry (columns: [slots, K])."""
        per_partition = torch.bmm(columns.to(self.stack.dtype).T.unsqueeze(1), self.stack)  # [K, 1, m]
        return _Unpadded.apply(per_partition.reshape(-1), self.position).reshape(self.shape)


@dataclass
class Composition:
    """The image tower's blocks: theta_0 and the stacked task vectors, [n_vectors, *shape] per block (LoRA
    vectors as LowRankStacks of their factors); with K > 1 partitions, each block's entries are split by a
    seeded assignment and get a coefficient each."""

    blocks: list[str]  # full state-dict names, sorted
    base: dict[str, torch.Tensor]
    stacks: dict[str, torch.Tensor]  # dense vectors (a LoRA vector's row is zero where the block has dense ones)
    granularity: str
    vector_count: int  # the task vectors of the job (with slots, each stack holds fewer)
    partitions: int = 1
    assignments: dict[str, torch.Tensor] | None = None  # K > 1, blocks of LoRA vectors: uint8 partition per entry
    slots: dict[str, list[int]] | None = None  # memory budget: block name -> the vectors stacked for it
    low_rank: dict[str, LowRankStack] = field(default_factory=dict)
    partitioned: dict[str, PartitionedStack] = field(default_factory=dict)  # K > 1: the dense vectors

    @property
    def stacked_bytes(self) -> int:
        return sum(stack.numel() * stack.element_size() for stack in self.stacks.values()) + sum(
            stack.nbytes for stack in [*self.low_rank.values(), *self.partitioned.values()])

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.base.values())).dtype

    @property
    def coefficient_shape(self) -> tuple[int, ...]:
        if self.partitions > 1:
            return self.vector_count, len(self.blocks), self.partitions
        return self.vector_count, len(self.blocks) if self.granularity == "block" else 1

    def column(self, block_index: int) -> int:
        return block_index if self.granularity == "block" else 0

    def _block_delta(self, name: str, column: torch.Tensor) -> torch.Tensor:
        """sum over the block's stacked vectors of column[slot] * tau (column: one coefficient per slot)."""
        delta = None
        if name in self.stacks:
            stack = self.stacks[name]
            delta = torch.tensordot(column.to(stack.dtype), stack, dims=1)
        if name in self.low_rank:
            low_rank = self.low_rank[name].delta(column)
            delta = low_rank if delta is None else delta + low_rank
        return delta

    def _partitioned_delta(self, name: str, columns: torch.Tensor) -> torch.Tensor:
        """K > 1: sum over the block's vectors of each entry's partition's coefficient times tau (columns: [slots,
        K]); LoRA factors cannot take a coefficient per entry, so each of their K candidates is composed whole."""
        delta = None
        if name in self.partitioned:
            delta = self.partitioned[name].delta(columns)
        if name in self.low_rank:
            candidates = torch.stack([self.low_rank[name].delta(columns[:, k]) for k in range(self.partitions)])
            index = self.assignments[name].to(candidates.device, torch.long).unsqueeze(0)
            low_rank = candidates.gather(0, index).squeeze(0)
            delta = low_rank if delta is None else delta + low_rank
        return delta

    def compose(self, coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        """{block name: theta_0 + tensordot(coefficients of the block, stacked task vectors)}; with vectors held
        in half precision the tensordot runs in it and its result joins theta_0 in theta_0's dtype. With K
        partitions each entry takes its partition's coefficients (_partitioned_delta)."""
        composed = {}
        for j, name in enumerate(self.blocks):
            if self.partitions > 1:
                columns = coefficients[:, j, :]
                if self.slots is not None:
                    columns = columns[self.slots[name]]
                delta = self._partitioned_delta(name, columns)
            else:
                column = coefficients[:, self.column(j)]
                if self.slots is not None:  # only the selected vectors' coefficients are used (and learned)
                    column = column[self.slots[name]]
                delta = self._block_delta(name, column)
            composed[name] = self.base[name] + delta.to(self.base[name].dtype)
        return composed

    def coefficient_matrix(self, coefficients: torch.Tensor) -> list[list[float]]:
        """Coefficients per task vector and block (isotropic: each vector's scalar repeated per block; K
        partitions: their mean, the exact values being partition_values)."""
        values = coefficients.detach().cpu().double()
        if self.partitions > 1:
            values = values.mean(dim=-1)
        return [[float(values[t, self.column(j)]) for j in range(len(self.blocks))] for t in range(len(values))]

    def partition_values(self, coefficients: torch.Tensor) -> list[list[list[float]]]:
        """K > 1: the coefficients per task vector, block and partition."""
        return coefficients.detach().cpu().double().tolist()


def vector_dtype(setting: str, device: str) -> torch.dtype | None:
    """The stacks' dtype for AtlasParams.vector_dtype; None: the model's own."""
    if setting == "auto":
        return torch.float16 if device.startswith("cuda") else None
    return getattr(torch, setting)


def build_composition(model: torch.nn.Module, task_vectors: list[TaskVectorInput], granularity: str,
                      device: str, dtype: torch.dtype | None = None, partitions: int = 1,
                      partition_seed: int = 0, selected: dict[str, list[int]] | None = None
                      ) -> tuple[Composition, int]:
    """Stack the task vectors' image-tower tensors (in dtype, else the model's), one vector file at a time;
    also returns how many float task-vector tensors lie outside the image tower (not composed). With
    `selected` (a memory budget), each block stacks only the vectors selected for it."""
    parameters = dict(model.named_parameters())
    tower = {name: p for name, p in parameters.items() if name.startswith(TOWER)}
    stacks: dict[str, torch.Tensor] = {}
    factors: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}  # block -> (slot, B, A) per LoRA vector
    uncomposed = 0
    for index, tv in enumerate(task_vectors):
        vector = TaskVectorFile(tv.path)
        for name in vector.float_names():
            if name not in parameters:
                continue
            if name not in tower:
                uncomposed += 1
                continue
            slots = selected.get(name, []) if selected is not None else range(len(task_vectors))
            if index not in slots:
                continue
            slot, stack_dtype = list(slots).index(index), dtype or tower[name].dtype
            lora = vector.lora(name)
            if lora is not None:
                factors.setdefault(name, []).append((slot, lora[0].to(device, stack_dtype),
                                                     lora[1].to(device, stack_dtype)))
                continue
            if name not in stacks:
                stacks[name] = torch.zeros((len(slots), *tower[name].shape), dtype=stack_dtype, device=device)
            stacks[name][slot] = vector.tensor(name).to(device)
    low_rank = {name: LowRankStack(torch.cat([b for _, b, _ in parts], dim=1), torch.cat([a for _, _, a in parts]),
                                   torch.cat([torch.full((a.shape[0],), slot, dtype=torch.long, device=device)
                                              for slot, _, a in parts]))
                for name, parts in factors.items()}
    if not stacks and not low_rank:
        raise ValueError("no task vector changes the image tower (visual.*): nothing to compose")
    blocks = sorted(stacks.keys() | low_rank.keys())
    base = {name: tower[name].detach() for name in blocks}  # the frozen model's own tensors, not copies
    assignments, partitioned = None, {}
    if partitions > 1:
        def assignment(name: str) -> torch.Tensor:
            return partition_assignment(name, base[name].shape, partitions, partition_seed).to(device)

        # one block's stack regrouped at a time, its original freed as the next is
        partitioned = {name: PartitionedStack.of(stacks.pop(name), assignment(name), partitions)
                       for name in list(stacks)}
        assignments = {name: assignment(name) for name in low_rank}
    slots = {name: selected[name] for name in blocks} if selected is not None else None
    return Composition(blocks, base, stacks, granularity, len(task_vectors), partitions, assignments, slots,
                       low_rank, partitioned), uncomposed


def gradient_selection(model: torch.nn.Module, task_vectors: list[TaskVectorInput], parts: list["BatchPart"],
                       batches: int, vectors_per_block: int, device: str
                       ) -> tuple[dict[str, list[int]], dict[str, list[float]]]:
    """The paper's blockwise gradient selection under a memory budget: per image-tower block, the
    vectors_per_block task vectors with the largest |dL/dlambda[t, b]| at lambda = 0, the training loss
    averaged over `batches` batches. dL/dlambda[t, b] = <dL/dtheta_b, tau_t[b]>, so one backward pass
    through theta_0 gives the gradient of every block and each vector is then read once, one at a time:
    memory is one model's gradient, not the stacked vectors. Returns the selection (vector indices per
    block, ascending) and every score."""
    parameters = dict(model.named_parameters())
    weights = {name[len(TOWER):]: p.detach().clone().requires_grad_(True)
               for name, p in parameters.items() if name.startswith(TOWER) and p.is_floating_point()}
    for _ in range(batches):
        drawn = [part.stream.take(part.count) for part in parts]
        pixels = torch.cat([preprocess_images(part.images[idx], model) for part, idx in zip(parts, drawn, strict=True)])
        with autocast(device):
            features = functional_call(model.visual, weights, (pixels.to(device),))
        features = F.normalize(features.float(), dim=-1)
        loss, offset = 0.0, 0
        for part, idx in zip(parts, drawn, strict=True):
            loss = loss + part.weight * part_loss(part, features[offset:offset + len(idx)], idx)
            offset += len(idx)
        (loss / batches).backward()
    gradients = {TOWER + name: w.grad for name, w in weights.items() if w.grad is not None}
    scores: dict[str, list[float]] = {name: [0.0] * len(task_vectors) for name in gradients}
    for index, tv in enumerate(task_vectors):
        for name, delta in load_float_deltas(tv.path, parameters).items():
            if name in gradients:
                scores[name][index] = abs(float((gradients[name].double() * delta.to(device).double()).sum()))
    selected = {name: sorted(sorted(range(len(task_vectors)), key=lambda t: (-values[t], t))[:vectors_per_block])
                for name, values in scores.items()}
    return selected, scores


class ComposedTower:
    """The frozen image tower run with composed weights."""

    def __init__(self, model: torch.nn.Module, composition: Composition):
        self.model, self.composition = model, composition

    def features(self, coefficients: torch.Tensor, pixels: torch.Tensor,
                 composed: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """L2-normalised image features of theta(coefficients); `composed` reuses an earlier compose()."""
        composed = composed if composed is not None else self.composition.compose(coefficients)
        weights = {name[len(TOWER):]: tensor for name, tensor in composed.items()}
        with autocast(str(pixels.device)):
            features = functional_call(self.model.visual, weights, (pixels,))
        return F.normalize(features.to(self.composition.dtype), dim=-1)  # autocast's fp16 back to the weights

    @torch.no_grad()
    def accuracy(self, coefficients: torch.Tensor, task: Task, split, batch_size: int, device: str) -> float:
        composed = self.composition.compose(coefficients)
        return accuracy(lambda pixels: self.features(coefficients, pixels, composed) @ task.head.T,
                        split, self.model, batch_size, device)


@torch.no_grad()
def finetuned_accuracy(model: torch.nn.Module, weights: InPlaceWeights, vector: TaskVectorInput, task: Task, split,
                       batch_size: int, device: str, dtype: torch.dtype) -> float:
    """The accuracy of theta_0 + tau_t, the whole vector loaded into the model's own weights: through the
    composition a one-hot coefficient reached only the blocks whose stacks hold the vector, which with
    vectors_per_block are not all of them (the learning curve's normalised accuracies and the best epoch then
    read a partial fine-tuned model). The caller restores the weights it composes onto afterwards."""
    weights.load(load_float_deltas(vector.path, weights.tensors), onto_start=False)  # from theta_0, in place

    def logits(pixels: torch.Tensor) -> torch.Tensor:
        with autocast(str(pixels.device)):
            features = model.visual(pixels)
        return F.normalize(features.to(dtype), dim=-1) @ task.head.T

    return accuracy(logits, split, model, batch_size, device)


def augmented_pixels(images_uint8: np.ndarray, model: torch.nn.Module, generator: torch.Generator) -> torch.Tensor:
    """The model's input from raw images, augmented as the official few-shot code does: per image a random
    resized crop (50-100% of the area, aspect 3/4-4/3) of the raw image, resized to the model's input size in
    place of the evaluation's centre crop, a coin-flip mirror, then the usual normalisation."""
    images = np.asarray(images_uint8)
    if images.ndim == 3:
        images = images[..., None]
    size = input_size(model)
    _, height, width, _ = images.shape
    out = torch.empty((len(images), 3, *size))
    for i in range(len(images)):
        draws = torch.rand(5, generator=generator).tolist()
        area = height * width * (CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0]) * draws[0])
        log_low, log_high = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
        ratio = math.exp(log_low + (log_high - log_low) * draws[1])
        crop_w = min(width, max(1, round(math.sqrt(area * ratio))))
        crop_h = min(height, max(1, round(math.sqrt(area / ratio))))
        top = min(height - crop_h, int(draws[2] * (height - crop_h + 1)))
        left = min(width - crop_w, int(draws[3] * (width - crop_w + 1)))
        # one crop at a time in float: a batch of large images converted whole took 12 bytes a source pixel
        crop = torch.from_numpy(np.array(images[i, top:top + crop_h, left:left + crop_w]))
        crop = crop.permute(2, 0, 1)[None].float().div_(255.0).expand(-1, 3, -1, -1)
        image = F.interpolate(crop, size=size, mode="bilinear", align_corners=False, antialias=True)[0]
        out[i] = image.flip(-1) if draws[4] < 0.5 else image
    return normalise_pixels(out.clamp_(0.0, 1.0), model)


def input_size(model: torch.nn.Module) -> tuple[int, int]:
    size = getattr(model.visual, "image_size", 224)
    return (size, size) if isinstance(size, int) else tuple(size)


def few_shot_indices(labels: np.ndarray, shots: int, rng: np.random.Generator) -> np.ndarray:
    """Up to `shots` indices per class, drawn without replacement; sorted."""
    drawn = [rng.permutation(np.flatnonzero(labels == c))[:shots] for c in np.unique(labels)]
    return np.sort(np.concatenate(drawn))


class IndexStream:
    """Endless seeded reshuffles of a pool of indices."""

    def __init__(self, pool: np.ndarray, rng: np.random.Generator):
        self.pool, self.rng = pool, rng
        self.order, self.position = rng.permutation(pool), 0

    def take(self, count: int) -> np.ndarray:
        taken = []
        while count > 0:
            if self.position == len(self.order):
                self.order, self.position = self.rng.permutation(self.pool), 0
            chunk = self.order[self.position:self.position + count]
            self.position += len(chunk)
            count -= len(chunk)
            taken.append(chunk)
        return np.concatenate(taken)


@dataclass
class BatchPart:
    """The share of each training batch drawn from one task, and how it enters the loss."""

    task: Task
    split: str
    images: np.ndarray
    labels: np.ndarray
    stream: IndexStream
    count: int
    weight: float  # +1 descend, -1 ascend (negation target)
    loss: str = "cross_entropy"  # or, unlabelled: "entropy" of the predictions, "ufm" (labels: pseudo-labels)
    trusted: np.ndarray | None = None  # ufm: which images' pseudo-labels are trusted

    @property
    def passes(self) -> int:
        """Steps for one pass over this part's pool."""
        return math.ceil(len(self.stream.pool) / self.count)


def train_split(params: AtlasParams, task: Task) -> str:
    """The first split of params.train_order the task has."""
    order = params.train_order
    present = [split for split in order if task.sizes.get(split)]
    if not present:
        raise ValueError(f"dataset {task.dataset.name!r} has no {' or '.join(order)} split to train aTLAS on "
                         f"({params.mode}); name another with train_split")
    return present[0]


@dataclass(frozen=True)
class PseudoLabels:
    """UFM's targets for a split's images: the zero-shot model's labels and which of them are trusted."""

    labels: np.ndarray  # int64, the most probable class of each image
    trusted: np.ndarray  # bool
    per_class: int  # k

    def summary(self, classes: int) -> dict:
        by_class = np.bincount(self.labels[self.trusted], minlength=classes)
        return {"per_class": self.per_class, "images": int(self.trusted.sum()), "by_class": by_class.tolist()}


def trusted_pseudo_labels(labels: np.ndarray, confidence: np.ndarray, classes: int,
                          per_class: int | None) -> PseudoLabels:
    """From each image's most probable class under the zero-shot model and that class's probability: per class
    the per_class (None: min(N / C, 100)) images assigned to it with the highest probability, trusted."""
    count = len(labels)
    k = per_class if per_class is not None else min(count // classes, UFM_MAX_TRUSTED)
    trusted = np.zeros(count, dtype=bool)
    for c in range(classes):
        members = np.flatnonzero(labels == c)
        trusted[members[np.argsort(-confidence[members], kind="stable")[:k]]] = True
    return PseudoLabels(labels.astype(np.int64), trusted, k)


def ufm_loss(strong_logits: torch.Tensor, weak_logits: torch.Tensor, labels: torch.Tensor,
             trusted: torch.Tensor) -> torch.Tensor:
    """learn_ufm.py's ssl_loss_trusted with a working temperature: cross-entropy of the strong view against the
    trusted label, or the weak view's sharpened prediction where that is over UFM_THRESHOLD confident; the mean
    over the images that count (0 when none does)."""
    sharpened = weak_logits.detach().float().softmax(dim=-1).pow(1 / UFM_TEMPERATURE)
    sharpened = sharpened / sharpened.sum(dim=-1, keepdim=True)
    targets = torch.where(trusted[:, None], F.one_hot(labels, sharpened.shape[1]).to(sharpened), sharpened)
    weights = torch.where(trusted, torch.ones_like(sharpened[:, 0]),
                          (sharpened.max(dim=-1).values > UFM_THRESHOLD).to(sharpened))
    per_image = -(targets * strong_logits.float().log_softmax(dim=-1)).sum(dim=-1)
    return (per_image * weights).sum() / weights.sum().clamp_min(1.0)


def batch_parts(params: AtlasParams, tasks: list[Task], rng: np.random.Generator,
                pseudo: PseudoLabels | None = None) -> list[BatchPart]:
    mode = params.mode

    def part(task: Task, count: int, pool=None, **kwargs) -> BatchPart:
        split = train_split(params, task)
        images, labels = task.splits[split]
        if kwargs.get("loss", "cross_entropy") == "cross_entropy" and not is_labelled((images, labels)):
            raise ValueError(f"dataset {task.dataset.name!r} ({split}) needs labels for {params.objective} training")
        if pseudo is not None:
            labels = pseudo.labels
        pool = np.arange(len(images)) if pool is None else pool
        return BatchPart(task, split, images, labels, IndexStream(pool, rng), count, **kwargs)

    if mode == "addition":
        per_task = max(1, params.batch_size // len(tasks))
        return [part(task, per_task, weight=1.0) for task in tasks]
    target = tasks[0]
    if mode == "few_shot":
        labels = target.splits[train_split(params, target)][1]
        pool = few_shot_indices(labels, params.shots, rng) if params.shots else None
        return [part(target, params.batch_size, pool, weight=1.0)]
    if mode == "negation":
        half = params.batch_size // 2
        return [part(target, half, weight=-1.0), part(tasks[1], params.batch_size - half, weight=1.0)]
    if mode == "ufm":
        return [part(target, params.batch_size, weight=1.0, loss="ufm", trusted=pseudo.trusted)]
    return [part(target, params.batch_size, weight=1.0, loss="entropy")]


def steps_per_epoch(mode: str, parts: list[BatchPart]) -> int:
    """addition: one pass over the smallest task's split (the official code zips the tasks' loaders);
    few-shot: one pass over the shots, repeated to at least FEW_SHOT_MIN_BATCHES batches; negation: one
    pass over the target's split (the control is drawn alongside); entropy and ufm: one pass over the images."""
    if mode == "addition":
        return min(part.passes for part in parts)
    if mode == "few_shot":
        return max(FEW_SHOT_MIN_BATCHES, parts[0].passes)
    return parts[0].passes


def part_loss(part: BatchPart, features: torch.Tensor, index: np.ndarray,
              weak_features: torch.Tensor | None = None) -> torch.Tensor:
    logits = features @ part.task.head.T
    if part.loss == "entropy":
        return -(logits.softmax(dim=-1) * logits.log_softmax(dim=-1)).sum(dim=-1).mean()
    labels = torch.as_tensor(part.labels[index], device=logits.device)
    if part.loss == "ufm":
        trusted = torch.as_tensor(part.trusted[index], device=logits.device)
        return ufm_loss(logits, weak_features @ part.task.head.T, labels, trusted)
    return F.cross_entropy(logits, labels)


@torch.no_grad()
def most_probable_classes(tower: "ComposedTower", coefficients: torch.Tensor, task: Task, images: np.ndarray,
                          batch_size: int, device: str) -> tuple[np.ndarray, np.ndarray]:
    """The composed model's most probable class of each unaugmented image, and its probability: all the
    pseudo-labelling reads of the [N, C] probabilities, which are never held whole (N x C x 4 bytes: 8 GB for
    200k images of 10k classes)."""
    composed = tower.composition.compose(coefficients)
    labels, confidence = np.empty(len(images), dtype=np.int64), np.empty(len(images), dtype=np.float32)
    batch_size = images_per_batch(batch_size, tower.model)
    for start in range(0, len(images), batch_size):
        pixels = preprocess_images(images[start:start + batch_size], tower.model).to(device)
        logits = tower.features(coefficients, pixels, composed) @ task.head.T
        best = logits.float().softmax(dim=-1).max(dim=-1)
        labels[start:start + len(pixels)] = best.indices.cpu().numpy()
        confidence[start:start + len(pixels)] = best.values.cpu().numpy()
        del pixels, logits  # not held while the next batch is made
    return labels, confidence


def load_tasks(inputs: MergeInputs, params: AtlasParams, heads: HeadFactory) -> list[Task]:
    """addition: one task per task vector with a dataset; otherwise [target] or [target, control]."""
    if params.mode == "addition":
        return [load_task(inputs, ds, heads, task_vector_by_id(inputs, tv))
                for tv, ds in params.task_datasets.items()]
    ids = [params.target_dataset_id] + ([params.control_dataset_id] if params.control_dataset_id else [])
    return [load_task(inputs, ds, heads) for ds in ids]


def evaluated(tasks: list[Task], order) -> list[Task]:
    """The tasks with a labelled split in this order (an entropy target may have none)."""
    return [task for task in tasks if task.has_labelled(order)]


def run(inputs: MergeInputs, params: AtlasParams, ctx: JobContext) -> MethodResult:
    coefficients, curve, metrics = learn_coefficients(inputs, params, ctx)  # frees the model and stacks on return
    out = ctx.workdir / "merged.safetensors"
    write_checkpoint(inputs, coefficients, out, ctx)
    return MethodResult(out, metrics=metrics, artifacts={"coefficients": coefficients, "learning_curve": curve})


SELECTION_RULES = {
    "addition": "highest mean normalised accuracy", "few_shot": "highest target accuracy",
    "entropy": "highest target accuracy", "ufm": "highest target accuracy",
    "negation": "lowest target accuracy with control >= 0.95 x zero-shot",
}


def learn_coefficients(inputs: MergeInputs, params: AtlasParams, ctx: JobContext) -> tuple[dict, list[dict], dict]:
    """Train; returns the best epoch's coefficients (JSON), the learning curve and the metrics."""
    mode, device, recipe = params.mode, ctx.device, params.recipe
    lr, epochs = params.lr or recipe.lr, params.epochs or recipe.epochs
    schedule = params.schedule or recipe.schedule
    augment = params.augment if params.augment is not None else mode in ("few_shot", "ufm")
    rng = np.random.default_rng(ctx.seed)
    augment_generator = torch.Generator().manual_seed(ctx.seed)

    model = load_base_model(inputs, device)
    heads = HeadFactory(model, inputs, ctx)
    tasks = load_tasks(inputs, params, heads)  # every head from theta_0's text tower
    weights = InPlaceWeights(model, inputs.base_path, inputs.start_path)
    weights.load({})  # chaining: theta_0 -> the start checkpoint, in place (the composition's base); else nothing
    partition_seed = params.partition_seed if params.partition_seed is not None else ctx.seed
    selected = None
    if params.vectors_per_block is not None:  # drawn from their own stream: training's batches stay the same
        selection_parts = batch_parts(params, tasks, np.random.default_rng([ctx.seed, 1]))
        batches = min(SELECTION_BATCHES, steps_per_epoch(mode, selection_parts))
        selected, _ = gradient_selection(model, inputs.task_vectors, selection_parts, batches,
                                         params.vectors_per_block, device)
    composition, uncomposed = build_composition(model, inputs.task_vectors, params.granularity, device,
                                                vector_dtype(params.vector_dtype, device), params.partitions,
                                                partition_seed, selected)
    tower = ComposedTower(model, composition)
    coefficients = torch.zeros(composition.coefficient_shape, device=device, requires_grad=True)
    tv_index = {tv.id: i for i, tv in enumerate(inputs.task_vectors)}

    selection_tasks = evaluated(tasks, SELECTION_SPLITS)
    selection_splits = {task.name: task.split_name(SELECTION_SPLITS) for task in selection_tasks}

    def accuracies(values: torch.Tensor) -> dict[str, float]:
        return {task.name: tower.accuracy(values, task, task.splits[selection_splits[task.name]],
                                          params.eval_batch_size, device) for task in selection_tasks}

    finetuned = {}
    if mode == "addition":  # the fine-tuned references theta_0 + tau_t, whatever the composition starts from
        finetuned = {task.name: finetuned_accuracy(model, weights, inputs.task_vectors[tv_index[task.task_vector_id]],
                                                   task, task.splits[selection_splits[task.name]],
                                                   params.eval_batch_size, device, composition.dtype)
                     for task in selection_tasks}
        weights.load({})

    def epoch_entry(epoch: int, loss: float | None) -> dict:
        entry = {"epoch": epoch, "loss": loss, "accuracy": accuracies(coefficients), "splits": selection_splits}
        if finetuned:
            entry["normalised_accuracy"] = {n: normalised(entry["accuracy"][n], f) for n, f in finetuned.items()}
            entry["mean_normalised_accuracy"] = mean_normalised_accuracy(entry["accuracy"], finetuned)
        return entry

    def selection_score(entry: dict) -> float | None:
        """Larger is better; None: not eligible."""
        accs = entry["accuracy"]
        if mode == "addition":
            return entry.get("mean_normalised_accuracy", entry["epoch"])
        if mode == "negation":
            if not keeps_control(entry):
                return None
            return -accs[params.target_dataset_id]
        return accs.get(params.target_dataset_id, entry["epoch"])  # unlabelled target: the last epoch

    def keeps_control(entry: dict) -> bool:
        control = params.control_dataset_id
        return control_kept(entry["accuracy"][control], curve[0]["accuracy"][control])

    pseudo = None
    if mode == "ufm":  # the zero-shot model's labels for the images it trains on
        target = tasks[0]
        labels, confidence = most_probable_classes(tower, coefficients, target,
                                                   target.splits[train_split(params, target)][0],
                                                   params.eval_batch_size, device)
        pseudo = trusted_pseudo_labels(labels, confidence, target.head.shape[0], params.trusted_per_class)
    parts = batch_parts(params, tasks, rng, pseudo)
    per_epoch = steps_per_epoch(mode, parts)
    total_steps = epochs * per_epoch
    optimizer = torch.optim.AdamW([coefficients], lr=lr, weight_decay=params.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=device.startswith("cuda"))

    curve = [epoch_entry(0, None)]
    best_entry, best_score = curve[0], selection_score(curve[0])
    best = coefficients.detach().clone()
    ctx.report(Progress("evaluation", 0, epochs, curve[0]))
    step, stopped_early = 0, None
    for epoch in range(1, epochs + 1):
        losses = []
        for _ in range(per_epoch):
            ctx.check_cancel()
            if schedule == "cosine":
                for group in optimizer.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))
            drawn = [part.stream.take(part.count) for part in parts]
            pixels = torch.cat([augmented_pixels(part.images[idx], model, augment_generator) if augment
                                else preprocess_images(part.images[idx], model)
                                for part, idx in zip(parts, drawn, strict=True)])
            features = tower.features(coefficients, pixels.to(device))
            weak = None
            if mode == "ufm":  # the unaugmented view only sets targets: no gradient through it
                with torch.no_grad():
                    weak = tower.features(coefficients, preprocess_images(parts[0].images[drawn[0]], model).to(device))
            loss, offset = 0.0, 0
            for part, idx in zip(parts, drawn, strict=True):
                share = features[offset:offset + len(idx)]
                loss = loss + part.weight * part_loss(part, share, idx, weak)
                offset += len(idx)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([coefficients], params.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            losses.append(float(loss.detach()))
            ctx.report(Progress("training", step, total_steps, {"epoch": epoch, "loss": losses[-1]}))
        ctx.check_cancel()
        entry = epoch_entry(epoch, float(np.mean(losses)))
        entry["lr"] = optimizer.param_groups[0]["lr"]
        curve.append(entry)
        score = selection_score(entry)
        if score is not None and (best_score is None or score > best_score):
            best_entry, best_score, best = entry, score, coefficients.detach().clone()
        ctx.report(Progress("evaluation", epoch, epochs, entry))
        if mode == "negation" and not keeps_control(entry):
            stopped_early = epoch  # learn_task_negation.py stops once the control drops
            break

    ctx.check_cancel()
    splits_used = "/".join(sorted(set(selection_splits.values())))
    best_source = (f"best epoch on {splits_used} ({SELECTION_RULES[mode]})" if selection_tasks
                   else "last epoch (no labelled data to select on)")
    metrics = {
        "chosen": {
            "objective": given_or_default(params, "objective"),
            "granularity": given_or_default(params, "granularity"),
            "train_split": given_or_default(params, "train_split")
            | {"value": {part.task.name: part.split for part in parts}},
            "lr": given_or_default(params, "lr") | {"value": lr},
            "schedule": given_or_default(params, "schedule") | {"value": schedule},
            "epochs": given_or_default(params, "epochs") | {"value": epochs},
            "batch_size": given_or_default(params, "batch_size"),
            "augment": given_or_default(params, "augment") | {"value": augment},
            "best_epoch": chosen(best_entry["epoch"], best_source),
        },
        "mode": mode, "steps": step, "steps_per_epoch": per_epoch, "coefficients": int(best.numel()),
        "blocks": len(composition.blocks), "uncomposed_tensors": uncomposed, "stopped_early": stopped_early,
    }
    if mode == "few_shot":
        metrics["chosen"]["shots"] = given_or_default(params, "shots")
        metrics["train_images"] = len(parts[0].stream.pool)
    if pseudo is not None:
        metrics["chosen"]["trusted_per_class"] = given_or_default(params, "trusted_per_class") | {
            "value": pseudo.per_class}
        metrics["trusted"] = pseudo.summary(tasks[0].head.shape[0])

    coefficient_json = {
        "task_vectors": [tv.id for tv in inputs.task_vectors], "blocks": composition.blocks,
        "values": composition.coefficient_matrix(best), "granularity": params.granularity,
    }
    metrics["stacked_vector_bytes"] = composition.stacked_bytes
    if selected is not None:
        ids = [tv.id for tv in inputs.task_vectors]
        metrics["chosen"]["vectors_per_block"] = given_or_default(params, "vectors_per_block")
        metrics["budget"] = {"selection_batches": batches,
                             "selected": {name: [ids[t] for t in slots] for name, slots in selected.items()},
                             "learned_coefficients": sum(len(selected[name]) for name in composition.blocks)}
    if params.partitions > 1:
        coefficient_json.update(partitions=params.partitions, partition_seed=partition_seed,
                                partition_values=composition.partition_values(best))
        metrics["chosen"]["partitions"] = given_or_default(params, "partitions")
        metrics["chosen"]["partition_seed"] = chosen(partition_seed, "given" if params.partition_seed is not None
                                                     else "the job's seed")
    return coefficient_json, curve, metrics


def write_checkpoint(inputs: MergeInputs, coefficients: dict, out: Path, ctx: JobContext) -> int:
    """Stream theta_0 + sum_t Lambda[t, b] tau_t[b] for the composed blocks; every other tensor stays theta_0.

    Everything comes from the coefficients document (a job's GET /v1/jobs/{id}/coefficients): with K partitions,
    each block's partition is rebuilt from partition_seed and each entry takes its partition's coefficient."""
    partitions = coefficients.get("partitions", 1)
    rows = coefficients["partition_values"] if partitions > 1 else coefficients["values"]
    block_values = {name: [row[j] for row in rows] for j, name in enumerate(coefficients["blocks"])}

    def merge(name: str, base: torch.Tensor, taus: Sequence[torch.Tensor | None]) -> torch.Tensor:
        if name not in block_values:
            return base
        merged = base.clone()
        index = None
        if partitions > 1:
            index = partition_assignment(name, base.shape, partitions, coefficients["partition_seed"]).long()
        for value, tau in zip(block_values[name], taus, strict=True):
            if tau is None:
                continue
            merged += (torch.tensor(value, dtype=base.dtype)[index] if index is not None else value) * tau
        return merged

    return merge_streaming(inputs.onto_path, [tv.path for tv in inputs.task_vectors], out, merge, ctx)

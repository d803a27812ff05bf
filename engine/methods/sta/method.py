"""Selective task arithmetic (STA, arXiv 2411.16139): keep each task's important entries, then fuse.

1. Importance, task by task with one model in memory: the model is set to
   theta_t = theta_0 + tau_t and I_t = |tau_t * g_t| (or |theta_t * g_t|), with
   g_t the gradient of the task's cross-entropy (its zero-shot head) on seeded
   micro-batches of its calibration data, pooled as the mean over micro-batches
   of the absolute product. Since |tau * g| = |tau| * |g|, this is |tau| times the
   mean absolute gradient. A task vector without calibration data is scored by
   |tau| (labelled "magnitude" in metrics["importance_source"]); so are tensors
   that the classification loss does not reach (e.g. the text tower, whose
   heads are frozen), counted in metrics["magnitude_tensors"].
2. Normalisation: I_t is divided by its mean over the tensor (score 1 = the
   tensor's average importance), which makes one threshold meaningful for every
   task and layer (see StaParams for the defaults). The mask keeps scores >= threshold (default 3), or the top
   `density` fraction per tensor; zero-importance entries are never kept.
3. Masks are bit-packed (numpy packbits) into one safetensors file per task in
   ctx.workdir/sta/, with fp16 normalised scores beside them only for disjoint
   fusion; fusion then streams tensor by tensor:
   theta = theta_0 + lambda * sum_t s_t m_t tau_t, s_t = -1 for forgotten tasks.
   The data-free default (no calibration data, threshold, not disjoint) needs no mask files: each tensor's
   masks are decided while it is fused (MagnitudeFusion), the same bits in one streaming pass per tensor.
"""
import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open

from engine.context import JobContext, MergeInputs, MethodResult, Progress
from engine.data import is_labelled, load_task, pick_split, preprocess_images, split_sizes
from engine.evaluator import EvalTarget, Evaluator
from engine.heads import HeadFactory, image_logits
from engine.kernels import masked_accumulate, threshold_accumulate, threshold_mask
from engine.methods.sta.params import CALIBRATION_SPLITS, STA_SCALING_GRID, StaParams
from engine.metrics import given_or_default
from engine.safetensors_io import read_header, save_tensors
from engine.scaling_search import SearchSpec, search_scaling, searched
from engine.selection import mean_magnitude
from engine.streaming import CHUNK, collect_deltas, float32_readers, in_chunks, merge_streaming
from engine.task_vectors import TaskVectorFile
from engine.weights import InPlaceWeights, load_base_model, load_float_deltas

FP16_MAX = 65504.0  # normalised scores above this (a tensor dominated by a handful of entries) are clipped on disk


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool mask -> uint8 tensor of ceil(numel / 8) bytes, 8 entries per byte."""
    return torch.from_numpy(np.packbits(mask.cpu().numpy().ravel()))


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    count = int(np.prod(shape, dtype=np.int64))
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=count).astype(bool).reshape(shape))


def calibration_batches(images: np.ndarray, labels: np.ndarray, samples: int, micro_batch_size: int,
                        seed: tuple[int, ...]) -> list[tuple[np.ndarray, np.ndarray]]:
    """min(samples, N) images drawn without replacement (seeded), cut into micro-batches."""
    order = np.random.default_rng(seed).permutation(len(images))[:samples]
    return [(images[order[i:i + micro_batch_size]], labels[order[i:i + micro_batch_size]])
            for i in range(0, len(order), micro_batch_size)]


def mean_abs_gradients(model: torch.nn.Module, names: list[str], head: torch.Tensor,
                       batches: list[tuple[np.ndarray, np.ndarray]], device: str,
                       on_batch: Callable[[int], None] = lambda step: None) -> dict[str, torch.Tensor]:
    """Mean over micro-batches of |d CE / d w| for the named parameters the loss reaches (float32, CPU).

    Only these parameters require grad, and only for the duration of the call. Full precision
    even on CUDA: the calibration set is small and fp16 gradients of small weights underflow.
    """
    parameters = dict(model.named_parameters())
    names = [name for name in names if name in parameters]
    sums: dict[str, torch.Tensor] = {}
    try:
        for name in names:
            parameters[name].requires_grad_(True)
        for step, (images, labels) in enumerate(batches, start=1):
            pixels = preprocess_images(images, model).to(device)
            loss = F.cross_entropy(image_logits(model, pixels, head), torch.as_tensor(labels, device=device))
            grads = (torch.autograd.grad(loss, [parameters[name] for name in names], allow_unused=True)
                     if loss.requires_grad else [None] * len(names))  # no named tensor reaches the loss
            for name, grad in zip(names, grads, strict=True):
                if grad is not None:
                    magnitude = grad.detach().float().abs().cpu()
                    sums[name] = sums[name] + magnitude if name in sums else magnitude
            on_batch(step)
    finally:
        for name in names:
            parameters[name].requires_grad_(False)
    return {name: total / len(batches) for name, total in sums.items()}


def tensor_mean(scores: torch.Tensor) -> np.float32:
    """The mean of non-negative scores over the tensor, as engine.selection.mean_magnitude takes it (the same
    value an upload measures for |tau|, whatever the thread count)."""
    flat = scores.detach().reshape(-1).float().cpu().numpy()
    return mean_magnitude(lambda start, stop: flat[start:stop], flat.size)


def normalise(scores: torch.Tensor) -> torch.Tensor:
    """Scores divided by their mean over the tensor (all zeros stay zeros)."""
    mean = tensor_mean(scores)
    return scores / torch.tensor(mean) if mean > 0 else torch.zeros_like(scores)


def select(normalised_scores: torch.Tensor, threshold: float, density: float | None) -> torch.Tensor:
    """The mask of kept entries: score >= threshold, or the top density fraction (ties at the cut kept)."""
    if density is not None:
        keep = max(1, round(density * normalised_scores.numel()))
        flat = normalised_scores.flatten()
        threshold_value = flat.kthvalue(flat.numel() - keep + 1).values
        return (normalised_scores >= threshold_value) & (normalised_scores > 0)
    return (normalised_scores >= threshold) & (normalised_scores > 0)


def planned_steps(inputs: MergeInputs, params: StaParams, tv_id: str) -> int:
    """Progress steps of one task vector: its calibration micro-batches, or 1 for a magnitude score."""
    dataset_id = params.calibration_datasets.get(tv_id)
    if dataset_id is None:
        return 1
    sizes = split_sizes(inputs.datasets[dataset_id].path)
    count = min(params.calibration_samples, sizes[pick_split(sizes, CALIBRATION_SPLITS, dataset_id)])
    return -(-count // params.micro_batch_size)


def run(inputs: MergeInputs, params: StaParams, ctx: JobContext) -> MethodResult:
    known = {tv.id for tv in inputs.task_vectors}
    unknown = sorted((set(params.calibration_datasets) | set(params.forget)) - known)
    if unknown:
        raise ValueError(f"task vectors {unknown} are not among the job's task vectors")
    missing = sorted(set(params.dataset_ids()) - set(inputs.datasets))
    if missing:
        raise ValueError(f"datasets {missing} are not among the job's datasets")
    if not params.calibration_datasets and not params.disjoint and params.density is None:
        fusion = MagnitudeFusion(params.threshold, _signs(inputs, params),
                                 [tv.magnitude_means for tv in inputs.task_vectors])
        return _fuse(inputs, params, ctx, fusion,
                     {tv.id: "magnitude" for tv in inputs.task_vectors}, _float_tensor_counts(inputs))
    mask_dir = ctx.workdir / "sta"
    mask_dir.mkdir(parents=True, exist_ok=True)

    # Data-free scores (|tau|) need no model: build it only to take gradients on calibration data.
    needs_model = bool(params.calibration_datasets)
    model = load_base_model(inputs, ctx.device) if needs_model else None
    heads = HeadFactory(model, inputs, ctx) if needs_model else None
    weights = InPlaceWeights(model, inputs.base_path) if needs_model else None
    base_tensors = weights.tensors if weights is not None else read_header(inputs.base_path).tensors
    total = sum(planned_steps(inputs, params, tv.id) for tv in inputs.task_vectors)
    done = 0

    def advance(tv_id: str) -> None:
        nonlocal done
        done += 1
        ctx.report(Progress("importance", done, total, {"task_vector": tv_id}))
        ctx.check_cancel()

    sources, densities, magnitude_tensors = {}, {}, {}
    mask_paths, score_paths = [], []
    for index, tv in enumerate(inputs.task_vectors):
        ctx.check_cancel()
        deltas = load_float_deltas(tv.path, base_tensors)
        gradients = {}
        dataset_id = params.calibration_datasets.get(tv.id)
        if dataset_id is not None:
            task = load_task(inputs, dataset_id, heads, tv)  # head from theta_0: weights are restored here
            images, labels = task.split(CALIBRATION_SPLITS)
            if not is_labelled((images, labels)):
                raise ValueError(f"calibration dataset {task.dataset.name!r} needs labels")
            batches = calibration_batches(images, labels, params.calibration_samples, params.micro_batch_size,
                                          seed=(ctx.seed, index))
            weights.load(deltas)
            gradients = mean_abs_gradients(model, sorted(deltas), task.head, batches, ctx.device,
                                           on_batch=lambda _step, tv_id=tv.id: advance(tv_id))
            weights.restore()
            del task, batches
        else:
            advance(tv.id)
        sources[tv.id] = "taylor" if dataset_id is not None else "magnitude"
        magnitude_tensors[tv.id] = sum(1 for name in deltas if name not in gradients)

        packed, scores, kept, entries = {}, {}, 0, 0
        with safe_open(str(inputs.base_path), framework="pt") as base:
            for name in sorted(deltas):
                tau = deltas[name]
                weight = (base.get_tensor(name).float() + tau) if params.importance == "theta" else tau
                importance = weight.abs() * gradients[name] if name in gradients else tau.abs()
                if params.disjoint or params.density is not None:
                    score = normalise(importance)
                    mask = select(score, params.threshold, params.density)
                    packed[name] = pack_mask(mask)
                    if params.disjoint:
                        scores[name] = score.clamp(max=FP16_MAX).half()
                    kept += int(mask.sum())
                else:  # the default: one compiled pass from importance to packed bits (same bits as select)
                    bits = np.zeros(-(-importance.numel() // 8), np.uint8)
                    kept += threshold_mask(importance.reshape(-1).numpy(), tensor_mean(importance),
                                           np.float32(params.threshold), bits)
                    packed[name] = torch.from_numpy(bits)
                entries += importance.numel()
        del deltas, gradients
        densities[tv.id] = kept / entries if entries else 0.0
        mask_paths.append(mask_dir / f"masks-{index:04d}.safetensors")
        save_tensors(mask_paths[-1], packed, {"task_vector_id": tv.id, "importance_source": sources[tv.id]})
        if params.disjoint:
            score_paths.append(mask_dir / f"scores-{index:04d}.safetensors")
            save_tensors(score_paths[-1], scores, {"task_vector_id": tv.id})
    del model, weights
    with FusedDelta(mask_paths, score_paths, _signs(inputs, params)) as fused:
        result = _fuse(inputs, params, ctx, fused, sources, magnitude_tensors)
    result.metrics["mask_density"] = densities
    return result


def _signs(inputs: MergeInputs, params: StaParams) -> list[float]:
    return [-1.0 if tv.id in params.forget else 1.0 for tv in inputs.task_vectors]


def _float_tensor_counts(inputs: MergeInputs) -> dict[str, int]:
    """Per task vector, its floating-point tensors that the base has (all scored by magnitude without data)."""
    base = read_header(inputs.base_path).tensors
    return {tv.id: sum(1 for name in TaskVectorFile(tv.path).float_names() if name in base)
            for tv in inputs.task_vectors}


def _fuse(inputs: MergeInputs, params: StaParams, ctx: JobContext, fused, sources: dict[str, str],
          magnitude_tensors: dict[str, int]) -> MethodResult:
    """theta_0 + lambda * fused(tensor), lambda given or searched; fused: a FusedDelta or a MagnitudeFusion."""
    paths = [tv.path for tv in inputs.task_vectors]
    selection = ("density",) if params.density is not None else ("threshold",)
    chosen = {name: given_or_default(params, name) for name in ("importance", *selection, "disjoint", "forget")}
    metrics: dict = {}
    if params.validation_datasets:
        # Searched on the unsigned fused vector: params allow a search only when every vector is added
        # or every vector is forgotten, and a forgetting search negates it.
        unsigned = fused.unsigned()
        deltas = collect_deltas(inputs.base_path, paths, unsigned, ctx, stage="fusion")
        evaluator = Evaluator(inputs, ctx)
        forgetting = bool(params.forget)
        spec = SearchSpec(
            targets=[EvalTarget(ds, None if forgetting else tv) for tv, ds in params.validation_datasets.items()],
            negate=forgetting,
            control=EvalTarget(params.control_dataset_id) if params.control_dataset_id else None)
        scaling, metrics = search_scaling(evaluator, deltas, spec, STA_SCALING_GRID)
        del evaluator, deltas
        chosen["scaling"] = searched(scaling, metrics)
    else:
        scaling = params.scaling
        chosen["scaling"] = given_or_default(params, "scaling")

    def merge(name: str, base: torch.Tensor, taus: Sequence[torch.Tensor | None]) -> torch.Tensor:
        return fused.scaled(name, base, taus, scaling)

    out = ctx.workdir / "merged.safetensors"
    count = merge_streaming(inputs.onto_path, paths, out, merge, ctx, stage="fusion")
    metrics.update(chosen=chosen, importance_source=sources, magnitude_tensors=magnitude_tensors, tensors=count)
    if isinstance(fused, MagnitudeFusion):
        metrics["mask_density"] = fused.densities([tv.id for tv in inputs.task_vectors])
    return MethodResult(out, metrics=metrics)


class MagnitudeFusion:
    """sum_t sign_t m_t tau_t for one tensor with the data-free default masks (|tau_t| >= threshold x the
    tensor's mean |tau_t|, and > 0) decided as it goes: one compiled pass that selects and sums
    (engine.kernels.threshold_accumulate), chunk by chunk, each vector read once. The means come from the
    vectors' uploads (means[t], by tensor name); a vector without them costs one more pass over it. The same
    bits as threshold_mask then masked_accumulate, without mask files."""

    def __init__(self, threshold: float, signs: list[float], means: list[dict[str, float] | None] | None = None):
        self.threshold, self.signs = np.float32(threshold), signs
        self.means = means or [None] * len(signs)
        self.kept: list[dict[str, int]] = [{} for _ in signs]  # per vector: tensor -> kept entries
        self.entries: list[dict[str, int]] = [{} for _ in signs]

    def __call__(self, name: str, taus: Sequence[torch.Tensor | None], signs: list[float] | None = None,
                 onto: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
        """The fused tensor, or with onto (float32, the tensor's shape) onto + scale * fused: the same bits as
        torch's `onto + scale * fused`, each chunk summed in a buffer that stays in cache."""
        signs = signs or self.signs
        shape, readers = float32_readers(taus)
        numel = math.prod(shape)
        fused = []
        for index, read in enumerate(readers):
            if read is not None:
                stored = self.means[index]
                mean = np.float32(stored[name]) if stored and name in stored else mean_magnitude(read, numel)
                fused.append((index, read, mean, np.float32(signs[index])))
        flat_onto = None if onto is None else onto.reshape(-1).numpy()
        out = np.empty(numel, np.float32)

        def fuse_range(first: int, last: int) -> list[int]:
            kept = [0] * len(fused)
            running = np.empty(CHUNK, np.float32)
            for start in range(first, last, CHUNK):
                stop = min(last, start + CHUNK)
                total = out[start:stop] if flat_onto is None else running[:stop - start]
                total.fill(0)
                for k, (_, read, mean, sign) in enumerate(fused):
                    kept[k] += threshold_accumulate(read(start, stop), mean, self.threshold, sign, total)
                if flat_onto is not None:
                    np.multiply(total, np.float32(scale), out=total)
                    np.add(flat_onto[start:stop], total, out=out[start:stop])
            return kept

        counts = in_chunks(numel, fuse_range)
        for k, (index, *_rest) in enumerate(fused):
            self.kept[index][name] = sum(part[k] for part in counts)
            self.entries[index][name] = numel
        return torch.from_numpy(out).view(shape)

    def scaled(self, name: str, base: torch.Tensor, taus: Sequence[torch.Tensor | None], scale: float
               ) -> torch.Tensor:
        """base + scale * the fused tensor, in the fusion's own pass."""
        return self(name, taus, onto=base, scale=scale)

    def unsigned(self):
        """The same fusion with every sign +1."""
        return lambda name, taus: self(name, taus, [1.0] * len(self.signs))

    def densities(self, ids: list[str]) -> dict[str, float]:
        entries = [sum(e.values()) for e in self.entries]
        return {tv: sum(kept.values()) / total if total else 0.0
                for tv, kept, total in zip(ids, self.kept, entries, strict=True)}


class FusedDelta:
    """sum_t sign_t m_t tau_t for one tensor, masks (and, for disjoint fusion, scores) read from disk.

    Without scores, chunk by chunk through a compiled loop that reads the packed mask bits in place; with
    scores, each entry goes to the task with the highest normalised importance only.
    """

    def __init__(self, mask_paths: list[Path], score_paths: list[Path], signs: list[float]):
        self._stack = ExitStack()
        self.masks = [self._stack.enter_context(safe_open(str(p), framework="pt")) for p in mask_paths]
        self.scores = [self._stack.enter_context(safe_open(str(p), framework="pt")) for p in score_paths]
        self.signs = signs

    def __enter__(self) -> "FusedDelta":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def __call__(self, name: str, taus: Sequence[torch.Tensor | None], signs: list[float] | None = None
                 ) -> torch.Tensor:
        signs = signs or self.signs
        if self.scores:
            return self._disjoint(name, taus, signs)
        shape, readers = float32_readers(taus)
        fused = [(read, self.masks[index].get_tensor(name).numpy(), np.float32(signs[index]))
                 for index, read in enumerate(readers) if read is not None]
        total = np.zeros(math.prod(shape), np.float32)

        def fuse_range(first: int, last: int) -> None:
            for start in range(first, last, CHUNK):
                stop = min(last, start + CHUNK)
                for read, packed, sign in fused:
                    masked_accumulate(read(start, stop), packed, start, sign, total[start:stop])

        in_chunks(total.size, fuse_range)
        return torch.from_numpy(total).view(shape)

    def _disjoint(self, name: str, taus: Sequence[torch.Tensor | None], signs: list[float]) -> torch.Tensor:
        total, best = None, None
        for index, tau in enumerate(taus):
            if tau is None:
                continue
            if total is None:
                total = torch.zeros_like(tau)
                best = torch.full_like(tau, -1.0)  # normalised scores are >= 0
            mask = unpack_mask(self.masks[index].get_tensor(name), tuple(tau.shape))
            score = torch.where(mask, self.scores[index].get_tensor(name).float(), -1.0)
            wins = score > best  # strict: on a tie the earlier task keeps the entry
            total = torch.where(wins, signs[index] * tau, total)
            best = torch.where(wins, score, best)
        return total

    def unsigned(self):
        """The same fusion with every sign +1."""
        return lambda name, taus: self(name, taus, [1.0] * len(self.signs))

    def scaled(self, name: str, base: torch.Tensor, taus: Sequence[torch.Tensor | None], scale: float
               ) -> torch.Tensor:
        """base + scale * the fused tensor."""
        return base + scale * self(name, taus)

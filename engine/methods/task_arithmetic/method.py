"""Task arithmetic: theta = theta_0 +/- lambda * sum_t tau_t, lambda given or searched on validation data.

Follows mlfoundations/task_vectors (src/task_vectors.py for the sum, src/eval.py for the
search over {0, 0.05, ..., 1} on validation splits).
"""
from collections.abc import Sequence

import numpy as np
import torch

from engine.context import JobContext, MergeInputs, MethodResult
from engine.evaluator import EvalTarget, Evaluator
from engine.methods.spec import unique
from engine.methods.task_arithmetic.params import TaskArithmeticParams
from engine.metrics import given_or_default
from engine.scaling_search import SearchSpec, search_scaling, searched
from engine.streaming import CHUNK, float32_readers, in_chunks, merge_streaming


def summed_vectors(evaluator: Evaluator) -> dict[str, torch.Tensor]:
    """sum_t tau_t over the model's float tensors, read one task vector at a time."""
    summed: dict[str, torch.Tensor] = {}
    for tv in evaluator.inputs.task_vectors:
        for name, delta in evaluator.task_vector_deltas(tv.id).items():
            summed[name] = summed[name].add_(delta) if name in summed else delta
    return summed


def scaled_sum(base: torch.Tensor, taus: Sequence[torch.Tensor | None], scale: float) -> torch.Tensor:
    """base + scale * (tau_1 + tau_2 + ...) in float32, summed in the vectors' order, chunk by chunk: each
    vector's memory-mapped slice is added into a running sum small enough to stay in cache, so every
    input is read once and no whole-tensor temporary is made."""
    shape, readers = float32_readers(taus)
    flat_base = base.reshape(-1).numpy()
    out = np.empty_like(flat_base)

    def sum_range(first: int, last: int) -> None:
        running = np.empty(CHUNK, np.float32)
        for start in range(first, last, CHUNK):
            stop = min(last, start + CHUNK)
            total = running[:stop - start]
            total.fill(0)
            for read in readers:
                if read is not None:
                    np.add(total, read(start, stop), out=total)
            np.multiply(total, np.float32(scale), out=total)
            np.add(flat_base[start:stop], total, out=out[start:stop])

    in_chunks(flat_base.size, sum_range)
    return torch.from_numpy(out).view(shape)


def run(inputs: MergeInputs, params: TaskArithmeticParams, ctx: JobContext) -> MethodResult:
    negate = params.operation == "negate"
    metrics: dict = {}
    if params.validation_datasets:
        evaluator = Evaluator(inputs, ctx)
        # negation reads each dataset's plain accuracy: a dataset named for several vectors is one target (as
        # engine.cost counts it, not once per vector)
        targets = [EvalTarget(ds) for ds in unique(list(params.validation_datasets.values()))] if negate else \
            [EvalTarget(ds, tv) for tv, ds in params.validation_datasets.items()]
        spec = SearchSpec(
            targets=targets,
            negate=negate,
            control=EvalTarget(params.control_dataset_id) if params.control_dataset_id else None)
        scaling, metrics = search_scaling(evaluator, summed_vectors(evaluator), spec)
        chosen_scaling = searched(scaling, metrics)
        del evaluator
    else:
        scaling, chosen_scaling = params.scaling, given_or_default(params, "scaling")
    scale = -scaling if negate else scaling

    def merge(_name: str, base: torch.Tensor, taus: Sequence[torch.Tensor | None]) -> torch.Tensor:
        return scaled_sum(base, taus, scale)

    out = ctx.workdir / "merged.safetensors"
    count = merge_streaming(inputs.onto_path, [tv.path for tv in inputs.task_vectors], out, merge, ctx)
    metrics["chosen"] = {"scaling": chosen_scaling, "operation": given_or_default(params, "operation")}
    return MethodResult(out, metrics={**metrics, "tensors": count})

"""DARE (Yu et al., 2024): random drop and rescale of each task vector, then a sum or a TIES-style merge.

The drop follows FusionBench's dare/utils.py (param_random_drop_: keep where a uniform draw exceeds p, then
divide by 1 - p); the sum follows its DareTaskArithmetic, the ties combination mergekit's dare_ties (sign
consensus and a disjoint mean, no magnitude trim). Each tensor's mask is drawn from its own generator, seeded
by (seed, the vector's position, the tensor's name), so a tensor's drop does not depend on the order in which
tensors are merged or on a lambda search. One tensor of each vector is in memory at a time (the ties
combination holds the dropped slices of all vectors for the tensor it merges).
"""
import zlib
from collections.abc import Sequence

import numpy as np
import torch

from engine.context import JobContext, MergeInputs, MethodResult
from engine.methods.dare.params import DareParams
from engine.methods.ties.method import counted_ties_merge
from engine.metrics import chosen, given_or_default
from engine.scaling_search import write_scaled_merge


def drop_and_rescale(tau: torch.Tensor, drop_rate: float, rescale: bool, seed: int, position: int,
                     name: str) -> tuple[torch.Tensor, int]:
    """tau with each entry dropped with probability drop_rate (the survivors scaled by 1/(1-p) if rescale),
    float32, and how many entries survived."""
    generator = np.random.default_rng([seed, position, zlib.crc32(name.encode())])
    keep = torch.from_numpy(generator.random(tau.numel(), dtype=np.float32) > drop_rate).view(tau.shape)
    dropped = tau.float() * keep
    if rescale:
        dropped = dropped / (1 - drop_rate)
    return dropped, int(keep.sum())


def run(inputs: MergeInputs, params: DareParams, ctx: JobContext) -> MethodResult:
    seed = params.seed if params.seed is not None else ctx.seed
    counts = [0, 0]  # surviving entries, entries

    def dropped(name: str, taus: Sequence[torch.Tensor | None], position: int) -> torch.Tensor | None:
        tau = taus[position]
        if tau is None:
            return None
        kept, survived = drop_and_rescale(tau, params.drop_rate, params.rescale, seed, position, name)
        counts[0] += survived
        counts[1] += tau.numel()
        return kept

    def merged_delta(name: str, taus: Sequence[torch.Tensor | None]) -> torch.Tensor:
        if params.combine == "ties":
            slices = [dropped(name, taus, position) for position in range(len(taus))]
            return counted_ties_merge(slices, 100.0, [0.0] * len(slices), "mean")[0]
        total = None
        for position in range(len(taus)):  # one vector's slice in memory at a time
            slice_ = dropped(name, taus, position)
            if slice_ is not None:
                total = slice_ if total is None else total.add_(slice_)
        return total

    scaling = params.resolved_scaling
    written = write_scaled_merge(inputs, ctx, merged_delta, params.validation_datasets, params.scaling_grid, scaling,
                                 given_or_default(params, "scaling") | {"value": scaling})
    metrics = written.metrics
    metrics["chosen"] = {
        "drop_rate": given_or_default(params, "drop_rate"), "rescale": given_or_default(params, "rescale"),
        "combine": given_or_default(params, "combine"), "scaling": written.chosen_scaling,
        "seed": chosen(seed, "given" if params.seed is not None else "the job's seed"),
    }
    metrics.update(tensors=written.tensors, kept_fraction=counts[0] / counts[1] if counts[1] else 0.0)
    return MethodResult(written.path, metrics=metrics)

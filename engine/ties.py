"""TIES merging: trim, elect sign, disjoint mean (Yadav et al., 2023), one tensor at a time."""
import math

import torch

from engine.context import JobContext, MergeInputs, MethodResult
from engine.params import TiesParams
from engine.streaming import merge_streaming


def trim(tau: torch.Tensor, top_k: float) -> torch.Tensor:
    """tau with all but its top_k percent largest-magnitude entries zeroed (entries tied at the cut kept)."""
    keep = math.ceil(top_k / 100 * tau.numel())
    if keep >= tau.numel():
        return tau.clone()
    magnitude = tau.abs().flatten()
    cut = magnitude.kthvalue(magnitude.numel() - keep + 1).values
    return torch.where(tau.abs() >= cut, tau, torch.zeros_like(tau))


def ties_merge(taus: list[torch.Tensor], top_k: float) -> torch.Tensor:
    """The merged task vector of one tensor: mean over tasks of the trimmed entries agreeing with the elected sign."""
    trimmed = torch.stack([trim(tau, top_k) for tau in taus])
    elected = torch.sign(trimmed.sum(dim=0))
    agrees = (torch.sign(trimmed) == elected) & (trimmed != 0)
    count = agrees.sum(dim=0)
    total = torch.where(agrees, trimmed, torch.zeros_like(trimmed)).sum(dim=0)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def run(inputs: MergeInputs, params: TiesParams, ctx: JobContext) -> MethodResult:
    kept = [0, 0]  # nonzero merged entries, entries merged

    def merge(_name: str, base: torch.Tensor, taus: list[torch.Tensor | None]) -> torch.Tensor:
        merged = ties_merge([tau for tau in taus if tau is not None], params.top_k)
        kept[0] += int(torch.count_nonzero(merged))
        kept[1] += merged.numel()
        return base + params.scaling * merged

    out = ctx.workdir / "merged.safetensors"
    count = merge_streaming(inputs.base_path, [tv.path for tv in inputs.task_vectors], out, merge, ctx)
    return MethodResult(out, metrics={
        "top_k": params.top_k, "scaling": params.scaling, "tensors": count,
        "merged_density": kept[0] / kept[1] if kept[1] else 0.0,
    })

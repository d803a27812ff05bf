"""Task arithmetic: theta = theta_0 +/- lambda * sum_t tau_t, lambda given or searched on validation data."""
from collections.abc import Sequence

import torch

from engine.context import JobContext, MergeInputs, MethodResult
from engine.params import TaskArithmeticParams
from engine.streaming import merge_streaming


def run(inputs: MergeInputs, params: TaskArithmeticParams, ctx: JobContext) -> MethodResult:
    negate = params.operation == "negate"
    scaling, metrics = params.scaling, {"scaling_source": "given"}
    if params.validation_datasets:
        from engine.evaluation import (
            search_task_arithmetic_scaling,  # loads open_clip only when searching
        )

        scaling, search = search_task_arithmetic_scaling(
            inputs, params.validation_datasets, negate, params.control_dataset_id, ctx)
        metrics = {"scaling_source": "search", **search}
    scale = -scaling if negate else scaling

    def merge(_name: str, base: torch.Tensor, taus: Sequence[torch.Tensor | None]) -> torch.Tensor:
        total = torch.zeros_like(base)
        for tau in taus:
            if tau is not None:
                total += tau
        return base + scale * total

    out = ctx.workdir / "merged.safetensors"
    count = merge_streaming(inputs.base_path, [tv.path for tv in inputs.task_vectors], out, merge, ctx)
    return MethodResult(out, metrics={"scaling": scaling, "operation": params.operation, "tensors": count, **metrics})

"""Task arithmetic: theta = theta_0 +/- lambda * sum_t tau_t."""
import torch

from engine.context import JobContext, MergeInputs, MethodResult
from engine.params import TaskArithmeticParams
from engine.streaming import merge_streaming


def run(inputs: MergeInputs, params: TaskArithmeticParams, ctx: JobContext) -> MethodResult:
    sign = -1.0 if params.operation == "negate" else 1.0
    scale = sign * params.scaling

    def merge(_name: str, base: torch.Tensor, taus: list[torch.Tensor | None]) -> torch.Tensor:
        total = torch.zeros_like(base)
        for tau in taus:
            if tau is not None:
                total += tau
        return base + scale * total

    out = ctx.workdir / "merged.safetensors"
    count = merge_streaming(inputs.base_path, [tv.path for tv in inputs.task_vectors], out, merge, ctx)
    return MethodResult(out, metrics={"scaling": params.scaling, "operation": params.operation, "tensors": count})

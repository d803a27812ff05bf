"""How TSV-M, Iso-C and Iso-CTS run: engine.spectral's merge per tensor, alpha given or searched."""
from collections.abc import Sequence

import torch

from engine.context import JobContext, MergeInputs, MethodResult
from engine.methods.spectral_params import SPECTRAL_GRID, SPECTRAL_PATIENCE, SpectralParams
from engine.metrics import given_or_default
from engine.scaling_search import write_scaled_merge
from engine.spectral import MatrixMerge, is_merged_as_matrix, merged_delta, on_device


def run_spectral(inputs: MergeInputs, params: SpectralParams, ctx: JobContext, merge_matrix: MatrixMerge,
                 chosen_extra: dict | None = None) -> MethodResult:
    """A method of this family: theta_0 + alpha * (merge_matrix per weight matrix, taken on the job's device; the
    mean elsewhere), alpha given or searched on validation data as the official code searches it."""
    matrices, zero = set(), set()
    merge_matrix = on_device(merge_matrix, ctx.device)

    def delta(name: str, taus: Sequence[torch.Tensor | None]) -> torch.Tensor:
        merged = merged_delta(name, taus, merge_matrix)
        if is_merged_as_matrix(name, merged.shape):
            matrices.add(name)
            if not merged.any():
                zero.add(name)
        return merged

    written = write_scaled_merge(inputs, ctx, delta, params.validation_datasets, SPECTRAL_GRID, params.scaling,
                                 given_or_default(params, "scaling"), patience=SPECTRAL_PATIENCE)
    metrics = written.metrics
    metrics["chosen"] = {"scaling": written.chosen_scaling, **(chosen_extra or {})}
    metrics.update(tensors=written.tensors, matrix_tensors=len(matrices), zero_matrices=sorted(zero))
    return MethodResult(written.path, metrics=metrics)

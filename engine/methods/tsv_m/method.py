"""TSV-M, following AntoAndGar/task_singular_vectors (src/utils/TSVM_utils.py,
compute_and_sum_svd_mem_reduction): engine.spectral.tsv_merge per weight matrix, the mean elsewhere."""
from engine.context import JobContext, MergeInputs, MethodResult
from engine.methods.spectral_method import run_spectral
from engine.methods.tsv_m.params import TsvMParams
from engine.spectral import tsv_merge


def run(inputs: MergeInputs, params: TsvMParams, ctx: JobContext) -> MethodResult:
    return run_spectral(inputs, params, ctx, tsv_merge)

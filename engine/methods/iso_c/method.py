"""Iso-C, following danielm1405/iso-merging (src/utils/iso.py, iso_c): engine.spectral.iso_c_merge per
weight matrix, the mean elsewhere."""
from engine.context import JobContext, MergeInputs, MethodResult
from engine.methods.iso_c.params import IsoCParams
from engine.methods.spectral_method import run_spectral
from engine.spectral import iso_c_merge


def run(inputs: MergeInputs, params: IsoCParams, ctx: JobContext) -> MethodResult:
    return run_spectral(inputs, params, ctx, iso_c_merge)

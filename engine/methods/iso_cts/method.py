"""Iso-CTS, following danielm1405/iso-merging (src/utils/iso.py, iso_cts): engine.spectral.iso_cts_merge per
weight matrix, the mean elsewhere."""
from functools import partial

from engine.context import JobContext, MergeInputs, MethodResult
from engine.methods.iso_cts.params import IsoCtsParams
from engine.methods.spectral_method import run_spectral
from engine.metrics import given_or_default
from engine.spectral import iso_cts_merge


def run(inputs: MergeInputs, params: IsoCtsParams, ctx: JobContext) -> MethodResult:
    merge = partial(iso_cts_merge, common_space_fraction=params.common_space_fraction)
    return run_spectral(inputs, params, ctx, merge,
                        {"common_space_fraction": given_or_default(params, "common_space_fraction")})

"""The method catalogue: every composition method, listed explicitly (as mergekit's merge_methods/registry.py).

Importing it loads each method's params module only: no torch, no side effects. Adding a method
is one folder under engine/methods/ and one line here.
"""
from engine.methods.atlas.params import SPEC as ATLAS
from engine.methods.dare.params import SPEC as DARE
from engine.methods.iso_c.params import SPEC as ISO_C
from engine.methods.iso_cts.params import SPEC as ISO_CTS
from engine.methods.spec import MethodSpec
from engine.methods.sta.params import SPEC as STA
from engine.methods.task_arithmetic.params import SPEC as TASK_ARITHMETIC
from engine.methods.ties.params import SPEC as TIES
from engine.methods.tsv_m.params import SPEC as TSV_M

METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    TASK_ARITHMETIC,
    TIES,
    STA,
    ATLAS,
    DARE,
    TSV_M,
    ISO_C,
    ISO_CTS,
)}


def get_method(name: str) -> MethodSpec:
    """The spec of a method; KeyError names the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(METHODS)}") from None

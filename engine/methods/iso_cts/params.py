from pydantic import Field

from engine.methods.spec import MethodSpec
from engine.methods.spectral_params import SPECTRAL_RESULT_KEYS, SpectralParams


class IsoCtsParams(SpectralParams):
    """Iso-CTS. Each weight matrix: the top singular directions of the tasks' sum (the common space), plus for
    each task the top directions of its matrix with the common space projected out, orthogonalised together
    with a flat spectrum; other tensors averaged."""

    common_space_fraction: float = Field(
        0.8, gt=0, lt=1,
        description="Share of each matrix's rank given to the common space (rounded so that the rest divides "
                    "evenly among the tasks); 0.8 is the official code's default.",
    )


SPEC = MethodSpec(
    name="iso_cts",
    summary="Iso-CTS: per weight matrix, the tasks' common subspace plus each task's own directions, orthogonalised "
            "with a flat spectrum; other tensors averaged; alpha searched on validation data when datasets are given.",
    reference="Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific "
              "Subspaces, ICML 2025 (arXiv 2502.04959); danielm1405/iso-merging.",
    params=IsoCtsParams,
    result_keys=SPECTRAL_RESULT_KEYS,
)

from engine.methods.spec import MethodSpec
from engine.methods.spectral_params import SPECTRAL_RESULT_KEYS, SpectralParams


class IsoCParams(SpectralParams):
    """Iso-C. Each weight matrix: the sum of the task matrices with every singular value replaced by their
    mean (a flat spectrum); other tensors averaged. No parameter besides alpha, as in the paper."""


SPEC = MethodSpec(
    name="iso_c",
    summary="Iso-C: per weight matrix, the sum of the task vectors with its spectrum flattened to the mean singular "
            "value; other tensors averaged; alpha searched on validation data when datasets are given.",
    reference="Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific "
              "Subspaces, ICML 2025 (arXiv 2502.04959); danielm1405/iso-merging.",
    params=IsoCParams,
    result_keys=SPECTRAL_RESULT_KEYS,
)

from engine.methods.spec import MethodSpec
from engine.methods.spectral_params import SPECTRAL_RESULT_KEYS, SpectralParams


class TsvMParams(SpectralParams):
    """TSV-M. Each weight matrix: every task keeps its top 1/T singular triplets; the concatenated singular
    vectors are orthogonalised (their polar factors) and recombined with the kept singular values; other
    tensors are averaged. No parameter besides alpha, as in the paper."""


SPEC = MethodSpec(
    name="tsv_m",
    summary="TSV-M: per weight matrix, each task's top 1/T singular directions, orthogonalised across tasks and "
            "recombined; other tensors averaged; alpha searched on validation data when datasets are given.",
    reference="Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model Merging, CVPR 2025 "
              "(arXiv 2412.00081); AntoAndGar/task_singular_vectors.",
    params=TsvMParams,
    result_keys=SPECTRAL_RESULT_KEYS,
)

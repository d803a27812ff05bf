"""Parameters shared by the merges in singular-value space (TSV-M, Iso-C, Iso-CTS); torch-free."""
from pydantic import Field

from engine.methods.spec import SEARCH_RESULT_KEYS, SearchedMergeParams, TaskDatasets

# The official code's search (danielm1405/iso-merging, src/eval/eval.py, used for TSV-M, Iso-C and Iso-CTS
# alike): alpha over linspace(0, 3, 31)[1:], stopping after 3 points in a row without improvement.
SPECTRAL_GRID = tuple(round(0.1 * i, 1) for i in range(1, 31))
SPECTRAL_PATIENCE = 3

SPECTRAL_RESULT_KEYS = {
    "matrix_tensors": "Tensors merged in singular-value space (2-D weights); the others are the vectors' mean.",
    "zero_matrices": "Weight matrices whose merge is zero, so they stay theta_0: no task changed them, or (TSV-M) "
                     "the job has more task vectors than the matrix's rank, so each keeps int(rank / T) = 0 "
                     "singular triplets, as the reference computes it.",
    **SEARCH_RESULT_KEYS,
}


class SpectralParams(SearchedMergeParams):
    scaling: float = Field(
        1.0, ge=-10, le=10,
        description="alpha in theta_0 + alpha * merged vector. The papers choose alpha on validation data "
                    "(validation_datasets); 1.0 when none is given. Not used when validation_datasets are given.",
    )
    validation_datasets: TaskDatasets = Field(
        default={},
        description="Task vector id -> dataset id. When given, alpha is searched over 0.1, 0.2, ..., 3.0 on each "
                    "dataset's val split (else train) for the highest mean normalised accuracy, stopping after 3 "
                    "points without improvement (the official code's search). The checkpoint's accuracy on their "
                    "report split (test, else val) is in result.metrics.evaluation.",
    )

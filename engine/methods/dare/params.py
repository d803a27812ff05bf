from typing import Literal

from pydantic import Field

from engine.methods.spec import SEARCH_RESULT_KEYS, MethodSpec, SearchedMergeParams, TaskDatasets

# lambda grids searched on validation data: task arithmetic's for sum, the TIES code's for ties (a disjoint mean).
SUM_SCALING_GRID = tuple(round(0.05 * i, 2) for i in range(21))
TIES_SCALING_GRID = tuple(round(0.8 + 0.1 * i, 2) for i in range(18))
DEFAULT_SCALING = {"sum": 0.3, "ties": 1.0}


class DareParams(SearchedMergeParams):
    """DARE. Each task vector loses a random fraction drop_rate of its entries and the survivors are scaled by
    1 / (1 - drop_rate), so its expectation is unchanged; the dropped vectors are then summed (task arithmetic)
    or merged TIES-style. The drop is seeded per task vector and tensor: the same seed gives the same bytes. (The
    draws changed once, for speed, from one 53-bit draw per splitmix64 hash to two 32-bit draws: a DARE
    checkpoint made before that change is not reproduced bit for bit by its seed.)"""

    drop_rate: float = Field(
        0.5, ge=0, lt=1,
        description="p: the probability that an entry is dropped. 0.5 is FusionBench's default for CLIP models "
                    "(the paper goes to 0.9 and beyond for language models).",
    )
    rescale: bool = Field(True, description="Scale the surviving entries by 1 / (1 - p), as the paper does.")
    combine: Literal["sum", "ties"] = Field(
        "sum", description="sum: theta_0 + lambda * the sum of the dropped vectors (FusionBench's DareTaskArithmetic, "
                           "mergekit's dare_linear); ties: elect a sign per entry and take the disjoint mean of the "
                           "agreeing entries, with DARE in place of TIES's magnitude trimming (mergekit's dare_ties).",
    )
    scaling: float | None = Field(
        None, ge=-10, le=10,
        description="lambda; None: 0.3 for sum (FusionBench's default), 1 for ties. Not used when "
                    "validation_datasets are given.",
    )
    seed: int | None = Field(
        None, ge=0, le=2**63 - 1,
        description="Seed of the drop masks; None: the job's seed. Reported in result.metrics.chosen.",
    )
    validation_datasets: TaskDatasets = Field(
        default={},
        description="Task vector id -> dataset id. When given, lambda is searched on each dataset's val split "
                    "(else train) for the highest mean normalised accuracy: over 0, 0.05, ..., 1 for sum, over "
                    "0.8, 0.9, ..., 2.5 for ties.",
    )

    @property
    def scaling_grid(self) -> tuple[float, ...]:
        return SUM_SCALING_GRID if self.combine == "sum" else TIES_SCALING_GRID

    @property
    def resolved_scaling(self) -> float:
        return self.scaling if self.scaling is not None else DEFAULT_SCALING[self.combine]


SPEC = MethodSpec(
    name="dare",
    summary="DARE: drop each task vector's entries at random with probability p and rescale the rest by 1/(1-p), "
            "then sum (task arithmetic) or merge TIES-style; seeded; lambda searched on validation data when "
            "datasets are given.",
    reference="Yu et al., Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free "
              "Lunch, ICML 2024 (arXiv 2311.03099); FusionBench's dare; mergekit's dare_linear and dare_ties.",
    params=DareParams,
    result_keys={
        "kept_fraction": "Fraction of the task vectors' entries that survived the drop.",
        **SEARCH_RESULT_KEYS,
    },
)

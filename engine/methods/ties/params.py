from typing import Literal

from pydantic import Field

from engine.methods.spec import SEARCH_RESULT_KEYS, MethodSpec, SearchedMergeParams, TaskDatasets

# lambda grids searched on validation data. mean: the TIES code's (prateeky2806/ties-merging README,
# 0.8 to 2.5 by 0.1); sum: task arithmetic's {0, 0.05, ..., 1} (a sum is on task arithmetic's scale).
MEAN_SCALING_GRID = tuple(round(0.8 + 0.1 * i, 2) for i in range(18))
SUM_SCALING_GRID = tuple(round(0.05 * i, 2) for i in range(21))
DEFAULT_SCALING = {"mean": 1.0, "sum": 0.3}


class TiesParams(SearchedMergeParams):
    """TIES-merging. Defaults follow the paper and its code: the top 20% of each task vector by magnitude
    over the whole flattened vector, sign election, disjoint mean, lambda 1 (the code's default; its
    reported numbers search lambda on validation data, which validation_datasets does). One deviation: an
    entry whose kept values cancel exactly (their float32 sum is 0) merges to 0, where the code gives it the
    sign most of the model's entries elected."""

    top_k: float = Field(
        20.0, gt=0, le=100,
        description="Percent of each task vector's entries kept, by magnitude (ties at the cut are kept). "
                    "20 is the TIES paper's default.",
    )
    trim_scope: Literal["global", "tensor"] = Field(
        "global", description="global: the top-k% over the whole flattened task vector (the paper and its code); "
                              "tensor: the top-k% of each tensor separately (mergekit's choice).",
    )
    merge: Literal["mean", "sum"] = Field(
        "mean", description="mean: the disjoint mean of the entries agreeing with the elected sign (the paper); "
                            "sum: their sum (FusionBench's TIES, reported with lambda 0.3).",
    )
    scaling: float | None = Field(
        None, ge=-10, le=10,
        description="lambda applied to the merged vector; None: 1 for mean, 0.3 for sum. Not used when "
                    "validation_datasets are given.",
    )
    validation_datasets: TaskDatasets = Field(
        default={},
        description="Task vector id -> dataset id. When given, lambda is searched on each dataset's val split "
                    "(else train) for the highest mean normalised accuracy: over 0.8, 0.9, ..., 2.5 for mean (the "
                    "TIES code's grid), over 0, 0.05, ..., 1 for sum.",
    )

    @property
    def scaling_grid(self) -> tuple[float, ...]:
        return MEAN_SCALING_GRID if self.merge == "mean" else SUM_SCALING_GRID

    @property
    def resolved_scaling(self) -> float:
        return self.scaling if self.scaling is not None else DEFAULT_SCALING[self.merge]


SPEC = MethodSpec(
    name="ties",
    summary="TIES: trim each task vector to its top-k% entries, elect a sign per entry, merge the agreeing "
            "entries (disjoint mean or sum); streamed; lambda searched on validation data when datasets are given.",
    reference="Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023 "
              "(arXiv 2306.01708); prateeky2806/ties-merging; FusionBench's ties_merging.",
    params=TiesParams,
    result_keys={
        "merged_density": "Fraction of merged entries that are nonzero.",
        **SEARCH_RESULT_KEYS,
    },
)

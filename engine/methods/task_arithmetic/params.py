from typing import Literal

from pydantic import Field, model_validator

from engine.methods.spec import (
    SEARCH_RESULT_KEYS,
    DatasetNeed,
    MethodParams,
    MethodSpec,
    TaskDatasets,
    check_task_datasets,
    search_needs,
    unique,
)


class TaskArithmeticParams(MethodParams):
    scaling: float = Field(
        0.3, ge=-10, le=10,
        description="lambda in theta_0 + lambda * sum(tau); 0.3 is the usual default without validation data. "
                    "Not used when validation_datasets are given (lambda is then searched).",
    )
    operation: Literal["add", "negate"] = Field(
        "add", description="add: multi-task model; negate: theta_0 - lambda * sum(tau), to forget the tasks.",
    )
    validation_datasets: TaskDatasets = Field(
        default={},
        description="Task vector id -> dataset id. When given, lambda is searched over {0, 0.05, ..., 1.0} "
                    "on each dataset's val split (else train). add: the highest mean normalised accuracy "
                    "(merged / that task's fine-tuned model); negate: the lowest mean target accuracy whose "
                    "control accuracy stays >= 0.95 x the zero-shot control accuracy. The checkpoint's "
                    "accuracy on their report split (test, else val) is in result.metrics.evaluation.",
    )
    control_dataset_id: str | None = Field(
        None, description="negate with search: the control task whose accuracy must be kept.",
    )

    @model_validator(mode="after")
    def _search_inputs(self) -> "TaskArithmeticParams":
        if self.control_dataset_id is not None and not (self.operation == "negate" and self.validation_datasets):
            raise ValueError("control_dataset_id is used only by a negation search (operation negate "
                             "with validation_datasets)")
        if self.operation == "negate" and self.validation_datasets and self.control_dataset_id is None:
            raise ValueError("a negation search needs control_dataset_id")
        check_task_datasets(self.validation_datasets, "validation_datasets", normalised=self.operation == "add",
                            control=self.control_dataset_id)
        return self

    def dataset_ids(self) -> list[str]:
        return unique([*self.validation_datasets.values(), self.control_dataset_id])

    def dataset_needs(self) -> list[DatasetNeed]:
        return search_needs(self.validation_datasets, self.control_dataset_id)

    def task_vector_ids(self) -> list[str]:
        return list(self.validation_datasets)

    def evaluation_targets(self) -> list[tuple[str, str | None]]:
        if self.operation == "negate":
            return [(ds, None) for ds in unique([*self.validation_datasets.values(), self.control_dataset_id])]
        return [(ds, tv) for tv, ds in self.validation_datasets.items()]


SPEC = MethodSpec(
    name="task_arithmetic",
    summary="theta_0 + lambda * sum of task vectors (or minus, to forget), streamed one tensor at a time; "
            "lambda searched on validation data when datasets are given.",
    reference="Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023 (arXiv 2212.04089); "
              "mlfoundations/task_vectors.",
    params=TaskArithmeticParams,
    result_keys={
        **SEARCH_RESULT_KEYS,
    },
)

"""What every composition method declares: a torch-free parameter schema and a spec.

A method lives in one folder, engine/methods/<name>/:
- params.py: its parameters (pydantic) and its SPEC; importing it loads no torch, so the API
  validates job bodies and publishes the schemas without the engine's weight;
- method.py: run(inputs, params, ctx) -> MethodResult, imported only where jobs run.
engine/methods/catalogue.py lists the specs.
"""
import importlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, model_validator

from engine.context import SELECTION_SPLITS

TaskDatasets = dict[str, str]  # task vector id -> dataset id

# Result keys every method may report, beside its own.
COMMON_RESULT_KEYS: dict[str, str] = {
    "chosen": "Every value the method used or chose: {name: {value, source}}; source is 'given', 'default', "
              "or how it was chosen (e.g. 'search on val ...', 'best epoch on val ...').",
    "evaluation": "When the job names datasets: the checkpoint's accuracy on each dataset's report split "
                  "(test, else val, else train), {datasets: {id: {split, images, accuracy[, task_vector_id, "
                  "reference_accuracy (its fine-tuned model's), normalised_accuracy]}}, mean_accuracy[, "
                  "mean_normalised_accuracy]}.",
    "tensors": "Tensors written to the checkpoint.",
}


class StrictModel(BaseModel):
    """Refuses unknown fields (valid_fields_at names the valid ones for the error) and non-finite numbers."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def valid_fields_at(model: type[BaseModel], path: Sequence[str]) -> list[str] | None:
    """The field names of the model nested at path (field names, outermost first); None if path leaves models."""
    for part in path:
        field = model.model_fields.get(part)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return list(model.model_fields)


@dataclass(frozen=True)
class DatasetNeed:
    """A dataset a method reads at `loc` of its params, to train, calibrate or select on: the method uses the
    first of `splits` the dataset has, which must hold images, and labelled ones where `labelled`."""

    loc: tuple[str, ...]
    dataset_id: str
    splits: tuple[str, ...]
    labelled: bool
    purpose: str  # what it is read for, as the end of a sentence: "to train aTLAS on (few_shot)"
    # One class gives every image the same prediction: a cross-entropy with no gradient, an entropy of 0, an
    # accuracy of 1 whatever the weights. An evaluation may still report one.
    min_classes: int = 2

    def unmet(self, split_sizes: dict[str, int], dataset_labelled: bool, class_count: int | None) -> str | None:
        """Why a dataset with these split sizes, labels and class names (their number; None: none) cannot serve,
        or None (the engine's pick_split, is_labelled and zero-shot head, answered from the dataset's row)."""
        split = next((s for s in self.splits if split_sizes.get(s)), None)
        if split is None:
            has = ", ".join(s for s, count in split_sizes.items() if count) or "no images"
            return f"The dataset has no {' or '.join(self.splits)} split {self.purpose}; it has {has}"
        if self.labelled and not dataset_labelled:
            return f"The dataset is unlabelled; its {split} split needs labels {self.purpose}"
        if class_count is None:
            return f"The dataset has no class names; its zero-shot head needs them {self.purpose}"
        if class_count < self.min_classes:
            return (f"The dataset has {class_count} class; at least {self.min_classes} are needed {self.purpose} "
                    f"(with one, every image gets the same prediction)")
        return None


class MethodParams(StrictModel):
    def dataset_ids(self) -> list[str]:
        """Ids of the registered datasets this job reads (the API checks they exist and are the owner's)."""
        return []

    def dataset_needs(self) -> list[DatasetNeed]:
        """What the method needs of the datasets it trains, calibrates or selects on (the API checks each at
        submission; the report's datasets need nothing: an unlabelled one is reported as such)."""
        return []

    def task_vector_ids(self) -> list[str]:
        """Task vector ids the parameters name (each must be among the job's task vectors)."""
        return []

    def evaluation_targets(self) -> list[tuple[str, str | None]]:
        """(dataset id, task vector id or None) whose accuracy the finished checkpoint reports on its report
        split; a task vector id normalises that dataset's accuracy by its fine-tuned model."""
        return []


# Result keys of every method that searches lambda on validation data.
SEARCH_RESULT_KEYS: dict[str, str] = {
    "search": "With validation_datasets: the grid, the rule, the split per dataset, the fine-tuned references and "
              "every row evaluated.",
    "selected": "With validation_datasets: the search row that was chosen.",
}


class SearchedMergeParams(MethodParams):
    """A merge of all the job's vectors whose lambda is searched on validation_datasets when given (each method
    declares the field with its own grid): what it reads, the vectors it names, what the checkpoint reports."""

    validation_datasets: TaskDatasets

    @model_validator(mode="after")
    def _distinct_validation_datasets(self) -> "SearchedMergeParams":
        check_task_datasets(self.validation_datasets, "validation_datasets", normalised=True)
        return self

    def dataset_ids(self) -> list[str]:
        return unique(list(self.validation_datasets.values()))

    def dataset_needs(self) -> list[DatasetNeed]:
        return search_needs(self.validation_datasets)

    def task_vector_ids(self) -> list[str]:
        return list(self.validation_datasets)

    def evaluation_targets(self) -> list[tuple[str, str | None]]:
        return [(ds, tv) for tv, ds in self.validation_datasets.items()]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    summary: str
    reference: str  # the paper, and the official code its recipe follows
    params: type[MethodParams]
    result_keys: dict[str, str] = field(default_factory=dict)  # its own keys in result.metrics

    @property
    def all_result_keys(self) -> dict[str, str]:
        return {**COMMON_RESULT_KEYS, **self.result_keys}

    def runner(self) -> Callable:
        """run(inputs, params, ctx) from method.py beside the params module (imported on first use)."""
        package = self.params.__module__.rpartition(".")[0]
        return importlib.import_module(f"{package}.method").run


def check_task_datasets(datasets: TaskDatasets, field: str, normalised: bool, control: str | None = None,
                        control_field: str = "control_dataset_id") -> None:
    """Datasets a method selects on, as its validators check them (ValueError). Normalised (addition): each
    dataset's accuracy is read against one task vector's fine-tuned model, so a dataset named for two vectors
    would be reported against one of them. A control that is also a target would be kept and forgotten at once:
    every forgetting choice then passes the control check on the very data it forgets."""
    if normalised:
        named = Counter(datasets.values())
        if shared := sorted(ds for ds, count in named.items() if count > 1):
            raise ValueError(f"{field}: each task vector needs a dataset of its own (its accuracy is normalised by "
                             f"that vector's fine-tuned model); {', '.join(shared)} is named for several")
    if control is not None and control in datasets.values():
        raise ValueError(f"{control_field} {control} is also a target in {field}: the control must be another task")


def search_needs(validation_datasets: TaskDatasets, control_dataset_id: str | None = None) -> list[DatasetNeed]:
    """A lambda search reads each validation dataset's and the control's selection split (scaling_search)."""
    needs = [DatasetNeed(("validation_datasets", tv), ds, SELECTION_SPLITS, True, "to search lambda on")
             for tv, ds in validation_datasets.items()]
    if control_dataset_id is not None:
        needs.append(DatasetNeed(("control_dataset_id",), control_dataset_id, SELECTION_SPLITS, True,
                                 "to check the control's accuracy on"))
    return needs


def unique(ids: list[str | None]) -> list[str]:
    return list(dict.fromkeys(i for i in ids if i is not None))

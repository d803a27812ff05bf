"""The method registry: each composition method has a validated parameter schema and a runner.

Schemas import no torch, so the API can validate job specs without loading the engine.
"""
import importlib
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict


class MethodParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def dataset_ids(self) -> list[str]:
        """Ids of the registered datasets this job reads (the API checks they exist and are the owner's)."""
        return []

    def task_vector_ids(self) -> list[str]:
        """Task vector ids the parameters name (each must be among the job's task vectors)."""
        return []


@dataclass(frozen=True)
class MethodSpec:
    name: str
    params: type[MethodParams]
    runner: str  # "module:function", imported only by workers
    summary: str

    def load_runner(self) -> Callable:
        module, function = self.runner.split(":")
        return getattr(importlib.import_module(module), function)


METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    METHODS[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    import engine.params  # noqa: F401 - fills METHODS

    return METHODS[name]


def method_names() -> list[str]:
    import engine.params  # noqa: F401 - fills METHODS

    return sorted(METHODS)

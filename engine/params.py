"""Parameter schemas of the composition methods, registered by name."""
from typing import Literal

from pydantic import Field

from engine.registry import MethodParams, MethodSpec, register


class TaskArithmeticParams(MethodParams):
    scaling: float = Field(
        0.3, ge=-10, le=10,
        description="lambda in theta_0 + lambda * sum(tau); 0.3 is the usual default without validation data.",
    )
    operation: Literal["add", "negate"] = Field(
        "add", description="add: multi-task model; negate: theta_0 - lambda * sum(tau), to forget the tasks.",
    )


register(MethodSpec(
    name="task_arithmetic",
    params=TaskArithmeticParams,
    runner="engine.task_arithmetic:run",
    summary="theta_0 + lambda * sum of task vectors, streamed one tensor at a time.",
))

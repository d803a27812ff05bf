"""The method catalogue: what each composition method does, its params schema and the results it reports."""
from fastapi import APIRouter

from app.deps import OwnerDep, ReleasingRoute
from app.problems import PROBLEM_RESPONSES, not_found
from app.schemas import MethodOut
from engine.methods.catalogue import METHODS
from engine.methods.spec import MethodSpec

router = APIRouter(prefix="/v1/methods", tags=["methods"], responses=PROBLEM_RESPONSES,
                   route_class=ReleasingRoute)


def _out(spec: MethodSpec) -> MethodOut:
    return MethodOut(name=spec.name, summary=spec.summary, reference=spec.reference,
                     params_schema=spec.params.model_json_schema(), result_keys=spec.all_result_keys)


@router.get("", response_model=list[MethodOut])
def list_methods(_owner: OwnerDep):
    return [_out(spec) for spec in METHODS.values()]


@router.get("/{name}", response_model=MethodOut)
def get_method(name: str, _owner: OwnerDep):
    if name not in METHODS:
        raise not_found("method", name)
    return _out(METHODS[name])

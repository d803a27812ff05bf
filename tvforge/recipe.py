"""Merge recipes: one small YAML file names the base, the task vectors, the datasets, the method and its params
(`tvforge merge RECIPE.yaml`). Params are validated by the same method schemas as the API's job bodies; they
name vectors and datasets by their recipe names, which become server ids once the files are uploaded.
`recipe_json_schema()` is published as docs/recipe.schema.json for editors."""
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, TypeAdapter, ValidationError, create_model, model_validator

from engine.methods.catalogue import METHODS
from engine.methods.spec import MethodParams, MethodSpec, StrictModel, valid_fields_at
from tvforge.client import TvforgeClient, file_sha256

MAX_RECIPE_BYTES = 1024 * 1024


class RecipeError(ValueError):
    """A recipe that cannot run, with every reason, one per line."""


class FileOrId(StrictModel):
    path: Path | None = Field(None, description="A local file, relative to the recipe's folder.")
    id: str | None = Field(None, description="Or the id of something the server already holds.")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.id is None):
            raise ValueError("give exactly one of path and id")
        return self


class BaseRef(FileOrId):
    name: str | None = Field(None, max_length=200, description="Registered name; default: the file's stem.")
    architecture: str | None = Field(None, description="An open_clip model name, e.g. ViT-B-32.")
    config: dict[str, Any] | None = Field(None, description="Or an open_clip model config.")

    @model_validator(mode="after")
    def _one_architecture(self):
        if self.path is not None and (self.architecture is None) == (self.config is None):
            raise ValueError("a base given by path needs exactly one of architecture and config")
        return self


class VectorRef(FileOrId):
    kind: Literal["task_vector", "finetuned"] = Field(
        "task_vector", description="task_vector: the file is tau; finetuned: fine-tuned weights (tau is computed).")
    class_names: list[str] | None = Field(None, description="The task's class names.")


class DatasetRef(FileOrId):
    class_names: list[str] | None = Field(None, description="Class names, if the file does not carry them.")
    templates: list[str] | None = Field(None, description="Zero-shot prompt templates ({c}: the class name).")


Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")]


class RecipeFields(StrictModel):
    base: BaseRef
    vectors: dict[Name, VectorRef | Path] = Field(
        min_length=1, max_length=64,
        description="Task vectors by name, in the job's order; a bare path is short for {path: ...}.")
    datasets: dict[Name, DatasetRef | Path] = Field(
        default={}, max_length=64, description="Datasets by name; params refer to them by these names.")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    start_checkpoint_id: str | None = Field(
        None, description="Chaining: merge onto this checkpoint (an earlier job's, same base model) instead of "
                          "theta_0.")
    output: Path | None = Field(None, description="Where the merged checkpoint goes, relative to the recipe.")

    @model_validator(mode="after")
    def _distinct_names(self):
        shared = set(self.vectors) & set(self.datasets)
        if shared:
            raise ValueError(f"a vector and a dataset share the name(s) {sorted(shared)}: params name both, so "
                             "names must be distinct")
        return self

    def vector_refs(self) -> dict[str, VectorRef]:
        return {n: r if isinstance(r, VectorRef) else VectorRef(path=r) for n, r in self.vectors.items()}

    def dataset_refs(self) -> dict[str, DatasetRef]:
        return {n: r if isinstance(r, DatasetRef) else DatasetRef(path=r) for n, r in self.datasets.items()}


def _recipe_model(spec: MethodSpec) -> type[RecipeFields]:
    title = "".join(word.capitalize() for word in spec.name.split("_"))
    return create_model(f"{title}Recipe", __base__=RecipeFields, __doc__=f"A `{spec.name}` merge. {spec.summary}",
                        method=(Literal[spec.name], Field(description="The composition method.")),
                        params=(spec.params, Field(default={}, validate_default=True,
                                                   description=f"Parameters of {spec.name}; vectors and datasets by "
                                                               "their names in this recipe.")))


Recipe = Annotated[Union[tuple(_recipe_model(s) for s in METHODS.values())],  # noqa: UP007
                   Field(discriminator="method")]
RECIPE = TypeAdapter(Recipe)


def recipe_json_schema() -> dict:
    schema = RECIPE.json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "tvforge merge recipe", **schema}


def _check_references(recipe: RecipeFields) -> list[str]:
    """Names the params use must be the recipe's vectors and datasets (or server ids)."""
    problems = []
    vectors, datasets = set(recipe.vectors), set(recipe.datasets)
    for name in recipe.params.task_vector_ids():
        if name not in vectors:
            problems.append(f"params: {name!r} is not one of the recipe's vectors ({', '.join(sorted(vectors))})")
    for name in recipe.params.dataset_ids():
        if name not in datasets and not name.startswith("ds_"):
            problems.append(f"params: {name!r} is not one of the recipe's datasets "
                            f"({', '.join(sorted(datasets)) or 'none'}) nor a dataset id")
    return problems


def load_recipe(path: Path) -> RecipeFields:
    """Parse and validate a recipe file; RecipeError lists every problem with where it is, schema errors and
    missing files together."""
    path = Path(path)
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: larger than {MAX_RECIPE_BYTES} bytes")
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text: {exc}") from None
    recipe, problems = _validate(document)
    if recipe is not None:
        problems += _check_references(recipe)
    root = path.parent
    problems += [f"{where}: no file {root / file}" for where, file in _file_paths(document)
                 if not (root / file).is_file()]
    if problems:
        raise RecipeError(f"{path}:\n" + "\n".join(problems))
    return recipe


def _validate(document: Any) -> tuple[RecipeFields | None, list[str]]:
    """The recipe, else every schema problem with where it is. Without a known method there is no schema for
    the params, so the other fields are checked alone."""
    try:
        return RECIPE.validate_python(document), []
    except ValidationError as exc:
        errors = exc.errors()
    if errors[0]["type"] not in ("union_tag_not_found", "union_tag_invalid"):
        return None, [_located(error) for error in errors]
    method = document.get("method")
    problems = [f"method: {'missing' if method is None else f'unknown method {method!r}'}; "
                f"choose one of {', '.join(METHODS)}"]
    try:
        RecipeFields.model_validate({k: v for k, v in document.items() if k not in ("method", "params")})
    except ValidationError as exc:
        problems += [_located(error) for error in exc.errors()]
    return None, problems


def _located(error: Any) -> str:
    """'params.top_k: ...': where in the recipe (pydantic puts the method, the union's tag, first) and what; an
    unknown params field names the valid ones, as the API's 422 does."""
    loc = [str(part) for part in error["loc"]]
    method = loc.pop(0) if loc and loc[0] in METHODS else None
    msg = error["msg"]
    if error["type"] == "extra_forbidden" and method is not None and loc[:1] == ["params"]:
        valid = valid_fields_at(METHODS[method].params, loc[1:-1])
        if valid is not None:
            msg = f"unknown field {loc[-1]!r}; valid fields: {', '.join(valid)}"
    return f"{'.'.join(loc) or '(recipe)'}: {msg}"


def _file_paths(document: Any) -> list[tuple[str, str]]:
    """(where, path) of every local file the recipe names, read from the document itself so that they are
    checked even when its schema is not valid."""
    if not isinstance(document, dict):
        return []
    base = document.get("base")
    refs = [("base", base.get("path") if isinstance(base, dict) else None)]
    for section in ("vectors", "datasets"):
        entries = document.get(section)
        if isinstance(entries, dict):
            refs += [(f"{section}.{name}", ref.get("path") if isinstance(ref, dict) else ref)
                     for name, ref in entries.items()]
    return [(where, file) for where, file in refs if isinstance(file, str)]


@dataclass
class Uploaded:
    """What resolving one input did: `reused` when the server already held the file."""

    what: str
    name: str
    id: str
    reused: bool


Report = Callable[[Uploaded], None]
UploadProgress = Callable[[str], Callable[[int, int], None] | None]  # label -> progress callback


class RecipeRun:
    """Uploads what a recipe names (skipping files the server holds, by sha256) and builds its job body."""

    def __init__(self, client: TvforgeClient, recipe: RecipeFields, root: Path, report: Report,
                 upload_progress: UploadProgress = lambda _label: None):
        self.client, self.recipe, self.root = client, recipe, root
        self.report, self.upload_progress = report, upload_progress
        self.dataset_names: dict[str, str] = {}  # server id -> recipe name, once resolved

    def resolve(self) -> dict[str, Any]:
        """Upload what is missing; the job body with every recipe name replaced by its server id."""
        base_id = self._resolve_base()
        vector_ids = {name: self._resolve_vector(base_id, name, ref) for name, ref in self.recipe.vector_refs().items()}
        dataset_ids = {name: self._resolve_dataset(name, ref) for name, ref in self.recipe.dataset_refs().items()}
        self.dataset_names = {dataset_id: name for name, dataset_id in dataset_ids.items()}
        body = {"method": self.recipe.method, "base_model_id": base_id, "task_vectors": list(vector_ids.values()),
                "params": params_with_ids(self.recipe.params, vector_ids, dataset_ids), "seed": self.recipe.seed}
        if self.recipe.start_checkpoint_id is not None:
            body["start_checkpoint_id"] = self.recipe.start_checkpoint_id
        return body

    def _resolve_base(self) -> str:
        ref = self.recipe.base
        if ref.id:
            return self._known("base model", f"/v1/base-models/{ref.id}")
        file = self.root / ref.path
        name = ref.name or file.stem
        return self._upload_once("base model", name,
                                 lambda: self.client.find_equivalent_base_model(file_sha256(file), ref.architecture,
                                                                                ref.config, name),
                                 lambda progress: self.client.register_base_model(
                                     name, file, architecture=ref.architecture, config=ref.config, progress=progress))

    def _resolve_vector(self, base_id: str, name: str, ref: VectorRef) -> str:
        if ref.id:
            return self._known("task vector", f"/v1/task-vectors/{ref.id}")
        file = self.root / ref.path
        return self._upload_once("task vector", name,
                                 lambda: self.client.find_equivalent_task_vector(
                                     base_id, file_sha256(file), ref.kind, ref.class_names, name),
                                 lambda progress: self.client.upload_task_vector(
                                     base_id, name, file, kind=ref.kind, class_names=ref.class_names,
                                     progress=progress))

    def _resolve_dataset(self, name: str, ref: DatasetRef) -> str:
        if ref.id:
            return self._known("dataset", f"/v1/datasets/{ref.id}")
        file = self.root / ref.path
        templates = ref.templates if ref.templates is not None else npz_templates(file)
        return self._upload_once("dataset", name,
                                 lambda: self.client.find_equivalent_dataset(file_sha256(file), ref.class_names,
                                                                            templates, name),
                                 lambda progress: self.client.upload_dataset(
                                     name, file, class_names=ref.class_names, templates=ref.templates,
                                     progress=progress))

    def _known(self, what: str, path: str) -> str:
        row = self.client.get(path)
        self.report(Uploaded(what, row["name"], row["id"], reused=True))
        return row["id"]

    def _upload_once(self, what: str, name: str, find: Callable[[], dict | None],
                     upload: Callable[[Any], dict]) -> str:
        row = find()
        reused = row is not None
        if row is None:
            row = upload(self.upload_progress(f"{what} {name}"))
        self.report(Uploaded(what, name, row["id"], reused))
        return row["id"]


def npz_templates(path: Path) -> list[str] | None:
    """The templates an npz dataset carries, which the server keeps when the upload gives none; None for any other
    file (a zip of images has only what the upload gives)."""
    import zipfile

    import numpy as np

    if not zipfile.is_zipfile(path):
        return None
    with np.load(path, allow_pickle=False) as data:
        if "templates" not in data.files:
            return None
        return [value.decode() if isinstance(value, bytes) else str(value) for value in data["templates"]]


def params_with_ids(params: MethodParams, vector_ids: dict[str, str], dataset_ids: dict[str, str]) -> dict[str, Any]:
    """The params the recipe set, with recipe names replaced by server ids only where the method reads a task
    vector or a dataset; every other string (a split, a merge rule, an operation) is kept, even when a vector or
    dataset is named like it."""
    return {field: _field_with_ids(params, field, value, vector_ids, dataset_ids)
            for field, value in params.model_dump(mode="json", exclude_unset=True).items()}


def _field_with_ids(params: MethodParams, field: str, value: Any, vector_ids: dict[str, str],
                    dataset_ids: dict[str, str]) -> Any:
    # The method specs say which strings are references only through task_vector_ids() and dataset_ids() (what
    # the API checks): every string of this field is swapped for a marker of its own, and the markers those
    # return are the field's references.
    names: dict[str, str] = {}

    def mark(name: str) -> str:
        marker = f"\0{len(names)}"
        names[marker] = name
        return marker

    marked = _map_strings(value, mark)
    probe = params.model_copy(update={field: marked})
    vector_refs, dataset_refs = set(probe.task_vector_ids()), set(probe.dataset_ids())

    def resolve(marker: str) -> str:
        name = names[marker]
        if marker in vector_refs:
            return vector_ids.get(name, name)
        if marker in dataset_refs:
            return dataset_ids.get(name, name)
        return name

    return _map_strings(marked, resolve)


def _map_strings(value: Any, replace: Callable[[str], str]) -> Any:
    """value (JSON) with replace() applied to every string in it, dict keys included."""
    if isinstance(value, dict):
        return {replace(k): _map_strings(v, replace) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_strings(v, replace) for v in value]
    if isinstance(value, str):
        return replace(value)
    return value


def idempotency_key(body: dict, attempt: int = 0) -> str:
    """The same resolved recipe and attempt give the same key, so running the recipe again finds its job instead
    of repeating it; the next attempt's key submits it anew (after a job that failed, was cancelled or lost its
    checkpoint)."""
    return "recipe-" + hashlib.sha256(json.dumps([body, attempt], sort_keys=True).encode()).hexdigest()[:48]

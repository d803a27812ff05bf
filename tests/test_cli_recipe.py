"""Recipes without a server: names become ids only where the method reads a vector or dataset, every problem
is reported at once, and the Idempotency-Key of each attempt."""
from pathlib import Path

import pytest
import yaml

from engine.methods.catalogue import METHODS
from tvforge.recipe import RecipeError, idempotency_key, load_recipe, params_with_ids


def write_recipe(folder: Path, recipe: dict, files: list[str] = ()) -> Path:
    for name in files:
        (folder / name).write_bytes(b"")
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def base(**extra) -> dict:
    return {"path": "base.safetensors", "architecture": "ViT-B-32", **extra}


def test_names_that_are_also_option_values_become_ids_only_where_they_are_references(tmp_path):
    """Vectors called sum and mean, datasets called val and test: ties' merge rule keeps `sum`, aTLAS keeps its
    split."""
    files = ["base.safetensors", "sum.safetensors", "mean.safetensors", "val.npz", "test.npz"]
    vector_ids, dataset_ids = {"sum": "tv_sum", "mean": "tv_mean"}, {"val": "ds_val", "test": "ds_test"}
    ties = load_recipe(write_recipe(tmp_path, {
        "base": base(), "vectors": {"sum": "sum.safetensors", "mean": "mean.safetensors"},
        "datasets": {"val": "val.npz", "test": "test.npz"}, "method": "ties",
        "params": {"merge": "sum", "validation_datasets": {"sum": "val", "mean": "test"}}}, files))
    assert params_with_ids(ties.params, vector_ids, dataset_ids) == {
        "merge": "sum", "validation_datasets": {"tv_sum": "ds_val", "tv_mean": "ds_test"}}

    atlas = load_recipe(write_recipe(tmp_path, {
        "base": base(), "vectors": {"sum": "sum.safetensors"}, "datasets": {"val": "val.npz"}, "method": "atlas",
        "params": {"objective": "entropy", "target_dataset_id": "val", "train_split": "val"}}, files))
    assert params_with_ids(atlas.params, vector_ids, dataset_ids) == {
        "objective": "entropy", "target_dataset_id": "ds_val", "train_split": "val"}


def test_every_reference_field_of_every_method_gets_its_id():
    """Vector references (keys of task -> dataset maps, STA's forget) and dataset references (their values,
    target and control ids); a server id (ds_...) is kept as it is."""
    vector_ids, dataset_ids = {"a": "tv_a", "b": "tv_b"}, {"x": "ds_x", "y": "ds_y"}
    sta = METHODS["sta"].params.model_validate({
        "calibration_datasets": {"a": "x"}, "forget": ["b"], "validation_datasets": {"b": "y"},
        "control_dataset_id": "ds_kept", "importance": "tau"})
    assert params_with_ids(sta, vector_ids, dataset_ids) == {
        "calibration_datasets": {"tv_a": "ds_x"}, "forget": ["tv_b"], "validation_datasets": {"tv_b": "ds_y"},
        "control_dataset_id": "ds_kept", "importance": "tau"}
    negation = METHODS["task_arithmetic"].params.model_validate({
        "operation": "negate", "validation_datasets": {"a": "x"}, "control_dataset_id": "y"})
    assert params_with_ids(negation, vector_ids, dataset_ids) == {
        "operation": "negate", "validation_datasets": {"tv_a": "ds_x"}, "control_dataset_id": "ds_y"}


def test_recipe_check_accepts_what_merge_resolves(tmp_path):
    """A dataset named like a split is a valid recipe (check and merge read references the same way)."""
    recipe = load_recipe(write_recipe(tmp_path, {
        "base": base(), "vectors": {"negate": "v.safetensors"}, "datasets": {"test": "t.npz"},
        "method": "task_arithmetic", "params": {"operation": "negate"}}, ["base.safetensors", "v.safetensors",
                                                                         "t.npz"]))
    assert params_with_ids(recipe.params, {"negate": "tv_1"}, {"test": "ds_1"}) == {"operation": "negate"}


def test_schema_errors_and_missing_files_are_reported_together(tmp_path):
    path = write_recipe(tmp_path, {"base": base(), "vectors": {"a": "missing.safetensors"}, "method": "ties",
                                   "params": {"topk": 10}}, ["base.safetensors"])
    with pytest.raises(RecipeError) as raised:
        load_recipe(path)
    assert "params.topk: unknown field 'topk'; valid fields: validation_datasets, top_k" in str(raised.value)
    assert "vectors.a: no file" in str(raised.value)


@pytest.mark.parametrize("method, message", [(None, "method: missing; choose one of task_arithmetic"),
                                              ("nope", "method: unknown method 'nope'; choose one of")])
def test_a_missing_or_unknown_method_is_named_plainly_beside_the_other_problems(tmp_path, method, message):
    recipe = {"base": {"path": "base.safetensors"}, "vectors": {"a": "missing.safetensors"}, "params": {}}
    if method is not None:
        recipe["method"] = method
    with pytest.raises(RecipeError) as raised:
        load_recipe(write_recipe(tmp_path, recipe, ["base.safetensors"]))
    text = str(raised.value)
    assert message in text and "discriminator" not in text
    assert "exactly one of architecture and config" in text  # the rest of the recipe is still checked
    assert "vectors.a: no file" in text


def test_each_attempt_has_its_own_stable_idempotency_key():
    body = {"method": "ties", "base_model_id": "bm_1", "task_vectors": ["tv_1"], "params": {}, "seed": 0}
    assert idempotency_key(body, 0) == idempotency_key(dict(body), 0)
    assert len({idempotency_key(body, attempt) for attempt in range(3)}) == 3
    assert idempotency_key(body, 0) != idempotency_key(body | {"seed": 1}, 0)
    assert all(len(idempotency_key(body, attempt)) <= 200 for attempt in (0, 10**6))  # the header's limit


def test_a_job_whose_best_epoch_is_the_start_says_it_kept_nothing_learned(capsys):
    from tvforge.user_commands import report_job

    job = {"id": "job_1", "status": "succeeded", "error": None,
           "result": {"metrics": {"chosen": {"best_epoch": {"value": 0, "source": "best epoch on val"}}}}}
    report_job(job)
    assert "keeps none of what was learned" in capsys.readouterr().err
    job["result"]["metrics"]["chosen"]["best_epoch"]["value"] = 3
    report_job(job)
    assert "best_epoch = 3" in (reported := capsys.readouterr().err) and "keeps none" not in reported

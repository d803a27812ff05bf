"""Task arithmetic: the merge itself, and lambda chosen on validation data as an independent search would."""
import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from engine.context import Cancelled, MergeInputs, TaskVectorInput
from engine.data import load_dataset
from engine.evaluator import EvalTarget
from engine.heads import zero_shot_head
from engine.methods.catalogue import get_method
from engine.methods.task_arithmetic.method import run
from engine.methods.task_arithmetic.params import TaskArithmeticParams
from engine.metrics import evaluate_accuracy
from engine.running import NonFiniteWeights, evaluate_checkpoint, run_method
from engine.safetensors_io import save_tensors
from engine.scaling_search import SCALING_GRID
from engine.weights import build_model
from tests.engine_jobs import SPEC, Recorder, make_job, one_thread  # noqa: F401 - fixture

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    return make_job(tmp_path_factory.mktemp("ta") / "job", n_vectors=2)


def expected_merge(job, scaling: float) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in job.state.items():
        total = tensor.double()
        for tau in job.taus.values():
            if name in tau:
                total = total + scaling * tau[name].double()
        out[name] = total.to(tensor.dtype)
    return out


def assert_close_state(path, expected):
    merged = load_file(str(path))
    assert merged.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-6, atol=1e-7)


def test_given_scaling_add_and_negate(job, tmp_path):
    result = run(job.inputs, TaskArithmeticParams(scaling=0.4), Recorder().context(tmp_path / "add"))
    assert_close_state(result.checkpoint_path, expected_merge(job, 0.4))
    assert result.metrics["chosen"]["scaling"] == {"value": 0.4, "source": "given"}
    assert result.metrics["chosen"]["operation"] == {"value": "add", "source": "default"}
    result = run(job.inputs, TaskArithmeticParams(scaling=0.4, operation="negate"),
                 Recorder().context(tmp_path / "neg"))
    assert_close_state(result.checkpoint_path, expected_merge(job, -0.4))


def independent_accuracies(job, scalings, dataset_ids, split="val"):
    """{scaling: {dataset: accuracy}} of theta_0 + scaling * sum(tau), loaded through load_state_dict."""
    model = build_model(SPEC)
    model.load_state_dict(job.state)
    heads = {ds: zero_shot_head(model, job.inputs.datasets[ds].class_names) for ds in dataset_ids}
    data = {ds: load_dataset(job.inputs.datasets[ds].path)[split] for ds in dataset_ids}
    table = {}
    for scaling in scalings:
        model.load_state_dict(expected_merge(job, scaling))
        table[scaling] = {ds: evaluate_accuracy(model, *data[ds], heads[ds]) for ds in dataset_ids}
    return table


def independent_finetuned(job, pairs, split="val"):
    model = build_model(SPEC)
    model.load_state_dict(job.state)
    heads = {ds: zero_shot_head(model, job.inputs.datasets[ds].class_names) for ds in pairs.values()}
    out = {}
    for tv, ds in pairs.items():
        model.load_state_dict({n: t + job.taus[tv][n] if n in job.taus[tv] else t for n, t in job.state.items()})
        out[ds] = evaluate_accuracy(model, *load_dataset(job.inputs.datasets[ds].path)[split], heads[ds])
    return out


def test_search_picks_the_best_mean_normalised_accuracy(job, tmp_path):
    pairs = {"tv0": "ds0", "tv1": "ds1"}
    recorder = Recorder()
    result = run(job.inputs, TaskArithmeticParams(validation_datasets=pairs), recorder.context(tmp_path / "w"))
    finetuned = independent_finetuned(job, pairs)
    table = independent_accuracies(job, SCALING_GRID, list(pairs.values()))
    scores = {s: np.mean([table[s][ds] / finetuned[ds] for ds in pairs.values()]) for s in SCALING_GRID}
    best = max(SCALING_GRID, key=lambda s: (scores[s], -s))
    search = result.metrics["search"]
    assert search["finetuned_accuracy"] == pytest.approx(finetuned)
    assert search["splits"] == {"ds0": "val", "ds1": "val"}
    assert [row["accuracy"] for row in search["rows"]] == [pytest.approx(table[s]) for s in SCALING_GRID]
    assert result.metrics["chosen"]["scaling"]["value"] == best
    assert result.metrics["chosen"]["scaling"]["source"].startswith("search on val")
    assert_close_state(result.checkpoint_path, expected_merge(job, best))
    assert {p.stage for p in recorder.reports} == {"scaling_search", "merging"}


def test_evaluate_checkpoint_normalises_by_the_finetuned_model(job, tmp_path):
    result = run(job.inputs, TaskArithmeticParams(scaling=0.5), Recorder().context(tmp_path / "w"))
    report = evaluate_checkpoint(job.inputs, result.checkpoint_path, [EvalTarget("ds1", "tv1"), EvalTarget("ctrl")],
                                 Recorder().context(tmp_path))
    merged = independent_accuracies(job, [0.5], ["ds1", "ctrl"], split="test")[0.5]
    finetuned = independent_finetuned(job, {"tv1": "ds1"}, split="test")
    ds1, ctrl = report["datasets"]["ds1"], report["datasets"]["ctrl"]
    assert (ds1["split"], ctrl["split"]) == ("test", "test")
    assert (ds1["accuracy"], ctrl["accuracy"]) == pytest.approx((merged["ds1"], merged["ctrl"]))
    assert ds1["reference_accuracy"] == pytest.approx(finetuned["ds1"]) and "reference_accuracy" not in ctrl
    assert ds1["task_vector_id"] == "tv1"
    assert ds1["normalised_accuracy"] == pytest.approx(merged["ds1"] / finetuned["ds1"])
    assert report["mean_normalised_accuracy"] == pytest.approx(merged["ds1"] / finetuned["ds1"])


def test_negation_search_keeps_control(job, tmp_path):
    params = TaskArithmeticParams(operation="negate", validation_datasets={"tv0": "ds0"}, control_dataset_id="ctrl")
    result = run(job.inputs, params, Recorder().context(tmp_path / "w"))
    negated = [-s for s in SCALING_GRID]
    table = independent_accuracies(job, negated, ["ds0", "ctrl"])
    floor = 0.95 * table[-0.0]["ctrl"]
    allowed = [s for s in SCALING_GRID if table[-s]["ctrl"] >= floor]
    best = min(allowed, key=lambda s: (table[-s]["ds0"], s))
    assert [row["control_accuracy"] for row in result.metrics["search"]["rows"]] == \
        [pytest.approx(table[-s]["ctrl"]) for s in SCALING_GRID]
    assert result.metrics["chosen"]["scaling"]["value"] == best
    assert_close_state(result.checkpoint_path, expected_merge(job, -best))


def test_cancel_during_search(job, tmp_path):
    recorder = Recorder(cancel_after=3)
    with pytest.raises(Cancelled):
        run(job.inputs, TaskArithmeticParams(validation_datasets={"tv0": "ds0"}), recorder.context(tmp_path / "w"))
    assert not (tmp_path / "w" / "merged.safetensors").exists()


def test_params_schema():
    assert get_method("task_arithmetic").params is TaskArithmeticParams
    params = TaskArithmeticParams(operation="negate", validation_datasets={"a": "d1", "b": "d1"},
                                  control_dataset_id="c")
    assert params.dataset_ids() == ["d1", "c"] and params.task_vector_ids() == ["a", "b"]
    assert TaskArithmeticParams().dataset_ids() == [] and TaskArithmeticParams().scaling == 0.3
    with pytest.raises(ValidationError):
        TaskArithmeticParams(operation="negate", validation_datasets={"a": "d1"})
    with pytest.raises(ValidationError):
        TaskArithmeticParams(control_dataset_id="c")
    assert SCALING_GRID[0] == 0.0 and SCALING_GRID[-1] == 1.0 and len(SCALING_GRID) == 21


@pytest.mark.parametrize("method, params, message", [
    # addition normalises each dataset's accuracy by one vector's fine-tuned model
    ("task_arithmetic", {"validation_datasets": {"a": "d", "b": "d"}}, "a dataset of its own"),
    ("ties", {"validation_datasets": {"a": "d", "b": "d"}}, "a dataset of its own"),
    ("sta", {"calibration_datasets": {"a": "d", "b": "e"}, "validation_datasets": {"a": "d", "b": "d"}},
     "a dataset of its own"),
    ("atlas", {"objective": "supervised", "task_datasets": {"a": "d", "b": "d"}}, "a dataset of its own"),
    # a control that is also a target passes its own check on the data it forgets
    ("task_arithmetic", {"operation": "negate", "validation_datasets": {"a": "d"}, "control_dataset_id": "d"},
     "also a target"),
    ("sta", {"calibration_datasets": {"a": "d"}, "forget": ["a"], "validation_datasets": {"a": "d"},
             "control_dataset_id": "d"}, "also a target"),
    ("atlas", {"objective": "negation", "target_dataset_id": "d", "control_dataset_id": "d"}, "is the target"),
])
def test_a_search_or_training_on_datasets_that_cannot_tell_tasks_apart_is_refused(method, params, message):
    with pytest.raises(ValidationError, match=message):
        get_method(method).params.model_validate(params)


def test_a_negation_search_reads_a_dataset_named_for_several_vectors_once(job, tmp_path, monkeypatch):
    """As engine.cost counts it: a target per dataset, not per vector (64 vectors on one dataset were 64 times
    the estimated evaluations)."""
    from engine.evaluator import Evaluator

    targets_per_report = []
    report = Evaluator.report

    def counted(self, targets, *args, **kwargs):
        targets_per_report.append([target.dataset_id for target in targets])
        return report(self, targets, *args, **kwargs)

    monkeypatch.setattr(Evaluator, "report", counted)
    params = TaskArithmeticParams(operation="negate", validation_datasets={"tv0": "ds0", "tv1": "ds0"},
                                  control_dataset_id="ctrl")
    run(job.inputs, params, Recorder().context(tmp_path / "w"))
    assert ["ds0", "ds0"] not in targets_per_report and ["ds0"] in targets_per_report


def test_a_merge_that_overflows_fails_instead_of_writing_inf(tmp_path):
    """Finite float16 inputs, a sum past float16's range: the job fails with a reason, no checkpoint remains."""
    save_tensors(tmp_path / "base.safetensors", {"w": torch.full((4,), 60000.0, dtype=torch.float16)})
    save_tensors(tmp_path / "tv.safetensors", {"w": torch.full((4,), 30000.0)})
    vector = TaskVectorInput("tv", "tv", tmp_path / "tv.safetensors")
    inputs = MergeInputs(tmp_path / "base.safetensors", SPEC, [vector])
    with pytest.raises(NonFiniteWeights, match="NaN or Inf in 1 tensors"):
        run_method(get_method("task_arithmetic"), inputs, TaskArithmeticParams(scaling=1.0),
                   Recorder().context(tmp_path / "w"))
    assert not (tmp_path / "w" / "merged.safetensors").exists()

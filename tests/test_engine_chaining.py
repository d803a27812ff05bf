"""Chaining: a merge written onto a start checkpoint instead of theta_0, its references still theta_0 + tau_t."""
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from engine.context import JobContext
from engine.evaluator import EvalTarget, Evaluator
from engine.methods.atlas.method import write_checkpoint
from engine.methods.atlas.params import AtlasParams
from engine.methods.catalogue import METHODS
from engine.methods.task_arithmetic.params import TaskArithmeticParams
from engine.running import evaluate_checkpoint
from engine.safetensors_io import save_tensors
from tests.engine_jobs import IndependentEvaluator, Recorder, make_job, one_thread  # noqa: F401 - fixture

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def chained(tmp_path_factory):
    """A job, and a start checkpoint: theta_0 with every float tensor moved (the text tower too)."""
    root = tmp_path_factory.mktemp("chaining")
    job = make_job(root / "job", n_vectors=2, sizes={"train": 12, "val": 6, "test": 6})
    generator = torch.Generator().manual_seed(9)
    start = {name: tensor + 0.01 * torch.randn(tensor.shape, generator=generator) if tensor.is_floating_point()
             else tensor for name, tensor in job.state.items()}
    save_tensors(root / "start.safetensors", start)
    return job, replace(job.inputs, start_path=root / "start.safetensors"), start


TRAINING_FREE = sorted(name for name in METHODS if name != "atlas")


@pytest.mark.parametrize("method", TRAINING_FREE)
def test_a_merge_is_written_onto_the_start_checkpoint(method, chained, tmp_path):
    job, inputs, start = chained
    spec = METHODS[method]
    plain = load_file(str(spec.runner()(job.inputs, spec.params(), Recorder().context(tmp_path / "a", seed=2))
                          .checkpoint_path))
    onto = load_file(str(spec.runner()(inputs, spec.params(), Recorder().context(tmp_path / "b", seed=2))
                         .checkpoint_path))
    changed = {name for name in job.state if not torch.equal(plain[name], job.state[name])}
    assert changed
    for name, tensor in start.items():
        if name in changed:  # the same merged delta, added to the start instead of theta_0
            torch.testing.assert_close(onto[name] - tensor, plain[name] - job.state[name], rtol=1e-4, atol=1e-6)
        else:
            assert torch.equal(onto[name], tensor), name


def test_task_arithmetic_onto_a_start_by_an_independent_computation(chained, tmp_path):
    job, inputs, start = chained
    result = METHODS["task_arithmetic"].runner()(inputs, TaskArithmeticParams(scaling=0.4),
                                                 Recorder().context(tmp_path))
    delta = {name: sum(taus[name].double() for taus in job.taus.values() if name in taus) for name in job.taus["tv0"]}
    merged = load_file(str(result.checkpoint_path))
    for name, tensor in IndependentEvaluator.plus_state(start, delta, 0.4).items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_the_evaluator_searches_from_the_start_and_normalises_by_theta_0_plus_tau(chained, tmp_path):
    job, inputs, start = chained
    independent = IndependentEvaluator(job)
    evaluator = Evaluator(inputs, JobContext(workdir=tmp_path))
    target = EvalTarget("ds0", "tv0", "val")
    assert evaluator.finetuned_accuracy(target, "val") == independent.accuracy(independent.finetuned("tv0"), "ds0",
                                                                               "val")
    evaluator.use_deltas(job.taus["tv1"], 0.5)  # a candidate: the start + 0.5 tau_1
    state = evaluator.model.state_dict()
    for name, tensor in IndependentEvaluator.plus_state(start, job.taus["tv1"], 0.5).items():
        torch.testing.assert_close(state[name], tensor.float(), rtol=1e-6, atol=1e-7, msg=name)
    evaluator.use_base()
    assert all(torch.equal(evaluator.model.state_dict()[name], tensor) for name, tensor in job.state.items())

    result = METHODS["task_arithmetic"].runner()(
        inputs, TaskArithmeticParams(validation_datasets={"tv0": "ds0", "tv1": "ds1"}), Recorder().context(tmp_path))
    plain = METHODS["task_arithmetic"].runner()(
        job.inputs, TaskArithmeticParams(validation_datasets={"tv0": "ds0", "tv1": "ds1"}),
        Recorder().context(tmp_path / "plain"))
    search = result.metrics["search"]
    assert search["finetuned_accuracy"] == plain.metrics["search"]["finetuned_accuracy"]
    zero = next(row for row in search["rows"] if row["scaling"] == 0)  # lambda 0 is the start checkpoint itself
    assert zero["accuracy"]["ds0"] == independent.accuracy(start, "ds0", "val")


def test_atlas_learns_from_the_start_checkpoint_and_keeps_theta_0_references(chained, tmp_path):
    job, inputs, start = chained
    params = AtlasParams(task_datasets={"tv0": "ds0", "tv1": "ds1"}, epochs=2, batch_size=6)
    result = METHODS["atlas"].runner()(inputs, params, Recorder().context(tmp_path / "chained", seed=1))
    plain = METHODS["atlas"].runner()(job.inputs, params, Recorder().context(tmp_path / "plain", seed=1))

    def references(curve):
        first = curve[0]
        return {name: first["accuracy"][name] / first["normalised_accuracy"][name] for name in first["accuracy"]}

    chained_curve, plain_curve = result.artifacts["learning_curve"], plain.artifacts["learning_curve"]
    assert references(chained_curve) == pytest.approx(references(plain_curve))
    independent = IndependentEvaluator(job)
    assert chained_curve[0]["accuracy"]["ds0"] == independent.accuracy(start, "ds0", "val")  # epoch 0: the start

    merged = load_file(str(result.checkpoint_path))
    blocks = set(result.artifacts["coefficients"]["blocks"])
    assert all(torch.equal(merged[name], tensor) for name, tensor in start.items() if name not in blocks)
    write_checkpoint(inputs, result.artifacts["coefficients"], tmp_path / "rebuilt.safetensors",
                     Recorder().context(tmp_path / "rebuild"))
    rebuilt = load_file(str(tmp_path / "rebuilt.safetensors"))
    assert all(torch.equal(rebuilt[name], merged[name]) for name in merged)
    report = evaluate_checkpoint(inputs, result.checkpoint_path, [EvalTarget("ds0", "tv0")],
                                 JobContext(workdir=tmp_path))
    assert report == evaluate_checkpoint(job.inputs, result.checkpoint_path, [EvalTarget("ds0", "tv0")],
                                         JobContext(workdir=tmp_path))

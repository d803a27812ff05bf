"""TSV-M, Iso-C and Iso-CTS against transcriptions of the official code (float64) and the properties the papers
state: TSV-M keeps each task's top singular values and orthogonalises their directions, Iso-C and Iso-CTS give a
flat spectrum."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from engine.methods.catalogue import get_method
from engine.methods.iso_c.params import IsoCParams
from engine.methods.iso_cts.params import IsoCtsParams
from engine.methods.spectral_params import SPECTRAL_GRID, SPECTRAL_PATIENCE
from engine.methods.tsv_m.params import TsvMParams
from engine.spectral import (
    SlicesOn,
    iso_c_merge,
    iso_cts_merge,
    leading_svd,
    merged_delta,
    on_device,
    polar,
    polar_and_mean,
    tsv_merge,
)
from engine.spectral import svd as spectral_svd
from tests.engine_jobs import IndependentEvaluator, Recorder, make_job, one_thread  # noqa: F401 - fixture

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = {"visual.mlp.weight": (24, 16), "visual.proj": (16, 10), "visual.positional_embedding": (5, 16),
          "visual.mlp.bias": (24,), "visual.conv1.weight": (4, 3, 2, 2), "text_projection": (10, 6)}


def random_vectors(tasks: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [{name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()} for _ in range(tasks)]


def is_matrix(name: str, tensor: torch.Tensor) -> bool:
    return tensor.ndim == 2 and "text_projection" not in name


# --- the official code, transcribed over dicts of tensors in float64 ---------------------------------------------

def reference_tsv_m(vectors: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """task_singular_vectors, src/utils/TSVM_utils.py: compute_and_sum_svd_mem_reduction."""
    sv_reduction = 1 / len(vectors)
    merged = {}
    for key in vectors[0]:
        for i, vector in enumerate(vectors):
            vec = vector[key].double()
            if is_matrix(key, vec):
                u, s, v = torch.linalg.svd(vec, full_matrices=False)
                if i == 0:
                    sum_u, sum_s, sum_v = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(v)
                reduced = int(s.shape[0] * sv_reduction)
                sum_u[:, i * reduced:(i + 1) * reduced] = u[:, :reduced]
                sum_s[i * reduced:(i + 1) * reduced] = s[:reduced]
                sum_v[i * reduced:(i + 1) * reduced, :] = v[:reduced, :]
            elif i == 0:
                merged[key] = vec.clone()
            else:
                merged[key] += (vec - merged[key]) / (i + 1)
        if is_matrix(key, vectors[0][key]):
            u_u, _, v_u = torch.linalg.svd(sum_u, full_matrices=False)
            u_v, _, v_v = torch.linalg.svd(sum_v, full_matrices=False)
            merged[key] = torch.linalg.multi_dot((u_u, v_u, torch.diag(sum_s), u_v, v_v))
    return merged


def reference_iso_c(vectors: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """iso-merging, src/utils/iso.py: iso_c."""
    merged = {}
    for key in vectors[0]:
        tvs = [vector[key].double() for vector in vectors]
        merged[key] = sum(tvs) / len(tvs)
        if is_matrix(key, tvs[0]):
            merged[key] *= len(tvs)
            u, s, v = torch.linalg.svd(merged[key], full_matrices=False)
            merged[key] = torch.linalg.multi_dot((u, torch.diag(torch.ones_like(s) * s.mean()), v))
    return merged


def reference_iso_cts(vectors: list[dict[str, torch.Tensor]], fraction: float) -> dict[str, torch.Tensor]:
    """iso-merging, src/utils/iso.py: iso_cts."""
    tasks = len(vectors)
    merged = {}
    for key in vectors[0]:
        shape = vectors[0][key].shape
        if not is_matrix(key, vectors[0][key]):
            for i, vector in enumerate(vectors):
                vec = vector[key].double()
                merged[key] = vec.clone() if i == 0 else merged[key] + (vec - merged[key]) / (i + 1)
            continue
        combined = sum(vector[key].double() for vector in vectors)
        common = int(min(shape) * fraction)
        common = min(shape) - round((min(shape) - common) / tasks) * tasks
        u, s, v = torch.linalg.svd(combined, full_matrices=False)
        common_u, common_s, common_v = u[:, :common], s[:common], v[:common, :]
        per_task = int((min(shape) - common) / tasks)
        for i, vector in enumerate(vectors):
            w = vector[key].double()
            w_ts = w - common_u @ common_u.T @ w
            u_ts, s_ts, v_ts = torch.linalg.svd(w_ts, full_matrices=False)
            if i == 0:
                space_u, space_s, space_v = torch.zeros_like(u_ts), torch.zeros_like(s_ts), torch.zeros_like(v_ts)
            space_u[:, i * per_task:(i + 1) * per_task] = u_ts[:, :per_task]
            space_s[i * per_task:(i + 1) * per_task] = s_ts[:per_task]
            space_v[i * per_task:(i + 1) * per_task, :] = v_ts[:per_task, :]
        end = tasks * per_task
        space_u[:, end:end + common], space_s[end:end + common], space_v[end:end + common, :] = \
            common_u, common_s, common_v
        uu, _, vu = torch.linalg.svd(space_u, full_matrices=False)
        uv, _, vv = torch.linalg.svd(space_v, full_matrices=False)
        space_s = torch.ones_like(space_s) * space_s.mean()
        merged[key] = torch.linalg.multi_dot((uu @ vu, torch.diag(space_s), uv @ vv))
    return merged


MERGES = {
    "tsv_m": (tsv_merge, reference_tsv_m),
    "iso_c": (iso_c_merge, reference_iso_c),
    "iso_cts": (lambda slices: iso_cts_merge(slices, 0.8), lambda vectors: reference_iso_cts(vectors, 0.8)),
}


@pytest.mark.parametrize("method", MERGES)
@pytest.mark.parametrize("tasks", [1, 2, 3, 8])
def test_matches_the_official_code(method, tasks):
    merge_matrix, reference = MERGES[method]
    vectors = random_vectors(tasks, seed=tasks)
    expected = reference(vectors)
    for name in SHAPES:
        got = merged_delta(name, [vector[name] for vector in vectors], merge_matrix)
        torch.testing.assert_close(got.double(), expected[name], rtol=1e-4, atol=1e-4, msg=f"{method} {name}")


def test_tensors_other_than_weight_matrices_are_the_mean_and_absent_vectors_are_left_out():
    vectors = random_vectors(3)
    for name in ("visual.mlp.bias", "visual.conv1.weight", "text_projection"):
        slices = [vectors[0][name], None, vectors[2][name]]
        torch.testing.assert_close(merged_delta(name, slices, tsv_merge), (vectors[0][name] + vectors[2][name]) / 2)


def test_tsv_m_keeps_each_tasks_top_singular_values():
    """The orthogonalised factors change the directions, not the kept singular values: the merged matrix's
    spectrum is each task's top 1/T singular values, side by side."""
    vectors = random_vectors(4)
    slices = [vector["visual.mlp.weight"] for vector in vectors]
    kept = int(16 / 4)
    expected = torch.cat([torch.linalg.svdvals(s)[:kept] for s in slices]).sort(descending=True).values
    got = torch.linalg.svdvals(tsv_merge(slices))[:len(expected)]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_tsv_m_with_more_tasks_than_a_matrixs_rank_keeps_nothing_of_it_as_the_reference():
    """int(rank / T) = 0 triplets per task: the reference's merge of that matrix is zero, and so is this one."""
    vectors = random_vectors(17)  # visual.proj is 16 x 10: rank 10; visual.mlp.weight rank 16
    for name in ("visual.proj", "visual.mlp.weight"):
        reference = reference_tsv_m([{name: v[name]} for v in vectors])[name]
        merged = tsv_merge([v[name] for v in vectors])
        assert not reference.any() and not merged.any()


def test_a_spectral_job_reports_the_matrices_it_merged_to_zero(tmp_path):
    """A matrix no task changed stays theta_0 and is named, so a user sees it (with TSV-M, so is one whose rank
    is under the task count)."""
    from dataclasses import replace

    from engine.safetensors_io import save_tensors

    job = make_job(tmp_path / "job", n_vectors=2, with_datasets=False)
    untouched = "visual.transformer.resblocks.0.attn.out_proj.weight"
    vectors = []
    for tv in job.inputs.task_vectors:
        tensors = dict(job.taus[tv.id])
        tensors[untouched] = torch.zeros_like(tensors[untouched])
        save_tensors(tmp_path / f"{tv.id}-zeroed.safetensors", tensors)
        vectors.append(replace(tv, path=tmp_path / f"{tv.id}-zeroed.safetensors"))
    inputs = replace(job.inputs, task_vectors=vectors)
    result = get_method("tsv_m").runner()(inputs, TsvMParams(), Recorder().context(tmp_path / "w"))
    assert result.metrics["zero_matrices"] == [untouched]
    assert torch.equal(load_file(str(result.checkpoint_path))[untouched], job.state[untouched])


def test_tsv_m_of_tasks_in_orthogonal_subspaces_is_their_sum():
    """Tasks of rank 1/T of the matrix acting on disjoint rows and columns do not interfere: their singular
    vectors are orthogonal already, TSV-M leaves them as they are, and the merge is their plain sum."""
    generator = torch.Generator().manual_seed(1)
    slices = []
    for i in range(4):
        matrix = torch.zeros(16, 12)
        matrix[4 * i:4 * i + 4, 3 * i:3 * i + 3] = torch.randn(4, 3, generator=generator)  # rank 3 = 12 / 4
        slices.append(matrix)
    torch.testing.assert_close(tsv_merge(slices), sum(slices), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("merge", [iso_c_merge, lambda slices: iso_cts_merge(slices, 0.8)])
def test_iso_merges_have_a_flat_spectrum(merge):
    vectors = random_vectors(3)
    slices = [vector["visual.mlp.weight"] for vector in vectors]
    values = torch.linalg.svdvals(merge(slices))
    assert float(values.max() / values.min()) == pytest.approx(1.0, rel=1e-4)


def test_iso_c_keeps_the_sums_directions_at_its_mean_singular_value():
    vectors = random_vectors(3)
    slices = [vector["visual.proj"] for vector in vectors]
    total = sum(slices)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    torch.testing.assert_close(iso_c_merge(slices), s.mean() * u @ vh, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spec_name, params", [("tsv_m", TsvMParams), ("iso_c", IsoCParams),
                                               ("iso_cts", IsoCtsParams)])
def test_job_writes_theta_0_plus_alpha_times_the_merge(spec_name, params, tmp_path):
    job = make_job(tmp_path / "job", n_vectors=3, with_datasets=False)
    merge_matrix, reference = MERGES[spec_name]
    spec = get_method(spec_name)
    assert spec.params is params
    result = spec.runner()(job.inputs, params(scaling=0.7), Recorder().context(tmp_path / "w"))
    delta = reference(list(job.taus.values()))
    merged = load_file(str(result.checkpoint_path))
    for name, tensor in IndependentEvaluator.plus_state(job.state, delta, 0.7).items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-5, atol=1e-5, msg=name)
    matrices = sum(1 for name, tau in job.taus["tv0"].items() if is_matrix(name, tau))
    assert result.metrics["matrix_tensors"] == matrices > 0
    assert result.metrics["chosen"]["scaling"] == {"value": 0.7, "source": "given"}


def test_alpha_search_stops_as_the_official_code_stops(tmp_path):
    """alpha over 0.1..3.0 on val, the highest mean normalised accuracy, stopping after 3 points without
    improvement: the rows evaluated and the pick equal an independent search's."""
    job = make_job(tmp_path / "job", n_vectors=2)
    pairs = {"tv0": "ds0", "tv1": "ds1"}
    result = get_method("iso_c").runner()(job.inputs, IsoCParams(validation_datasets=pairs),
                                           Recorder().context(tmp_path / "w"))
    delta = reference_iso_c(list(job.taus.values()))
    independent = IndependentEvaluator(job)
    finetuned = {ds: independent.accuracy(independent.finetuned(tv), ds, "val") for tv, ds in pairs.items()}
    scores, best, since_best = {}, None, 0
    for alpha in SPECTRAL_GRID:
        state = independent.plus(delta, alpha)
        scores[alpha] = float(np.mean([independent.accuracy(state, ds, "val") / finetuned[ds]
                                       for ds in pairs.values()]))
        if best is None or scores[alpha] > scores[best]:
            best, since_best = alpha, 0
        else:
            since_best += 1
            if since_best >= SPECTRAL_PATIENCE:
                break
    rows = result.metrics["search"]["rows"]
    assert [row["scaling"] for row in rows] == list(scores)
    assert [row["mean_normalised_accuracy"] for row in rows] == pytest.approx(list(scores.values()))
    assert result.metrics["chosen"]["scaling"]["value"] == best
    assert "stopping after 3 points without improvement" in result.metrics["search"]["rule"]


def test_iso_cts_common_space_fraction_is_validated():
    assert IsoCtsParams().common_space_fraction == 0.8
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError):
            IsoCtsParams(common_space_fraction=bad)


def test_svd_falls_back_to_float64_when_float32_does_not_converge(monkeypatch):
    matrix = torch.randn(12, 5, generator=torch.Generator().manual_seed(3))
    svd = torch.linalg.svd

    def float32_fails(m, full_matrices=True):
        if m.dtype == torch.float32:
            raise torch.linalg.LinAlgError("did not converge")
        return svd(m, full_matrices=full_matrices)

    monkeypatch.setattr(torch.linalg, "svd", float32_fails)
    u, s, vh = spectral_svd(matrix)
    assert u.dtype == s.dtype == vh.dtype == torch.float32
    torch.testing.assert_close((u * s) @ vh, matrix, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(u.T @ u, torch.eye(5), rtol=1e-5, atol=1e-5)


@pytest.fixture
def svd_calls(monkeypatch) -> list[tuple[int, ...]]:
    """The shapes of the matrices that reach torch.linalg.svd during the test."""
    calls = []
    svd = torch.linalg.svd

    def recording(m, full_matrices=True):
        calls.append(tuple(m.shape))
        return svd(m, full_matrices=full_matrices)

    monkeypatch.setattr(torch.linalg, "svd", recording)
    return calls


def test_svd_of_a_wide_matrix_is_taken_through_its_transpose(svd_calls):
    """MKL's CPU SVD of a wide matrix is about 3x slower than of its transpose: only tall or square matrices
    reach LAPACK, and the factors returned are the wide matrix's own thin SVD."""
    matrix = torch.randn(6, 15, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    u, s, vh = spectral_svd(matrix)
    assert svd_calls == [(15, 6)]
    assert (u.shape, s.shape, vh.shape) == ((6, 6), (6,), (6, 15))
    torch.testing.assert_close(s, torch.linalg.svdvals(matrix))
    torch.testing.assert_close((u * s) @ vh, matrix)
    torch.testing.assert_close(u.T @ u, torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(vh @ vh.T, torch.eye(6, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(40, 12), (12, 40)])
def test_leading_svd_is_the_svds_first_k_triplets_without_an_svd(shape, svd_calls):
    """The Gram path: no SVD is taken, and the factors are the float64 SVD's leading triplets (up to the pairs'
    signs) at float32 precision, with orthonormal singular vectors."""
    generator = torch.Generator().manual_seed(7)
    matrix = torch.randn(shape, generator=generator)
    exact_u, exact_s, exact_vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    svd_calls.clear()
    u, s, vh = leading_svd(matrix, 5)
    assert svd_calls == []
    assert (u.shape, s.shape, vh.shape) == ((shape[0], 5), (5,), (5, shape[1]))
    assert u.dtype == s.dtype == vh.dtype == torch.float32
    torch.testing.assert_close(s.double(), exact_s[:5], rtol=1e-6, atol=1e-6)
    signs = torch.sign((u.double() * exact_u[:, :5]).sum(0))
    torch.testing.assert_close(u.double() * signs, exact_u[:, :5], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vh.double() * signs[:, None], exact_vh[:5], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(u.T @ u, torch.eye(5), rtol=1e-5, atol=1e-5)


def test_leading_svd_of_a_rank_deficient_matrix_is_the_full_svds():
    """A kept singular value at 0 (a rank-2 matrix, k = 4: a LoRA vector's shape of spectrum) leaves U undefined
    on the Gram path: the full SVD's first k are returned, its completion included."""
    generator = torch.Generator().manual_seed(8)
    matrix = torch.randn(30, 2, generator=generator) @ torch.randn(2, 10, generator=generator)
    u, s, vh = leading_svd(matrix, 4)
    full_u, full_s, full_vh = spectral_svd(matrix)
    assert torch.equal(u, full_u[:, :4]) and torch.equal(s, full_s[:4]) and torch.equal(vh, full_vh[:4])
    empty = leading_svd(matrix, 0)
    assert [tuple(f.shape) for f in empty] == [(30, 0), (0,), (0, 10)]
    with pytest.raises(ValueError):
        leading_svd(matrix, 11)


@pytest.mark.parametrize("smallest, gram", [(1e-3, True), (1e-5, False)])
def test_leading_svd_leaves_kept_singular_values_below_1e_4_of_the_largest_to_the_svd(smallest, gram, svd_calls):
    """Singular values 1 .. `smallest`, all kept: the Gram path above the floor, the full SVD below it."""
    generator = torch.Generator().manual_seed(9)
    left, _ = torch.linalg.qr(torch.randn(20, 6, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(6, 6, generator=generator, dtype=torch.float64))
    values = torch.logspace(0, float(np.log10(smallest)), 6, dtype=torch.float64)
    matrix = ((left * values) @ right.T).float()
    _, s, _ = leading_svd(matrix, 6)
    assert bool(svd_calls) is not gram
    torch.testing.assert_close(s.double(), values, rtol=1e-3, atol=1e-6)


def test_on_device_copies_each_slice_as_it_is_read_and_the_merge_back():
    """A merge on another device sees slices on that device and returns to the CPU; on the CPU nothing is wrapped."""
    vectors = random_vectors(3)
    slices = [vector["visual.mlp.weight"] for vector in vectors]
    assert on_device(tsv_merge, "cpu") is tsv_merge
    seen = []

    def recording(on):
        seen.extend(on[i].device.type for i in range(len(on)))
        return on[0]

    onto_meta = on_device(recording, "meta")
    with pytest.raises(NotImplementedError):  # the meta device holds no data to copy back
        onto_meta(slices)
    assert seen == ["meta"] * 3
    torch.testing.assert_close(tsv_merge(SlicesOn(slices, "cpu")), tsv_merge(slices))


@pytest.mark.parametrize("shape", [(40, 12), (12, 40)])
def test_polar_factor_and_mean_singular_value_without_an_svd(shape, svd_calls):
    """A full-rank matrix: U V^T and the mean singular value of its float64 SVD, from the Gram matrix alone."""
    matrix = torch.randn(shape, generator=torch.Generator().manual_seed(11))
    exact_u, exact_s, exact_vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    svd_calls.clear()
    factor, mean = polar_and_mean(matrix)
    assert svd_calls == [] and factor.shape == shape and factor.dtype == mean.dtype == torch.float32
    torch.testing.assert_close(factor.double(), exact_u @ exact_vh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean.double(), exact_s.mean(), rtol=1e-6, atol=1e-6)
    assert torch.equal(polar(matrix), factor)


def test_polar_of_a_rank_deficient_matrix_is_the_svds(svd_calls):
    """A singular value at 0 (a TSV-M concatenation with columns left empty, when T x (rank // T) < rank): the
    polar factor is not unique, and it is the SVD's, as the references take it."""
    matrix = torch.randn(30, 2, generator=torch.Generator().manual_seed(12)) @ torch.randn(
        2, 10, generator=torch.Generator().manual_seed(13))
    factor, mean = polar_and_mean(matrix)
    assert svd_calls == [(30, 10)]
    u, s, vh = spectral_svd(matrix)
    assert torch.equal(factor, u @ vh) and torch.equal(mean, s.mean())



def test_iso_cts_on_a_small_matrix_with_many_tasks_keeps_a_common_space():
    """rank 17, 6 tasks, common fraction 0.1: the reference's rounding gives the tasks 18 of the 17 directions (a
    common space of -1, which its slicing silently takes as "all but the last column"); here the task share is
    rounded down (2 each), the common space keeps the other 5, and every direction is used once."""
    generator = torch.Generator().manual_seed(11)
    slices = [torch.randn(17, 64, generator=generator) for _ in range(6)]
    merged = iso_cts_merge(slices, 0.1)
    assert merged.shape == (17, 64) and torch.isfinite(merged).all()
    singular = torch.linalg.svdvals(merged.double())
    torch.testing.assert_close(singular, torch.full_like(singular, singular.mean()), rtol=1e-5, atol=0)  # isotropic

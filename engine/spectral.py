"""Merges in the singular-value space of each weight matrix: TSV-M, Iso-C and Iso-CTS.

They share one shape, from the official code (AntoAndGar/task_singular_vectors,
src/utils/TSVM_utils.py compute_and_sum_svd_mem_reduction; danielm1405/iso-merging, src/utils/iso.py):
every 2-D tensor but a text projection is merged through SVDs of the task vectors' matrices; every
other tensor (biases, norms, the patch embedding, the class token) is the running mean of the vectors.

A tensor's slices are read one task vector at a time, so memory is bounded by the largest layer (times
the few factors a method keeps), not by the model or the number of vectors. The leading triplets that TSV-M
and Iso-CTS keep, and the polar factors all three take, come from the eigendecomposition of a float64 Gram
matrix (leading_svd, polar_and_mean); where that would lose precision (a rank-deficient matrix) they come
from the full SVD, in float32 as the references take it. Every factor is kept on the slices' device: the
merges run wherever their slices are (bench.spectral_device times them on the CPU and on CUDA).
"""
from collections.abc import Callable, Sequence

import torch

from engine.streaming import VectorSlices

# the task vectors' matrices of one tensor, float32 [m, n], read one at a time -> the merged matrix
MatrixMerge = Callable[[Sequence[torch.Tensor]], torch.Tensor]


def is_merged_as_matrix(name: str, shape: Sequence[int]) -> bool:
    """The references' test: 2-D, and not the text tower's projection (averaged like a bias)."""
    return len(shape) == 2 and "text_projection" not in name


def present(taus: Sequence[torch.Tensor | None]) -> list[int]:
    """Indices of the vectors that have this tensor (a vector may leave some tensors out)."""
    if isinstance(taus, VectorSlices):  # ask without reading the slice
        return [i for i in range(len(taus)) if taus.reader(i) is not None]
    return [i for i, tau in enumerate(taus) if tau is not None]


class Slices(Sequence):
    """The present vectors' slices of one tensor as float32, each read when indexed (never all at once)."""

    def __init__(self, taus: Sequence[torch.Tensor | None]):
        self._taus, self._indices = taus, present(taus)
        if not self._indices:
            raise ValueError("no task vector has this tensor")

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self._taus[self._indices[index]].float()


class SlicesOn(Sequence):
    """Slices copied to a device as each is indexed."""

    def __init__(self, slices: Sequence[torch.Tensor], device: str):
        self._slices, self._device = slices, device

    def __len__(self) -> int:
        return len(self._slices)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self._slices[index].to(self._device)


def on_device(merge_matrix: MatrixMerge, device: str) -> MatrixMerge:
    """merge_matrix taken on the job's device (the references take these SVDs on their GPU): each slice is
    copied there as it is read, the merged matrix copied back."""
    if torch.device(device).type == "cpu":
        return merge_matrix

    def merge(slices: Sequence[torch.Tensor]) -> torch.Tensor:
        return merge_matrix(SlicesOn(slices, device)).cpu()

    return merge


def running_mean(slices: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean, accumulated as the references do (mean += (tau - mean) / (i + 1))."""
    mean = slices[0].clone()
    for i in range(1, len(slices)):
        mean += (slices[i] - mean) / (i + 1)
    return mean


def merged_delta(name: str, taus: Sequence[torch.Tensor | None], merge_matrix: MatrixMerge) -> torch.Tensor:
    """One tensor's merged task vector: merge_matrix for weight matrices, the running mean otherwise."""
    slices = Slices(taus)
    shape = taus.shape if isinstance(taus, VectorSlices) else slices[0].shape
    if is_merged_as_matrix(name, shape):
        return merge_matrix(slices)
    return running_mean(slices)


def svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD, in float32 as the references take it. LAPACK's float32 divide-and-conquer SVD can fail to
    converge on the matrices these merges build (the concatenated singular vectors have many equal singular
    values; a task's matrix with the common space projected out has many near 0: both seen on ViT-B/32
    shapes); it is then taken in float64.

    A wide matrix is decomposed through its transpose (the same factors, up to rounding and the pairs' signs,
    which every merge here cancels): MKL's CPU SVD of a 768 x 3072 float32 matrix (ViT-B/32's MLP output
    projection, and TSV-M's concatenated right singular vectors of it) took 0.47 s, of its transpose 0.16 s.
    """
    if matrix.shape[0] < matrix.shape[1]:
        u, s, vh = svd(matrix.T)
        return vh.T, s, u.T
    try:
        return torch.linalg.svd(matrix, full_matrices=False)
    except torch.linalg.LinAlgError:
        u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
        return u.to(matrix.dtype), s.to(matrix.dtype), vh.to(matrix.dtype)


# A singular value that a Gram path relies on below this fraction of the largest sends it to svd(): the Gram
# matrix's rounding (float64 eps x sigma_1^2) would reach float32's resolution of its singular vector (at
# sigma / sigma_1 ~ 1e-4)
GRAM_RELATIVE_FLOOR = 1e-4


def _gram_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """A tall matrix in float64, and its Gram matrix's eigenvalues (sigma^2, ascending) and eigenvectors (V); None
    where eigh does not converge."""
    exact = matrix.double()
    try:
        values, vectors = torch.linalg.eigh(exact.T @ exact)
    except torch.linalg.LinAlgError:
        return None
    return exact, values, vectors


def _above_floor(values: torch.Tensor, index: int) -> bool:
    return bool(values[index] > GRAM_RELATIVE_FLOOR ** 2 * values[-1])


def leading_svd(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first k triplets of svd(matrix): the references take the full SVD and keep them. Computed from the
    eigendecomposition of the float64 Gram matrix of the short side (V and sigma^2), then U = A V / sigma:
    for ViT-B/32's 3072 x 768 float32 matrices 0.074 s against the full SVD's 0.158 (2 threads), and closer
    to the float64 SVD's leading part (relative 4.5e-7 against float32 LAPACK's 1.7e-5 on random matrices,
    whose singular values crowd at k). Where a kept singular value is below GRAM_RELATIVE_FLOOR of the largest
    (a rank-deficient matrix, such as a LoRA vector's; the Gram's eigenvectors there are not accurate, and U
    is undefined at 0) it is the full SVD's, whose arbitrary completion the references use too."""
    rows, columns = matrix.shape
    if not 0 <= k <= min(rows, columns):
        raise ValueError(f"cannot keep {k} singular triplets of a {rows} x {columns} matrix")
    if rows < columns:
        u, s, vh = leading_svd(matrix.T, k)
        return vh.T, s, u.T
    if k == 0:
        like = {"dtype": matrix.dtype, "device": matrix.device}
        return torch.zeros(rows, 0, **like), torch.zeros(0, **like), torch.zeros(0, columns, **like)
    gram = _gram_eigh(matrix)
    if gram is None or not _above_floor(gram[1], -k):
        u, s, vh = svd(matrix)
        return u[:, :k], s[:k], vh[:k]
    exact, values, vectors = gram
    values, vectors = values[-k:].flip(0), vectors[:, -k:].flip(1)
    singular = values.sqrt()
    left = (exact @ vectors) / singular
    return left.to(matrix.dtype), singular.to(matrix.dtype), vectors.T.to(matrix.dtype)


def polar_and_mean(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The orthonormal factor closest to matrix (U V^T of its SVD: how the references re-orthogonalise the
    concatenated singular vectors, and Iso-C's directions) and the mean singular value (Iso-C's scale). Where
    every singular value is at least GRAM_RELATIVE_FLOOR of the largest the factor is unique, and is computed as
    A V diag(sigma^-1) V^T from the float64 Gram matrix (0.12 s against the SVD's 0.18 for 3072 x 768, 2
    threads); else, as for a rank-deficient matrix, it is the SVD's, whose completion the references use."""
    if matrix.shape[0] < matrix.shape[1]:
        factor, mean = polar_and_mean(matrix.T)
        return factor.T, mean
    gram = _gram_eigh(matrix)
    if gram is None or not _above_floor(gram[1], 0):
        u, s, vh = svd(matrix)
        return u @ vh, s.mean()
    exact, values, vectors = gram
    singular = values.sqrt()
    factor = ((exact @ vectors) / singular) @ vectors.T
    return factor.to(matrix.dtype), singular.mean().to(matrix.dtype)


def polar(matrix: torch.Tensor) -> torch.Tensor:
    """polar_and_mean's orthonormal factor."""
    return polar_and_mean(matrix)[0]


def _factor_buffers(first: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zeroed left vectors, values and right vectors of `rank` kept triplets, as the slices' dtype and device."""
    like = {"dtype": first.dtype, "device": first.device}
    return (torch.zeros(first.shape[0], rank, **like), torch.zeros(rank, **like),
            torch.zeros(rank, first.shape[1], **like))


def tsv_merge(slices: Sequence[torch.Tensor]) -> torch.Tensor:
    """TSV-M: each task keeps its top 1/T of singular triplets, side by side; the concatenated left and
    right singular vectors are orthogonalised and recombined with the kept singular values."""
    tasks = len(slices)
    reduction = 1 / tasks  # the reference's sv_reduction; int(rank * reduction) below as it computes it
    first = slices[0]
    rank = min(first.shape)
    kept = int(rank * reduction)
    left, values, right = _factor_buffers(first, rank)
    for i in range(tasks):
        span = slice(i * kept, (i + 1) * kept)
        left[:, span], values[span], right[span] = leading_svd(slices[i], kept)
    return (polar(left) * values) @ polar(right)


def iso_c_merge(slices: Sequence[torch.Tensor]) -> torch.Tensor:
    """Iso-C: the sum of the task matrices with its spectrum flattened to the mean singular value."""
    total = slices[0].clone()
    for i in range(1, len(slices)):
        total += slices[i]
    factor, mean = polar_and_mean(total)
    return factor * mean


def iso_cts_merge(slices: Sequence[torch.Tensor], common_space_fraction: float) -> torch.Tensor:
    """Iso-CTS: the sum's top singular directions (the common space) plus, per task, the top directions of
    its matrix with the common space projected out; orthogonalised together, with a flat spectrum."""
    tasks = len(slices)
    first = slices[0]
    rank = min(first.shape)
    common = int(rank * common_space_fraction)
    # the reference rounds the task-specific total to a multiple of the task count (Python's round). Deviation:
    # where that rounds past the rank (a small matrix, many tasks, a small common fraction), the reference's
    # common space goes negative and its slicing silently drops columns; the total is rounded down instead.
    specific_total = round((rank - common) / tasks) * tasks
    if specific_total > rank:
        specific_total = (rank - common) // tasks * tasks
    common = rank - specific_total
    per_task = specific_total // tasks

    total = first.clone()
    for i in range(1, tasks):
        total += slices[i]
    common_u, common_s, common_vh = leading_svd(total, common)

    left, values, right = _factor_buffers(first, rank)
    for i in range(tasks):
        specific = slices[i]
        specific = specific - common_u @ (common_u.T @ specific)
        span = slice(i * per_task, (i + 1) * per_task)
        left[:, span], values[span], right[span] = leading_svd(specific, per_task)
    span = slice(tasks * per_task, tasks * per_task + common)
    left[:, span], values[span], right[span] = common_u, common_s, common_vh
    return (polar(left) * values.mean()) @ polar(right)


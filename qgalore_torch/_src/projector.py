"""The GaLore projector: SVD, sign rule, stored form, projection (docs/spec.md sections 1-3).

Everything here works on the canonical gradient ``G`` of shape (m, n) = (out, in), which is
how torch stores ``Linear.weight``. With ``r = min(rank, m, n)``:

* m >= n, side ``"right"``: ``P`` = top-r rows of ``Vt`` (r x n); ``R = G P^T``; back ``D P``.
* m <  n, side ``"left"``:  ``P`` = top-r columns of ``U`` (m x r); ``R = P^T G``; back ``P D``.

The projector is always kept as ``basis_RxK``, the r x k matrix whose rows are the kept
singular vectors (``P`` for "right", ``P^T`` for "left"); that is also the matrix that is
quantised, so (in, out) and (out, in) layouts give the same codes. This is the twin of
``qgalore_jax._src.projector``.
"""

import torch

from qgalore_torch._src import quantization

RIGHT = "right"
LEFT = "left"
# How a refresh finds the basis (docs/spec.md section 2.6): a thin SVD of G, a randomized
# range finder, or subspace iteration warm-started from the previous projector.
SVD_METHODS = ("full", "randomized", "subspace")


def projector_side(shape: tuple[int, int]) -> str:
  """``"right"`` if the canonical (out, in) matrix has out >= in, else ``"left"``."""
  out_dim, in_dim = shape
  return RIGHT if out_dim >= in_dim else LEFT


def effective_rank(shape: tuple[int, int], rank: int) -> int:
  """``min(rank, m, n)``: the rank is clamped to the matrix (docs/spec.md section 1)."""
  return min(rank, *shape)


def basis_shape(shape: tuple[int, int], rank: int) -> tuple[int, int]:
  """Shape (r, k) of ``basis_RxK`` for a canonical matrix of ``shape``."""
  out_dim, in_dim = shape
  k = in_dim if projector_side(shape) == RIGHT else out_dim
  return effective_rank(shape, rank), k


def low_rank_shape(shape: tuple[int, int], rank: int) -> tuple[int, int]:
  """Shape of the projected gradient and of its moments (docs/spec.md section 2).

  Example:
    >>> from qgalore_torch._src.projector import low_rank_shape
    >>> [low_rank_shape(s, 128) for s in ((1376, 512), (512, 1376), (8, 4))]
    [(1376, 128), (128, 1376), (8, 4)]
  """
  r = effective_rank(shape, rank)
  return (shape[0], r) if projector_side(shape) == RIGHT else (r, shape[1])


def sign_canonical(vectors_RxK: torch.Tensor) -> torch.Tensor:
  """Flips each row so that its entry of largest magnitude is positive (docs/spec.md section 2).

  Ties go to the first such index, as ``torch.argmax`` does. SVD libraries disagree on the
  sign of singular vectors; this makes JAX, torch, CPU and GPU agree.
  """
  idx = torch.argmax(vectors_RxK.abs(), dim=1, keepdim=True)
  pivot = torch.gather(vectors_RxK, 1, idx)
  return vectors_RxK * torch.where(pivot < 0, -1.0, 1.0).to(vectors_RxK.dtype)


def compute_projector(grad_MxN: torch.Tensor, rank: int) -> torch.Tensor:
  """Returns the sign-canonical float32 ``basis_RxK`` of a canonical gradient.

  The SVD runs in float32 (bf16/f16 gradients are upcast) and is thin. On CUDA,
  ``torch.linalg.svd`` synchronises the device with the host.

  Args:
    grad_MxN: canonical (out, in) gradient.
    rank: requested rank; clamped to ``min(m, n)``.

  Returns:
    float32 [r, k]: the top-r right singular vectors as rows ("right"), or the top-r left
    singular vectors as rows ("left").

  References:
    Zhao et al., `GaLore <https://arxiv.org/abs/2403.03507>`_, algorithm 2, 2024.
  """
  shape = tuple(grad_MxN.shape)
  r = effective_rank(shape, rank)
  u_MxK, _, vt_KxN = torch.linalg.svd(grad_MxN.to(torch.float32), full_matrices=False)
  rows = vt_KxN[:r] if projector_side(shape) == RIGHT else u_MxK[:, :r].T
  return sign_canonical(rows)


def sketch_shape(shape: tuple[int, int], rank: int, oversample: int) -> tuple[int, int]:
  """Shape ``(k, l)`` of a refresh's sketch, ``l = min(r + oversample, k)`` (section 2.6)."""
  r, k = basis_shape(shape, rank)
  return k, min(r + oversample, k)


def warm_start(sketch_KxL: torch.Tensor, previous_RxK: torch.Tensor) -> torch.Tensor:
  """The start block of subspace iteration: the sketch with its first r columns replaced by
  the previous basis, transposed (docs/spec.md section 2.6)."""
  start_KxL = sketch_KxL.clone()
  start_KxL[:, : previous_RxK.shape[0]] = previous_RxK.T
  return start_KxL


def _orthonormal(x: torch.Tensor) -> torch.Tensor:
  """An orthonormal basis of the columns of ``x``: Q of its reduced Householder QR."""
  return torch.linalg.qr(x, mode="reduced")[0]


def randomized_projector(
  grad_MxN: torch.Tensor, rank: int, start_KxL: torch.Tensor, iters: int
) -> torch.Tensor:
  r"""The sign-canonical float32 ``basis_RxK`` by a range finder from ``start_KxL``.

  Halko, Martinsson and Tropp's power-iterated range finder (their algorithms 4.3 and
  5.1, orthonormalised after each power iteration) on ``A = G`` (D x k, "right") or
  ``A = G^T`` ("left"), ``D >= k``:
  ``Q = qr(A X)``; ``iters`` times ``Q = qr(A (A^T Q))``; the basis is the sign-canonical
  top r rows of ``V^T`` in the thin SVD ``Q^T A = U S V^T``. Every QR is a reduced
  Householder QR, all in float32 (docs/spec.md section 2.6). The twin of
  ``qgalore_jax._src.projector.randomized_projector``.

  Args:
    grad_MxN: canonical (out, in) gradient.
    rank: requested rank; clamped to ``min(m, n)``.
    start_KxL: float32 start block ``X``, ``(k, l)`` with ``r <= l <= k``
      (:func:`sketch_shape`): a sketch, or :func:`warm_start` of the previous basis.
    iters: power (subspace) iterations, >= 0.

  Returns:
    float32 [r, k], the contract of :func:`compute_projector`.

  References:
    Halko, Martinsson and Tropp, `Finding structure with randomness
    <https://arxiv.org/abs/0909.4061>`_, algorithms 4.3 and 5.1, 2011.
  """
  shape = tuple(grad_MxN.shape)
  r = effective_rank(shape, rank)
  g_MxN = grad_MxN.to(torch.float32)
  a_DxK = g_MxN if projector_side(shape) == RIGHT else g_MxN.T
  q_DxL = _orthonormal(a_DxK @ start_KxL)
  for _ in range(iters):
    q_DxL = _orthonormal(a_DxK @ (a_DxK.T @ q_DxL))
  _, _, vt_LxK = torch.linalg.svd(q_DxL.T @ a_DxK, full_matrices=False)
  return sign_canonical(vt_LxK[:r])


def project(
  grad_MxN: torch.Tensor, basis_RxK: torch.Tensor, side: str | None = None
) -> torch.Tensor:
  """Projects a canonical gradient: ``G P^T`` (m x r) or ``P^T G`` (r x n).

  ``side`` defaults to the side of ``grad_MxN``'s shape; a row shard of a larger matrix
  passes the side of the whole matrix.
  """
  side = projector_side(tuple(grad_MxN.shape)) if side is None else side
  if side == RIGHT:
    return grad_MxN @ basis_RxK.T
  return basis_RxK @ grad_MxN


def project_back(low_rank: torch.Tensor, basis_RxK: torch.Tensor, side: str) -> torch.Tensor:
  """Back-projects a low-rank update to the canonical (m, n) space: ``D P`` or ``P D``."""
  if side == RIGHT:
    return low_rank @ basis_RxK
  return basis_RxK.T @ low_rank


def project_back_add(
  c: torch.Tensor,
  low_rank: torch.Tensor,
  basis_RxK: torch.Tensor,
  side: str,
  *,
  alpha: float = 1.0,
  beta: float = 1.0,
  out: torch.Tensor | None = None,
) -> torch.Tensor:
  """``beta c + alpha back-project(low_rank)`` as one matmul call (``torch.addmm``).

  ``c`` is a float32 canonical (m, n) matrix; ``out=c`` updates it in place, without an
  (m, n) temporary. ``alpha`` and ``beta`` are Python numbers.
  """
  a, b = (low_rank, basis_RxK) if side == RIGHT else (basis_RxK.T, low_rank)
  if out is c:
    return c.addmm_(a, b, beta=beta, alpha=alpha)
  return torch.addmm(c, a, b, beta=beta, alpha=alpha, out=out)


def store_projector(basis_RxK: torch.Tensor, bits: int | None, group_size: int):
  """The stored form of a projector: a packed :class:`QuantizedTensor`, or float32 if no bits."""
  if bits is None:
    return basis_RxK.to(torch.float32)
  return quantization.quantize(basis_RxK, bits, group_size)


def load_projector(stored, shape_RxK: tuple[int, int], bits: int | None, group_size: int):
  """The float32 ``basis_RxK`` used to project and back-project (dequantised if stored so)."""
  if bits is None:
    return stored
  return quantization.dequantize(stored, shape_RxK, bits, group_size)


def stored_from_state(state: dict, bits: int | None):
  """The stored projector held in an optimizer ``state`` dict (docs/spec.md section 7.2).

  ``proj_codes``, ``proj_scale``, ``proj_zero`` as a :class:`QuantizedTensor`, or the float32
  ``proj_basis`` when ``bits`` is None.
  """
  if bits is None:
    return state["proj_basis"]
  return quantization.QuantizedTensor(state["proj_codes"], state["proj_scale"], state["proj_zero"])


def stored_to_state(stored) -> dict:
  """The ``state`` entries of a stored projector: inverse of :func:`stored_from_state`."""
  if isinstance(stored, quantization.QuantizedTensor):
    return {"proj_codes": stored.codes, "proj_scale": stored.scale, "proj_zero": stored.zero}
  return {"proj_basis": stored}

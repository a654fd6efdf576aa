"""The GaLore projector: SVD, sign rule, stored form, projection (docs/spec.md sections 1-3).

Everything here works on the canonical gradient ``G`` of shape (m, n) = (out, in). With
``r = min(rank, m, n)``:

* m >= n, side ``"right"``: ``P`` = top-r rows of ``Vt`` (r x n); ``R = G P^T``; back ``D P``.
* m <  n, side ``"left"``:  ``P`` = top-r columns of ``U`` (m x r); ``R = P^T G``; back ``P D``.

The projector is always kept as ``basis_RxK``, the r x k matrix whose rows are the kept
singular vectors (``P`` for "right", ``P^T`` for "left"); that is also the matrix that is
quantised, so (in, out) and (out, in) layouts give the same codes.
"""

import jax
import jax.numpy as jnp

from qgalore_jax._src import quantization

RIGHT = "right"
LEFT = "left"
# How a refresh finds the basis (docs/spec.md section 2.6): a thin SVD of G, a randomized
# range finder, or subspace iteration warm-started from the previous projector.
SVD_METHODS = ("full", "randomized", "subspace")


def projector_side(shape: tuple[int, int]) -> str:
  """Which side GaLore projects on, for a canonical (out, in) matrix (docs/spec.md section 2).

  Args:
    shape: ``(m, n) = (out, in)``.

  Returns:
    ``"right"`` (``P`` is r x n, ``R = G P^T``) when ``m >= n``, else ``"left"``.

  Example:
    >>> from qgalore_jax import projector_side
    >>> projector_side((1376, 512)), projector_side((512, 1376))
    ('right', 'left')
  """
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
    >>> from qgalore_jax._src.projector import low_rank_shape
    >>> [low_rank_shape(s, 128) for s in ((1376, 512), (512, 1376), (8, 4))]
    [(1376, 128), (128, 1376), (8, 4)]
  """
  r = effective_rank(shape, rank)
  return (shape[0], r) if projector_side(shape) == RIGHT else (r, shape[1])


def sign_canonical(vectors_RxK: jax.Array) -> jax.Array:
  """Flips each row so that its entry of largest magnitude is positive (docs/spec.md section 2).

  Ties go to the first such index, as ``argmax`` does. SVD libraries disagree on the
  sign of singular vectors; this makes JAX, torch, CPU and GPU agree.

  Args:
    vectors_RxK: singular vectors as rows.

  Returns:
    The rows, each multiplied by the sign of its largest-magnitude entry.

  Example:
    >>> import jax.numpy as jnp
    >>> from qgalore_jax import sign_canonical
    >>> sign_canonical(jnp.array([[0.6, -0.8], [0.8, 0.6]]))
    Array([[-0.6,  0.8],
           [ 0.8,  0.6]], dtype=float32)
  """
  idx = jnp.argmax(jnp.abs(vectors_RxK), axis=1)
  pivot = jnp.take_along_axis(vectors_RxK, idx[:, None], axis=1)
  return vectors_RxK * jnp.where(pivot < 0, -1.0, 1.0).astype(vectors_RxK.dtype)


def compute_projector(grad_MxN: jax.Array, rank: int) -> jax.Array:
  """Returns the sign-canonical float32 ``basis_RxK`` of a canonical gradient.

  The SVD runs in float32 (bf16/f16 gradients are upcast) and is thin. This is the default
  ``projector_fn`` of :func:`~qgalore_jax.scale_by_qgalore`; a replacement has its signature
  and returns a basis of the same shape.

  Args:
    grad_MxN: canonical (out, in) gradient.
    rank: requested rank; clamped to ``min(m, n)``.

  Returns:
    float32 [r, k]: the top-r right singular vectors as rows ("right"), or the top-r left
    singular vectors as rows ("left").

  Example:
    >>> import jax.numpy as jnp
    >>> from qgalore_jax import compute_projector
    >>> g = jnp.outer(jnp.arange(1.0, 5.0), jnp.array([3.0, -4.0]))  # rank 1, (4, 2)
    >>> basis = compute_projector(g, rank=1)  # "right": the top row of Vt, sign fixed
    >>> basis.shape, bool(jnp.allclose(basis, jnp.array([[-0.6, 0.8]])))
    ((1, 2), True)

  References:
    Zhao et al., `GaLore <https://arxiv.org/abs/2403.03507>`_, Algorithm 2, 2024.
  """
  shape = grad_MxN.shape
  r = effective_rank(shape, rank)
  u_MxK, _, vt_KxN = jnp.linalg.svd(grad_MxN.astype(jnp.float32), full_matrices=False)
  rows = vt_KxN[:r] if projector_side(shape) == RIGHT else u_MxK[:, :r].T
  return sign_canonical(rows)


def sketch_shape(shape: tuple[int, int], rank: int, oversample: int) -> tuple[int, int]:
  """Shape ``(k, l)`` of a refresh's sketch, ``l = min(r + oversample, k)`` (section 2.6)."""
  r, k = basis_shape(shape, rank)
  return k, min(r + oversample, k)


def warm_start(sketch_KxL: jax.Array, previous_RxK: jax.Array) -> jax.Array:
  """The start block of subspace iteration: the sketch with its first r columns replaced by
  the previous basis, transposed (docs/spec.md section 2.6)."""
  return sketch_KxL.at[:, : previous_RxK.shape[0]].set(previous_RxK.T)


def _orthonormal(x: jax.Array) -> jax.Array:
  """An orthonormal basis of the columns of ``x``: Q of its reduced Householder QR."""
  return jnp.linalg.qr(x, mode="reduced")[0]


def randomized_projector(
  grad_MxN: jax.Array, rank: int, start_KxL: jax.Array, iters: int
) -> jax.Array:
  r"""The sign-canonical float32 ``basis_RxK`` by a range finder from ``start_KxL``.

  Halko, Martinsson and Tropp's power-iterated range finder (their algorithms 4.3 and
  5.1, orthonormalised after each power iteration) on ``A``, the canonical gradient read
  so that the basis lives in its columns: ``A = G`` (D x k, "right") or ``A = G^T``
  ("left"), with ``D >= k``. Then

  .. math::

    Q = \text{qr}(A X); \quad \text{iters times: } Q = \text{qr}(A (A^\top Q));
    \quad \text{basis} = \text{sign}(\text{top } r \text{ rows of } V^\top), \;
    Q^\top A = U \Sigma V^\top

  Every QR is a reduced Householder QR and the last SVD is thin, all in float32
  (docs/spec.md section 2.6). With ``X`` a random sketch this is the ``"randomized"``
  refresh; with ``X`` = :func:`warm_start` of the previous basis, the ``"subspace"`` one.
  When ``l = k`` the result is the full SVD's basis, to rounding.

  Args:
    grad_MxN: canonical (out, in) gradient.
    rank: requested rank; clamped to ``min(m, n)``.
    start_KxL: float32 start block ``X``, ``(k, l)`` with ``r <= l <= k``
      (:func:`sketch_shape`).
    iters: power (subspace) iterations, >= 0.

  Returns:
    float32 [r, k], the contract of :func:`compute_projector`.

  Example:
    >>> import jax.numpy as jnp
    >>> from qgalore_jax._src.projector import randomized_projector
    >>> g = jnp.outer(jnp.arange(1.0, 5.0), jnp.array([3.0, -4.0]))  # rank 1, (4, 2)
    >>> basis = randomized_projector(g, 1, jnp.ones((2, 2)), iters=1)
    >>> bool(jnp.allclose(basis, jnp.array([[-0.6, 0.8]])))
    True

  References:
    Halko, Martinsson and Tropp, `Finding structure with randomness
    <https://arxiv.org/abs/0909.4061>`_, algorithms 4.3 and 5.1, 2011.
  """
  shape = grad_MxN.shape
  r = effective_rank(shape, rank)
  g_MxN = grad_MxN.astype(jnp.float32)
  a_DxK = g_MxN if projector_side(shape) == RIGHT else g_MxN.T
  q_DxL = _orthonormal(a_DxK @ start_KxL)
  for _ in range(iters):
    q_DxL = _orthonormal(a_DxK @ (a_DxK.T @ q_DxL))
  _, _, vt_LxK = jnp.linalg.svd(q_DxL.T @ a_DxK, full_matrices=False)
  return sign_canonical(vt_LxK[:r])


def project(grad_MxN: jax.Array, basis_RxK: jax.Array) -> jax.Array:
  """Projects a canonical gradient into the subspace (docs/spec.md section 2).

  Args:
    grad_MxN: canonical (out, in) gradient ``G``.
    basis_RxK: the projector's rows (:func:`compute_projector`, dequantised if stored so).

  Returns:
    ``G P^T`` of shape (m, r) on the "right" side, ``P^T G`` of shape (r, n) on the "left".

  Example:
    >>> import jax.numpy as jnp
    >>> from qgalore_jax import compute_projector, project, project_back
    >>> g = jnp.outer(jnp.arange(1.0, 5.0), jnp.array([3.0, -4.0]))
    >>> basis = compute_projector(g, rank=1)
    >>> low = project(g, basis)
    >>> low.shape, bool(jnp.allclose(project_back(low, basis, "right"), g, atol=1e-5))
    ((4, 1), True)
  """
  if projector_side(grad_MxN.shape) == RIGHT:
    return grad_MxN @ basis_RxK.T
  return basis_RxK @ grad_MxN


def project_back(low_rank: jax.Array, basis_RxK: jax.Array, side: str) -> jax.Array:
  """Back-projects a low-rank update to the canonical (m, n) space (docs/spec.md section 2).

  Args:
    low_rank: the low-rank update ``D``, shaped as :func:`project` returns.
    basis_RxK: the same projector rows that projected it.
    side: ``"right"`` or ``"left"``, from :func:`projector_side` of the matrix.

  Returns:
    ``D P`` ("right") or ``P D`` ("left"), of the canonical matrix's shape. See
    :func:`project` for an example.
  """
  if side == RIGHT:
    return low_rank @ basis_RxK
  return basis_RxK.T @ low_rank


def project_back_transposed(low_rank: jax.Array, basis_RxK: jax.Array, side: str) -> jax.Array:
  """``project_back(low_rank, basis_RxK, side).T``, computed directly in (in, out) layout.

  ``(D P)^T = P^T D^T`` and ``(P D)^T = D^T P``: the matmul writes the Flax-kernel layout
  itself, where transposing the (out, in) result would cost two passes over the matrix.
  """
  if side == RIGHT:
    return basis_RxK.T @ low_rank.T
  return low_rank.T @ basis_RxK


def store_projector(basis_RxK: jax.Array, bits: int | None, group_size: int):
  """The stored form of a projector: a packed :class:`QuantizedArray`, or float32 if no bits."""
  if bits is None:
    return basis_RxK.astype(jnp.float32)
  return quantization.quantize(basis_RxK, bits, group_size)


def load_projector(stored, shape_RxK: tuple[int, int], bits: int | None, group_size: int):
  """The float32 ``basis_RxK`` used to project and back-project (dequantised if stored so)."""
  if bits is None:
    return stored
  return quantization.dequantize(stored, shape_RxK, bits, group_size)

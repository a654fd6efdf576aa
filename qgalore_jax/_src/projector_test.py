"""Projector tests: NumPy SVD as reference, and the authors' GaLoreProjector as an oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qgalore_jax import compute_projector
from qgalore_jax import dequantize
from qgalore_jax import project
from qgalore_jax import project_back
from qgalore_jax import projector_side
from qgalore_jax import quantize
from qgalore_jax import sign_canonical
from qgalore_jax import unpack_int4
from qgalore_jax._src.generator import sketch
from qgalore_jax._src.projector import randomized_projector
from qgalore_jax._src.projector import sketch_shape
from qgalore_jax._src.projector import warm_start


def numpy_sign_canonical(rows):
  rows = np.array(rows, copy=True)
  for i, row in enumerate(rows):
    j = int(np.argmax(np.abs(row)))  # first index of the largest magnitude
    if row[j] < 0:
      rows[i] = -row
  return rows


def well_conditioned(m, n, seed=0):
  """A matrix with well separated singular values, so all SVD libraries agree closely."""
  rng = np.random.default_rng(seed)
  u, _ = np.linalg.qr(rng.normal(size=(m, m)))
  v, _ = np.linalg.qr(rng.normal(size=(n, n)))
  k = min(m, n)
  s = np.linspace(10.0, 1.0, k)
  return (u[:, :k] * s) @ v[:, :k].T


def test_sign_canonical_known_rows():
  rows = jnp.array([[0.1, -0.9, 0.3], [-0.5, 0.5, 0.2], [0.0, 0.0, -1.0]])
  want = np.array([[-0.1, 0.9, -0.3], [0.5, -0.5, -0.2], [0.0, 0.0, 1.0]])
  np.testing.assert_array_equal(np.asarray(sign_canonical(rows)), want.astype(np.float32))


@pytest.mark.parametrize("shape,rank", [((12, 6), 3), ((6, 12), 3), ((8, 8), 4), ((5, 3), 9)])
def test_compute_projector_matches_numpy_svd(shape, rank):
  g = well_conditioned(*shape)
  u, _, vt = np.linalg.svd(g, full_matrices=False)
  r = min(rank, *shape)
  side = "right" if shape[0] >= shape[1] else "left"
  want = numpy_sign_canonical(vt[:r] if side == "right" else u[:, :r].T)
  got = np.asarray(compute_projector(jnp.asarray(g, jnp.float32), rank))
  assert projector_side(shape) == side
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=2e-5)
  # Projection and back-projection follow docs/spec.md section 2 on the canonical matrix.
  p = want
  low = g @ p.T if side == "right" else p @ g
  got_low = np.asarray(project(jnp.asarray(g, jnp.float32), jnp.asarray(p, jnp.float32)))
  np.testing.assert_allclose(got_low, low, atol=1e-5 * np.abs(low).max())
  back = low @ p if side == "right" else p.T @ low
  got_back = np.asarray(project_back(jnp.asarray(low), jnp.asarray(p), side))
  np.testing.assert_allclose(got_back, back, atol=1e-5 * np.abs(back).max())


def test_bf16_gradient_is_upcast():
  g = well_conditioned(16, 8)
  got = compute_projector(jnp.asarray(g, jnp.bfloat16), 4)
  want = compute_projector(jnp.asarray(g, jnp.bfloat16).astype(jnp.float32), 4)
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _sign_fixed(projector_obj):
  """Wraps the authors' SVD so its output rows follow the sign rule (docs/spec.md section 2)."""
  import torch

  original = projector_obj.get_orthogonal_matrix

  def patched(weights, rank, type):
    out = original(weights, rank, type)
    rows = out if type == "right" else out.T
    fixed = torch.from_numpy(numpy_sign_canonical(rows.numpy()))
    return fixed if type == "right" else fixed.T.contiguous()

  projector_obj.get_orthogonal_matrix = patched
  return projector_obj


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48)])
def test_quantised_projection_matches_authors_projector(authors_projector_cls, shape):
  """The authors' GaLoreProjector (q-galore-torch 1.0), sign-fixed, as an independent oracle.

  For "left" (m < n) it is fed the transpose G^T, whose "right" basis is U^T of G: then its
  quantisation groups lie along the singular vectors, as docs/spec.md section 3 requires.
  """
  import torch

  rank, group_size = 8, 32
  g = well_conditioned(*shape, seed=1).astype(np.float32)
  side = projector_side(shape)
  oracle = _sign_fixed(
    authors_projector_cls(rank, update_proj_gap=10, quant=True, group_size=group_size, n_bit=4)
  )
  fed = g if side == "right" else g.T
  oracle_low = oracle.project(torch.from_numpy(fed), 0).numpy()
  oracle_basis = oracle.ortho_matrix_scales * (
    oracle.ortho_matrix.to(torch.float32) - oracle.ortho_matrix_zeros
  )
  oracle_basis = oracle_basis.reshape(oracle.ortho_matrix_shape).numpy()

  basis = compute_projector(jnp.asarray(g), rank)
  q = quantize(basis, 4, group_size)
  ours = np.asarray(dequantize(q, basis.shape, 4, group_size))
  # SVDs of two libraries differ by ~1 ulp. That moves scales by ulps (tiny differences
  # everywhere) and can flip a code at a rounding boundary (one step off): allow at most one
  # flipped code per 512 elements.
  step = float(np.asarray(q.scale).max())
  diff = np.abs(ours - oracle_basis)
  flipped = diff > step / 2
  assert flipped.sum() <= max(1, diff.size // 512)
  assert np.all(diff[~flipped] <= 1e-5)
  assert diff.max() <= step * 1.001 + 1e-5
  ours_low = np.asarray(project(jnp.asarray(g), jnp.asarray(ours)))
  oracle_low = oracle_low if side == "right" else oracle_low.T
  np.testing.assert_allclose(ours_low, oracle_low, atol=step * np.abs(g).max() * 2, rtol=1e-4)


def test_quantiser_matches_authors_on_identical_input(authors_projector_cls):
  """Fed the same float basis, our codes, scales and zeros equal the authors' bit for bit."""
  import torch

  basis = np.asarray(compute_projector(jnp.asarray(well_conditioned(64, 32)), 16))
  oracle = authors_projector_cls(16)
  codes, scales, zeros, _ = oracle._quantize(torch.tensor(basis), q_group_size=64, n_bit=4)
  q = jax.jit(quantize, static_argnums=(1, 2))(jnp.asarray(basis), 4, 64)
  np.testing.assert_array_equal(np.asarray(unpack_int4(q.codes, basis.size)), codes.reshape(-1))
  np.testing.assert_array_equal(np.asarray(q.scale), scales.reshape(-1).numpy())
  np.testing.assert_array_equal(np.asarray(q.zero), zeros.reshape(-1).numpy())


def numpy_range_finder(g, rank, start, iters):
  """docs/spec.md section 2.6 in float64 NumPy: Halko et al.'s power iteration, small SVD."""
  a = g if g.shape[0] >= g.shape[1] else g.T
  q = np.linalg.qr(a @ start)[0]
  for _ in range(iters):
    q = np.linalg.qr(a @ (a.T @ q))[0]
  return numpy_sign_canonical(np.linalg.svd(q.T @ a, full_matrices=False)[2][:rank])


def gapped(m, n, rank, seed=0):
  """A matrix whose top ``rank`` singular values (10..5) stand far above the rest (<= 0.01)."""
  rng = np.random.default_rng(seed)
  u = np.linalg.qr(rng.normal(size=(m, m)))[0]
  v = np.linalg.qr(rng.normal(size=(n, n)))[0]
  k = min(m, n)
  s = np.concatenate([np.linspace(10.0, 5.0, rank), np.linspace(0.01, 0.001, k - rank)])
  return ((u[:, :k] * s) @ v[:, :k].T).astype(np.float32)


def numpy_top_rows(g, rank):
  """The exact sign-canonical top-r basis, from NumPy's float64 SVD."""
  u, _, vt = np.linalg.svd(g.astype(np.float64), full_matrices=False)
  return numpy_sign_canonical(vt[:rank] if g.shape[0] >= g.shape[1] else u[:, :rank].T)


# (shape, power iterations, start columns l): both sides, with and without iterations, and a
# start spanning the whole space (l = k), where the result is the full SVD's basis.
RANGE_CASES = (((48, 20), 0, 12), ((48, 20), 2, 12), ((20, 48), 0, 12), ((20, 48), 2, 12),
               ((30, 12), 0, 12))  # fmt: skip


def test_randomized_projector_matches_numpy_range_finder():
  rng = np.random.default_rng(1)
  gs = [well_conditioned(*shape, seed=3).astype(np.float32) for shape, _, _ in RANGE_CASES]
  starts = [
    rng.choice([-1.0, 1.0], size=(min(shape), cols)).astype(np.float32)
    for shape, _, cols in RANGE_CASES
  ]
  iters = [it for _, it, _ in RANGE_CASES]
  got = jax.jit(lambda gs, starts: [
    randomized_projector(g, 4, start, it) for g, start, it in zip(gs, starts, iters)
  ])(gs, starts)  # fmt: skip
  for g, start, it, basis in zip(gs, starts, iters, got, strict=True):
    want = numpy_range_finder(g.astype(np.float64), 4, start.astype(np.float64), it)
    assert basis.shape == (4, min(g.shape)) and basis.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(basis), want, atol=5e-5)
    np.testing.assert_allclose(np.asarray(basis @ basis.T), np.eye(4), atol=1e-5)
  np.testing.assert_allclose(np.asarray(got[-1]), numpy_top_rows(gs[-1], 4), atol=2e-5)
  assert sketch_shape((30, 12), 4, 100) == (12, 12)  # l = min(r + oversample, k)


def test_randomized_projector_captures_the_top_subspace_of_a_gapped_matrix():
  shapes = ((64, 24), (24, 64))
  gs = [gapped(*shape, rank=6) for shape in shapes]
  bases = jax.jit(lambda gs: [
    randomized_projector(g, 6, sketch(0, 0, 0, 0, sketch_shape(g.shape, 6, 4)), 1) for g in gs
  ])(gs)  # fmt: skip
  for g, basis in zip(gs, bases, strict=True):
    exact = numpy_top_rows(g, 6)
    a = (g if g.shape[0] >= g.shape[1] else g.T).astype(np.float64)
    energy = lambda b, a=a: np.linalg.norm(a @ np.asarray(b, np.float64).T)
    assert abs(energy(basis) / energy(exact) - 1) < 1e-5
    np.testing.assert_allclose(basis, exact, atol=1e-4)  # the same vectors, sign rule included


def test_warm_start_replaces_the_leading_columns():
  sketch_KxL = jnp.ones((5, 4))
  previous_RxK = jnp.arange(10.0).reshape(2, 5)
  want = np.ones((5, 4))
  want[:, :2] = np.arange(10.0).reshape(2, 5).T
  np.testing.assert_array_equal(np.asarray(warm_start(sketch_KxL, previous_RxK)), want)

"""Tests of the projector (docs/spec.md sections 1-3) against NumPy and the authors' projector."""

import numpy as np
import pytest
import torch

from qgalore_torch._src import projector as proj


def naive_sign_rule(rows):
  """Each row times the sign of its first entry of largest magnitude (docs/spec.md section 2)."""
  rows = np.array(rows, copy=True)
  for i, row in enumerate(rows):
    pivot = row[np.argmax(np.abs(row))]
    if pivot < 0:
      rows[i] = -row
  return rows


def _matrix(shape, seed=0, dtype=torch.float32):
  return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize(
  "shape, rank, side, basis",
  [
    ((12, 8), 4, "right", (4, 8)),
    ((8, 8), 3, "right", (3, 8)),
    ((6, 10), 4, "left", (4, 6)),
    ((6, 4), 9, "right", (4, 4)),
    ((3, 10), 9, "left", (3, 3)),
  ],
)
def test_side_rank_clamp_and_basis_shape(shape, rank, side, basis):
  assert proj.projector_side(shape) == side
  assert proj.effective_rank(shape, rank) == basis[0]
  assert proj.basis_shape(shape, rank) == basis
  basis_RxK = proj.compute_projector(_matrix(shape), rank)
  assert tuple(basis_RxK.shape) == basis
  assert basis_RxK.dtype == torch.float32


def test_sign_canonical_matches_naive_rule_including_ties():
  rows = torch.tensor([[0.5, -0.5, 0.1], [-0.2, 0.9, -0.9], [-3.0, 1.0, 2.0], [0.0, 0.0, 0.0]])
  expected = naive_sign_rule(rows.numpy())
  np.testing.assert_array_equal(proj.sign_canonical(rows).numpy(), expected)


@pytest.mark.parametrize("shape, rank", [((12, 8), 4), ((6, 10), 4), ((7, 7), 7)])
def test_compute_projector_matches_numpy_svd(shape, rank):
  """Rows are the top singular vectors of NumPy's float64 SVD, sign-fixed, to rounding."""
  g = _matrix(shape, seed=3)
  u, _, vt = np.linalg.svd(g.numpy().astype(np.float64), full_matrices=False)
  r = min(rank, *shape)
  rows = vt[:r] if shape[0] >= shape[1] else u[:, :r].T
  ours = proj.compute_projector(g, rank).numpy()
  np.testing.assert_allclose(ours, naive_sign_rule(rows), atol=2e-5)


def test_compute_projector_upcasts_bf16():
  g = _matrix((12, 8), seed=4, dtype=torch.bfloat16)
  np.testing.assert_array_equal(
    proj.compute_projector(g, 3).numpy(), proj.compute_projector(g.float(), 3).numpy()
  )


def test_project_and_back_are_the_spec_products():
  g_right, g_left = _matrix((12, 8), seed=5).double(), _matrix((6, 10), seed=6).double()
  p_right, p_left = _matrix((3, 8), seed=7).double(), _matrix((2, 6), seed=8).double()
  np.testing.assert_allclose(proj.project(g_right, p_right), g_right.numpy() @ p_right.numpy().T)
  np.testing.assert_allclose(proj.project(g_left, p_left), p_left.numpy() @ g_left.numpy())
  d_right, d_left = _matrix((12, 3), seed=9).double(), _matrix((2, 10), seed=10).double()
  np.testing.assert_allclose(
    proj.project_back(d_right, p_right, "right"), d_right.numpy() @ p_right.numpy()
  )
  np.testing.assert_allclose(
    proj.project_back(d_left, p_left, "left"), p_left.numpy().T @ d_left.numpy()
  )


def test_store_and_load_without_bits_keep_float32():
  basis = _matrix((3, 8), seed=11)
  stored = proj.store_projector(basis, None, 256)
  assert torch.equal(proj.load_projector(stored, (3, 8), None, 256), basis)


def _spans_zero_in_every_group(basis_RxK, group_size):
  """The authors clamp the zero point to [0, Q]; that differs from ours only when a group
  has a single sign, so the inputs below are checked to have none."""
  groups = basis_RxK.reshape(-1, group_size)
  return bool(((groups.amin(1) <= 0) & (groups.amax(1) >= 0)).all())


def _authors_projector(cls, rank, group_size):
  """The authors' projector, 4-bit, its SVD output sign-fixed (docs/spec.md section 2)."""
  authors = cls(rank, update_proj_gap=200, scale=1.0, quant=True, group_size=group_size, n_bit=4)
  unsigned = authors.get_orthogonal_matrix

  def signed(weights, rank, type):
    assert type == "right"  # the tests below only feed it matrices with rows >= columns
    return torch.from_numpy(naive_sign_rule(unsigned(weights, rank, type).numpy()))

  authors.get_orthogonal_matrix = signed
  return authors


@pytest.mark.parametrize("shape, rank, group_size", [((12, 8), 4, 8), ((16, 16), 4, 16)])
def test_quantised_right_projection_matches_authors(authors_projector_cls, shape, rank, group_size):
  g = _matrix(shape, seed=12)
  authors = _authors_projector(authors_projector_cls, rank, group_size)
  expected_low_rank = authors.project(g, 0)
  basis_shape = proj.basis_shape(shape, rank)
  float_basis_RxK = proj.compute_projector(g, rank)
  assert _spans_zero_in_every_group(float_basis_RxK, group_size)
  stored = proj.store_projector(float_basis_RxK, 4, group_size)
  basis_RxK = proj.load_projector(stored, basis_shape, 4, group_size)
  low_rank = proj.project(g, basis_RxK)
  torch.testing.assert_close(low_rank, expected_low_rank, rtol=1e-6, atol=1e-6)
  torch.testing.assert_close(
    proj.project_back(low_rank, basis_RxK, "right"),
    authors.project_back(expected_low_rank),
    rtol=1e-6,
    atol=1e-6,
  )


@pytest.mark.parametrize("shape, rank, group_size", [((6, 10), 4, 12), ((8, 24), 4, 16)])
def test_quantised_left_projection_matches_authors_on_transpose(
  authors_projector_cls, shape, rank, group_size
):
  """docs/spec.md section 3 groups the r x m matrix of left singular vectors along the vectors.

  The authors' "left" path would group the m x r matrix across vectors, so the oracle gets
  G^T, whose "right" projector is exactly that r x m matrix.
  """
  g = _matrix(shape, seed=13)
  authors = _authors_projector(authors_projector_cls, rank, group_size)
  expected_low_rank = authors.project(g.T.contiguous(), 0).T
  basis_shape = proj.basis_shape(shape, rank)
  float_basis_RxK = proj.compute_projector(g, rank)
  assert _spans_zero_in_every_group(float_basis_RxK, group_size)
  stored = proj.store_projector(float_basis_RxK, 4, group_size)
  basis_RxK = proj.load_projector(stored, basis_shape, 4, group_size)
  low_rank = proj.project(g, basis_RxK)
  torch.testing.assert_close(low_rank, expected_low_rank, rtol=1e-5, atol=1e-6)
  torch.testing.assert_close(
    proj.project_back(low_rank, basis_RxK, "left"),
    authors.project_back(expected_low_rank.T.contiguous()).T,
    rtol=1e-5,
    atol=1e-6,
  )


def numpy_range_finder(g, rank, start, iters):
  """docs/spec.md section 2.6 in float64 NumPy: Halko et al.'s power iteration, small SVD."""
  a = g if g.shape[0] >= g.shape[1] else g.T
  q = np.linalg.qr(a @ start)[0]
  for _ in range(iters):
    q = np.linalg.qr(a @ (a.T @ q))[0]
  return naive_sign_rule(np.linalg.svd(q.T @ a, full_matrices=False)[2][:rank])


@pytest.mark.parametrize("shape", [(48, 20), (20, 48)], ids=str)
@pytest.mark.parametrize("iters", [0, 2])
def test_randomized_projector_matches_numpy_range_finder(shape, iters):
  g = _matrix(shape, seed=3)
  k = min(shape)
  start = np.random.default_rng(1).choice([-1.0, 1.0], size=(k, 12))
  got = proj.randomized_projector(g, 4, torch.tensor(start, dtype=torch.float32), iters)
  want = numpy_range_finder(g.double().numpy(), 4, start, iters)
  assert got.shape == (4, k) and got.dtype == torch.float32
  np.testing.assert_allclose(got.numpy(), want, atol=5e-5)
  np.testing.assert_allclose((got @ got.T).numpy(), np.eye(4), atol=1e-5)


def test_randomized_projector_with_the_whole_space_is_the_full_svd():
  g = _matrix((30, 12), seed=4)
  assert proj.sketch_shape((30, 12), 5, 100) == (12, 12)  # l = min(r + oversample, k)
  start = torch.ones(12, 12).triu()  # any invertible start block spans the whole space
  basis = proj.randomized_projector(g, 5, start, 0)
  torch.testing.assert_close(basis, proj.compute_projector(g, 5), atol=2e-5, rtol=0)


def test_warm_start_replaces_the_leading_columns():
  want = torch.ones(5, 4)
  want[:, :2] = torch.arange(10.0).reshape(2, 5).T
  got = proj.warm_start(torch.ones(5, 4), torch.arange(10.0).reshape(2, 5))
  torch.testing.assert_close(got, want, atol=0, rtol=0)

"""Adaptive refresh schedule: the documented example and the authors' projector as oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qgalore_jax import projection_stats
from qgalore_jax import scale_by_qgalore
from qgalore_jax._src import schedule


def run_schedule(tx, grads_TxMxN):
  """Runs ``tx`` over a sequence of gradients; returns per-step svd_count and gap."""
  params = jnp.zeros(grads_TxMxN.shape[1:])

  def step(state, g):
    _, state = tx.update(g, state, params)
    stats = projection_stats(state)
    return state, (stats["svd_count"], stats["gap"])

  _, (svd_counts, gaps) = jax.jit(lambda g: jax.lax.scan(step, tx.init(params), g))(grads_TxMxN)
  return np.asarray(svd_counts), np.asarray(gaps)


def refresh_steps(svd_counts):
  return [int(t) for t in np.nonzero(np.diff(np.concatenate([[0], svd_counts])))[0]]


def test_stable_gradient_example_schedule():
  """docs/spec.md section 4 / the reference: 10 SVDs in 10k steps with update_proj_gap 200."""
  g = jnp.asarray(np.random.default_rng(0).normal(size=(6, 4)), jnp.float32)
  grads = jnp.broadcast_to(g, (10_000, 6, 4))
  svd_counts, gaps = run_schedule(scale_by_qgalore(rank=2, input_axis=1), grads)
  assert refresh_steps(svd_counts) == [0, 200, 400, 600, 800, 1000, 1200, 1600, 3200, 6400]
  assert svd_counts[-1] == 10
  assert gaps[-1] == 6400  # the next refresh would be at 12800


def test_gamma_one_is_fixed_gap():
  g = jnp.asarray(np.random.default_rng(0).normal(size=(6, 4)), jnp.float32)
  svd_counts, gaps = run_schedule(
    scale_by_qgalore(rank=2, update_proj_gap=50, gamma_proj=1, input_axis=1),
    jnp.broadcast_to(g, (1000, 6, 4)),
  )
  assert refresh_steps(svd_counts) == list(range(0, 1000, 50))
  assert set(gaps.tolist()) == {50}


def test_matches_authors_adaptive_schedule(authors_projector_cls):
  """Gap and SVD count per step equal the authors' GaLoreProjector fed the same gradients."""
  import torch

  rng = np.random.default_rng(3)
  shape = (12, 6)
  base = rng.normal(size=shape)
  # A subspace that drifts, then settles: cosines fall on both sides of the threshold.
  noise = np.concatenate([np.full(120, 1.5), np.full(180, 0.15)])
  grads = np.stack([base + n * rng.normal(size=shape) for n in noise]).astype(np.float32)

  oracle = authors_projector_cls(
    2, update_proj_gap=4, quant=True, group_size=6, n_bit=4, cos_threshold=0.4, queue_size=3
  )
  original = oracle.get_orthogonal_matrix

  def sign_fixed(weights, rank, type):
    out = original(weights, rank, type)
    idx = out.abs().argmax(dim=1, keepdim=True)
    return out * torch.where(out.gather(1, idx) < 0, -1.0, 1.0)

  oracle.get_orthogonal_matrix = sign_fixed
  want_counts, want_gaps = [], []
  for t, g in enumerate(grads):
    oracle.project(torch.from_numpy(g), t)
    want_counts.append(oracle.svd_count)
    want_gaps.append(oracle.update_proj_gap)

  tx = scale_by_qgalore(
    rank=2, update_proj_gap=4, proj_group_size=6, cos_threshold=0.4, queue_size=3, input_axis=1
  )
  svd_counts, gaps = run_schedule(tx, jnp.asarray(grads))
  assert want_gaps[-1] > 4  # the example exercises growth
  np.testing.assert_array_equal(svd_counts, want_counts)
  np.testing.assert_array_equal(gaps, want_gaps)


def test_record_refresh_ring_buffer():
  state = schedule.init_subspace(k=2, update_proj_gap=10, queue_size=2)
  v = jnp.array([1.0, 0.0])
  w = jnp.array([0.0, 1.0])
  state = schedule.record_refresh(state, v, cos_threshold=0.5, gamma_proj=2)  # first: no cosine
  assert int(state.num_cosines) == 0 and int(state.svd_count) == 1
  state = schedule.record_refresh(state, w, 0.5, 2)  # cos 0
  state = schedule.record_refresh(state, w, 0.5, 2)  # cos 1, mean 0.5 >= 0.5: grow
  np.testing.assert_array_equal(np.asarray(state.cosines), [0.0, 1.0])
  assert int(state.gap) == 20
  state = schedule.record_refresh(state, v, 0.5, 2)  # cos 0 drops the oldest: [1, 0]
  np.testing.assert_array_equal(np.asarray(state.cosines), [1.0, 0.0])
  assert int(state.gap) == 40 and int(state.svd_count) == 4


@pytest.mark.parametrize("gamma,want", [(2, 2**30), (1.5, 2**30), (3, 2**30 // 3 * 3)])
def test_gap_never_overflows(gamma, want):
  assert int(schedule.grow_gap(jnp.asarray(2**29 + 7, jnp.int32), gamma)) <= 2**30
  assert int(schedule.grow_gap(jnp.asarray(2**30, jnp.int32), gamma)) == want


def test_fractional_gamma_floors():
  assert int(schedule.grow_gap(jnp.asarray(7, jnp.int32), 1.5)) == 10

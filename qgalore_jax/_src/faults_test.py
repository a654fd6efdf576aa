"""Faults and awkward inputs (docs/reliability.md): what a user gets, checked.

References: NumPy least squares for "it still trains", the spec's clamped rank
``min(rank, m, n)`` (docs/spec.md section 1.1) for the state's shapes, and section 4.3 for a
refresh whose basis is not finite.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qgalore_jax import projection_stats
from qgalore_jax import qgalore_adamw
from qgalore_jax import scale_by_qgalore
from qgalore_jax._src.qgalore import ScaleByQGaLoreState
from qgalore_jax._src.qgalore_test import train_steps


def _least_squares(shape, dtype, seed=0):
  """A problem ``|x W - y|^2`` whose float64 optimum NumPy knows; returns loss_fn, W0, best."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(64, shape[0]))
  y = x @ rng.normal(size=shape)
  best = float(np.mean((x @ np.linalg.lstsq(x, y, rcond=None)[0] - y) ** 2))
  xj, yj = jnp.asarray(x, dtype), jnp.asarray(y, dtype)
  loss_fn = lambda p: jnp.mean((xj @ p["w"] - yj).astype(jnp.float32) ** 2)
  return loss_fn, {"w": jnp.zeros(shape, dtype)}, best


@pytest.mark.parametrize(
  "shape, rank",
  [((8, 6), 10), ((8, 6), 6), ((1, 40), 4), ((40, 1), 4), ((1, 1), 3)],
  ids=["rank over both sides", "rank equal to a side", "1 x n", "n x 1", "1 x 1"],
)
def test_awkward_shapes_clamp_the_rank_andtrain_steps(shape, rank):
  loss_fn, params, best = _least_squares(shape, jnp.float32)
  tx = qgalore_adamw(5e-2, rank=rank, update_proj_gap=5, weight_decay=0.0)
  params, state, losses = train_steps(tx, loss_fn, params, 150)
  r = min(rank, *shape)
  is_qgalore = lambda x: isinstance(x, ScaleByQGaLoreState)
  (qgalore,) = [x for x in jax.tree.leaves(state, is_leaf=is_qgalore) if is_qgalore(x)]
  mu = qgalore.mu["w"]  # the low-rank first moment (float moments), docs/spec.md 1.1
  assert r in mu.shape and mu.size == r * max(shape)
  assert int(projection_stats(state)["w"]["svd_count"]) >= 1
  assert losses[-1] < 0.2 * losses[0] and np.isfinite(losses[-1])
  assert losses[-1] >= best - 1e-4


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_params_keep_their_dtype_andtrain_steps(dtype):
  loss_fn, params, _ = _least_squares((16, 12), dtype)
  tx = qgalore_adamw(1e-1, rank=4, update_proj_gap=10, weight_decay=0.0)
  params, _, losses = train_steps(tx, loss_fn, params, 150)
  assert params["w"].dtype == dtype
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0]


def test_float64_params_under_x64_keep_their_dtype_andtrain_steps():
  with jax.enable_x64(True):
    loss_fn, params, _ = _least_squares((16, 12), jnp.float64)
    tx = qgalore_adamw(1e-1, rank=4, update_proj_gap=10, weight_decay=0.0)
    params, _, losses = train_steps(tx, loss_fn, params, 150)
    assert params["w"].dtype == jnp.float64
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0]


def test_all_zero_gradients_leave_the_weights_and_refresh():
  """A zero gradient is a valid SVD input: the update is zero and the projector finite."""
  params = {"w": jnp.full((8, 6), 0.5)}
  tx = qgalore_adamw(1e-2, rank=2, update_proj_gap=1, weight_decay=0.0)
  state = tx.init(params)
  for _ in range(3):
    updates, state = jax.jit(tx.update)({"w": jnp.zeros((8, 6))}, state, params)
    np.testing.assert_array_equal(np.asarray(updates["w"]), 0.0)
  assert int(projection_stats(state)["w"]["svd_count"]) == 3
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state))


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf], ids=["NaN basis", "inf basis"])
def test_a_non_finite_basis_from_the_svd_is_rejected(bad):
  """An SVD that returns garbage (the projector_fn seam): the refresh is skipped and retried.

  docs/spec.md section 4.3: the stored projector and schedule stay, and the matrix retries
  on its next refresh step.
  """
  params = {"w": jnp.ones((8, 6))}
  grads = {"w": jax.random.normal(jax.random.key(0), (8, 6))}
  good = scale_by_qgalore(rank=2, update_proj_gap=2)
  poisoned = scale_by_qgalore(
    rank=2, update_proj_gap=2, projector_fn=lambda g, r: jnp.full((r, 6), bad, jnp.float32)
  )
  _, state = jax.jit(good.update)(grads, good.init(params), params)
  before = jax.tree.map(np.asarray, (state.projector, state.subspace))
  state = state._replace(count=jnp.asarray(2))  # a refresh step
  updates, new = jax.jit(poisoned.update)(grads, state, params)
  after = jax.tree.map(np.asarray, (new.projector, new.subspace))
  jax.tree.map(np.testing.assert_array_equal, after, before)
  assert np.all(np.isfinite(np.asarray(updates["w"])))


def test_an_svd_that_raises_surfaces_its_error():
  """A projector_fn that fails (e.g. a solver that does not converge) is not swallowed."""

  def fails(grad, rank):
    raise np.linalg.LinAlgError("SVD did not converge")

  params = {"w": jnp.ones((8, 6))}
  tx = scale_by_qgalore(rank=2, projector_fn=fails)
  with pytest.raises(np.linalg.LinAlgError, match="did not converge"):
    tx.update({"w": jnp.ones((8, 6))}, tx.init(params), params)

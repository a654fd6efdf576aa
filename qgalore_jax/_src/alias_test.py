"""Tests of the user alias: routing of the seams (``projector_fn``, ``min_8bit_size``), guard."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qgalore_jax import STATIC_ARGS
from qgalore_jax import ScaleByAdam8bitState
from qgalore_jax import ScaleByQGaLoreState
from qgalore_jax import qgalore_adamw
from qgalore_jax import skipped_steps


def _inner(state, cls):
  """The one inner state of type ``cls`` in a ``qgalore_adamw`` state."""
  found = [
    s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, cls)) if isinstance(s, cls)
  ]
  assert len(found) == 1
  return found[0]


def test_min_8bit_size_reaches_projected_and_plain_leaves():
  params = {"w": jnp.ones((16, 16)), "e": jnp.ones((16, 16)), "b": jnp.ones(16)}
  mask = {"w": True, "e": False, "b": False}
  grads = jax.tree.map(jnp.ones_like, params)
  for size, dtype in [(256, jnp.uint8), (4096, jnp.float32)]:
    tx = qgalore_adamw(1e-3, rank=16, mask=mask, moment_bits=8, min_8bit_size=size)
    _, state = jax.jit(tx.update)(grads, tx.init(params), params)
    assert _inner(state, ScaleByQGaLoreState).mu.codes["w"].dtype == dtype
    assert _inner(state, ScaleByAdam8bitState).mu.codes["e"].dtype == dtype
    assert _inner(state, ScaleByAdam8bitState).mu.codes["b"].dtype == jnp.float32


def test_projector_fn_reaches_scale_by_qgalore():
  basis = np.array([[0.0, 1.0, 0.0, 0.0]], np.float32)  # rank 1: the second input only
  tx = qgalore_adamw(1.0, rank=1, proj_bits=None, projector_fn=lambda g, rank: jnp.asarray(basis))
  params = {"kernel": jnp.zeros((4, 8))}  # Flax (in, out): canonical (8, 4), "right"
  updates, state = tx.update({"kernel": jnp.ones((4, 8))}, tx.init(params), params)
  np.testing.assert_array_equal(
    np.asarray(_inner(state, ScaleByQGaLoreState).projector["kernel"]), basis
  )
  # Adam's first direction is sign(R) = 1 (to float32 rounding) on the one basis row: only
  # row 1 (input 1) moves.
  expected = np.zeros((4, 8), np.float32)
  expected[1] = -0.25
  np.testing.assert_allclose(np.asarray(updates["kernel"]), expected, rtol=1e-5)


def test_seams_are_static_under_inject_hyperparams():
  assert {"projector_fn", "min_8bit_size"} <= set(STATIC_ARGS)
  calls = []

  def projector_fn(grad_MxN, rank):
    calls.append(rank)
    return jnp.eye(rank, min(grad_MxN.shape))  # (r, k): k = n ("right") or m ("left")

  inject = optax.inject_hyperparams(qgalore_adamw, static_args=STATIC_ARGS)
  tx = inject(learning_rate=0.1, rank=2, projector_fn=projector_fn, moment_bits=8, min_8bit_size=16)
  params = {"w": jnp.ones((8, 4))}
  _, state = tx.update({"w": jnp.ones((8, 4))}, tx.init(params), params)
  assert calls == [2]
  assert _inner(state, ScaleByQGaLoreState).mu.codes["w"].dtype == jnp.uint8


@pytest.mark.parametrize(
  "kwargs, error, match",
  [
    (dict(projector_fn=3), TypeError, "projector_fn"),
    (dict(min_8bit_size=0), ValueError, "min_8bit_size"),
    (dict(min_8bit_size=None), TypeError, "min_8bit_size"),
  ],
)
def test_bad_seam_arguments(kwargs, error, match):
  with pytest.raises(error, match=match):
    qgalore_adamw(1e-3, **kwargs)


def test_skip_nonfinite_is_validated_and_static_under_inject_hyperparams():
  with pytest.raises(TypeError, match="skip_nonfinite"):
    qgalore_adamw(1e-3, skip_nonfinite=1)
  params = {"w": jnp.ones((8, 4))}
  tx = optax.inject_hyperparams(qgalore_adamw, static_args=STATIC_ARGS)(
    learning_rate=1e-2, rank=2, skip_nonfinite=True
  )
  state = tx.init(params)
  _, state = tx.update({"w": jnp.full((8, 4), jnp.inf)}, state, params)
  assert int(skipped_steps(state)) == 1
  with pytest.raises(ValueError, match=r"apply_if_finite.*skip_nonfinite=True"):
    skipped_steps(qgalore_adamw(1e-3).init(params))

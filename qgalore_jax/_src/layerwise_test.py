"""layerwise_train_step against int8_train_step on a small scanned model, and its errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qgalore_jax
from qgalore_jax import DimensionNumbers

DIMS = {
  "embed": None,
  "head": None,
  "layers": {"w": DimensionNumbers(1, 2, 0), "n": None},
}


def _params(scale=1.0):
  keys = jax.random.split(jax.random.key(0), 3)
  return {
    "embed": jax.random.normal(keys[0], (16, 32)) * scale,
    "layers": {"w": jax.random.normal(keys[1], (3, 32, 32)) / 6, "n": jnp.ones((3, 32))},
    "head": jax.random.normal(keys[2], (32, 16)) / 6,
  }


def embed(p, tokens):
  return p["embed"][tokens]


def block(p, x):
  return x + jnp.tanh((x * p["n"]) @ p["w"])


def head(p, x, tokens):
  logp = jax.nn.log_softmax(x @ p["head"])
  return -jnp.mean(jnp.take_along_axis(logp[:-1], tokens[1:, None], 1))


def loss_fn(p, tokens):
  """The whole model, its blocks in a scan: the ordinary step's loss."""
  x, _ = jax.lax.scan(lambda x, bp: (block(bp, x), None), embed(p, tokens), p["layers"])
  return head(p, x, tokens)


TOKENS = jnp.arange(24) % 16


def _run(step_fn, tx, params, steps, tokens=TOKENS):
  qparams = qgalore_jax.quantize_params(
    jax.tree.map(jnp.copy, params), dimension_numbers=DIMS, group_size=64
  )
  state = tx.init(qgalore_jax.dequantize_params(qparams))
  losses = []
  for t in range(steps):
    qparams, state, loss = step_fn(qparams, state, tokens, jnp.int32(t))
    losses.append(float(loss))
  return qgalore_jax.dequantize_params(qparams), state, np.array(losses)


def _distance(a, b) -> float:
  num = sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  return (num / sum(float(jnp.sum(y**2)) for y in jax.tree.leaves(b))) ** 0.5


@pytest.mark.slow
@pytest.mark.parametrize("moment_bits", [None, 8])
def test_matches_the_ordinary_step(moment_bits):
  """12 steps, refreshes every 3: within the chaos floor of the ordinary step, and the first
  step (a refresh of every slice) bit for bit."""
  tx = qgalore_jax.qgalore_adamw(
    1e-2,
    rank=4,
    update_proj_gap=3,
    dimension_numbers=DIMS,
    moment_bits=moment_bits,
    min_8bit_size=16,
  )
  layerwise = qgalore_jax.layerwise_train_step(embed, block, head, tx)
  ordinary = qgalore_jax.int8_train_step(loss_fn, tx)
  first, _, _ = _run(layerwise, tx, _params(), 1)
  want_first, _, _ = _run(ordinary, tx, _params(), 1)
  jax.tree.map(np.testing.assert_array_equal, first, want_first)

  if moment_bits is not None:
    return  # the trajectory is checked with float moments (and on the LLaMA, examples/)
  got, got_state, got_losses = _run(layerwise, tx, _params(), 12)
  want, want_state, want_losses = _run(ordinary, tx, _params(), 12)
  nudged, _, _ = _run(ordinary, tx, _params(1 + 2**-23), 12)
  assert _distance(got, want) <= 4 * _distance(nudged, want) + 1e-7
  assert np.max(np.abs(got_losses - want_losses)) < 1e-4
  count = lambda s: jax.tree.leaves(qgalore_jax.projection_stats(s))
  for a, b in zip(count(got_state), count(want_state)):
    if a.dtype == jnp.int32:
      np.testing.assert_array_equal(a, b)
  assert want_losses[-1] < want_losses[0] - 0.5


def batch_head(p, x, tokens):
  """``head`` on a batch of sequences, the mean over all of them."""
  logp = jax.nn.log_softmax(x @ p["head"])
  return -jnp.mean(jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], 2))


def batch_loss_fn(p, tokens):
  x, _ = jax.lax.scan(lambda x, bp: (block(bp, x), None), embed(p, tokens), p["layers"])
  return batch_head(p, x, tokens)


BATCH = (jnp.arange(4 * 12) * 7 % 16).reshape(4, 12)


@pytest.mark.slow
def test_micro_batches_train_as_the_whole_batch():
  """12 steps of 4 micro-batches, refreshes every 3, against the ordinary step on the whole
  batch: within the chaos floor (the gradients are summed over the parts, so only their
  rounding differs), the same refresh decisions, and the loss the mean over the batch."""
  tx = qgalore_jax.qgalore_adamw(1e-2, rank=4, update_proj_gap=3, dimension_numbers=DIMS)
  step = qgalore_jax.layerwise_train_step(embed, block, batch_head, tx, micro_batches=4)
  ordinary = qgalore_jax.int8_train_step(batch_loss_fn, tx)
  got, got_state, got_losses = _run(step, tx, _params(), 12, BATCH)
  want, want_state, want_losses = _run(ordinary, tx, _params(), 12, BATCH)
  nudged, _, _ = _run(ordinary, tx, _params(1 + 2**-23), 12, BATCH)
  assert _distance(got, want) <= 4 * _distance(nudged, want) + 1e-7
  np.testing.assert_allclose(got_losses, want_losses, rtol=1e-5)
  count = lambda s: jax.tree.leaves(qgalore_jax.projection_stats(s))
  for a, b in zip(count(got_state), count(want_state)):
    if a.dtype == jnp.int32:
      np.testing.assert_array_equal(a, b)
  assert want_losses[-1] < want_losses[0] - 0.5


def test_micro_batches_must_split_the_batch_evenly():
  tx = qgalore_jax.qgalore_adamw(1e-2, rank=4, dimension_numbers=DIMS)
  with pytest.raises(ValueError, match="positive int"):
    qgalore_jax.layerwise_train_step(embed, block, batch_head, tx, micro_batches=0)
  step = qgalore_jax.layerwise_train_step(embed, block, batch_head, tx, micro_batches=3)
  params = _params()
  with pytest.raises(ValueError, match="equal parts; got a leaf of shape \\(4, 12\\)"):
    step(params, tx.init(params), BATCH, jnp.int32(0))


@pytest.mark.slow
def test_randomized_refresh_draws_each_slice_its_own_sketch():
  """A block's slice of a stack keys its sketch by its index in the whole stack: the first
  step's projectors equal the ordinary step's (a wrong key gives another basis)."""
  tx = qgalore_jax.qgalore_adamw(
    1e-2, rank=4, dimension_numbers=DIMS, svd_method="randomized", power_iters=0
  )
  _, got, _ = _run(qgalore_jax.layerwise_train_step(embed, block, head, tx), tx, _params(), 1)
  _, want, _ = _run(qgalore_jax.int8_train_step(loss_fn, tx), tx, _params(), 1)
  projector = lambda s: s.inner_states["qgalore"].inner_state.projector
  got_p, want_p = projector(got[0]), projector(want[0])
  # The sketched matmuls fuse differently in the two programs: scales may differ by an ulp.
  np.testing.assert_allclose(got_p.scale["layers"]["w"], want_p.scale["layers"]["w"], rtol=1e-5)
  same = np.mean(np.asarray(got_p.codes["layers"]["w"]) == np.asarray(want_p.codes["layers"]["w"]))
  assert same > 0.95, same


def test_float_weights_train():
  """Without INT8 weights the step adds the updates in float, as optax.apply_updates."""
  tx = qgalore_jax.qgalore_adamw(1e-2, rank=4, dimension_numbers=DIMS)
  step = qgalore_jax.layerwise_train_step(embed, block, head, tx)
  params = _params()
  state = tx.init(params)
  losses = []
  for t in range(5):
    params, state, loss = step(params, state, TOKENS, jnp.int32(t))
    losses.append(float(loss))
  assert params["layers"]["w"].dtype == jnp.float32
  assert losses[-1] < losses[0]


@pytest.mark.parametrize(
  "wrap",
  [
    lambda tx: optax.chain(optax.clip_by_global_norm(1.0), tx),
    lambda tx: optax.MultiSteps(tx, 2),
    lambda tx: optax.apply_if_finite(tx, 3),
  ],
  ids=["clip_by_global_norm", "MultiSteps", "apply_if_finite"],
)
def test_refuses_transforms_that_need_the_whole_gradient(wrap):
  tx = wrap(qgalore_jax.qgalore_adamw(1e-2, rank=4, dimension_numbers=DIMS))
  with pytest.raises(ValueError, match="the whole gradient"):
    qgalore_jax.layerwise_train_step(embed, block, head, tx)


def test_refuses_skip_nonfinite():
  tx = qgalore_jax.qgalore_adamw(1e-2, rank=4, dimension_numbers=DIMS, skip_nonfinite=True)
  with pytest.raises(ValueError, match="skip_nonfinite"):
    qgalore_jax.layerwise_train_step(embed, block, head, tx)


def test_refuses_params_without_stacked_blocks():
  tx = qgalore_jax.qgalore_adamw(1e-2, rank=4, dimension_numbers=DIMS)
  params = _params()
  state = tx.init(params)
  step = qgalore_jax.layerwise_train_step(embed, block, head, tx, blocks="blocks")
  with pytest.raises(ValueError, match="'blocks'"):
    step(params, state, TOKENS, jnp.int32(0))
  bad = {**params, "layers": {**params["layers"], "n": jnp.ones((2, 32))}}
  dims = {**DIMS, "layers": {"w": DimensionNumbers(1, 2, 0), "n": None}}
  tx = qgalore_jax.qgalore_adamw(1e-2, rank=4, dimension_numbers=dims)
  step = qgalore_jax.layerwise_train_step(embed, block, head, tx)
  with pytest.raises(ValueError, match="leading layer axis of one size"):
    step(bad, tx.init(bad), TOKENS, jnp.int32(0))

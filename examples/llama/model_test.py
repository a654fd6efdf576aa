"""Tests of the LLaMA model: shapes, causality, RoPE, paper sizes, projected matrices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from examples.llama import model

SMALL = model.Config(vocab_size=50, d_model=32, d_ff=48, num_layers=2, num_heads=4, seq_len=16)


def logits_fn():
  graphdef, params = model.init_params(SMALL, seed=0)
  return jax.jit(lambda tokens: nnx.merge(graphdef, params)(tokens))


def test_logits_shape():
  tokens = jnp.zeros((2, 12), jnp.int32)
  assert logits_fn()(tokens).shape == (2, 12, SMALL.vocab_size)


def test_future_tokens_do_not_change_past_logits():
  llama = logits_fn()
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, SMALL.vocab_size)
  changed = tokens.at[:, 7:].set((tokens[:, 7:] + 1) % SMALL.vocab_size)
  before, after = llama(tokens), llama(changed)
  np.testing.assert_allclose(before[:, :7], after[:, :7], rtol=1e-5, atol=1e-5)
  assert not np.allclose(before[:, 7:], after[:, 7:])


def naive_rope(x, theta):
  """Rotates pair (i, i + D/2) of each (position, head) by position * theta**(-2i/D)."""
  x = np.asarray(x, np.float64)
  out = np.empty_like(x)
  half = x.shape[-1] // 2
  for t in range(x.shape[1]):
    for i in range(half):
      angle = t * theta ** (-2 * i / x.shape[-1])
      c, s = np.cos(angle), np.sin(angle)
      a, b = x[:, t, :, i], x[:, t, :, i + half]
      out[:, t, :, i] = a * c - b * s
      out[:, t, :, i + half] = b * c + a * s
  return out


def test_rope_matches_naive_rotation():
  x = jax.random.normal(jax.random.key(0), (2, 9, 3, 8))
  got = model.apply_rope(x, jnp.arange(9), theta=10000.0)
  np.testing.assert_allclose(got, naive_rope(x, 10000.0), rtol=1e-5, atol=1e-5)


def test_rope_keeps_relative_positions():
  # q.k after RoPE depends only on the distance between the two positions.
  q, k = jax.random.normal(jax.random.key(2), (2, 1, 1, 1, 16))
  score = lambda tq, tk: jnp.sum(
    model.apply_rope(q, jnp.array([tq]), 100.0) * model.apply_rope(k, jnp.array([tk]), 100.0)
  )
  np.testing.assert_allclose(score(5, 2), score(13, 10), atol=1e-5)


@pytest.mark.parametrize(
  ("name", "millions"), [("60m", 58.1), ("130m", 134.1), ("350m", 368.0), ("1b", 1339.1)]
)
def test_paper_configs_have_the_paper_sizes(name, millions):
  assert model.param_count(model.CONFIGS[name]) / 1e6 == pytest.approx(millions, abs=0.1)


def test_projection_mask_selects_the_seven_matrices_per_layer():
  _, params = model.init_params(SMALL, seed=0)
  mask = model.projection_mask(params)
  assert sum(jax.tree.leaves(mask)) == 7 * SMALL.num_layers
  assert mask["layers"][0]["mlp"]["down"]["kernel"]
  assert not mask["embed"]["embedding"]
  assert not mask["lm_head"]["kernel"]
  assert not mask["layers"][1]["attn_norm"]["scale"]


def test_scanned_params_are_the_unscanned_layers_stacked():
  _, params = model.init_params(SMALL, seed=0)
  _, stacked = model.init_params(SMALL, seed=0, scan=True)
  assert stacked["layers"]["attn"]["q"]["kernel"].shape == (2, 32, 32)
  assert stacked["layers"]["mlp"]["down"]["kernel"].shape == (2, 48, 32)
  assert stacked["layers"]["attn_norm"]["scale"].shape == (2, 32)
  for i in range(SMALL.num_layers):
    np.testing.assert_array_equal(
      stacked["layers"]["mlp"]["gate"]["kernel"][i], params["layers"][i]["mlp"]["gate"]["kernel"]
    )
  np.testing.assert_array_equal(stacked["lm_head"]["kernel"], params["lm_head"]["kernel"])
  assert model.param_count(SMALL) == sum(x.size for x in jax.tree.leaves(stacked))


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_model_gives_the_unscanned_logits_and_gradients(remat):
  graphdef, params = model.init_params(SMALL, seed=0)
  scanned_graphdef, stacked = model.init_params(SMALL, seed=0, scan=True, remat=remat)
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, SMALL.vocab_size)
  logits = lambda graphdef, params: nnx.merge(graphdef, params)(tokens)
  loss = lambda graphdef, params: jnp.mean(logits(graphdef, params) ** 2)
  # Scan changes how XLA fuses and orders the sums, so agreement is to float32 rounding.
  np.testing.assert_allclose(
    jax.jit(logits, static_argnums=0)(scanned_graphdef, stacked),
    jax.jit(logits, static_argnums=0)(graphdef, params),
    rtol=1e-5,
    atol=1e-5,
  )
  value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)
  want_loss, want_grads = value_and_grad(graphdef, params)
  got_loss, got_grads = value_and_grad(scanned_graphdef, stacked)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  jax.tree.map(
    lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6),
    got_grads,
    model.stack_layers(want_grads),
  )

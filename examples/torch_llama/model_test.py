"""Tests of the torch LLaMA: shapes, causality, RoPE and configs against the Flax example."""

import numpy as np
import pytest
import torch

from examples.torch_llama import model

SMALL = model.Config(vocab_size=50, d_model=32, d_ff=48, num_layers=2, num_heads=4, seq_len=16)


def test_logits_shape():
  llama = model.build(SMALL, seed=0)
  assert llama(torch.zeros(2, 12, dtype=torch.long)).shape == (2, 12, SMALL.vocab_size)


def test_future_tokens_do_not_change_past_logits():
  llama = model.build(SMALL, seed=0)
  tokens = torch.randint(0, SMALL.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
  changed = tokens.clone()
  changed[:, 7:] = (tokens[:, 7:] + 1) % SMALL.vocab_size
  with torch.no_grad():
    before, after = llama(tokens), llama(changed)
  torch.testing.assert_close(before[:, :7], after[:, :7], rtol=1e-5, atol=1e-5)
  assert not torch.allclose(before[:, 7:], after[:, 7:])


def test_same_seed_same_weights():
  a, b = model.build(SMALL, seed=3), model.build(SMALL, seed=3)
  for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
    torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)


def test_param_count_matches_the_built_model():
  llama = model.build(SMALL, seed=0)
  assert model.param_count(SMALL) == sum(p.numel() for p in llama.parameters())


def test_rope_agrees_with_the_flax_example():
  pytest.importorskip("flax", reason="the Flax example's model needs flax")
  from examples.llama import model as flax_model

  x = np.random.default_rng(0).standard_normal((2, 9, 3, 8)).astype(np.float32)
  want = np.asarray(flax_model.apply_rope(x, np.arange(9), theta=10000.0))
  got = model.apply_rope(torch.from_numpy(x), torch.arange(9), theta=10000.0).numpy()
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def torch_state_dict(flax_params) -> dict:
  """The Flax example's parameters under this model's names ((in, out) kernels transposed)."""
  weight = lambda kernel: torch.from_numpy(np.asarray(kernel).T.copy())
  as_torch = lambda x: torch.from_numpy(np.asarray(x).copy())
  state = {
    "embed.weight": as_torch(flax_params["embed"]["embedding"]),
    "norm.weight": as_torch(flax_params["norm"]["scale"]),
    "lm_head.weight": weight(flax_params["lm_head"]["kernel"]),
  }
  for i, layer in flax_params["layers"].items():
    state[f"layers.{i}.attn_norm.weight"] = as_torch(layer["attn_norm"]["scale"])
    state[f"layers.{i}.mlp_norm.weight"] = as_torch(layer["mlp_norm"]["scale"])
    for name in ("q", "k", "v", "o"):
      state[f"layers.{i}.attn.{name}_proj.weight"] = weight(layer["attn"][name]["kernel"])
    for name in ("gate", "up", "down"):
      state[f"layers.{i}.mlp.{name}_proj.weight"] = weight(layer["mlp"][name]["kernel"])
  return state


def test_logits_equal_the_flax_model_with_the_same_weights():
  pytest.importorskip("flax", reason="the Flax example's model needs flax")
  import jax
  from flax import nnx

  from examples.llama import model as flax_model

  graphdef, params = flax_model.init_params(SMALL, seed=0)
  # Norm scales start at one; random ones check that both models apply them the same way.
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map_with_path(
    lambda path, x: (
      x * rng.uniform(0.5, 1.5, x.shape).astype(np.float32) if path[-1].key == "scale" else x
    ),
    params,
  )
  tokens = rng.integers(0, SMALL.vocab_size, (2, 12))
  want = np.asarray(nnx.merge(graphdef, params)(tokens))
  llama = model.build(SMALL, seed=0)
  llama.load_state_dict(torch_state_dict(params))
  with torch.no_grad():
    got = llama(torch.from_numpy(tokens)).numpy()
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

"""A LLaMA decoder in Flax NNX: RMSNorm, RoPE, SwiGLU MLP, untied head, no biases.

This is the architecture of the Q-GaLore paper's pre-training runs (arXiv 2407.08296,
section 4.1, following GaLore's LLaMA configs). The paper's shapes are in ``CONFIGS``
together with ``tiny``, a CPU-sized model for the default run.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from examples.llama.configs import CONFIGS  # noqa: F401  (re-exported as model.CONFIGS)
from examples.llama.configs import PROJECTED
from examples.llama.configs import Config


def apply_rope(x_BTHD: jax.Array, positions_T: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding, LLaMA's rotate-half layout.

  Feature ``i`` is paired with feature ``i + D/2`` and the pair is rotated by the angle
  ``position * theta ** (-2 i / D)``.

  Args:
    x_BTHD: queries or keys, shape (batch, time, heads, head_dim), head_dim even.
    positions_T: integer positions of the time axis.
    theta: base of the frequencies.

  Returns:
    ``x_BTHD`` rotated, same shape and dtype.
  """
  half = x_BTHD.shape[-1] // 2
  freqs_F = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles_TF = positions_T[:, None].astype(jnp.float32) * freqs_F[None, :]
  cos_T1F = jnp.cos(angles_TF)[:, None, :]
  sin_T1F = jnp.sin(angles_TF)[:, None, :]
  x1, x2 = x_BTHD[..., :half].astype(jnp.float32), x_BTHD[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos_T1F - x2 * sin_T1F, x2 * cos_T1F + x1 * sin_T1F], axis=-1)
  return out.astype(x_BTHD.dtype)


def _linear(d_in: int, d_out: int, rngs: nnx.Rngs) -> nnx.Linear:
  init = nnx.initializers.normal(stddev=d_in**-0.5)
  return nnx.Linear(d_in, d_out, use_bias=False, kernel_init=init, rngs=rngs)


class Attention(nnx.Module):
  """Causal multi-head self-attention with RoPE on queries and keys."""

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    self.cfg = cfg
    self.q = _linear(cfg.d_model, cfg.d_model, rngs)
    self.k = _linear(cfg.d_model, cfg.d_model, rngs)
    self.v = _linear(cfg.d_model, cfg.d_model, rngs)
    self.o = _linear(cfg.d_model, cfg.d_model, rngs)

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    cfg = self.cfg
    b, t, _ = x_BTD.shape
    split = lambda y: y.reshape(b, t, cfg.num_heads, cfg.head_dim)
    positions_T = jnp.arange(t)
    q_BTHD = apply_rope(split(self.q(x_BTD)), positions_T, cfg.rope_theta)
    k_BTHD = apply_rope(split(self.k(x_BTD)), positions_T, cfg.rope_theta)
    out_BTHD = jax.nn.dot_product_attention(q_BTHD, k_BTHD, split(self.v(x_BTD)), is_causal=True)
    return self.o(out_BTHD.reshape(b, t, cfg.d_model))


class MLP(nnx.Module):
  """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    self.gate = _linear(cfg.d_model, cfg.d_ff, rngs)
    self.up = _linear(cfg.d_model, cfg.d_ff, rngs)
    self.down = _linear(cfg.d_ff, cfg.d_model, rngs)

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    return self.down(jax.nn.silu(self.gate(x_BTD)) * self.up(x_BTD))


class Block(nnx.Module):
  """Pre-norm decoder block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    self.attn_norm = nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, rngs=rngs)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, rngs=rngs)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD))
    return x_BTD + self.mlp(self.mlp_norm(x_BTD))


class Llama(nnx.Module):
  """Token ids (batch, time) to next-token logits (batch, time, vocab)."""

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    self.embed = nnx.Embed(
      cfg.vocab_size, cfg.d_model, embedding_init=nnx.initializers.normal(1.0), rngs=rngs
    )
    self.layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
    self.norm = nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, rngs=rngs)
    self.lm_head = _linear(cfg.d_model, cfg.vocab_size, rngs)

  def __call__(self, tokens_BT: jax.Array) -> jax.Array:
    x_BTD = self.embed(tokens_BT)
    for layer in self.layers:
      x_BTD = layer(x_BTD)
    return self.lm_head(self.norm(x_BTD))


def is_projected(path: tuple, leaf) -> bool:
  """Whether a parameter (by its pytree path) is one of the seven projected matrices."""
  names = [getattr(k, "key", getattr(k, "name", k)) for k in path]
  return jnp.ndim(leaf) == 2 and len(names) >= 2 and names[-2] in PROJECTED


def projection_mask(params) -> dict:
  """Bool pytree shaped like ``params``: True on q, k, v, o, gate, up and down kernels."""
  return jax.tree_util.tree_map_with_path(is_projected, params)


def init_params(cfg: Config, seed: int):
  """Builds the model and returns ``(graphdef, params)``, params as a plain nested dict."""
  graphdef, state = nnx.split(Llama(cfg, nnx.Rngs(seed)))
  return graphdef, nnx.to_pure_dict(state)


def param_count(cfg: Config) -> int:
  """Number of parameters of a config, computed from shapes only (nothing allocated)."""
  state = nnx.state(nnx.eval_shape(lambda: Llama(cfg, nnx.Rngs(0))))
  return sum(x.size for x in jax.tree.leaves(state))

"""A LLaMA decoder in Flax NNX: RMSNorm, RoPE, SwiGLU MLP, untied head, no biases.

This is the architecture of the Q-GaLore paper's pre-training runs (arXiv 2407.08296,
section 4.1, following GaLore's LLaMA configs). The paper's shapes are in ``CONFIGS``
together with ``tiny``, a CPU-sized model for the default run.

The decoder blocks are either a list of modules applied one after another, or, scanned
(``scan=True``), one block whose parameters carry a leading layer axis, applied with
``nnx.scan``: the train step then traces and compiles one block whatever the depth, and
each block kernel is one ``(layers, in, out)`` leaf, a stack of matrices that Q-GaLore
projects slice by slice (docs/spec.md section 1.3).
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import qgalore_jax
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


def _linear(d_in: int, d_out: int, rngs: nnx.Rngs, dtype=None) -> nnx.Linear:
  init = nnx.initializers.normal(stddev=d_in**-0.5)
  return nnx.Linear(d_in, d_out, use_bias=False, kernel_init=init, dtype=dtype, rngs=rngs)


class Attention(nnx.Module):
  """Causal multi-head self-attention with RoPE on queries and keys."""

  def __init__(self, cfg: Config, rngs: nnx.Rngs, dtype=None):
    self.cfg = cfg
    self.q = _linear(cfg.d_model, cfg.d_model, rngs, dtype)
    self.k = _linear(cfg.d_model, cfg.d_model, rngs, dtype)
    self.v = _linear(cfg.d_model, cfg.d_model, rngs, dtype)
    self.o = _linear(cfg.d_model, cfg.d_model, rngs, dtype)

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

  def __init__(self, cfg: Config, rngs: nnx.Rngs, dtype=None):
    self.gate = _linear(cfg.d_model, cfg.d_ff, rngs, dtype)
    self.up = _linear(cfg.d_model, cfg.d_ff, rngs, dtype)
    self.down = _linear(cfg.d_ff, cfg.d_model, rngs, dtype)

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    return self.down(jax.nn.silu(self.gate(x_BTD)) * self.up(x_BTD))


class Block(nnx.Module):
  """Pre-norm decoder block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

  def __init__(self, cfg: Config, rngs: nnx.Rngs, dtype=None):
    self.attn_norm = nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, dtype=dtype, rngs=rngs)
    self.attn = Attention(cfg, rngs, dtype)
    self.mlp_norm = nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, dtype=dtype, rngs=rngs)
    self.mlp = MLP(cfg, rngs, dtype)

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD))
    return x_BTD + self.mlp(self.mlp_norm(x_BTD))


def _stacked_blocks(cfg: Config, rngs: nnx.Rngs, dtype=None) -> Block:
  """``cfg.num_layers`` blocks made at once: one ``Block`` whose parameters are stacked on a
  leading layer axis, each layer initialised from its own split of ``rngs``."""

  @nnx.split_rngs(splits=cfg.num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def create(rngs: nnx.Rngs) -> Block:
    return Block(cfg, rngs, dtype)

  return create(rngs)


def _apply_block(block: Block, x_BTD: jax.Array) -> jax.Array:
  return block(x_BTD)


class Llama(nnx.Module):
  """Token ids (batch, time) to next-token logits (batch, time, vocab).

  Args:
    cfg: the model's shape.
    rngs: initialisation keys.
    scan: hold the blocks stacked (``layers/attn/q/kernel`` of shape ``(layers, d, d)``)
      and apply them with ``nnx.scan``; otherwise a list (``layers/0/attn/q/kernel``).
      Built here, a scanned model draws its weights differently from an unscanned one;
      ``init_params`` gives both the same weights for a seed.
    remat: recompute each block's activations in the backward pass instead of keeping
      them (``nnx.remat``): less memory, about one more forward pass of compute.
    dtype: the dtype of the computation (activations) of every layer, e.g.
      ``jnp.bfloat16``; ``None`` (the default): the parameters' and inputs' dtypes.
  """

  def __init__(
    self,
    cfg: Config,
    rngs: nnx.Rngs,
    *,
    scan: bool = False,
    remat: bool = False,
    dtype=None,
  ):
    self.scanned = scan
    self.remat = remat
    self.embed = nnx.Embed(
      cfg.vocab_size,
      cfg.d_model,
      embedding_init=nnx.initializers.normal(1.0),
      dtype=dtype,
      rngs=rngs,
    )
    if scan:
      self.layers = _stacked_blocks(cfg, rngs, dtype)
    else:
      self.layers = nnx.List([Block(cfg, rngs, dtype) for _ in range(cfg.num_layers)])
    self.norm = nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, dtype=dtype, rngs=rngs)
    self.lm_head = _linear(cfg.d_model, cfg.vocab_size, rngs, dtype)

  def __call__(self, tokens_BT: jax.Array) -> jax.Array:
    apply_block = nnx.remat(_apply_block) if self.remat else _apply_block
    x_BTD = self.embed(tokens_BT)
    if self.scanned:
      scan_blocks = nnx.scan(
        lambda x_BTD, block: apply_block(block, x_BTD),
        in_axes=(nnx.Carry, 0),
        out_axes=nnx.Carry,
      )
      x_BTD = scan_blocks(x_BTD, self.layers)
    else:
      for layer in self.layers:
        x_BTD = apply_block(layer, x_BTD)
    return self.lm_head(self.norm(x_BTD))


def layerwise_fns(cfg: Config, dtype=None):
  """``(embed_fn, block_fn, head_fn)`` of the scanned model, for
  ``qgalore_jax.layerwise_train_step`` (``blocks="layers"``).

  The three parts of ``Llama.__call__`` and ``train.loss_fn``, each on the pure-dict params
  of its modules: ``embed_fn(outer, batch)`` looks the inputs up, ``block_fn(block, x)``
  applies one decoder block (the slice of the stacked ``layers`` params), and
  ``head_fn(outer, x, batch)`` applies the final norm and the head and returns the mean
  next-token cross-entropy. ``dtype``: as for ``Llama``.
  """
  abstract = nnx.eval_shape(lambda: Llama(cfg, nnx.Rngs(0), dtype=dtype))
  embed_def, norm_def, head_def = (
    nnx.graphdef(m) for m in (abstract.embed, abstract.norm, abstract.lm_head)
  )
  block_def = nnx.graphdef(abstract.layers[0])

  def embed_fn(outer, batch):
    return nnx.merge(embed_def, outer["embed"])(batch[0])

  def block_fn(block, x_BTD):
    return nnx.merge(block_def, block)(x_BTD)

  def head_fn(outer, x_BTD, batch):
    logits = nnx.merge(head_def, outer["lm_head"])(nnx.merge(norm_def, outer["norm"])(x_BTD))
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch[1])
    return losses.mean()

  return embed_fn, block_fn, head_fn


def is_projected(path: tuple, leaf) -> bool:
  """Whether a parameter (by its pytree path) is one of the seven projected matrices.

  For the unscanned model and optax's GaLore, which projects 2-D leaves only: the stacked
  kernels of a scanned model are 3-D, so this is False for them (see ``dimension_numbers``).
  """
  names = [getattr(k, "key", getattr(k, "name", k)) for k in path]
  return jnp.ndim(leaf) == 2 and len(names) >= 2 and names[-2] in PROJECTED


def projection_mask(params) -> dict:
  """Bool pytree shaped like ``params``: True on q, k, v, o, gate, up and down kernels."""
  return jax.tree_util.tree_map_with_path(is_projected, params)


def dimension_numbers(llama: Llama):
  """Which matrices Q-GaLore projects, as a callable on ``llama``'s params (docs/spec.md
  section 1.3): the seven block kernels of each layer, a stacked kernel slice by slice;
  not the head, which gets Adam as in the paper, nor embeddings and norms."""
  return qgalore_jax.nnx_dimension_numbers(llama, exclude=("lm_head",))


def stack_layers(params: dict) -> dict:
  """An unscanned model's params in the scanned model's layout: each block parameter of
  layer ``i`` at index ``i`` of a new leading axis.

  Example:
    >>> cfg = Config(vocab_size=16, d_model=8, d_ff=8, num_layers=3, num_heads=2)
    >>> _, params = init_params(cfg, seed=0)
    >>> stack_layers(params)["layers"]["attn"]["q"]["kernel"].shape
    (3, 8, 8)
  """
  layers = [params["layers"][i] for i in sorted(params["layers"])]
  return {**params, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}


def init_params(cfg: Config, seed: int, *, scan: bool = False, remat: bool = False):
  """Builds the model and returns ``(graphdef, params)``, params as a plain nested dict.

  A scanned model's params are the unscanned model's for the same seed, stacked
  (``stack_layers``), so that both start from identical weights.
  """
  graphdef, state = nnx.split(Llama(cfg, nnx.Rngs(seed), remat=remat))
  params = nnx.to_pure_dict(state)
  if not scan:
    return graphdef, params
  abstract = nnx.eval_shape(lambda: Llama(cfg, nnx.Rngs(seed), scan=True, remat=remat))
  return nnx.graphdef(abstract), stack_layers(params)


def tensor_ids(cfg: Config, *, scan: bool):
  """The stochastic-rounding tensor id of every matrix, for ``qgalore_jax.apply_updates``.

  Each matrix gets its leaf index among the unscanned model's params (the library's
  default for that model); in the scanned layout a stacked kernel gets the ids of its
  layers, one per slice (docs/spec.md section 1.3). So on the same seed both layouts round
  their INT8 weights with the same uniforms.

  Example:
    >>> cfg = Config(vocab_size=16, d_model=8, d_ff=8, num_layers=3, num_heads=2)
    >>> tensor_ids(cfg, scan=True)["layers"]["attn"]["q"]["kernel"].tolist()
    [3, 12, 21]
  """
  abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Llama(cfg, nnx.Rngs(0)))))
  leaves, treedef = jax.tree.flatten(abstract)
  ids = treedef.unflatten(range(len(leaves)))
  return stack_layers(ids) if scan else ids


def param_count(cfg: Config) -> int:
  """Number of parameters of a config, computed from shapes only (nothing allocated)."""
  state = nnx.state(nnx.eval_shape(lambda: Llama(cfg, nnx.Rngs(0))))
  return sum(x.size for x in jax.tree.leaves(state))

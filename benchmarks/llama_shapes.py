"""Parameter shapes of the paper's LLaMA configs, in Flax layout (kernels are (in, out)).

The paper's settings (arXiv 2407.08296, following GaLore): untied head, no biases, RMSNorm,
vocabulary 32000. The benchmarks build their pytrees from these shapes, abstractly
(``jax.ShapeDtypeStruct``) or with random values, and count their bytes with :func:`nbytes`.
"""

import jax
import jax.numpy as jnp

CONFIGS = {
  # name: (hidden, ffn, layers)
  "60M": (512, 1376, 8),
  "130M": (768, 2048, 12),
  "350M": (1024, 2736, 24),
  "1B": (2048, 5461, 24),
  "7B": (4096, 11008, 32),
}
VOCAB = 32000
# GaLore ranks of the paper's runs (reference: 1B used 512 in the paper, 1024 in the scripts).
RANKS = {"60M": 128, "130M": 256, "350M": 256, "1B": 512, "7B": 1024}
# The configs the speed benchmarks time (the larger ones take too long on a CPU).
SPEED_CONFIGS = ("60M", "130M")
# The matrices GaLore and Q-GaLore project (the authors' target modules).
BLOCK_MATRICES = ("q", "k", "v", "o", "gate", "up", "down")


def llama_param_shapes(hidden: int, ffn: int, layers: int, vocab: int = VOCAB) -> dict:
  """A pytree of shapes: ``embed``, ``layers/<i>/<name>``, ``final_norm``, ``lm_head``."""
  layer = {name: (hidden, hidden) for name in ("q", "k", "v", "o")}
  layer |= {"gate": (hidden, ffn), "up": (hidden, ffn), "down": (ffn, hidden)}
  layer |= {"attn_norm": (hidden,), "mlp_norm": (hidden,)}
  return {
    "embed": (vocab, hidden),
    "layers": {str(i): dict(layer) for i in range(layers)},
    "final_norm": (hidden,),
    "lm_head": (hidden, vocab),
  }


def is_shape(x) -> bool:
  """``is_leaf`` for trees of shape tuples."""
  return isinstance(x, tuple)


def block_mask(shapes: dict, only_blocks: bool = True) -> dict:
  """True for the leaves that GaLore projects: the block matrices, or every 2-D leaf."""
  import jax

  def select(path, shape):
    return len(shape) == 2 and (not only_blocks or path[-1].key in BLOCK_MATRICES)

  return jax.tree_util.tree_map_with_path(select, shapes, is_leaf=is_shape)


def nbytes(tree) -> int:
  """Bytes of the arrays (or ``jax.ShapeDtypeStruct``) of a pytree."""
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))

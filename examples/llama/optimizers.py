"""The optimizers the example compares, all built the same way from a name.

- ``adamw``: ``optax.adamw`` on every parameter (the full-rank baseline).
- ``galore``: ``optax.contrib.galore`` (plain GaLore, fixed refresh gap, float projector).
- ``qgalore``: ``qgalore_jax.qgalore_adamw`` with an INT4 projector and adaptive refresh,
  and the projected matrices held as INT8 codes updated by stochastic rounding.
- ``qgalore-noquant``: ``qgalore_adamw`` with quantisation off (float32 projector, fixed
  gap, float weights): GaLore as implemented by this project.
- ``qgalore-fixedgap``: ``qgalore`` with the refresh gap held fixed (``gamma_proj=1``), for
  the SVD-count study (``benchmarks/svd_study.py``); not in ``NAMES``, the compare set.
- ``qgalore-8bit``: ``qgalore`` with 8-bit block-wise Adam moments (``moment_bits=8``), the
  paper's 8-bit Adam; not in ``NAMES`` (``--optimizer qgalore-8bit`` or ``--optimizers``).
- ``qgalore-randomized``, ``qgalore-subspace``: ``qgalore`` with a cheaper refresh
  (``svd_method``, docs/spec.md section 2.6) in place of the full SVD; not in ``NAMES``.

Every one is guarded against non-finite gradients: a step whose gradients hold a NaN or an
infinity is skipped whole and counted (``qgalore_adamw(skip_nonfinite=True)``, and
``optax.apply_if_finite`` around the others; ``skipped_steps`` reads the count).

The low-rank ones project only the attention and MLP matrices (q, k, v, o, gate, up,
down), as the authors do; embeddings, norms and the head get Adam. All use the paper's
``b2 = 0.95``, no weight decay and GaLore's ``scale = 0.25``.

Ours take the projected matrices from the model (``model.dimension_numbers``), so they
train the scanned model, whose stacked kernels they project slice by slice. Optax's
``galore`` projects 2-D leaves only (its dimension numbers have no batch axis), so it
trains the unscanned model (``UNSCANNED``).
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax
from optax import contrib

import qgalore_jax
from examples.llama import model

NAMES = ("adamw", "galore", "qgalore", "qgalore-noquant")
B2 = 0.95
SCALE = 0.25
INT8_GROUP_SIZE = 256
# Peak learning rates, from a sweep on the tiny config (README.md, "How the learning rates
# were chosen").
LEARNING_RATES = {"adamw": 3e-3, "galore": 3e-2, "qgalore": 3e-2, "qgalore-noquant": 3e-2}
# Variants of qgalore_adamw: its arguments, and whether the projected weights are INT8.
QGALORE_VARIANTS = {
  "qgalore": (dict(proj_bits=4, gamma_proj=2), True),
  "qgalore-noquant": (dict(proj_bits=None, gamma_proj=1), False),
  "qgalore-fixedgap": (dict(proj_bits=4, gamma_proj=1), True),
  "qgalore-8bit": (dict(proj_bits=4, gamma_proj=2, moment_bits=8), True),
  "qgalore-randomized": (dict(proj_bits=4, gamma_proj=2, svd_method="randomized"), True),
  "qgalore-subspace": (dict(proj_bits=4, gamma_proj=2, svd_method="subspace"), True),
}
LEARNING_RATES |= {
  name: LEARNING_RATES["qgalore"]
  for name in ("qgalore-fixedgap", "qgalore-8bit", "qgalore-randomized", "qgalore-subspace")
}
ALL_NAMES = ("adamw", "galore", *QGALORE_VARIANTS)
# The optimizers that cannot train the scanned model, and why.
UNSCANNED = {
  "galore": "optax's GaLore projects 2-D leaves only (its dimension numbers have no batch"
  " axis), so it trains the unscanned model",
}


@dataclasses.dataclass(frozen=True)
class LowRank:
  """Rank and initial refresh gap of the low-rank optimizers (the rest are paper values)."""

  rank: int
  update_proj_gap: int


def build(
  name: str,
  learning_rate,
  low_rank: LowRank,
  llama: model.Llama | None = None,
  guard: bool = True,
) -> tuple[optax.GradientTransformation, bool]:
  """``(tx, int8_weights)`` for optimizer ``name``; ``learning_rate`` may be a schedule.

  Args:
    name: one of ``ALL_NAMES``.
    learning_rate: the peak learning rate, or a schedule.
    low_rank: rank and initial refresh gap of the low-rank optimizers.
    llama: the model to train (an abstract one from ``nnx.eval_shape`` will do): the
      ``qgalore`` variants take the matrices to project from it. Unscanned for ``galore``
      (``UNSCANNED``).

  Raises:
    ValueError: for an unknown name, a ``qgalore`` variant without ``llama``, or
      ``galore`` with a scanned model.

  ``guard`` False leaves the ``qgalore`` variants unguarded (``skip_nonfinite=False``), as
  layer-wise training needs.
  """
  if name == "adamw":
    return _guarded(optax.adamw(learning_rate, b2=B2, weight_decay=0.0)), False
  if name == "galore":
    if llama is not None and llama.scanned:
      raise ValueError(f"galore cannot train a scanned model: {UNSCANNED['galore']}")
    dims = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, p: contrib.GaLoreDimensionNumbers() if model.is_projected(path, p) else None,
      params,
    )
    tx = contrib.galore(
      learning_rate,
      rank=low_rank.rank,
      update_proj_gap=low_rank.update_proj_gap,
      scale=SCALE,
      base_optimizer=optax.scale_by_adam(b2=B2),
      weight_dimension_numbers=dims,
    )
    return _guarded(tx), False
  if name in QGALORE_VARIANTS:
    if llama is None:
      raise ValueError(f"{name} needs the model, to know which matrices to project")
    kwargs, int8_weights = QGALORE_VARIANTS[name]
    tx = qgalore_jax.qgalore_adamw(
      learning_rate,
      b2=B2,
      rank=low_rank.rank,
      update_proj_gap=low_rank.update_proj_gap,
      scale=SCALE,
      dimension_numbers=model.dimension_numbers(llama),
      skip_nonfinite=guard,
      **kwargs,
    )
    return tx, int8_weights
  raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(ALL_NAMES)}")


def _guarded(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """``tx`` skipping every non-finite step, as ``qgalore_adamw(skip_nonfinite=True)`` does."""
  return optax.apply_if_finite(tx, max_consecutive_errors=2**31 - 1)


def skipped_steps(opt_state) -> int:
  """Steps skipped so far for non-finite gradients (every optimizer here is guarded)."""
  return int(qgalore_jax.skipped_steps(opt_state))


def svd_count(name: str, opt_state, steps: int, num_projected: int, low_rank: LowRank) -> int:
  """SVDs done in ``steps`` steps, summed over the projected matrices.

  Ours count them in the state (``projection_stats``: one count per matrix, an array of
  one per slice for a stacked kernel). Optax's GaLore keeps no counter; its schedule is
  fixed (every matrix at every multiple of the gap), so the count follows.
  """
  if name == "adamw":
    return 0
  if name == "galore":
    return num_projected * -(-steps // low_rank.update_proj_gap)
  is_stats = lambda x: isinstance(x, dict) and "svd_count" in x
  leaves = jax.tree.leaves(qgalore_jax.projection_stats(opt_state), is_leaf=is_stats)
  return sum(int(jnp.sum(stats["svd_count"])) for stats in leaves)

"""The user alias of Q-GaLore: a drop-in for ``optax.adamw`` (docs/spec.md section 5).

``qgalore_adamw`` routes the leaves selected by ``mask`` to :func:`scale_by_qgalore` and the
rest to ``optax.scale_by_adam`` (or its 8-bit twin), then adds decoupled weight decay and the
learning rate, in the order of ``optax.adamw``.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from qgalore_jax._src import layout
from qgalore_jax._src import moments
from qgalore_jax._src.checks import check_number
from qgalore_jax._src.checks import static_hint
from qgalore_jax._src.layout import path_str
from qgalore_jax._src.qgalore import _unwrap
from qgalore_jax._src.qgalore import scale_by_qgalore


def _resolve_mask(mask, specs, params):
  """Bool per leaf of ``params``: which leaves are projected (validated against ``specs``)."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  if mask is None:
    return [s is not None for s in specs]
  selected = mask(params) if callable(mask) else mask
  if jax.tree.structure(selected) != jax.tree.structure(params):
    raise ValueError(
      "`mask` must have the structure of the params: got "
      f"{jax.tree.structure(selected)}, params are {jax.tree.structure(params)}"
    )
  out = []
  for (path, p), s, spec in zip(flat, jax.tree.leaves(selected), specs, strict=True):
    if not isinstance(s, bool) and getattr(s, "dtype", None) != jnp.bool_:
      raise TypeError(f"`mask` leaf for parameter {path_str(path)} must be a bool, got {s!r}")
    if bool(s) and spec is None:
      raise ValueError(
        f"`mask` selects parameter {path_str(path)} of shape {jnp.shape(p)}, but it has no"
        " dimension numbers: only 2-D matrices, or leaves given `dimension_numbers`, can be"
        " projected"
      )
    out.append(bool(s))
  return out


def qgalore_adamw(
  learning_rate: optax.ScalarOrSchedule,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  weight_decay: float = 0.0,
  *,
  rank: int = 128,
  update_proj_gap: int = 200,
  scale: float = 0.25,
  proj_bits: int | None = 4,
  proj_group_size: int = 256,
  cos_threshold: float = 0.4,
  gamma_proj: float = 2,
  queue_size: int = 5,
  mask: Any | Callable[[optax.Params], Any] | None = None,
  input_axis: int | Any | Callable[[optax.Params], Any] | None = None,
  dimension_numbers: Any = None,
  mu_dtype: Any | None = None,
  moment_bits: int | None = None,
  min_8bit_size: int = moments.MIN_QUANTIZED_SIZE,
  skip_nonfinite: bool = False,
  projector_fn: Callable[[jax.Array, int], jax.Array] | None = None,
  svd_method: str = "full",
  oversample: int = 16,
  power_iters: int = 2,
  subspace_iters: int = 1,
  seed: int = 0,
) -> optax.GradientTransformation:
  r"""AdamW with Q-GaLore on the selected matrices: a drop-in for ``optax.adamw``.

  Leaves selected by ``mask`` get :func:`scale_by_qgalore`; the others get
  ``optax.scale_by_adam`` with the same ``b1, b2, eps``. Then, for every leaf,

  .. math::

    W \leftarrow W - \eta_t \, (\text{direction} + \lambda W)

  (decoupled weight decay on the old weights, as ``optax.adamw``; docs/spec.md section 5).

  Args:
    learning_rate: a float or an optax schedule.
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to the root of the second moment.
    weight_decay: decoupled weight decay ``lambda`` applied to every leaf.
    rank: see :func:`scale_by_qgalore`.
    update_proj_gap: see :func:`scale_by_qgalore`.
    scale: see :func:`scale_by_qgalore`.
    proj_bits: see :func:`scale_by_qgalore`; ``None`` keeps a float32 projector.
    proj_group_size: see :func:`scale_by_qgalore`.
    cos_threshold: see :func:`scale_by_qgalore`.
    gamma_proj: see :func:`scale_by_qgalore`; 1 gives plain GaLore's fixed gap.
    queue_size: see :func:`scale_by_qgalore`.
    mask: which leaves are projected: a pytree of bools shaped like the params, or a
      callable on the params returning one. Default: every leaf that has dimension
      numbers, i.e. every 2-D leaf when ``dimension_numbers`` is not given; then a
      floating leaf of 3 or more dimensions is an error at ``init`` (a scanned kernel
      must not silently get full-size AdamW moments): give it dimension numbers, or
      exclude it with ``mask``. (Unlike ``optax.adamw``'s ``mask``, this selects
      projection, not weight decay.)
    input_axis: input axis of each projected 2-D leaf: 0 for Flax kernels (the default),
      1 for (out, in) arrays; an int, a pytree of ints or a callable (see
      :func:`scale_by_qgalore`).
    dimension_numbers: how to read each leaf as (a stack of) matrices, ``None`` where a
      leaf gets plain Adam: see :func:`scale_by_qgalore` and
      :func:`~qgalore_jax.nnx_dimension_numbers`. Give this or ``input_axis``, not both.
    mu_dtype: dtype of the stored first moments (default float32 for projected leaves,
      the param dtype for the others, as ``optax.scale_by_adam``).
    moment_bits: ``None`` (default) for float moments, or 8 for 8-bit block-wise moments on
      every leaf, projected or not (:func:`scale_by_adam_8bit` for the others): the
      paper's 8-bit Adam. Moments under ``min_8bit_size`` elements or not 2-D stay
      float32.
    min_8bit_size: see :func:`scale_by_qgalore`; applies to every leaf's moments.
    skip_nonfinite: if ``True``, a step whose gradients hold a NaN or an infinity anywhere
      is skipped whole: the updates are zero (which leaves INT8 weights bit-identical under
      :func:`apply_updates`, docs/spec.md section 6.2) and the state, projectors and
      schedules included, stays as it was. The chain is wrapped in
      ``optax.apply_if_finite``, which counts the skips in its state (read them with
      :func:`skipped_steps`); every such step is skipped, however many in a row. The twin
      of ``QGaLoreAdamW(skip_nonfinite=True)``.
    projector_fn: see :func:`scale_by_qgalore`: the hook for a reference SVD in parity
      tests or another projector in research (``None``: :func:`compute_projector`).
    svd_method: ``"full"`` (default), ``"randomized"`` or ``"subspace"``: how a refresh
      finds the basis; see :func:`scale_by_qgalore` and docs/spec.md section 2.6.
    oversample: see :func:`scale_by_qgalore`.
    power_iters: see :func:`scale_by_qgalore`.
    subspace_iters: see :func:`scale_by_qgalore`.
    seed: seed of the refreshes' sketches; see :func:`scale_by_qgalore`.

  Returns:
    An ``optax.GradientTransformation``. Under ``optax.inject_hyperparams`` (which turns
    every numeric argument into an array), pass ``static_args=qgalore_jax.STATIC_ARGS``:
    ``optax.inject_hyperparams(qgalore_adamw, static_args=STATIC_ARGS)(learning_rate=...)``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from qgalore_jax import qgalore_adamw, projection_stats
    >>> params = {"kernel": jnp.ones((16, 8)), "bias": jnp.zeros((8,))}
    >>> tx = qgalore_adamw(1e-3, rank=4, weight_decay=0.01)
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> int(projection_stats(state)["kernel"]["svd_count"])
    1

  References:
    Zhang et al., `Q-GaLore: Quantized GaLore with INT4 Projection and Layer-Adaptive
    Low-Rank Gradients <https://arxiv.org/abs/2407.08296>`_, 2024.
    Zhao et al., `GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection
    <https://arxiv.org/abs/2403.03507>`_, 2024.
    Loshchilov and Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, 2019.
  """
  if not callable(learning_rate):
    check_number(learning_rate, "learning_rate")
  check_number(weight_decay, "weight_decay", 0.0)
  galore = scale_by_qgalore(
    rank=rank,
    update_proj_gap=update_proj_gap,
    scale=scale,
    proj_bits=proj_bits,
    proj_group_size=proj_group_size,
    cos_threshold=cos_threshold,
    gamma_proj=gamma_proj,
    queue_size=queue_size,
    b1=b1,
    b2=b2,
    eps=eps,
    mu_dtype=mu_dtype,
    input_axis=input_axis,
    dimension_numbers=dimension_numbers,
    moment_bits=moment_bits,
    min_8bit_size=min_8bit_size,
    projector_fn=projector_fn,
    svd_method=svd_method,
    oversample=oversample,
    power_iters=power_iters,
    subspace_iters=subspace_iters,
    seed=seed,
  )
  if moment_bits is None:
    adam = moments.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype)
  else:
    adam = moments.scale_by_adam_8bit(b1=b1, b2=b2, eps=eps, min_8bit_size=min_8bit_size)

  def labels(params):
    specs = layout.resolve_specs(params, dimension_numbers, input_axis, "qgalore_adamw")
    selected = _resolve_mask(mask, specs, params)
    if mask is None:
      layout.no_silent_stacks(
        params, specs, "qgalore_adamw", "a `mask` that leaves them to plain AdamW"
      )
    names = ["qgalore" if s else "adam" for s in selected]
    # MaskedNode leaves (left out of a partial update) keep their place in the labels.
    return jax.tree.unflatten(jax.tree.structure(params, is_leaf=layout.is_masked), names)

  if not isinstance(skip_nonfinite, bool):
    raise TypeError(
      f"`skip_nonfinite` must be a bool, got {type(skip_nonfinite).__name__}"
      f" {skip_nonfinite!r}{static_hint(skip_nonfinite, 'skip_nonfinite')}"
    )
  tx = optax.chain(
    optax.partition({"qgalore": galore, "adam": adam}, labels),
    optax.add_decayed_weights(weight_decay),
    optax.scale_by_learning_rate(learning_rate),
  )
  if skip_nonfinite:
    return optax.apply_if_finite(tx, max_consecutive_errors=_NEVER_GIVE_UP)
  # Every transform of the chain updates a leaf from its own gradient and state alone, so
  # it may run on a part of the params at a time (layerwise_train_step).
  setattr(tx.update, PER_LEAF, True)
  return tx


# Attribute of an update function that may run on any part of the params at a time.
PER_LEAF = "_qgalore_per_leaf"


# ``optax.apply_if_finite`` applies a non-finite update after more consecutive errors than
# this; its count is an int32, which never exceeds it.
_NEVER_GIVE_UP = 2**31 - 1


def skipped_steps(opt_state) -> jax.Array:
  """Steps skipped for non-finite gradients so far, from an ``optax.apply_if_finite`` state.

  Args:
    opt_state: the state of ``qgalore_adamw(..., skip_nonfinite=True)``, or of any optimizer
      with one ``optax.apply_if_finite`` inside (e.g. under ``optax.inject_hyperparams``
      or ``flax.nnx.Optimizer``).

  Returns:
    The int32 count (``total_notfinite``); the twin of ``QGaLoreAdamW.skipped_steps``.

  Example:
    >>> import jax.numpy as jnp
    >>> from qgalore_jax import qgalore_adamw, skipped_steps
    >>> params = {"w": jnp.ones((8, 4))}
    >>> tx = qgalore_adamw(1e-3, rank=2, skip_nonfinite=True)
    >>> state = tx.init(params)
    >>> _, state = tx.update({"w": jnp.full((8, 4), jnp.nan)}, state, params)
    >>> int(skipped_steps(state))
    1
  """
  is_guard = lambda x: isinstance(x, optax.ApplyIfFiniteState)
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=is_guard) if is_guard(s)]
  if len(found) != 1:
    raise ValueError(
      f"expected one optax.apply_if_finite state in `opt_state`, found {len(found)}: build"
      " the optimizer with skip_nonfinite=True"
    )
  return _unwrap(found[0].total_notfinite)

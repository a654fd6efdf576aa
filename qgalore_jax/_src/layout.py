"""The canonical (out, in) view of a parameter, and parameter names (docs/spec.md section 1).

A 2-D leaf is read as its canonical matrix W of shape (out, in) through its input axis:
``0`` for Flax kernels, stored (in, out), and ``1`` for arrays stored (out, in) as torch
weights are. Projection (docs/spec.md section 2), quantisation (section 3) and the stochastic
rounding of INT8 weights (docs/spec.md section 6) all index W, so the same matrix gives the same
numbers whichever way it is stored. Errors name a parameter by its pytree key path.
"""

import jax
import optax

from qgalore_jax._src.checks import static_hint


def path_str(path) -> str:
  """A pytree key path as the parameter's name in error messages, e.g. ``['layer']['kernel']``."""
  return jax.tree_util.keystr(path) or "<root>"


def canonical_shape(shape: tuple[int, ...], axis: int) -> tuple[int, int]:
  """(out, in) shape of a 2-D leaf whose input axis is ``axis`` (0 or 1)."""
  return (shape[1], shape[0]) if axis == 0 else (shape[0], shape[1])


def to_canonical(x: jax.Array, axis: int) -> jax.Array:
  """The (out, in) matrix of a 2-D leaf whose input axis is ``axis``; its own inverse."""
  return x.T if axis == 0 else x


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def resolve_input_axes(params, input_axis, where: str) -> list[int]:
  """The input axis (0 or 1) of each leaf of ``params``, validated.

  Args:
    params: a pytree of 2-D arrays; ``optax.MaskedNode`` leaves (from ``optax.partition``)
      are skipped.
    input_axis: an int, a pytree of ints shaped like ``params``, or a callable on ``params``
      returning one; -2 and -1 are read as 0 and 1.
    where: the caller's name, for error messages.

  Returns:
    One int per leaf of ``params``, in ``jax.tree.leaves`` order.

  Raises:
    ValueError: if a leaf is not 2-D, or an axis is not one of -2, -1, 0, 1, naming the
      parameter.
  """
  if callable(input_axis):
    input_axis = input_axis(params)
  if isinstance(input_axis, int) and not isinstance(input_axis, bool):
    axes = jax.tree.map(lambda p: p if _is_masked(p) else input_axis, params, is_leaf=_is_masked)
  else:
    try:
      axes = jax.tree.map(
        lambda p, a: p if _is_masked(p) else a, params, input_axis, is_leaf=_is_masked
      )
    except (ValueError, TypeError) as e:
      raise ValueError(
        f"`input_axis` must be an int or a pytree of ints with the structure of the params"
        f" given to {where}: {e}"
      ) from None
  checked = []
  flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
  for (path, p), a in zip(flat_params, jax.tree.leaves(axes), strict=True):
    name = path_str(path)
    if getattr(p, "ndim", None) != 2:
      raise ValueError(
        f"{where} projects 2-D matrices only, but parameter {name} has shape"
        f" {getattr(p, 'shape', None)}; route other leaves elsewhere (e.g. qgalore_adamw's"
        f" `mask`)"
      )
    if isinstance(a, bool) or not isinstance(a, int) or a not in (-2, -1, 0, 1):
      raise ValueError(
        f"`input_axis` for parameter {name} must be 0 or 1, got {a!r}{static_hint(a, 'input_axis')}"
      )
    checked.append(a % 2)
  return checked

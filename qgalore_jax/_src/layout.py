"""The canonical (out, in) view of a parameter, and parameter names (docs/spec.md section 1).

A 2-D leaf is read as its canonical matrix W of shape (out, in) through its input axis:
``0`` for Flax kernels, stored (in, out), and ``1`` for arrays stored (out, in) as torch
weights are. Projection (docs/spec.md section 2), quantisation (section 3) and the stochastic
rounding of INT8 weights (docs/spec.md section 6) all index W, so the same matrix gives the same
numbers whichever way it is stored. Errors name a parameter by its pytree key path.
"""

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
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


def is_masked(x) -> bool:
  """Whether ``x`` is an ``optax.MaskedNode``: a leaf that ``optax.partition`` routed elsewhere."""
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
    axes = jax.tree.map(lambda p: p if is_masked(p) else input_axis, params, is_leaf=is_masked)
  else:
    try:
      axes = jax.tree.map(
        lambda p, a: p if is_masked(p) else a, params, input_axis, is_leaf=is_masked
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


Axes = int | tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class DimensionNumbers:
  """Which axes of a leaf are its input, output and batch axes (docs/spec.md section 1.3).

  The reduction axes flatten to the canonical ``in`` side and the output axes to ``out``,
  as ``optax.contrib.GaLoreDimensionNumbers`` does; each index along the batch axes is its
  own canonical (out, in) matrix, a slice, with its own projector, moments and refresh
  schedule. Every axis of the leaf must be in exactly one group.

  A frozen dataclass, hence hashable and a pytree leaf: a pytree of specs (``None`` where a
  leaf is not projected) can be shaped like the params.

  Attributes:
    reduction_axis: an int or a tuple of ints (negative ints count from the end).
    output_axis: an int or a tuple of ints.
    batch_axis: an int or a tuple of ints; ``()`` for a single matrix.

  Example:
    >>> from qgalore_jax import DimensionNumbers
    >>> flax_kernel = DimensionNumbers(reduction_axis=0, output_axis=1)  # (in, out)
    >>> scanned_kernel = DimensionNumbers(reduction_axis=1, output_axis=2, batch_axis=0)
    >>> stack = scanned_kernel.resolve((4, 64, 32))  # 4 layers, in 64, out 32
    >>> stack.batch_shape, stack.matrix_shape
    ((4,), (32, 64))
  """

  reduction_axis: Axes
  output_axis: Axes
  batch_axis: Axes = ()

  def resolve(self, shape: tuple[int, ...], name: str = "the leaf") -> "StackLayout":
    """The :class:`StackLayout` of a leaf of ``shape``; ``name`` is used in errors.

    Raises:
      ValueError: if an axis is out of range or repeated, an axis of the leaf is in no
        group, or the reduction or output group is empty.
    """
    ndim = len(shape)
    groups = {}
    for field in ("reduction_axis", "output_axis", "batch_axis"):
      value = getattr(self, field)
      axes = (value,) if isinstance(value, int) else value
      if not isinstance(axes, tuple) or not all(
        isinstance(a, int) and not isinstance(a, bool) for a in axes
      ):
        raise ValueError(f"`{field}` of {self} must be an int or a tuple of ints")
      for a in axes:
        if not -ndim <= a < ndim:
          raise ValueError(
            f"{self} names axis {a} of {name}, which has shape {tuple(shape)} ({ndim} axes)"
          )
      groups[field] = tuple(a % ndim for a in axes)
    every = [a for axes in groups.values() for a in axes]
    if (
      sorted(every) != list(range(ndim))
      or not groups["reduction_axis"]
      or not groups["output_axis"]
    ):
      raise ValueError(
        f"{self} must put every axis of {name} (shape {tuple(shape)}) in exactly one group,"
        " with at least one reduction and one output axis"
      )
    return StackLayout(
      tuple(shape), groups["batch_axis"], groups["output_axis"], groups["reduction_axis"]
    )


def input_axis_numbers(axis: int) -> DimensionNumbers:
  """The :class:`DimensionNumbers` of a 2-D leaf whose input axis is ``axis`` (0 or 1)."""
  return DimensionNumbers(reduction_axis=axis, output_axis=1 - axis)


class StackLayout(NamedTuple):
  """A leaf read as its canonical stack of (m, n) matrices (docs/spec.md section 1.3).

  Hashable (all fields are tuples of ints), so it can be a static part of a pytree node.
  """

  shape: tuple[int, ...]  # the leaf's own shape
  batch: tuple[int, ...]  # batch axes of the leaf, in the order given
  output: tuple[int, ...]  # output axes, flattened to m
  reduction: tuple[int, ...]  # reduction axes, flattened to n

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return tuple(self.shape[a] for a in self.batch)

  @property
  def num_slices(self) -> int:
    return math.prod(self.batch_shape)

  @property
  def matrix_shape(self) -> tuple[int, int]:
    """(m, n) = (out, in) of each slice."""
    return (
      math.prod(self.shape[a] for a in self.output),
      math.prod(self.shape[a] for a in self.reduction),
    )

  @property
  def reduction_first(self) -> bool:
    """Whether the leaf stores every reduction axis before every output axis (Flax kernels).

    Such a leaf's update is written from the transposed stack (S, n, m), which maps onto the
    leaf without moving data across the in/out boundary.
    """
    return max(self.reduction) < min(self.output)

  @property
  def slice_layout(self) -> "StackLayout":
    """The layout of one slice, as :meth:`to_slices` gives it: the leaf without its batch axes."""
    rest = [a for a in range(len(self.shape)) if a not in self.batch]
    renumber = {a: i for i, a in enumerate(rest)}
    return StackLayout(
      tuple(self.shape[a] for a in rest),
      (),
      tuple(renumber[a] for a in self.output),
      tuple(renumber[a] for a in self.reduction),
    )

  def _slices_order(self) -> tuple[int, ...]:
    return self.batch + tuple(a for a in range(len(self.shape)) if a not in self.batch)

  def to_slices(self, x: jax.Array) -> jax.Array:
    """The leaf as (S, *slice shape): batch axes moved to the front and flattened.

    No data moves when the batch axes already lead (a scanned kernel).
    """
    x = jnp.transpose(x, self._slices_order())
    return x.reshape((self.num_slices, *self.slice_layout.shape))

  def from_slices(self, x: jax.Array) -> jax.Array:
    """Inverse of :meth:`to_slices`."""
    return self._unpermute(x, self._slices_order())

  def _unpermute(self, x: jax.Array, order: tuple[int, ...]) -> jax.Array:
    """The leaf from ``x``, its axes permuted to ``order`` and flattened in any way."""
    x = x.reshape(tuple(self.shape[a] for a in order))
    return jnp.transpose(x, tuple(int(i) for i in np.argsort(order)))

  def batch_to_slices(self, a: jax.Array) -> jax.Array:
    """A per-slice state array with the batch shape in front, as (S, ...)."""
    return a.reshape((self.num_slices, *a.shape[len(self.batch) :]))

  def slices_to_batch(self, a: jax.Array) -> jax.Array:
    """Inverse of :meth:`batch_to_slices`: (S, ...) with the batch shape in front."""
    return a.reshape(self.batch_shape + a.shape[1:])

  def _order(self, transposed: bool) -> tuple[int, ...]:
    inner = self.reduction + self.output if transposed else self.output + self.reduction
    return self.batch + inner

  def to_stack(self, x: jax.Array, transposed: bool = False) -> jax.Array:
    """The leaf as its canonical stack (S, m, n), or (S, n, m) if ``transposed``."""
    m, n = self.matrix_shape
    inner = (n, m) if transposed else (m, n)
    return jnp.transpose(x, self._order(transposed)).reshape((self.num_slices, *inner))

  def from_stack(self, x: jax.Array, transposed: bool = False) -> jax.Array:
    """Inverse of :meth:`to_stack`: a stack (S, m, n) (or (S, n, m)) in the leaf's layout."""
    return self._unpermute(x, self._order(transposed))


def map_slices(fn, xs):
  """``fn`` on each slice of the (S, ...) stacks ``xs`` (a tuple of pytrees), stacked back.

  One slice at a time, in a loop (``lax.map``), never ``vmap``: each slice runs the very
  computation of a 2-D leaf, so a stack gives the bits its slices would give as separate
  leaves (a batched matmul or a vectorised division may compile differently), and costs
  what they cost. A stack of one slice calls ``fn`` directly.
  """
  if jax.tree.leaves(xs)[0].shape[0] == 1:
    return jax.tree.map(lambda a: a[None], fn(*jax.tree.map(lambda a: a[0], xs)))
  return jax.lax.map(lambda args: fn(*args), xs)


def _name_leaves(params) -> list[tuple[str, object]]:
  """``(name, leaf)`` for every leaf of ``params``, ``optax.MaskedNode`` leaves included."""
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_masked)[0]
  return [(path_str(path), p) for path, p in flat]


def is_floating_array(p) -> bool:
  """Whether ``p`` is an array (anything with a dtype) of a floating-point dtype."""
  return hasattr(p, "dtype") and jnp.issubdtype(p.dtype, jnp.floating)


def resolve_specs(params, dimension_numbers, input_axis, where: str) -> list:
  """The :class:`DimensionNumbers` (or ``None``) of each leaf of ``params``, unresolved.

  Args:
    params: a pytree; ``optax.MaskedNode`` leaves get ``None``.
    dimension_numbers: ``None``, one :class:`DimensionNumbers` for every leaf, a pytree of
      them (``None`` where a leaf has none) shaped like ``params``, or a callable on
      ``params`` returning one.
    input_axis: ``None`` or the 2-D shorthand (an int, pytree of ints or callable; see
      :func:`resolve_input_axes`), used when ``dimension_numbers`` is ``None``: every 2-D
      leaf gets ``input_axis_numbers(axis)``, other leaves ``None``.
    where: the caller's name, for error messages.

  Returns:
    One entry per leaf of ``params`` (``jax.tree.leaves`` order, masked leaves included).

  Raises:
    ValueError: if both arguments are given, or a pytree does not match ``params``.
  """
  if dimension_numbers is not None and input_axis is not None:
    raise ValueError(
      f"{where} takes `dimension_numbers` or `input_axis`, not both: `input_axis=a` is"
      " DimensionNumbers(reduction_axis=a, output_axis=1 - a)"
    )
  named = _name_leaves(params)
  if dimension_numbers is None:
    matrices = jax.tree.map(
      lambda p: p if not is_masked(p) and jnp.ndim(p) == 2 else optax.MaskedNode(),
      params,
      is_leaf=is_masked,
    )
    axes = iter(resolve_input_axes(matrices, 0 if input_axis is None else input_axis, where))
    return [
      None if is_masked(p) or jnp.ndim(p) != 2 else input_axis_numbers(next(axes)) for _, p in named
    ]
  spec = dimension_numbers(params) if callable(dimension_numbers) else dimension_numbers
  if isinstance(spec, DimensionNumbers):
    return [None if is_masked(p) else spec for _, p in named]
  try:
    specs = jax.tree.map(
      # None would vanish from the leaves: a MaskedNode keeps its place.
      lambda p, s: optax.MaskedNode() if is_masked(p) or s is None else s,
      params,
      spec,
      is_leaf=is_masked,
    )
  except (ValueError, TypeError) as e:
    raise ValueError(
      f"`dimension_numbers` must be a DimensionNumbers or a pytree of them (None where a leaf"
      f" is not projected) with the structure of the params given to {where}: {e}"
    ) from None
  out = []
  for (name, _), s in zip(named, jax.tree.leaves(specs, is_leaf=is_masked), strict=True):
    if is_masked(s):
      out.append(None)
    elif isinstance(s, DimensionNumbers):
      out.append(s)
    else:
      raise TypeError(
        f"`dimension_numbers` for parameter {name} must be a DimensionNumbers or None, got {s!r}"
      )
  return out


def stacked_leaves(params, specs) -> list[str]:
  """Names of the floating leaves of 3 or more dimensions that ``specs`` leaves unprojected."""
  return [
    name
    for (name, p), s in zip(_name_leaves(params), specs, strict=True)
    if s is None and not is_masked(p) and is_floating_array(p) and jnp.ndim(p) >= 3
  ]


def no_silent_stacks(params, specs, where: str, exclude_hint: str) -> None:
  """Raises if a floating leaf of 3+ dimensions has no dimension numbers (docs/spec.md 1.3).

  Such a leaf is a stack of matrices or an N-D kernel; left alone it would silently get
  full-size treatment. The error names the leaves and both ways out.
  """
  names = stacked_leaves(params, specs)
  if names:
    shapes = {name: jnp.shape(p) for name, p in _name_leaves(params) if name in names}
    listed = ", ".join(f"{n} {tuple(s)}" for n, s in shapes.items())
    raise ValueError(
      f"{where}: {len(names)} floating-point parameter(s) of 3 or more dimensions have no"
      f" dimension numbers: {listed}. Say how to read each as matrices with"
      " `dimension_numbers=` (qgalore_jax.DimensionNumbers, or"
      " qgalore_jax.nnx_dimension_numbers(model) for a Flax NNX model; a scanned layer's"
      f" kernel (layers, in, out) is DimensionNumbers(1, 2, batch_axis=0)), or {exclude_hint}"
    )


def resolve_layouts(params, specs) -> list:
  """The :class:`StackLayout` of each leaf (``None`` where its spec is ``None``)."""
  return [
    None if s is None else s.resolve(tuple(jnp.shape(p)), f"parameter {name}")
    for (name, p), s in zip(_name_leaves(params), specs, strict=True)
  ]

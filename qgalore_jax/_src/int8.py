"""INT8 weights updated by stochastic rounding (docs/spec.md section 6).

A selected 2-D weight is held as a :class:`QuantizedWeight`: the codes of its canonical
(out, in) matrix W (docs/spec.md section 1), flattened row-major, one byte each, plus one float32
scale ``s`` and zero ``z`` per group of ``group_size`` consecutive elements (docs/spec.md
section 3). No float copy of the weights persists between steps: :func:`apply_updates` dequantises,
adds the update, recomputes ``s`` and ``z`` and rounds stochastically, all in float32::

  w_new = s * ((q - z) + update / s)     # = s * (q - z) + update, see _add_update
  s, z = groupwise(w_new)
  q = clamp(floor(w_new / s + u) + z, 0, 2**bits - 1)

so ``E[s * (q - z)] = w_new`` wherever the clamp is inactive (unbiased rounding). The
uniforms ``u`` come from the counter-based generator of ``generator.py``, keyed by (seed,
step, tensor id, element index of W in row-major order).
"""

import functools
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qgalore_jax._src import layout
from qgalore_jax._src import sharding
from qgalore_jax._src.checks import check_bits
from qgalore_jax._src.checks import check_int
from qgalore_jax._src.generator import uniforms
from qgalore_jax._src.layout import StackLayout
from qgalore_jax._src.layout import path_str
from qgalore_jax._src.quantization import QuantizedArray
from qgalore_jax._src.quantization import dequantize
from qgalore_jax._src.quantization import exact_divide
from qgalore_jax._src.quantization import grouped
from qgalore_jax._src.quantization import pack_int4
from qgalore_jax._src.quantization import quantize
from qgalore_jax._src.quantization import unpack_int4


def stochastic_round(
  w, *, seed, step, tensor_id, bits: int = 8, group_size: int = 256
) -> QuantizedArray:
  """Quantises ``w`` group-wise with stochastic rounding (docs/spec.md sections 3 and 6).

  :func:`~qgalore_jax.quantize` with ``noise`` from :func:`~qgalore_jax.uniforms`: the
  scale and zero of round-to-nearest, and the codes ``clamp(floor(w / s + u) + z, 0,
  2**bits - 1)``.

  Args:
    w: the canonical (out, in) matrix (any float dtype; computed in float32).
    seed: integer (Python or traced).
    step: integer (Python or traced).
    tensor_id: integer (Python or traced).
    bits: code width, 1..8 (4 or fewer: packed two per byte).
    group_size: elements per group.

  Returns:
    A :class:`~qgalore_jax.QuantizedArray`.

  Example:
    >>> import jax.numpy as jnp
    >>> from qgalore_jax import stochastic_round
    >>> q = stochastic_round(jnp.array([[0.0, 0.3, 1.0]]), seed=0, step=0, tensor_id=0)
    >>> q.codes.tolist()  # 0.3 * 255 = 76.5: 76 or 77, each with probability 1/2
    [0, 76, 255]

  References:
    Zhang et al., `Q-GaLore <https://arxiv.org/abs/2407.08296>`_, 2024.
  """
  noise = uniforms(seed, step, tensor_id, jnp.shape(w))
  return quantize(w, bits, group_size, noise=noise)


class QuantizedWeight(NamedTuple):
  """A weight leaf held as INT8 (or fewer-bit) codes (docs/spec.md sections 1.3 and 6).

  A pytree node whose children are the three arrays; the other fields are static (part of
  the tree structure), so ``jit`` and orbax see arrays only and the node restores from an
  abstract target like any leaf. A stack of matrices (a scanned kernel) holds each slice's
  codes, scales and zeros with the batch shape in front; groups never cross slices.
  """

  codes: jax.Array  # uint8 [*batch, m * n] (bits > 4) or [*batch, ceil(m * n / 2)]: row-major
  scale: jax.Array  # float32 [*batch, num_groups]
  zero: jax.Array  # float32 [*batch, num_groups]
  layout: StackLayout  # static: the leaf's shape and how it reads as (S, m, n)
  bits: int  # static: code width
  group_size: int  # static: elements per group

  @property
  def shape(self) -> tuple[int, ...]:
    """The leaf's own shape (e.g. (in, out) for a Flax kernel)."""
    return self.layout.shape

  @property
  def input_axis(self) -> int:
    """The input axis of a 2-D leaf (0 or 1); an error for a stack."""
    if self.layout.batch or len(self.layout.shape) != 2:
      raise AttributeError(f"a leaf of shape {self.shape} read as a stack has no single input axis")
    return self.layout.reduction[0]

  def _slices(self) -> QuantizedArray:
    return QuantizedArray(*map(self.layout.batch_to_slices, (self.codes, self.scale, self.zero)))

  def dequantize_canonical(self) -> jax.Array:
    """The float32 canonical stack (S, m, n) of ``s * (q - z)``, one matrix per slice."""
    shape = self.layout.matrix_shape
    deq = lambda *q: dequantize(QuantizedArray(*q), shape, self.bits, self.group_size)
    return layout.map_slices(deq, tuple(self._slices()))

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    """The weight ``s * (q - z)`` in the leaf's own shape and ``dtype``."""
    lay, one = self.layout, self.layout.slice_layout

    def deq(*q):
      w_MxN = dequantize(QuantizedArray(*q), lay.matrix_shape, self.bits, self.group_size)
      # Each slice in its own layout: a transpose of the whole stack would be one more copy.
      return one.from_stack(w_MxN[None]).astype(dtype)

    return lay.from_slices(layout.map_slices(deq, tuple(self._slices())))


_ARRAY_FIELDS = ("codes", "scale", "zero")
_STATIC_FIELDS = ("layout", "bits", "group_size")


def _flatten_with_keys(q):
  arrays = tuple((jax.tree_util.GetAttrKey(f), getattr(q, f)) for f in _ARRAY_FIELDS)
  return arrays, tuple(getattr(q, f) for f in _STATIC_FIELDS)


def _flatten(q):
  return tuple(getattr(q, f) for f in _ARRAY_FIELDS), tuple(getattr(q, f) for f in _STATIC_FIELDS)


def _unflatten(static, arrays):
  return QuantizedWeight(*arrays, *static)


jax.tree_util.register_pytree_with_keys(QuantizedWeight, _flatten_with_keys, _unflatten, _flatten)


def is_quantized(x) -> bool:
  """Whether ``x`` is a :class:`QuantizedWeight` (use as ``is_leaf`` in tree maps)."""
  return isinstance(x, QuantizedWeight)


def _per_leaf(value, params, name: str, leaf_type) -> list:
  """``value`` (a scalar, a pytree shaped like params, or a callable on them) per leaf."""
  if callable(value):
    value = value(params)
  leaves, treedef = jax.tree.flatten(params, is_leaf=is_quantized)
  if isinstance(value, leaf_type) or value is None:
    return [value] * len(leaves)
  try:
    return treedef.flatten_up_to(value)
  except (ValueError, TypeError) as e:
    raise ValueError(
      f"`{name}` must be a {leaf_type.__name__} or a pytree shaped like the params: {e}"
    ) from None


def _per_slice(quantized: QuantizedArray, lay: StackLayout) -> QuantizedArray:
  """A (S, ...) stack of quantised slices with the leaf's batch shape in front."""
  return QuantizedArray(*map(lay.slices_to_batch, quantized))


@functools.partial(jax.jit, static_argnames=("lay", "bits", "group_size"))
def _quantize_leaf(p, lay, bits, group_size):
  quantized = layout.map_slices(lambda w: quantize(w, bits, group_size), (lay.to_stack(p),))
  return tuple(_per_slice(quantized, lay))


def _quantize_placed(p, lay, bits, group_size) -> tuple:
  """The leaf's (codes, scale, zero); under Explicit mesh axes computed with them made Auto
  and placed by :func:`sharding.int8_weight_specs` (docs/spec.md section 9.1)."""
  quantize_leaf = functools.partial(_quantize_leaf, lay=lay, bits=bits, group_size=group_size)
  mesh = sharding.explicit_mesh(p)
  if mesh is None:
    return quantize_leaf(p)
  shapes = jax.eval_shape(quantize_leaf, jax.ShapeDtypeStruct(p.shape, p.dtype))
  specs = sharding.int8_weight_specs(p, lay, mesh, [a.shape[-1] for a in shapes])
  return sharding.in_auto_axes(quantize_leaf, specs, mesh, p)


def quantize_params(
  params,
  *,
  bits: int = 8,
  group_size: int = 256,
  mask: Any | Callable[[Any], Any] | None = None,
  input_axis: int | Any | Callable[[Any], Any] | None = None,
  dimension_numbers: Any = None,
):
  """Replaces the selected leaves of ``params`` by :class:`QuantizedWeight` nodes.

  Each selected leaf is read as its canonical (out, in) matrix W through ``input_axis``
  (docs/spec.md section 1.2), or as a stack of such matrices through ``dimension_numbers``
  (section 1.3), and each matrix is quantised with round-to-nearest (section 3): codes of
  W flattened row-major, one float32 scale and zero per ``group_size`` elements, groups
  cut within each matrix. Other leaves, and leaves that are already quantised, are
  returned unchanged.

  Args:
    params: a pytree of arrays (plain dicts, linen params, an ``nnx.State``).
    bits: code width, 1..8 (4 or fewer: packed two per byte).
    group_size: elements per quantisation group.
    mask: which leaves to quantise: a pytree of bools shaped like ``params`` or a callable
      on ``params`` returning one. Default: every floating-point leaf that has dimension
      numbers (every 2-D one when ``dimension_numbers`` is not given; then a floating
      leaf of 3 or more dimensions is an error: give it dimension numbers or exclude it
      with ``mask``).
    input_axis: the input axis of each 2-D leaf: 0 for Flax kernels (in, out), the
      default, 1 for arrays stored (out, in); an int, a pytree of ints or a callable
      returning one.
    dimension_numbers: a :class:`~qgalore_jax.DimensionNumbers`, a pytree of them (None
      for leaves left as they are) or a callable on ``params`` returning one, as for
      :func:`~qgalore_jax.qgalore_adamw`. Give this or ``input_axis``, not both.

  Returns:
    A pytree with the structure of ``params``, a :class:`QuantizedWeight` at each selected
    leaf: 1 byte per 8-bit weight plus 8 bytes per group, ``1 + 8 / group_size`` bytes
    per weight (1.03 for groups of 256).

  Example:
    >>> import jax.numpy as jnp
    >>> from qgalore_jax import quantize_params, dequantize_params
    >>> params = {"kernel": jnp.ones((512, 4)), "bias": jnp.zeros(4)}
    >>> qparams = quantize_params(params)
    >>> qparams["kernel"].codes.dtype, qparams["kernel"].scale.shape, qparams["bias"].shape
    (dtype('uint8'), (8,), (4,))
    >>> dequantize_params(qparams)["kernel"].shape
    (512, 4)

  References:
    Zhang et al., `Q-GaLore <https://arxiv.org/abs/2407.08296>`_, 2024.
  """
  check_bits(bits)
  check_int(group_size, "group_size")
  flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)
  # Already quantised leaves pass through: hide them from the dimension numbers.
  unquantized = jax.tree.map(
    lambda p: optax.MaskedNode() if is_quantized(p) else p, params, is_leaf=is_quantized
  )
  specs = layout.resolve_specs(unquantized, dimension_numbers, input_axis, "quantize_params")
  selected = _per_leaf(mask, params, "mask", bool)
  if mask is None:
    specs_of_floats = [
      s if layout.is_floating_array(p) else None for (_, p), s in zip(flat, specs, strict=True)
    ]
    layout.no_silent_stacks(
      unquantized, specs_of_floats, "quantize_params", "a `mask` that leaves them in float"
    )
  out = []
  for (path, p), s, spec in zip(flat, selected, specs, strict=True):
    name = path_str(path)
    if is_quantized(p):
      out.append(p)
      continue
    if s is None:
      s = spec is not None and layout.is_floating_array(p)
    if not isinstance(s, (bool, np.bool_)) and getattr(s, "dtype", None) != jnp.bool_:
      raise TypeError(f"`mask` leaf for parameter {name} must be a bool, got {s!r}")
    if not s:
      out.append(p)
      continue
    if spec is None or not layout.is_floating_array(p):
      raise ValueError(
        f"`mask` selects parameter {name} of shape {jnp.shape(p)} and dtype"
        f" {jnp.result_type(p)}, but only floating-point leaves with dimension numbers (2-D"
        " matrices, or leaves given `dimension_numbers`) can be quantised"
      )
    lay = spec.resolve(tuple(p.shape), f"parameter {name}")
    out.append(QuantizedWeight(*_quantize_placed(p, lay, bits, group_size), lay, bits, group_size))
  return treedef.unflatten(out)


def dequantize_params(qparams, dtype=jnp.float32):
  """Float view of ``qparams``: every :class:`QuantizedWeight` becomes ``s * (q - z)``.

  Args:
    qparams: a pytree from :func:`quantize_params`.
    dtype: dtype of the dequantised weights (other leaves keep theirs).

  Returns:
    A pytree with the structure of the original params, each quantised leaf in its own
    shape (e.g. a Flax kernel (in, out)).

  Example:
    >>> import jax.numpy as jnp
    >>> from qgalore_jax import dequantize_params, quantize_params
    >>> qparams = quantize_params({"kernel": jnp.array([[0.0, 1.0], [2.0, 3.0]])})
    >>> dequantize_params(qparams)["kernel"].tolist()
    [[0.0, 1.0], [2.0, 3.0]]
  """

  def leaf(x):
    if not is_quantized(x):
      return x
    mesh = sharding.explicit_mesh(x)
    if mesh is None:
      return x.dequantize(dtype)
    spec = sharding.dequantized_spec(x.codes, x.layout, mesh)
    return sharding.in_auto_axes(lambda q: q.dequantize(dtype), spec, mesh, x)

  return jax.tree.map(leaf, qparams, is_leaf=is_quantized)


def _add_update(p: QuantizedArray, update_MxN: jax.Array, bits: int, group_size: int) -> jax.Array:
  """``w + update`` on one canonical matrix, as ``s * ((q - z) + update / s)`` in float32.

  Written without a multiply feeding an add: XLA would contract ``s * (q - z) + update``
  into a fused multiply-add (one rounding instead of two) and the codes would differ from
  the torch twin's. Every operation here is a single IEEE-rounded one on both backends.
  """
  size = update_MxN.size
  codes = unpack_int4(p.codes, size) if bits <= 4 else p.codes
  codes = grouped(codes.astype(jnp.float32), group_size)
  update = grouped(update_MxN.astype(jnp.float32).reshape(-1), group_size)
  scale = p.scale[:, None]
  w_new = scale * ((codes - p.zero[:, None]) + exact_divide(update, scale))
  return w_new.reshape(-1)[:size].reshape(update_MxN.shape)


def _keep_unchanged_groups(
  old: QuantizedArray, new: QuantizedArray, update_MxN: jax.Array, bits: int, group_size: int
) -> QuantizedArray:
  """``new``, except that groups whose update is all zero keep ``old``'s codes, scale, zero.

  Re-quantising an unchanged group would move its codes: the group's dequantised range can be
  narrower than the one it was quantised from, so its scale shrinks. docs/spec.md section 6.2.
  """
  size = update_MxN.size
  still = jnp.all(grouped(update_MxN.reshape(-1), group_size) == 0, axis=1)
  codes = lambda q: unpack_int4(q.codes, size) if bits <= 4 else q.codes
  merged = jnp.where(jnp.repeat(still, group_size)[:size], codes(old), codes(new))
  return QuantizedArray(
    codes=pack_int4(merged) if bits <= 4 else merged,
    scale=jnp.where(still, old.scale, new.scale),
    zero=jnp.where(still, old.zero, new.zero),
  )


def _apply_leaf(p, u, path, seed, step, tensor_id):
  if u is None:
    return p
  if not is_quantized(p):
    return jnp.asarray(p + u).astype(jnp.result_type(p))
  if jnp.shape(u) != p.shape:
    raise ValueError(
      f"update for parameter {path_str(path)} has shape {jnp.shape(u)}, but the weight has"
      f" shape {p.shape}"
    )
  lay = p.layout
  # Each slice draws the uniforms of a separate matrix with its own tensor id.
  ids = jnp.asarray(tensor_id, jnp.uint32).reshape(lay.num_slices)

  def requantize(p, u, ids, keys):
    seed_, step_ = keys.get("seed", seed), keys.get("step", step)

    def round_slice(codes, scale, zero, u, slice_id):
      u_MxN = lay.slice_layout.to_stack(u)[0]  # transposed here, fused into the update
      old = QuantizedArray(codes, scale, zero)
      w_MxN = _add_update(old, u_MxN, p.bits, p.group_size)
      noise = uniforms(seed_, step_, slice_id, lay.matrix_shape)
      new = quantize(w_MxN, p.bits, p.group_size, noise=noise)
      return _keep_unchanged_groups(old, new, u_MxN, p.bits, p.group_size)

    new = _per_slice(layout.map_slices(round_slice, (*p._slices(), lay.to_slices(u), ids)), lay)
    return p._replace(codes=new.codes, scale=new.scale, zero=new.zero)

  # Traced keys are passed in as arguments (see sharding.in_auto_axes), Python ints closed over.
  keys = {k: v for k, v in (("seed", seed), ("step", step)) if isinstance(v, jax.Array)}
  mesh = sharding.explicit_mesh((p, u, keys))
  if mesh is None:
    return requantize(p, u, ids, keys)
  # Under Explicit axes: computed with them made Auto, the arrays placed as they came in.
  specs = jax.tree.map(lambda a: jax.sharding.PartitionSpec(*sharding.spec_entries(a)), p)
  return sharding.in_auto_axes(requantize, specs, mesh, p, u, ids, keys)


def _slice_ids(tensor_id, p, path):
  """The tensor ids of a leaf's matrices: one per slice of a stack, consecutive from an int."""
  if not is_quantized(p):
    return tensor_id  # a float leaf draws no uniforms
  num = p.layout.num_slices
  if isinstance(tensor_id, int) and not isinstance(tensor_id, bool):
    return np.arange(tensor_id, tensor_id + num) if num > 1 else tensor_id
  if jnp.size(tensor_id) != num:
    raise ValueError(
      f"`tensor_ids` for parameter {path_str(path)} must be an int or {num} ints (one per"
      f" matrix of the stack), got {tensor_id!r}"
    )
  return tensor_id


def _default_ids(flat) -> list:
  """Each leaf's position among the matrices: a stack of S slices counts S (spec 1.3)."""
  ids, count = [], 0
  for _, p in flat:
    ids.append(count)
    count += p.layout.num_slices if is_quantized(p) else 1
  return ids


def apply_updates(qparams, updates, *, seed, step, tensor_ids=None):
  r"""Adds ``updates`` to ``qparams``, requantising INT8 weights by stochastic rounding.

  For each :class:`QuantizedWeight`, in float32 on its canonical matrix (docs/spec.md section 6):

  .. math::

    w = s (q - z), \quad w' = w + \Delta, \quad (s', z') = \text{groupwise}(w'), \quad
    q' = \text{clamp}(\lfloor w' / s' + u \rfloor + z', 0, 2^b - 1)

  with ``u`` from :func:`uniforms` keyed by ``(seed, step, tensor id, element)`` (one id
  per matrix: per slice of a stack), so
  :math:`\mathbb{E}[s'(q' - z')] = w'`: an update much smaller than a quantisation step
  survives in expectation (round-to-nearest would drop it). A group whose update is all
  zero keeps its codes, scale and zero bit for bit, so zero updates (e.g. the non-final
  micro-steps of ``optax.MultiSteps``) change nothing. Other leaves get ``p + update`` in
  their own dtype, as ``optax.apply_updates``.

  Args:
    qparams: a pytree from :func:`quantize_params`.
    updates: updates shaped like the original params (e.g. from an optax optimizer applied
      to :func:`dequantize_params`); any float dtype. ``None`` leaves nothing changed.
    seed: integer (Python or traced): the run's seed.
    step: integer (Python or traced): the 0-based update count (the count before this
      update, e.g. the train loop's step).
    tensor_ids: integers shaped like the params, or ``None`` for each leaf's index in
      ``jax.tree.leaves(qparams, is_leaf=is_quantized)`` (its index among the leaves of the
      original params) when no leaf is a stack. Each matrix of a stack has its own id
      (docs/spec.md section 1.3): give a stacked leaf an int ``t`` (its slices get ``t,
      t + 1, ...``) or an array of ints of its batch shape; by default the ids count
      matrices, a stack of S slices counting S, in leaf order.

  Returns:
    The updated pytree, with the structure and dtypes of ``qparams``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from qgalore_jax import apply_updates, dequantize_params, quantize_params
    >>> qparams = quantize_params({"w": jnp.linspace(-1.0, 1.0, 512).reshape(64, 8)})
    >>> updates = {"w": jnp.full((64, 8), 1e-3)}
    >>> step_fn = jax.jit(lambda q, u, t: apply_updates(q, u, seed=0, step=t))
    >>> qparams = step_fn(qparams, updates, jnp.int32(0))
    >>> qparams["w"].codes.dtype
    dtype('uint8')

  References:
    Zhang et al., `Q-GaLore <https://arxiv.org/abs/2407.08296>`_, 2024.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(qparams, is_leaf=is_quantized)
  try:
    flat_updates = treedef.flatten_up_to(updates)
  except (ValueError, TypeError) as e:
    raise ValueError(f"`updates` must have the structure of the params: {e}") from None
  ids = (
    _default_ids(flat) if tensor_ids is None else _per_leaf(tensor_ids, qparams, "tensor_ids", int)
  )
  new = [
    _apply_leaf(p, u, path, seed, step, _slice_ids(i, p, path))
    for (path, p), u, i in zip(flat, flat_updates, ids, strict=True)
  ]
  return treedef.unflatten(new)


def int8_train_step(
  loss_fn: Callable[..., Any],
  optimizer: optax.GradientTransformation,
  *,
  seed: int = 0,
  dtype=jnp.float32,
  has_aux: bool = False,
  tensor_ids=None,
):
  """A jitted train step for INT8 weights: differentiate, update, requantise in place.

  The step dequantises ``qparams`` to ``dtype``, takes the gradient of ``loss_fn`` with
  respect to those float weights, runs ``optimizer`` and writes the result back with
  :func:`apply_updates`. ``qparams`` and ``opt_state`` are donated, so XLA reuses their
  buffers for the new ones: the float weights exist only inside the step. Works with any
  pytree: plain dicts, linen params, or an ``nnx.State`` from ``nnx.split``.

  To skip steps whose gradients are not all finite, build ``optimizer`` with
  ``qgalore_adamw(..., skip_nonfinite=True)`` (or wrap any optax optimizer in
  ``optax.apply_if_finite``): such a step returns zero updates, which leave every INT8
  code, scale and zero bit-identical, and the optimizer's state counts it
  (docs/spec.md section 4.3.1).

  Args:
    loss_fn: ``loss_fn(params, batch)`` returning a scalar loss (or ``(loss, aux)`` if
      ``has_aux``), where ``params`` has the structure of the float params.
    optimizer: an optax transformation, e.g. :func:`~qgalore_jax.qgalore_adamw`; initialise
      it with ``optimizer.init(dequantize_params(qparams))``.
    seed: seed of the stochastic rounding.
    dtype: dtype of the dequantised weights the loss sees.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    tensor_ids: see :func:`apply_updates`.

  Returns:
    ``step(qparams, opt_state, batch, step) -> (qparams, opt_state, loss)`` (with ``aux``
    appended if ``has_aux``), jitted, ``qparams`` and ``opt_state`` donated; ``step`` is
    the 0-based update count (a traced integer: no recompilation between steps).

  Example:
    A Flax NNX model: split it, quantise its ``Param`` state, merge inside the loss.

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from qgalore_jax import dequantize_params, int8_train_step, qgalore_adamw
    >>> from qgalore_jax import quantize_params
    >>> model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
    >>> graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    >>> qparams = quantize_params(params)
    >>> tx = qgalore_adamw(1e-2, rank=2)
    >>> opt_state = tx.init(dequantize_params(qparams))
    >>> def loss_fn(params, batch):
    ...   x, y = batch
    ...   return jnp.mean((nnx.merge(graphdef, params, rest)(x) - y) ** 2)
    >>> train_step = int8_train_step(loss_fn, tx, seed=0)
    >>> batch = (jnp.ones((2, 8)), jnp.zeros((2, 4)))
    >>> qparams, opt_state, loss = train_step(qparams, opt_state, batch, jnp.int32(0))
    >>> nnx.update(model, dequantize_params(qparams))  # write back for evaluation

  References:
    Zhang et al., `Q-GaLore <https://arxiv.org/abs/2407.08296>`_, 2024.
  """

  def step_fn(qparams, opt_state, batch, step):
    params = dequantize_params(qparams, dtype)
    out, grads = jax.value_and_grad(loss_fn, has_aux=has_aux)(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    qparams = apply_updates(qparams, updates, seed=seed, step=step, tensor_ids=tensor_ids)
    if has_aux:
      return qparams, opt_state, *out
    return qparams, opt_state, out

  return jax.jit(step_fn, donate_argnums=(0, 1))

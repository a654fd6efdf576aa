"""Group-wise asymmetric quantisation and INT4 packing (docs/spec.md section 3).

A tensor is read as its canonical matrix, flattened row-major and cut into groups of
``group_size`` consecutive elements; a trailing partial group is quantised on its own
elements. With ``b`` bits and ``Q = 2**b - 1``, per group::

  s = max(max - min, 1e-5) / Q
  z = round(-min / s)                       # round half to even; NOT clamped (see below)
  q = clamp(round(w / s) + z, 0, Q)         # or clamp(floor(w / s + u) + z, 0, Q), see below
  w_hat = s * (q - z)

Given ``noise`` (uniforms ``u`` in [0, 1), one per element), the codes are rounded
stochastically instead, ``E[s * (q - z)] = w`` wherever the clamp is inactive: the rounding
of INT8 weights (docs/spec.md section 6), with ``u`` from ``generator.uniforms``.

docs/spec.md section 3 (after the authors' code, itself after AWQ) clamps ``z`` to [0, Q], which
only matters when ``z`` is stored as a Q-bit integer. Here ``z`` is float32, and the clamp
would clip every single-sign group to [0, max - min]: a rank-1 projector ``[1.0]`` decodes
as ``1e-5`` and its matrix stops training. Without the clamp the codes equal the authors'
whenever a group spans zero (``0 <= round(-min / s) <= Q``), and every group keeps the
bound ``|w - w_hat| <= s / 2`` (plus float32 rounding). See ``docs/spec.md`` section 3.3.

Codes of at most 4 bits are stored two per byte (element ``2k`` in the low nibble, ``2k + 1``
in the high nibble), so a 4-bit tensor costs 0.5 byte per element plus 8 bytes per group.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from qgalore_jax._src.checks import check_bits
from qgalore_jax._src.checks import check_int

MIN_RANGE = 1e-5  # floor of (max - min): a constant group gets a tiny, finite scale.


class QuantizedArray(NamedTuple):
  """A group-wise quantised tensor (docs/spec.md section 3).

  The shape, bit width and group size are not stored: they are static facts known to the
  code that made the tensor, so the state holds arrays only.
  """

  codes: jax.Array  # uint8 [ceil(size / 2)] if bits <= 4 (packed), else uint8 [size]
  scale: jax.Array  # float32 [num_groups]
  zero: jax.Array  # float32 [num_groups]


def num_groups(size: int, group_size: int) -> int:
  """Number of quantisation groups for ``size`` elements (the last may be partial)."""
  return -(-size // group_size)


def grouped(flat: jax.Array, group_size: int) -> jax.Array:
  """Reshapes a flat vector to [num_groups, group_size], padding the last group.

  Shared by every group-wise computation (the quantiser, INT8 updates) so that all of them
  cut and pad groups alike.

  The padding repeats the last element, which belongs to the last group, so it changes
  neither that group's min nor its max.
  """
  pad = num_groups(flat.size, group_size) * group_size - flat.size
  if pad:
    flat = jnp.pad(flat, (0, pad), mode="edge")
  return flat.reshape(-1, group_size)


def _barrier_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
  """Division in the operands' dtype, the denominator behind an optimisation barrier."""
  return numerator / jax.lax.optimization_barrier(denominator)


def _float64_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
  """The float32 quotient rounded once from the float64 quotient (see below)."""
  with jax.enable_x64(True):
    wide = _barrier_divide(numerator.astype(jnp.float64), denominator.astype(jnp.float64))
    return wide.astype(numerator.dtype)


def exact_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
  """``numerator / denominator`` correctly rounded, as IEEE float32 division, on every backend.

  Two compiler behaviours would otherwise change a quotient by an ulp and flip a code at a
  rounding boundary (docs/spec.md section 3.4):

  * XLA rewrites ``a / broadcast(b)`` into ``a * broadcast(1 / b)``. The denominator is
    materialised behind an optimisation barrier, so the division stays a division.
  * XLA's GPU backends lower float32 division to an approximate instruction (on NVIDIA GPUs
    PTX ``div.full.f32``, up to 2 ulp off), where torch's CUDA division is IEEE. On GPUs the
    quotient is therefore taken in float64, whose division is IEEE there, and rounded once
    to float32. For float32 operands this double rounding is innocuous (53 >= 2 x 24 + 2
    bits): the result is the correctly rounded float32 quotient, as on the CPU.

  Both operands are float32; ``denominator`` broadcasts to ``numerator``'s shape.
  """
  denominator = jnp.broadcast_to(denominator, numerator.shape)
  return jax.lax.platform_dependent(
    numerator,
    denominator,
    default=_barrier_divide,
    cuda=_float64_divide,
    rocm=_float64_divide,
  )


def pack_int4(codes: jax.Array) -> jax.Array:
  """Packs 4-bit codes (uint8 values < 16) two per byte (docs/spec.md section 3).

  Args:
    codes: uint8 vector of any length; element ``2k`` goes to the low nibble of byte ``k``,
      element ``2k + 1`` to its high nibble. An odd trailing element leaves the high nibble 0.

  Returns:
    uint8 vector of length ``ceil(len(codes) / 2)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from qgalore_jax import pack_int4, unpack_int4
    >>> packed = pack_int4(jnp.array([1, 2, 15], jnp.uint8))
    >>> [hex(b) for b in packed.tolist()]
    ['0x21', '0xf']
    >>> unpack_int4(packed, 3).tolist()
    [1, 2, 15]
  """
  codes = codes.reshape(-1).astype(jnp.uint8)
  if codes.size % 2:
    codes = jnp.pad(codes, (0, 1))
  pairs = codes.reshape(-1, 2)
  return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_int4(packed: jax.Array, size: int) -> jax.Array:
  """Inverse of :func:`pack_int4`: the first ``size`` 4-bit codes, as uint8.

  Args:
    packed: uint8 bytes from :func:`pack_int4`.
    size: number of codes that were packed.

  Returns:
    uint8 vector of length ``size``. See :func:`pack_int4` for an example.
  """
  pairs = jnp.stack([packed & 0xF, packed >> 4], axis=-1)
  return pairs.reshape(-1)[:size]


def group_scale_zero(groups: jax.Array, bits: int) -> tuple[jax.Array, jax.Array]:
  """Per-group ``s = max(max - min, 1e-5) / Q`` and unclamped ``z = round(-min / s)``.

  Args:
    groups: float32 [num_groups, group_size] (see the module docstring for the padding).
    bits: code width; ``Q = 2**bits - 1``.

  Returns:
    float32 ``(scale, zero)``, each [num_groups].
  """
  lo = groups.min(axis=1)
  hi = groups.max(axis=1)
  scale = exact_divide(jnp.maximum(hi - lo, MIN_RANGE), jnp.float32(2**bits - 1))
  # Behind the barrier too: XLA would rewrite -lo / ((hi - lo) / Q) as (-lo * Q) / (hi - lo).
  return scale, jnp.round(exact_divide(-lo, scale))


def quantize(
  x: jax.Array, bits: int = 4, group_size: int = 256, *, noise: jax.Array | None = None
) -> QuantizedArray:
  """Quantises ``x`` group-wise, rounding to nearest or stochastically (docs/spec.md sections 3, 6).

  ``x`` is flattened row-major (pass the canonical matrix: projector rows, or weights in
  (out, in) layout) and computed in float32. The codes are ``clamp(round(x / s) + z, 0, Q)``
  without ``noise``, ``clamp(floor(x / s + u) + z, 0, Q)`` with ``noise = u``; the scale
  and zero are the same either way.

  Args:
    x: array of any shape and float dtype.
    bits: code width, 1..8. Codes of 4 bits or fewer are packed two per byte.
    group_size: number of consecutive elements sharing one scale and zero.
    noise: ``None`` for round-to-nearest, or float32 uniforms in [0, 1), one per element
      of ``x`` in row-major order (any shape of ``x``'s size), for stochastic rounding.

  Returns:
    A :class:`QuantizedArray`.

  Example:
    >>> import jax.numpy as jnp
    >>> from qgalore_jax import quantize, dequantize
    >>> q = quantize(jnp.array([[0.0, 0.5], [1.0, -1.0]]), bits=4, group_size=4)
    >>> q.codes.shape, q.scale.shape
    ((2,), (1,))
    >>> dequantize(q, (2, 2), bits=4, group_size=4)
    Array([[ 0.        ,  0.53333336],
           [ 0.9333334 , -0.9333334 ]], dtype=float32)
    >>> x = jnp.array([0.0, 0.3, 1.0])  # 0.3 * 255 = 76.5: rounded up if the noise is > 0.5
    >>> quantize(x, bits=8, noise=jnp.array([0.5, 0.49, 0.5])).codes.tolist()
    [0, 76, 255]
    >>> quantize(x, bits=8, noise=jnp.array([0.5, 0.51, 0.5])).codes.tolist()
    [0, 77, 255]
  """
  check_bits(bits)
  check_int(group_size, "group_size")
  levels = 2**bits - 1
  flat = jnp.asarray(x, jnp.float32).reshape(-1)
  groups = grouped(flat, group_size)
  scale, zero = group_scale_zero(groups, bits)
  scaled = exact_divide(groups, scale[:, None])
  if noise is None:
    codes = jnp.round(scaled)
  else:
    if jnp.size(noise) != flat.size:
      raise ValueError(
        f"`noise` must have one value per element of x ({flat.size}), got shape {jnp.shape(noise)}"
      )
    codes = jnp.floor(scaled + grouped(jnp.asarray(noise, jnp.float32).reshape(-1), group_size))
  codes = jnp.clip(codes + zero[:, None], 0, levels).astype(jnp.uint8).reshape(-1)[: flat.size]
  if bits <= 4:
    codes = pack_int4(codes)
  return QuantizedArray(codes=codes, scale=scale, zero=zero)


def dequantize(
  q: QuantizedArray, shape: tuple[int, ...], bits: int = 4, group_size: int = 256
) -> jax.Array:
  """Returns the float32 tensor ``s * (code - z)`` of ``shape`` (docs/spec.md section 3).

  Args:
    q: what :func:`quantize` returned.
    shape: the shape of the tensor that was quantised.
    bits: the code width it was quantised with.
    group_size: the group size it was quantised with.

  Returns:
    float32 array of ``shape``. See :func:`quantize` for an example.
  """
  size = 1
  for d in shape:
    size *= d
  codes = unpack_int4(q.codes, size) if bits <= 4 else q.codes
  groups = grouped(codes.astype(jnp.float32), group_size)
  values = q.scale[:, None] * (groups - q.zero[:, None])
  return values.reshape(-1)[:size].reshape(shape)


def quantized_nbytes(q: QuantizedArray) -> int:
  """Bytes a :class:`QuantizedArray` really stores (codes, scales and zeros).

  Works on concrete arrays and on ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``).

  Example:
    >>> import jax.numpy as jnp
    >>> from qgalore_jax import quantize, quantized_nbytes
    >>> quantized_nbytes(quantize(jnp.zeros((128, 512)), bits=4, group_size=256))
    34816
  """
  return sum(int(a.size) * a.dtype.itemsize for a in q)

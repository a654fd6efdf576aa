"""The counter-based uniform generator of stochastic rounding (docs/spec.md section 6).

Uniforms keyed by (seed, step, tensor id, element index in row-major order), written with
uint32 arithmetic that the torch twin reproduces bit for bit (``docs/spec.md`` section 6.3)::

  lowbias32(x) = x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16
  key = lowbias32(lowbias32(lowbias32(seed ^ 0x9e3779b9) ^ step) ^ tensor_id)
  h_i = lowbias32(lowbias32(i ^ key) + key);  u_i = (h_i >> 8) * 2**-24

An element's value depends on its index only, not on the shape or the sharding, and no
state is carried between calls: the same key gives the same uniforms on any device.
"""

import jax
import jax.numpy as jnp
import numpy as np

GOLDEN = 0x9E3779B9  # absorbed with the seed, so that seed 0 does not hash to the fixed point 0
MULTIPLIER_1 = 0x7FEB352D  # lowbias32 constants (C. Wellons, "hash-prospector")
MULTIPLIER_2 = 0x846CA68B
MAX_ELEMENTS = 2**32  # element indices are uint32
# Absorbed into a sketch's key, so that a refresh's sketch and the stochastic rounding of the
# same (seed, step, tensor id) draw unrelated streams (docs/spec.md section 2.6).
SKETCH_DOMAIN = 0x736B6574


def lowbias32(x: jax.Array) -> jax.Array:
  """The 32-bit integer hash ``lowbias32``, a bijection of uint32 (docs/spec.md section 6).

  Args:
    x: uint32 array.

  Returns:
    uint32 array of the same shape.

  Example:
    >>> import jax.numpy as jnp
    >>> from qgalore_jax._src.generator import lowbias32
    >>> [hex(h) for h in lowbias32(jnp.array([1, 0xDEADBEEF], jnp.uint32)).tolist()]
    ['0x688990c0', '0xe628c683']

  References:
    C. Wellons, `Prospecting for hash functions
    <https://nullprogram.com/blog/2018/07/31/>`_, 2018.
  """
  x = jnp.asarray(x, jnp.uint32)
  x = x ^ (x >> 16)
  x = x * jnp.uint32(MULTIPLIER_1)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(MULTIPLIER_2)
  return x ^ (x >> 16)


def _as_uint32(value, name: str) -> jax.Array:
  """A Python or array integer as uint32, modulo 2**32."""
  if isinstance(value, bool):
    raise TypeError(f"`{name}` must be an integer, got bool {value!r}")
  if isinstance(value, (int, np.integer)):
    return jnp.uint32(int(value) % 2**32)
  dtype = getattr(value, "dtype", None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.integer) or jnp.ndim(value) != 0:
    raise TypeError(
      f"`{name}` must be an integer scalar (Python int or integer array), got {value!r}"
    )
  return jnp.asarray(value).astype(jnp.uint32)


def stream_key(seed, step, tensor_id) -> jax.Array:
  """The uint32 key of one tensor's uniforms at one step (docs/spec.md section 6).

  Args:
    seed: integer (Python or traced), taken modulo 2**32.
    step: integer (Python or traced), taken modulo 2**32: the 0-based update count.
    tensor_id: integer (Python or traced), taken modulo 2**32.

  Returns:
    uint32 scalar ``lowbias32(lowbias32(lowbias32(seed ^ GOLDEN) ^ step) ^ tensor_id)``.

  Example:
    >>> from qgalore_jax._src.generator import stream_key
    >>> hex(int(stream_key(1234, 5678, 7)))
    '0x76df4541'
  """
  key = lowbias32(_as_uint32(seed, "seed") ^ jnp.uint32(GOLDEN))
  key = lowbias32(key ^ _as_uint32(step, "step"))
  return lowbias32(key ^ _as_uint32(tensor_id, "tensor_id"))


def uniforms(seed, step, tensor_id, shape: tuple[int, ...]) -> jax.Array:
  r"""Counter-based uniforms in [0, 1), one per element of a tensor (docs/spec.md section 6).

  .. math::

    h_i = \text{lowbias32}(\text{lowbias32}(i \oplus k) + k), \qquad u_i = \lfloor h_i / 2^8
    \rfloor \cdot 2^{-24}

  with ``k`` = :func:`stream_key` and ``i`` the row-major element index. Each ``u_i`` is a
  float32 multiple of ``2**-24``, computed without rounding, so the torch twin gives the same
  bits on any device; an element's value does not depend on the shape or the sharding.

  Args:
    seed: integer (Python or traced).
    step: integer (Python or traced).
    tensor_id: integer (Python or traced).
    shape: static shape; at most ``2**32`` elements.

  Returns:
    float32 array of ``shape``.

  Example:
    >>> from qgalore_jax import uniforms
    >>> u = uniforms(0, 0, 0, (2, 3))
    >>> u.shape, u.dtype, bool(((0 <= u) & (u < 1)).all())
    ((2, 3), dtype('float32'), True)

  References:
    Zhang et al., `Q-GaLore <https://arxiv.org/abs/2407.08296>`_, 2024.
  """
  size = int(np.prod(shape, dtype=np.int64))
  if size > MAX_ELEMENTS:
    raise ValueError(f"uniforms are indexed by uint32: at most 2**32 elements, got {size}")
  hashed = _hashes(stream_key(seed, step, tensor_id), size)
  return ((hashed >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)).reshape(shape)


def _hashes(key: jax.Array, size: int) -> jax.Array:
  """``h_i = lowbias32(lowbias32(i ^ key) + key)`` for ``i = 0 .. size - 1``."""
  index = jnp.arange(size, dtype=jnp.uint32)
  return lowbias32(lowbias32(index ^ key) + key)


def sketch_key(seed, step, tensor_id, slice_index) -> jax.Array:
  """The uint32 key of one matrix's sketch on one refresh (docs/spec.md section 2.6).

  Args:
    seed: integer (Python or traced), taken modulo 2**32.
    step: integer (Python or traced): the matrix's 0-based step of the refresh.
    tensor_id: integer (Python or traced): the leaf's index among the params' leaves.
    slice_index: integer (Python or traced): the matrix's row-major index in its stack
      (0 for a 2-D leaf).

  Returns:
    uint32 scalar ``lowbias32(lowbias32(stream_key ^ SKETCH_DOMAIN) ^ slice_index)``.

  Example:
    >>> from qgalore_jax._src.generator import sketch_key
    >>> hex(int(sketch_key(0, 0, 0, 0)))
    '0x2e2262a7'
  """
  key = lowbias32(stream_key(seed, step, tensor_id) ^ jnp.uint32(SKETCH_DOMAIN))
  return lowbias32(key ^ _as_uint32(slice_index, "slice_index"))


def sketch(seed, step, tensor_id, slice_index, shape: tuple[int, int]) -> jax.Array:
  r"""A Rademacher sketch: +1 or -1 per element, from the counter-based hash (section 2.6).

  .. math::

    \Omega_i = 1 - 2 \lfloor h_i / 2^{31} \rfloor

  with ``h_i`` the hash of :func:`uniforms` under :func:`sketch_key` and ``i`` the
  row-major element index: +1 where the top bit of ``h_i`` is 0, else -1. Exact in float32,
  so the torch twin gives the same values on any device.

  Args:
    seed: integer (Python or traced).
    step: integer (Python or traced).
    tensor_id: integer (Python or traced).
    slice_index: integer (Python or traced).
    shape: static shape, ``(k, l)`` for a refresh.

  Returns:
    float32 array of ``shape`` holding +1.0 and -1.0.

  Example:
    >>> from qgalore_jax._src.generator import sketch
    >>> sketch(0, 0, 0, 0, (2, 4)).tolist()
    [[1.0, -1.0, 1.0, -1.0], [1.0, -1.0, 1.0, 1.0]]
  """
  size = int(np.prod(shape, dtype=np.int64))
  if size > MAX_ELEMENTS:
    raise ValueError(f"a sketch is indexed by uint32: at most 2**32 elements, got {size}")
  hashed = _hashes(sketch_key(seed, step, tensor_id, slice_index), size)
  return (1.0 - 2.0 * (hashed >> 31).astype(jnp.float32)).reshape(shape)

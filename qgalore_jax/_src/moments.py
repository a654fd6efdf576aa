"""Adam moments in float32 or in 8 bits, block-wise (docs/spec.md section 8).

With ``moment_bits=8`` a moment that is 2-D and has at least ``min_8bit_size`` elements
(default :data:`MIN_QUANTIZED_SIZE`; decided from its global shape, never a shard's) is
stored as one uint8 code per element plus one float32 absmax per 16 x 16 tile. A code
indexes a 256-value map: the dynamic (tree) map of Dettmers et al. (arXiv 2110.02861),
signed for the first moment and unsigned for the second. Every other moment stays float32.

Tiles rather than runs of 256 consecutive elements: transposing a matrix maps tiles onto
tiles, so a Flax kernel (in, out) and a torch weight (out, in) holding the same values get
the same codes, and a shard whose sides are multiples of 16 holds whole tiles.

Each step dequantises, runs Adam in float32 (:func:`adam_step`), takes the direction from
those float32 moments and requantises them for storage.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qgalore_jax._src import sharding
from qgalore_jax._src import trees
from qgalore_jax._src.checks import check_int
from qgalore_jax._src.checks import check_number
from qgalore_jax._src.quantization import exact_divide

TILE = 16  # blocks are TILE x TILE tiles: 256 elements, bitsandbytes' block size
MIN_QUANTIZED_SIZE = 4096  # smaller moments stay float32 (bitsandbytes' min_8bit_size)
MOMENT_BITS = (None, 8)
TINY = float(np.finfo(np.float32).tiny)  # 2**-126: smaller magnitudes count as zero


def _dynamic_map(signed: bool) -> np.ndarray:
  """The 256 sorted float32 values of the dynamic map (docs/spec.md section 8.3 gives the rule).

  ``{0, 1}`` and, for each decade ``e = 0..6``, the midpoints of ``n`` equal steps of
  ``[0.1, 1] * 10**-e`` with ``n = 2**(6 - e)`` (signed: both signs) or ``2**(7 - e)``
  (unsigned). Computed in Python float64, rounded once to float32.
  """
  values = [0.0, 1.0]
  for e in range(7):
    n = 2 ** ((6 if signed else 7) - e)
    for j in range(n):
      v = 10.0**-e * (0.1 + 0.9 * (j + 0.5) / n)
      values += [v, -v] if signed else [v]
  table = np.array(sorted(values), np.float64).astype(np.float32)
  assert table.size == 256 and np.all(np.diff(table) > 0)
  return table


def _thresholds(table: np.ndarray) -> np.ndarray:
  """Float32 midpoints of neighbouring map values (computed in float64), +inf appended."""
  wide = table.astype(np.float64)
  mids = ((wide[:-1] + wide[1:]) / 2).astype(np.float32)
  return np.append(mids, np.float32(np.inf))


SIGNED_MAP = _dynamic_map(signed=True)
UNSIGNED_MAP = _dynamic_map(signed=False)
_SIGNED_THRESHOLDS = _thresholds(SIGNED_MAP)
_UNSIGNED_THRESHOLDS = _thresholds(UNSIGNED_MAP)
SIGNED_ZERO_CODE = int(np.flatnonzero(SIGNED_MAP == 0)[0])  # 127


class QuantizedMoment(NamedTuple):
  """8-bit moments, as a pair of trees shaped like the moments they store.

  Where a moment is quantised, ``codes`` holds its uint8 codes (the moment's shape) and
  ``absmax`` its float32 tile maxima ``[ceil(a / 16), ceil(b / 16)]``. Where a moment is
  too small or not 2-D, ``codes`` holds the float32 moment itself and ``absmax`` is
  ``optax.MaskedNode()``: no array (orbax cannot save empty ones).
  """

  codes: jax.Array
  absmax: jax.Array


def is_quantized_shape(shape: tuple[int, ...], min_size: int = MIN_QUANTIZED_SIZE) -> bool:
  """Whether a moment of this (global) shape is stored in 8 bits: 2-D, ``min_size`` or more."""
  return len(shape) == 2 and math.prod(shape) >= min_size


def _tiled(x: jax.Array) -> jax.Array:
  """``x`` [a, b] as [A, 16, B, 16] tiles, zero-padded (zeros change no absmax)."""
  a, b = x.shape
  pad_a, pad_b = -a % TILE, -b % TILE
  if pad_a or pad_b:
    x = jnp.pad(x, ((0, pad_a), (0, pad_b)))
  return x.reshape((a + pad_a) // TILE, TILE, (b + pad_b) // TILE, TILE)


def _per_element(absmax: jax.Array, shape: tuple[int, int]) -> jax.Array:
  """Each tile's value broadcast to its elements, cropped to ``shape``."""
  wide = jnp.repeat(jnp.repeat(absmax, TILE, axis=0), TILE, axis=1)
  return wide[: shape[0], : shape[1]]


def _flush(x: jax.Array) -> jax.Array:
  """``x`` with subnormals (``|x| < 2**-126``) set to zero.

  XLA's CPU code flushes them anyway; written out, every device computes the same codes.
  """
  return jnp.where(jnp.abs(x) < TINY, 0.0, x)


# _encode finds a code with two gathers instead of a binary search's eight. The float32
# bit pattern of |y|, shifted right by _SHIFT, names a bucket of 2**_SHIFT consecutive
# floats: 1/256 of a binade, narrower than any gap between two thresholds (checked
# below), so a bucket holds at most one threshold and the code of every y in it is the
# code of its lowest value, plus one if y lies above that threshold. Magnitudes under
# 2**-24 (below every nonzero threshold) share one bucket; |y| <= 1 bounds the other end.
_SHIFT = 15
_BUCKET_LO = int(np.float32(2.0**-24).view(np.int32)) >> _SHIFT
_ONE_BITS = int(np.float32(1.0).view(np.int32))
_BUCKET_HI = _ONE_BITS >> _SHIFT
_BUCKETS = _BUCKET_HI - _BUCKET_LO + 1


def _bucket_codes(thresholds: np.ndarray) -> np.ndarray:
  """int32 [2 * _BUCKETS]: the code of each bucket's lowest value, y >= 0 then y < 0."""
  b = np.arange(_BUCKET_LO, _BUCKET_HI + 1, dtype=np.int64)
  top = np.minimum(((b + 1) << _SHIFT) - 1, _ONE_BITS)
  bottom = np.where(b == _BUCKET_LO, 0, b << _SHIFT)
  as_float = lambda bits: bits.astype(np.int32).view(np.float32)
  rows = []
  for low, high in ((as_float(bottom), as_float(top)), (-as_float(top), -as_float(bottom))):
    first = np.searchsorted(thresholds, low, side="left")  # thresholds strictly below
    assert np.all(np.searchsorted(thresholds, high, side="left") - first <= 1)
    rows.append(first)
  return np.concatenate(rows).astype(np.int32)


def _encode(y: jax.Array, thresholds: np.ndarray, bucket_codes: np.ndarray) -> jax.Array:
  """Number of thresholds strictly below ``y`` (``|y| <= 1``; 0 for NaN), by bucket."""
  bits = jax.lax.bitcast_convert_type(y, jnp.int32)
  bucket = jnp.clip((bits & 0x7FFFFFFF) >> _SHIFT, _BUCKET_LO, _BUCKET_HI) - _BUCKET_LO
  first = jnp.asarray(bucket_codes)[jnp.where(bits < 0, bucket + _BUCKETS, bucket)]
  code = first + (jnp.asarray(thresholds)[first] < y)
  return jnp.where(jnp.isnan(y), 0, code)


_SIGNED_BUCKET_CODES = _bucket_codes(_SIGNED_THRESHOLDS)
_UNSIGNED_BUCKET_CODES = _bucket_codes(_UNSIGNED_THRESHOLDS)


def quantize_moment(x: jax.Array, signed: bool) -> QuantizedMoment:
  """8-bit block-wise codes of a 2-D moment.

  Per 16 x 16 tile, ``a = max |x|``; each element gets the code of the map value nearest to
  ``x / a`` (an exact float32 division; 0 where ``a`` is 0), ties to the smaller value.
  With the unsigned map a positive value never gets the zero code (it gets code 1), so a
  stored second moment never decodes to 0 where it is not: ``1 / sqrt(v)`` stays bounded.
  Subnormal ``x``, ``x / a`` and decoded values count as zero; a NaN gets code 0 (and its
  tile's absmax is NaN).

  Args:
    x: float32 [a, b] moment.
    signed: the signed map (first moment) or the unsigned one (second moment, ``x >= 0``).

  Returns:
    A :class:`QuantizedMoment` of arrays.

  Example:
    >>> import jax.numpy as jnp
    >>> from qgalore_jax import quantize_moment, dequantize_moment
    >>> x = jnp.linspace(-1.0, 2.0, 4096, dtype=jnp.float32).reshape(64, 64)
    >>> q = quantize_moment(x, signed=True)
    >>> q.codes.dtype, q.codes.shape, q.absmax.shape
    (dtype('uint8'), (64, 64), (4, 4))
    >>> # error <= absmax (2) * half the widest step of the map (0.0141 / 2)
    >>> bool(jnp.max(jnp.abs(dequantize_moment(q, signed=True) - x)) <= 2 * 0.0141 / 2)
    True
  """
  if x.ndim != 2:
    raise ValueError(f"8-bit moments are 2-D, got shape {x.shape}")
  x = _flush(x.astype(jnp.float32))
  absmax = jnp.max(jnp.abs(_tiled(x)), axis=(1, 3))
  divisor = _per_element(jnp.where(absmax == 0, 1.0, absmax), x.shape)
  y = _flush(exact_divide(x, divisor))
  if signed:
    code = _encode(y, _SIGNED_THRESHOLDS, _SIGNED_BUCKET_CODES)
  else:
    code = _encode(y, _UNSIGNED_THRESHOLDS, _UNSIGNED_BUCKET_CODES)
    code = jnp.where((code == 0) & (y > 0), 1, code)
  return QuantizedMoment(code.astype(jnp.uint8), absmax)


def dequantize_moment(q: QuantizedMoment, signed: bool) -> jax.Array:
  """Float32 ``map[code] * absmax`` of each element (inverse of :func:`quantize_moment`)."""
  table = jnp.asarray(SIGNED_MAP if signed else UNSIGNED_MAP)
  return _flush(table[q.codes.astype(jnp.int32)] * _per_element(q.absmax, q.codes.shape))


def init_moment(
  shape: tuple[int, ...],
  signed: bool,
  moment_bits: int | None,
  dtype=None,
  min_size: int = MIN_QUANTIZED_SIZE,
):
  """Zero moment of ``shape``: float (``dtype``, default float32) or a quantised pair.

  With ``moment_bits=8`` returns a :class:`QuantizedMoment` (for a moment kept in float32,
  i.e. not :func:`is_quantized_shape` with ``min_size``, its float32 zeros and no absmax);
  otherwise a float array.
  """
  if moment_bits is None:
    return jnp.zeros(shape, dtype or jnp.float32)
  if not is_quantized_shape(shape, min_size):
    return QuantizedMoment(jnp.zeros(shape, jnp.float32), optax.MaskedNode())
  tiles = (-(-shape[0] // TILE), -(-shape[1] // TILE))
  zero_code = SIGNED_ZERO_CODE if signed else 0
  return QuantizedMoment(jnp.full(shape, zero_code, jnp.uint8), jnp.zeros(tiles, jnp.float32))


def moment_spec(stored, spec: jax.sharding.PartitionSpec, mesh):
  """The partition specs of a stored moment (:func:`init_moment`'s form) whose float or
  code array is sharded as ``spec`` (docs/spec.md section 9): the tile maxima along the
  tile grid where it splits evenly (:func:`~qgalore_jax._src.sharding.tile_spec`)."""
  if not isinstance(stored, QuantizedMoment):
    return spec
  if isinstance(stored.absmax, optax.MaskedNode):
    return QuantizedMoment(spec, optax.MaskedNode())
  return QuantizedMoment(spec, sharding.tile_spec(spec, stored.absmax.shape, mesh))


def load_moment(stored, signed: bool, moment_bits: int | None) -> jax.Array:
  """The float32 moment held by ``stored`` (a float array or a :class:`QuantizedMoment`)."""
  if moment_bits is None:
    return stored.astype(jnp.float32)
  if stored.codes.dtype != jnp.uint8:
    return stored.codes
  return dequantize_moment(stored, signed)


def store_moment(
  x: jax.Array,
  signed: bool,
  moment_bits: int | None,
  dtype=None,
  min_size: int = MIN_QUANTIZED_SIZE,
):
  """Inverse of :func:`load_moment`: what the state holds for the float32 moment ``x``."""
  if moment_bits is None:
    return x.astype(dtype or jnp.float32)
  if not is_quantized_shape(x.shape, min_size):
    return QuantizedMoment(x, optax.MaskedNode())
  return quantize_moment(x, signed)


def adam_step(g, mu, nu, count_inc, b1, b2, eps):
  """One Adam step in float32 (docs/spec.md section 5; optax ``scale_by_adam``, eps_root 0).

  Args:
    g: float32 gradient (the low-rank ``R`` of a projected matrix).
    mu: float32 first moment ``m_{t-1}``.
    nu: float32 second moment ``v_{t-1}``.
    count_inc: int32 1-based step ``t`` of the new moments.
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to the root of the second moment.

  Returns:
    ``(u, mu, nu)``: the float32 direction and the new moments.
  """
  mu = (1 - b1) * g + b1 * mu
  nu = (1 - b2) * (g * g) + b2 * nu
  # Bias correction as a multiply by the reciprocal: XLA rewrites the division into exactly
  # this in some programs and not in others, so it is written so; the torch twin matches it
  # bit for bit, and a leaf's update does not depend on what else the program computes.
  mu_hat = mu * (1 / (1 - b1**count_inc)).astype(mu.dtype)
  nu_hat = nu * (1 / (1 - b2**count_inc)).astype(nu.dtype)
  return mu_hat / (jnp.sqrt(nu_hat) + eps), mu, nu


def check_moment_bits(moment_bits, mu_dtype=None) -> None:
  """Raises unless ``moment_bits`` is None or 8 (and, if 8, ``mu_dtype`` is None)."""
  if moment_bits not in MOMENT_BITS or isinstance(moment_bits, bool):
    raise ValueError(f"`moment_bits` must be None (float32 moments) or 8, got {moment_bits!r}")
  if moment_bits is not None and mu_dtype is not None:
    raise ValueError("`mu_dtype` and `moment_bits` both set the moments' storage; pass one")


def moment_cls(moment_bits):
  """How a tree of moments is stored: arrays (``None``) or :class:`QuantizedMoment` of trees."""
  return None if moment_bits is None else QuantizedMoment


class ScaleByAdam8bitState(NamedTuple):
  """State of :func:`scale_by_adam_8bit`: arrays only."""

  count: jax.Array  # int32 []
  mu: QuantizedMoment  # of trees shaped like the params
  nu: QuantizedMoment


def scale_by_adam(
  b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, mu_dtype=None
) -> optax.GradientTransformation:
  """``optax.scale_by_adam`` (eps_root 0) whose bias corrections multiply by reciprocals.

  Same state (``optax.ScaleByAdamState``) and arithmetic, in the moments' own dtypes, as
  ``optax.scale_by_adam``, except that ``m / (1 - b^t)`` is computed as
  ``m * (1 / (1 - b^t))``: XLA makes that rewrite in some programs and not in others, so
  written out a leaf's update is the same bits whatever else the program computes (as in a
  layer-wise step), and the torch twin's. The float-moment Adam of
  :func:`~qgalore_jax.qgalore_adamw`'s non-projected leaves.
  """

  def init_fn(params):
    dtype = lambda p: jnp.result_type(p) if mu_dtype is None else mu_dtype
    return optax.ScaleByAdamState(
      count=jnp.zeros([], jnp.int32),
      # zeros_like: placed as the param, on a mesh of Explicit axes too (as optax's).
      mu=jax.tree.map(lambda p: jnp.zeros_like(p, dtype(p)), params),
      nu=jax.tree.map(lambda p: jnp.zeros_like(p, jnp.result_type(p)), params),
    )

  def update_fn(updates, state, params=None):
    del params
    count_inc = optax.safe_increment(state.count)
    out = jax.tree.map(
      lambda g, mu, nu: adam_step(g, mu, nu, count_inc, b1, b2, eps), updates, state.mu, state.nu
    )
    is_out = lambda x: isinstance(x, tuple) and not isinstance(x, optax.MaskedNode)
    pick = lambda k: jax.tree.map(lambda o: o[k], out, is_leaf=is_out)
    mu = jax.tree.map(lambda m, old: m.astype(old.dtype), pick(1), state.mu)
    return pick(0), optax.ScaleByAdamState(count=count_inc, mu=mu, nu=pick(2))

  return optax.GradientTransformation(init_fn, update_fn)


CHUNK_ELEMENTS = 2**22  # an 8-bit moment larger than this is updated in chunks of rows


def _in_row_chunks(step, g, mu, nu):
  """``step(g, mu, nu)`` on a large 8-bit leaf one chunk of whole tile rows at a time.

  Tiles are independent, so the codes are those of one call on the whole leaf; the float32
  temporaries (dequantised moments, their new values, the direction) then take one chunk's
  memory instead of four or five copies of the leaf (for a 7B model's embedding, 0.5 GB
  each).
  """
  if mu.codes.dtype != jnp.uint8 or g.size <= CHUNK_ELEMENTS or g.shape[0] % TILE:
    return step(g, mu, nu)
  rows, cols = g.shape
  tile_rows = rows // TILE
  per_chunk = max(
    (
      d for d in range(1, tile_rows + 1) if tile_rows % d == 0 and d * TILE * cols <= CHUNK_ELEMENTS
    ),
    default=1,
  )
  chunks = tile_rows // per_chunk
  split = lambda a, r: a.reshape(chunks, r // chunks, *a.shape[1:])
  parts = (
    split(g, rows),
    QuantizedMoment(split(mu.codes, rows), split(mu.absmax, tile_rows)),
    QuantizedMoment(split(nu.codes, rows), split(nu.absmax, tile_rows)),
  )

  # Each chunk's direction and moments overwrite its gradient and old moments (of the same
  # dtypes) in the loop's carry: updated in place, where a map would write new arrays
  # (0.5 GB more per leaf of a 7B model's embedding size, live from wherever XLA places
  # their allocation).
  def body(c, carry):
    out = step(*jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, c, keepdims=False), carry))
    put = lambda a, v: jax.lax.dynamic_update_index_in_dim(a, v.astype(a.dtype), c, 0)
    return jax.tree.map(put, carry, out)

  out = jax.lax.fori_loop(0, chunks, body, parts)
  return jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), out)


def scale_by_adam_8bit(
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  *,
  min_8bit_size: int = MIN_QUANTIZED_SIZE,
) -> optax.GradientTransformation:
  """``optax.scale_by_adam`` (eps_root 0) with 8-bit block-wise moments.

  Moments of 2-D leaves with at least ``min_8bit_size`` elements are stored as uint8 codes plus a
  float32 absmax per 16 x 16 tile (about 1.016 bytes per element instead of 4); other
  leaves keep float32 moments. The arithmetic is float32: each step dequantises, updates
  the moments as ``optax.scale_by_adam``, takes the direction from them and requantises.
  The format is written out in ``docs/spec.md`` section 8; ``qgalore_torch`` implements it bit
  for bit.

  Args:
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to the root of the second moment.
    min_8bit_size: 2-D moments with fewer elements stay float32 (bitsandbytes' name and
      default).

  Returns:
    An ``optax.GradientTransformation`` whose updates have each gradient's dtype.

  Example:
    >>> import jax.numpy as jnp
    >>> from qgalore_jax import scale_by_adam_8bit
    >>> params = {"w": jnp.ones((64, 128)), "b": jnp.zeros(128)}
    >>> state = scale_by_adam_8bit().init(params)
    >>> state.mu.codes["w"].dtype, state.mu.absmax["w"].shape, state.mu.codes["b"].dtype
    (dtype('uint8'), (4, 8), dtype('float32'))

  References:
    Dettmers et al., `8-bit Optimizers via Block-wise Quantization
    <https://arxiv.org/abs/2110.02861>`_, 2022.
  """
  check_number(b1, "b1", 0.0, 1.0, high_open=True)
  check_number(b2, "b2", 0.0, 1.0, high_open=True)
  check_number(eps, "eps", 0.0)
  check_int(min_8bit_size, "min_8bit_size")

  def init_fn(params):
    leaves, treedef = jax.tree.flatten(params)
    mu = [init_moment(jnp.shape(p), True, 8, min_size=min_8bit_size) for p in leaves]
    nu = [init_moment(jnp.shape(p), False, 8, min_size=min_8bit_size) for p in leaves]
    mesh = sharding.explicit_mesh(params)
    if mesh is not None:  # each moment sharded as its param (docs/spec.md section 9)
      param_spec = lambda p: jax.sharding.PartitionSpec(*sharding.spec_entries(p))
      spec = lambda m, p: moment_spec(m, param_spec(p), mesh)
      mu = [sharding.place(m, spec(m, p), mesh) for m, p in zip(mu, leaves)]
      nu = [sharding.place(n, spec(n, p), mesh) for n, p in zip(nu, leaves)]
    return ScaleByAdam8bitState(
      count=jnp.zeros([], jnp.int32),
      mu=trees.pack(treedef, mu, QuantizedMoment),
      nu=trees.pack(treedef, nu, QuantizedMoment),
    )

  def update_fn(updates, state, params, hp):
    del params
    leaves, treedef = jax.tree.flatten(updates)
    count_inc = optax.safe_increment(state.count)
    out = []

    def step(g, mu, nu):
      u, mu, nu = adam_step(
        g.astype(jnp.float32),
        load_moment(mu, True, 8),
        load_moment(nu, False, 8),
        count_inc,
        hp["b1"],
        hp["b2"],
        hp["eps"],
      )
      mu = store_moment(mu, True, 8, min_size=min_8bit_size)
      nu = store_moment(nu, False, 8, min_size=min_8bit_size)
      return u.astype(g.dtype), mu, nu

    for g, mu, nu in zip(
      leaves,
      trees.unpack(treedef, state.mu, QuantizedMoment),
      trees.unpack(treedef, state.nu, QuantizedMoment),
      strict=True,
    ):
      out.append(_in_row_chunks(step, g, mu, nu))
    return treedef.unflatten([o[0] for o in out]), ScaleByAdam8bitState(
      count=count_inc,
      mu=trees.pack(treedef, [o[1] for o in out], QuantizedMoment),
      nu=trees.pack(treedef, [o[2] for o in out], QuantizedMoment),
    )

  hyperparams = dict(b1=b1, b2=b2, eps=eps)  # arguments of the update: see scale_by_qgalore
  return optax.GradientTransformation(init_fn, sharding.explicit_update(update_fn, hyperparams))


def adamw_8bit(
  learning_rate: optax.ScalarOrSchedule,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  weight_decay: float = 1e-4,
  mask=None,
  *,
  min_8bit_size: int = MIN_QUANTIZED_SIZE,
) -> optax.GradientTransformation:
  """``optax.adamw`` with 8-bit block-wise moments (:func:`scale_by_adam_8bit`).

  Args:
    learning_rate: a float or an optax schedule.
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to the root of the second moment.
    weight_decay: decoupled weight decay (``optax.adamw``'s default 1e-4).
    mask: which leaves get weight decay, as ``optax.adamw``'s ``mask``.
    min_8bit_size: see :func:`scale_by_adam_8bit`.

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from qgalore_jax import adamw_8bit
    >>> params = {"w": jnp.ones((64, 64))}
    >>> tx = adamw_8bit(1e-3)
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.ones((64, 64))}, state, params)
    >>> round(float(updates["w"][0, 0]), 6)
    -0.001
  """
  if not callable(learning_rate):
    check_number(learning_rate, "learning_rate")
  check_number(weight_decay, "weight_decay", 0.0)
  return optax.chain(
    scale_by_adam_8bit(b1, b2, eps, min_8bit_size=min_8bit_size),
    optax.add_decayed_weights(weight_decay, mask),
    optax.scale_by_learning_rate(learning_rate),
  )

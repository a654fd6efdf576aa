"""8-bit block-wise Adam moments (docs/spec.md section 8).

With ``moment_bits=8``, :class:`~qgalore_torch.QGaLoreAdamW` stores a moment that is 2-D and
has at least ``min_8bit_size`` (default :data:`MIN_QUANTIZED_SIZE`) elements as one uint8
code per element plus one float32 absmax per 16 x 16 tile. A code indexes a 256-value map:
the dynamic (tree) map of Dettmers et al. (arXiv 2110.02861), signed for the first moment
and unsigned for the second. Every other moment stays float32.

Per tile, with ``a = max |x|`` over the tile::

  y = x / a                       # IEEE float32 division; y = 0 where a == 0
  code = #{k : T[k] < y}          # T[k] = float32 midpoint of map[k], map[k + 1]
  code = 1 if unsigned and code == 0 and y > 0
  x_hat = map[code] * a

so each element gets the nearest map value, a tie going to the smaller one (a tie judged in
float32: a ``y`` equal to ``T[k]`` gets code ``k``), and a positive second moment never
decodes to zero. Subnormal numbers (magnitude below ``2**-126``) count
as zero wherever they occur: in ``x``, in ``y`` and in ``x_hat``. That is what XLA computes
on a CPU, which flushes subnormal inputs and results of float32 operations to zero; written
out here, it makes torch agree with it on every device.

Tiles rather than runs of 256 consecutive elements: transposing a matrix maps tiles onto
tiles, so a torch weight (out, in) and a Flax kernel (in, out) holding the same values get
the same codes. This is the twin of ``qgalore_jax._src.moments``: the same input gives the
same codes and absmax, bit for bit.

The maps and thresholds are copied to a device once per process (:func:`_tables`); after
that, quantising and dequantising never synchronise with the host.
"""

import functools
import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

TILE = 16  # blocks are TILE x TILE tiles: 256 elements, bitsandbytes' block size
MIN_QUANTIZED_SIZE = 4096  # smaller moments stay float32 (bitsandbytes' min_8bit_size)
STATE_KEYS = ("exp_avg", "exp_avg_sq")  # optimizer state keys of the two moments
TINY = float(np.finfo(np.float32).tiny)  # 2**-126: smaller magnitudes count as zero


def _map_values(signed: bool) -> np.ndarray:
  """The 256 sorted float32 values of the dynamic map, from the documented formula.

  ``{0, 1}`` and, for each decade ``e = 0..6``, ``D(e, n, j) = 10**-e * (0.1 + 0.9 *
  (j + 0.5) / n)`` for ``j = 0..n-1`` with ``n = 2**(6 - e)`` (signed: both signs, 127
  magnitudes each) or ``n = 2**(7 - e)`` (unsigned: 254 values). Each value is computed in
  Python float64, left to right, and rounded once to float32.
  """
  top = 6 if signed else 7
  values = [0.0, 1.0]
  for e in range(7):
    n = 2 ** (top - e)
    for j in range(n):
      d = 10.0**-e * (0.1 + 0.9 * (j + 0.5) / n)
      values += [d, -d] if signed else [d]
  table = np.array(sorted(values), dtype=np.float64).astype(np.float32)
  if table.size != 256 or not np.all(table[1:] > table[:-1]):
    raise AssertionError("the dynamic map must hold 256 distinct float32 values")
  return table


def _midpoints(table: np.ndarray) -> np.ndarray:
  """The 255 thresholds ``float32((float64(map[k]) + float64(map[k + 1])) / 2)``."""
  wide = table.astype(np.float64)
  return ((wide[1:] + wide[:-1]) / 2).astype(np.float32)


SIGNED_MAP = _map_values(signed=True)  # float32 [256]: first moment; zero is code 127
UNSIGNED_MAP = _map_values(signed=False)  # float32 [256]: second moment; zero is code 0
SIGNED_THRESHOLDS = _midpoints(SIGNED_MAP)  # float32 [255]
UNSIGNED_THRESHOLDS = _midpoints(UNSIGNED_MAP)  # float32 [255]
SIGNED_ZERO_CODE = int(np.flatnonzero(SIGNED_MAP == 0)[0])
UNSIGNED_ZERO_CODE = 0


class QuantizedMoment(NamedTuple):
  """A 2-D moment stored in 8 bits, block-wise (the twin of ``qgalore_jax.QuantizedMoment``).

  ``codes`` has the moment's shape [a, b]; ``absmax`` holds one value per 16 x 16 tile,
  [ceil(a / 16), ceil(b / 16)], the last row and column of tiles possibly partial. Which
  map the codes index (signed or unsigned) is not stored: the code that made them knows.
  """

  codes: torch.Tensor  # uint8 [a, b]
  absmax: torch.Tensor  # float32 [ceil(a / 16), ceil(b / 16)]


def is_quantized_shape(shape, min_size: int = MIN_QUANTIZED_SIZE) -> bool:
  """Whether a moment of this shape is stored in 8 bits: 2-D, ``min_size`` elements or more."""
  return len(shape) == 2 and math.prod(shape) >= min_size


def tile_shape(shape) -> tuple[int, int]:
  """Shape ``[ceil(a / 16), ceil(b / 16)]`` of the absmax of an [a, b] moment."""
  return -(-shape[0] // TILE), -(-shape[1] // TILE)


@functools.cache
def _tables(device: torch.device, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
  """``(map, thresholds)`` as float32 tensors on ``device``, copied there once."""
  if signed:
    return torch.from_numpy(SIGNED_MAP).to(device), torch.from_numpy(SIGNED_THRESHOLDS).to(device)
  return torch.from_numpy(UNSIGNED_MAP).to(device), torch.from_numpy(UNSIGNED_THRESHOLDS).to(device)


def _device_key(device: torch.device) -> torch.device:
  """``device`` with its index filled in (``cuda`` and ``cuda:0`` share one cache entry)."""
  if device.type == "cuda" and device.index is None:
    return torch.device("cuda", torch.cuda.current_device())
  return device


def _tiled(x: torch.Tensor) -> torch.Tensor:
  """``x`` [a, b] as [A, 16, B, 16] tiles, zero-padded on the bottom and right edges.

  Zeros change no tile's absmax. Shapes that are multiples of 16 are viewed, not copied.
  """
  a, b = x.shape
  pad_a, pad_b = -a % TILE, -b % TILE
  if pad_a or pad_b:
    x = F.pad(x, (0, pad_b, 0, pad_a))
  return x.reshape((a + pad_a) // TILE, TILE, (b + pad_b) // TILE, TILE)


def _flush(x: torch.Tensor) -> torch.Tensor:
  """``x`` with subnormal values (``|x| < 2**-126``) set to zero, as XLA's CPU code does."""
  return torch.where(x.abs() < TINY, 0.0, x)


def _untiled(t: torch.Tensor, shape) -> torch.Tensor:
  """Inverse of :func:`_tiled`: [A, 16, B, 16] back to ``shape``, cropping the padding."""
  a, b = shape
  full = t.reshape(t.shape[0] * TILE, t.shape[2] * TILE)
  if full.shape == (a, b):
    return full
  return full[:a, :b].contiguous()


def quantize_moment(x: torch.Tensor, signed: bool) -> QuantizedMoment:
  """8-bit block-wise codes of a 2-D moment (docs/spec.md section 8.5).

  Per 16 x 16 tile, ``a = max |x|``; each element gets the code of the map value nearest to
  ``x / a`` (IEEE float32 division; 0 where ``a`` is 0), a tie going to the smaller value.
  With the unsigned map a positive value never gets the zero code (it gets code 1), so a
  stored second moment never decodes to 0 where it is not. Subnormal ``x`` and ``y`` count
  as zero (see the module docstring). A NaN gets code 0 (its tile's absmax is NaN, so the
  whole tile decodes to NaN), as in ``qgalore_jax``.

  Args:
    x: [a, b] moment of a float dtype (computed in float32), on any device.
    signed: the signed map (first moment) or the unsigned one (second moment, ``x >= 0``).

  Returns:
    A :class:`QuantizedMoment` on the device of ``x``.

  Example:
    >>> import torch
    >>> from qgalore_torch import quantize_moment, dequantize_moment
    >>> x = torch.linspace(-1.0, 2.0, 4096).reshape(64, 64)
    >>> q = quantize_moment(x, signed=True)
    >>> q.codes.dtype, tuple(q.codes.shape), tuple(q.absmax.shape)
    (torch.uint8, (64, 64), (4, 4))
    >>> # error <= absmax (2) * half the widest step of the map (0.0141 / 2)
    >>> bool((dequantize_moment(q, signed=True) - x).abs().max() <= 2 * 0.0141 / 2)
    True
  """
  if x.dim() != 2:
    raise ValueError(f"8-bit moments are 2-D, got shape {tuple(x.shape)}")
  x = _flush(x.detach().to(torch.float32)).contiguous()  # codes come out row-major
  tiles = _tiled(x)
  absmax = tiles.abs().amax(dim=(1, 3))
  # A tensor divisor, broadcast per tile: IEEE division on the CPU and on CUDA alike (CUDA
  # turns division by a Python scalar into a reciprocal multiply, 1 ulp away).
  divisor = torch.where(absmax == 0, torch.ones_like(absmax), absmax)
  y = _flush(_untiled(tiles / divisor[:, None, :, None], x.shape))
  # torch.bucketize counts the thresholds strictly below y (right=False); a NaN would count
  # all of them, so it is sent to -inf first, where it counts none.
  y = torch.where(torch.isnan(y), -torch.inf, y)
  _, thresholds = _tables(_device_key(x.device), signed)
  codes = torch.bucketize(y, thresholds, out_int32=True, right=False)
  if not signed:
    codes = torch.where((codes == 0) & (y > 0), 1, codes)
  return QuantizedMoment(codes.to(torch.uint8), absmax)


def dequantize_moment(q: QuantizedMoment, signed: bool) -> torch.Tensor:
  """Float32 ``map[code] * absmax`` of each element (inverse of :func:`quantize_moment`).

  A subnormal product counts as zero, as in :func:`quantize_moment`.

  Args:
    q: what :func:`quantize_moment` returned.
    signed: the map the codes were made with.

  Returns:
    float32 tensor of the shape of ``q.codes``, contiguous, on its device.
  """
  table, _ = _tables(_device_key(q.codes.device), signed)
  shape = tuple(q.codes.shape)
  values = table.index_select(0, q.codes.reshape(-1).to(torch.int32)).reshape(shape)
  return _flush(_untiled(_tiled(values) * q.absmax[:, None, :, None], shape))


def zero_moment(shape, signed: bool, device=None) -> QuantizedMoment:
  """The stored form of an all-zero [a, b] moment: the zero code everywhere, absmax 0."""
  zero_code = SIGNED_ZERO_CODE if signed else UNSIGNED_ZERO_CODE
  return QuantizedMoment(
    torch.full(tuple(shape), zero_code, dtype=torch.uint8, device=device),
    torch.zeros(tile_shape(shape), dtype=torch.float32, device=device),
  )


def init_moment(
  shape, signed: bool, moment_bits, device=None, min_size=MIN_QUANTIZED_SIZE, like=None
):
  """Zero moment of ``shape``: a :class:`QuantizedMoment` or float32 zeros.

  With ``moment_bits=8`` and a shape that :func:`is_quantized_shape` with ``min_size``, the
  stored form of zeros (:func:`zero_moment`); otherwise float32 zeros, shaped and strided
  like the tensor ``like`` when given.
  """
  if moment_bits is not None and is_quantized_shape(shape, min_size):
    return zero_moment(shape, signed, device)
  if like is not None:
    return torch.zeros_like(like, dtype=torch.float32, memory_format=torch.preserve_format)
  return torch.zeros(tuple(shape), dtype=torch.float32, device=device)


def load_moment(stored, signed: bool) -> torch.Tensor:
  """The float32 moment held by ``stored``: a float32 tensor itself, or a dequantised
  :class:`QuantizedMoment` (a new tensor)."""
  if isinstance(stored, QuantizedMoment):
    return dequantize_moment(stored, signed)
  return stored


def store_moment(x: torch.Tensor, signed: bool, moment_bits, min_size=MIN_QUANTIZED_SIZE):
  """Inverse of :func:`load_moment`: what the state holds for the float32 moment ``x``.

  A :class:`QuantizedMoment` with ``moment_bits=8`` and a shape that
  :func:`is_quantized_shape` with ``min_size``; otherwise ``x`` itself.
  """
  if moment_bits is not None and is_quantized_shape(tuple(x.shape), min_size):
    return quantize_moment(x, signed)
  return x


def moment_nbytes(q: QuantizedMoment) -> int:
  """Bytes a :class:`QuantizedMoment` stores: ``1 + 4/256`` per element for whole tiles."""
  return sum(t.numel() * t.element_size() for t in q)


def check_moment_bits(moment_bits) -> None:
  """Raises ``ValueError`` unless ``moment_bits`` is None (float32 moments) or the int 8."""
  ok = moment_bits is None or (
    isinstance(moment_bits, int) and not isinstance(moment_bits, bool) and moment_bits == 8
  )
  if not ok:
    raise ValueError(f"`moment_bits` must be None (float32 moments) or 8, got {moment_bits!r}")


def from_state(state: dict) -> tuple:
  """The two stored moments of an optimizer ``state`` dict (docs/spec.md section 8.8).

  Each is a float32 tensor, or a :class:`QuantizedMoment` of its uint8 codes and its tile
  maxima (``exp_avg_absmax``, ``exp_avg_sq_absmax``) when the state holds codes.
  """
  return tuple(
    QuantizedMoment(state[key], state[f"{key}_absmax"])
    if state[key].dtype == torch.uint8
    else state[key]
    for key in STATE_KEYS
  )


def to_state(state: dict, stored) -> None:
  """Puts the two stored moments into ``state``; a float32 one has no absmax entry."""
  for key, moment in zip(STATE_KEYS, stored, strict=True):
    if isinstance(moment, QuantizedMoment):
      state[key], state[f"{key}_absmax"] = moment
    else:
      state[key] = moment
      state.pop(f"{key}_absmax", None)

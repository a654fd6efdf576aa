"""Tests of the 8-bit block-wise moments against NumPy references written here.

The references follow docs/spec.md section 8 directly: the maps from the formula
``D(e, n, j)``, and a brute-force quantiser that, tile by tile, picks the nearest map value by
argmin of the distance (ties to the smaller value) and applies the unsigned zero rule.
Subnormal numbers count as zero in ``x``, in ``y = x / a`` and in ``x_hat`` (as XLA computes
on a CPU; see ``moments.py``).

One detail of the documented rule ``code = #{k : T[k] < y}`` is stricter than "the nearest
map value": a threshold ``T[k]`` is the float32 rounding of the exact midpoint, and for about
half of them the rounding went up, so a ``y`` equal to such a ``T[k]`` is half an ulp nearer
to ``map[k + 1]`` yet gets code ``k``. The reference treats ``y == T[k]`` as the tie it is in
float32 (code ``k``, the smaller value); :func:`test_rounded_up_thresholds_go_to_the_smaller_code`
pins this down.
"""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from qgalore_torch._src import moments

TINY = np.finfo(np.float32).tiny  # 2**-126, the smallest normal float32


def flush(x: np.ndarray) -> np.ndarray:
  """Subnormal values set to zero."""
  return np.where(np.abs(x) < TINY, np.float32(0), x).astype(np.float32)


def reference_map(signed: bool) -> np.ndarray:
  """The documented map: ``{0, 1}`` and ``+-D(e, n, j)`` (signed) or ``D(e, n, j)``."""
  values = [0.0, 1.0]
  for e in range(7):
    n = 2 ** ((6 if signed else 7) - e)
    d = [10.0**-e * (0.1 + 0.9 * (j + 0.5) / n) for j in range(n)]
    values += d + ([-v for v in d] if signed else [])
  return np.sort(np.array(values, np.float64)).astype(np.float32)


def reference_thresholds(table: np.ndarray) -> np.ndarray:
  return ((table[:-1].astype(np.float64) + table[1:].astype(np.float64)) / 2).astype(np.float32)


def brute_force_codes(y: np.ndarray, signed: bool) -> np.ndarray:
  """Code of each float32 ``y`` (already divided by its tile's absmax), element by element.

  Nearest map value by exact (float64) distance, first index on ties; ``y`` equal to a
  float32 threshold is a tie and goes to the smaller value; unsigned: a positive ``y``
  never gets code 0. NaN gets code 0.
  """
  table = reference_map(signed)
  thresholds = reference_thresholds(table)
  codes = np.zeros(y.shape, np.int64)
  for index, value in np.ndenumerate(y):
    if np.isnan(value):
      continue
    code = int(np.argmin(np.abs(table.astype(np.float64) - np.float64(value))))
    hits = np.flatnonzero(thresholds == value)
    if hits.size:
      code = int(hits[0])
    if not signed and code == 0 and value > 0:
      code = 1
    codes[index] = code
  return codes.astype(np.uint8)


def brute_force_quantize(x: np.ndarray, signed: bool):
  """Tile by tile: ``a = max |x|``, ``y = x / a`` (float32; 0 where a == 0), codes."""
  x = flush(np.asarray(x, np.float32))
  rows, cols = x.shape
  tiles = (-(-rows // 16), -(-cols // 16))
  codes = np.zeros(x.shape, np.uint8)
  absmax = np.zeros(tiles, np.float32)
  for i in range(tiles[0]):
    for j in range(tiles[1]):
      block = x[16 * i : 16 * i + 16, 16 * j : 16 * j + 16]
      a = np.abs(block).max()
      with np.errstate(invalid="ignore"):
        y = flush(block / a) if a != 0 else np.zeros_like(block)
      codes[16 * i : 16 * i + 16, 16 * j : 16 * j + 16] = brute_force_codes(y, signed)
      absmax[i, j] = a
  return codes, absmax


def brute_force_dequantize(codes, absmax, signed):
  per_element = np.repeat(np.repeat(absmax, 16, 0), 16, 1)[: codes.shape[0], : codes.shape[1]]
  return flush(reference_map(signed)[codes] * per_element)


def _on_thresholds(signed: bool) -> np.ndarray:
  """Tiles whose max is 1 (or 2, or a negative -1): every other y is exactly a threshold,
  a map value, or one float32 ulp either side of a threshold."""
  t = reference_thresholds(reference_map(signed))
  values = np.concatenate([t, reference_map(signed), np.nextafter(t, 2), np.nextafter(t, -2)])
  values = values[np.abs(values) <= 1]
  width = 16 * 16 - 1
  count = -(-values.size // width)
  values = np.concatenate([values, np.zeros(count * width - values.size, np.float32)])
  blocks = []
  for k, chunk in enumerate(values.reshape(count, width)):
    top = (1.0, 2.0, -1.0)[k % 3] if signed else (1.0, 2.0)[k % 2]
    blocks.append(np.concatenate([[top], chunk * abs(top)]).reshape(16, 16))
  return np.concatenate(blocks, axis=1).astype(np.float32)


def _inputs(signed: bool) -> dict:
  rng = np.random.default_rng(0 if signed else 1)
  sign = (lambda v: v) if signed else np.abs
  tile_of_one = np.zeros((16, 16), np.float32)
  tile_of_one[3, 5] = -2.0 if signed else 2.0
  huge_range = rng.standard_normal((48, 40)) * np.exp(rng.uniform(-80, 80, (48, 40)))
  return {
    "random 64x64": sign(rng.standard_normal((64, 64))),
    "partial tiles 37x70": sign(rng.standard_normal((37, 70))),
    "partial tiles 5x300": sign(rng.standard_normal((5, 300))),
    "one element": sign(rng.standard_normal((1, 1))),
    "one tall column 100x1": sign(rng.standard_normal((100, 1))),
    "tiny 1e-30": sign(1e-30 * rng.standard_normal((20, 33))),
    "subnormal": sign(1e-42 * rng.standard_normal((16, 20))),
    "huge 1e30": sign(1e30 * rng.standard_normal((33, 17))),
    "huge dynamic range": sign(huge_range.astype(np.float32)),
    "zeros": np.zeros((20, 35)),
    "zero tiles beside nonzero": np.pad(sign(rng.standard_normal((16, 16))), ((0, 17), (16, 3))),
    "one nonzero per tile": np.tile(tile_of_one, (2, 3)),
    "on and around thresholds": _on_thresholds(signed),
  }


CASES = [(signed, name) for signed in (True, False) for name in _inputs(signed)]


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_maps_match_documented_formula(signed):
  table = reference_map(signed)
  stored = moments.SIGNED_MAP if signed else moments.UNSIGNED_MAP
  assert stored.dtype == np.float32 and stored.shape == (256,)
  np.testing.assert_array_equal(stored, table)
  np.testing.assert_array_equal(
    moments.SIGNED_THRESHOLDS if signed else moments.UNSIGNED_THRESHOLDS,
    reference_thresholds(table),
  )
  assert np.all(np.diff(table) > 0)
  steps = np.diff(table.astype(np.float64))
  if signed:
    assert moments.SIGNED_ZERO_CODE == 127 and table[127] == 0
    assert table[0] == np.float32(-0.99296875) and table[255] == 1
    assert steps.max() == pytest.approx(0.01406, abs=1e-5)
  else:
    assert table[0] == 0 and table[1] == np.float32(3.25e-7) and table[255] == 1
    assert steps.max() == pytest.approx(0.00703, abs=1e-5)


@pytest.mark.parametrize("signed, name", CASES)
def test_quantize_matches_brute_force(signed, name):
  x = np.asarray(_inputs(signed)[name], np.float32)
  q = moments.quantize_moment(torch.from_numpy(x), signed)
  codes, absmax = brute_force_quantize(x, signed)
  assert q.codes.dtype == torch.uint8 and q.absmax.dtype == torch.float32
  np.testing.assert_array_equal(q.absmax.numpy(), absmax)
  np.testing.assert_array_equal(q.codes.numpy(), codes)
  np.testing.assert_array_equal(
    moments.dequantize_moment(q, signed).numpy(), brute_force_dequantize(codes, absmax, signed)
  )


def _tiles_under_one(values: np.ndarray) -> np.ndarray:
  """16 x 16 tiles stacked vertically, each a 1.0 followed by 255 of ``values`` (zero-filled):
  ``y`` equals the value exactly, and row-major order runs tile by tile."""
  count = -(-values.size // 255)
  body = np.zeros((count, 255), np.float32)
  body.reshape(-1)[: values.size] = values
  return np.concatenate([np.ones((count, 1), np.float32), body], axis=1).reshape(16 * count, 16)


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_rounded_up_thresholds_go_to_the_smaller_code(signed):
  """``y == T[k]`` gets code ``k`` even where float32 rounding put ``T[k]`` above the midpoint."""
  table = reference_map(signed)
  t = reference_thresholds(table)
  up = np.flatnonzero(t.astype(np.float64) > (table[:-1].astype(np.float64) + table[1:]) / 2)
  assert up.size > 50  # about half of the 255 thresholds
  x = _tiles_under_one(t[up])
  q = moments.quantize_moment(torch.from_numpy(x), signed)
  codes = q.codes.numpy().reshape(-1, 256)[:, 1:].reshape(-1)[: up.size]
  np.testing.assert_array_equal(codes, up)
  # The nearest map value in exact arithmetic is the larger one, half a float32 ulp nearer.
  above, below = table[up + 1].astype(np.float64) - t[up], t[up] - table[up].astype(np.float64)
  assert np.all(above < below)


def test_unsigned_positive_values_never_get_the_zero_code():
  x = torch.zeros(16, 16)
  x[0, 0] = 1.0
  x[1, :4] = torch.tensor([1e-7, 1e-20, 1e-37, 0.0])
  q = moments.quantize_moment(x, signed=False)
  assert q.codes[1, :4].tolist() == [1, 1, 1, 0]
  v = moments.dequantize_moment(q, signed=False)
  assert bool((v[1, :3] > 0).all()) and v[1, 3] == 0
  signed = moments.quantize_moment(x, signed=True)
  assert signed.codes[1, 1:4].tolist() == [127] * 3  # the signed map rounds them to 0


def _error_bound(y, signed):
  """Half the step between the two map values around each ``y``; below the signed map's
  smallest value (-0.99297) the distance to it; for an unsigned ``0 < y < map[1]``, which the
  zero rule sends to ``map[1]``, the whole first step."""
  table = reference_map(signed).astype(np.float64)
  k = np.clip(np.searchsorted(table, y, side="right") - 1, 0, 254)
  bound = np.where(y < table[0], table[0] - y, (table[k + 1] - table[k]) / 2)
  if not signed:
    bound = np.where((y > 0) & (y < table[1]), table[1], bound)
  return bound


@pytest.mark.parametrize("signed, name", CASES)
def test_error_within_half_a_step_per_block(signed, name):
  x = np.asarray(_inputs(signed)[name], np.float32)
  q = moments.quantize_moment(torch.from_numpy(x), signed)
  x_hat = moments.dequantize_moment(q, signed).numpy().astype(np.float64)
  rows, cols = x.shape
  for i in range(0, rows, 16):
    for j in range(0, cols, 16):
      block = x[i : i + 16, j : j + 16].astype(np.float64)
      a = np.abs(block).max()
      if a == 0:
        assert not x_hat[i : i + 16, j : j + 16].any()
        continue
      y = block / a
      slack = 4 * np.finfo(np.float32).eps * a + TINY  # subnormals count as zero
      err = np.abs(x_hat[i : i + 16, j : j + 16] - block)
      assert np.all(err <= a * _error_bound(y, signed) + slack), (i, j)


@settings(max_examples=40, deadline=None)
@given(
  rows=st.integers(1, 40),
  cols=st.integers(1, 40),
  values=st.lists(
    st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=64
  ),
  signed=st.booleans(),
)
def test_any_finite_input_matches_brute_force(rows, cols, values, signed):
  """Arbitrary float32 values (subnormals, zeros and signed zeros included), any shape."""
  x = np.resize(np.asarray(values, np.float32), (rows, cols))
  if not signed:
    x = np.abs(x)
  q = moments.quantize_moment(torch.from_numpy(x), signed)
  codes, absmax = brute_force_quantize(x, signed)
  np.testing.assert_array_equal(q.codes.numpy(), codes)
  np.testing.assert_array_equal(q.absmax.numpy(), absmax)


@pytest.mark.parametrize("shape", [(64, 64), (37, 70), (16, 5), (130, 33)])
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_codes_of_transpose_are_transposed_codes(shape, signed):
  rng = np.random.default_rng(sum(shape))
  x = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
  if not signed:
    x = x.abs()
  q = moments.quantize_moment(x, signed)
  for transposed in (x.T, x.T.contiguous()):  # a strided view and a copy
    qt = moments.quantize_moment(transposed, signed)
    assert torch.equal(qt.codes, q.codes.T) and torch.equal(qt.absmax, q.absmax.T)
    x_hat = moments.dequantize_moment(q, signed)
    assert torch.equal(moments.dequantize_moment(qt, signed), x_hat.T)


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_requantising_a_dequantised_moment_gives_the_same_codes(signed):
  """Round trip: where each tile's largest-magnitude entry is positive (it decodes to exactly
  ``absmax``: map value 1), quantising the dequantised moment reproduces codes and absmax."""
  rng = np.random.default_rng(3)
  x = np.abs(rng.standard_normal((50, 45))).astype(np.float32)
  if signed:
    x = x * np.where(rng.random(x.shape) < 0.5, -1, 1).astype(np.float32)
    for i in range(0, 50, 16):
      for j in range(0, 45, 16):
        block = x[i : i + 16, j : j + 16]
        block.flat[np.argmax(np.abs(block))] = np.abs(block).max()
  q = moments.quantize_moment(torch.from_numpy(x), signed)
  again = moments.quantize_moment(moments.dequantize_moment(q, signed), signed)
  assert torch.equal(again.codes, q.codes) and torch.equal(again.absmax, q.absmax)


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_zero_moment_is_the_quantised_zero(signed):
  zero = moments.zero_moment((40, 70), signed)
  q = moments.quantize_moment(torch.zeros(40, 70), signed)
  assert torch.equal(zero.codes, q.codes) and torch.equal(zero.absmax, q.absmax)
  assert zero.absmax.shape == (3, 5)
  assert torch.equal(moments.dequantize_moment(zero, signed), torch.zeros(40, 70))
  assert torch.equal(q.codes, torch.full((40, 70), 127 if signed else 0, dtype=torch.uint8))


def test_nan_makes_its_tile_nan_and_leaves_the_others():
  x = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
  x[3, 4] = float("nan")
  q = moments.quantize_moment(x, signed=True)
  assert torch.isnan(q.absmax[0, 0]) and torch.isfinite(q.absmax[1, 0])
  assert not q.codes[:16].any()  # NaN y gets code 0, as in qgalore_jax
  x_hat = moments.dequantize_moment(q, signed=True)
  assert torch.isnan(x_hat[:16]).all() and torch.isfinite(x_hat[16:]).all()
  assert torch.equal(q.codes[16:], moments.quantize_moment(x[16:], signed=True).codes)


def test_subnormals_count_as_zero():
  x = torch.zeros(16, 32)
  x[0, :3] = torch.tensor([1e-39, -3e-40, 2e-39])  # a tile of subnormals only
  x[:, 16:] = 1.0
  x[0, 16:18] = torch.tensor([1e-39, 1e-37])  # beside 1.0: a subnormal x, a normal x
  q = moments.quantize_moment(x, signed=False)
  assert q.absmax.tolist() == [[0.0, 1.0]]
  assert not q.codes[:, :16].any()
  assert q.codes[0, 16:18].tolist() == [0, 1]  # 1e-37 / 1 is normal: the zero rule applies
  tiny_tile = moments.QuantizedMoment(torch.full((16, 16), 1, dtype=torch.uint8), torch.ones(1, 1))
  scaled = tiny_tile._replace(absmax=torch.full((1, 1), 1e-33))  # 3.25e-7 * 1e-33: subnormal
  assert not moments.dequantize_moment(scaled, signed=False).any()
  assert moments.dequantize_moment(tiny_tile, signed=False).min() > 0


def test_bf16_input_is_quantised_as_float32():
  x = torch.randn(20, 30, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
  for a, b in zip(moments.quantize_moment(x, True), moments.quantize_moment(x.float(), True)):
    assert torch.equal(a, b)


def test_storage_is_one_byte_plus_one_float_per_tile():
  q = moments.quantize_moment(torch.randn(128, 64), signed=True)
  assert moments.moment_nbytes(q) == 128 * 64 * (1 + 4 / 256)
  partial = moments.quantize_moment(torch.randn(17, 33), signed=False)
  assert moments.moment_nbytes(partial) == 17 * 33 + 4 * 2 * 3


@pytest.mark.parametrize(
  "shape, expected",
  [
    ((64, 64), True),
    ((4096, 1), True),
    ((1, 4096), True),
    ((2048, 2), True),
    ((63, 65), False),
    ((4096,), False),
    ((16, 16, 16), False),
    ((), False),
  ],
)
def test_which_shapes_are_quantised(shape, expected):
  assert moments.is_quantized_shape(shape) is expected


@pytest.mark.parametrize(
  "shape, min_size, expected",
  [((16, 16), 256, True), ((16, 15), 256, False), ((16, 16), 257, False), ((256,), 1, False)],
)
def test_min_size_sets_the_threshold(shape, min_size, expected):
  assert moments.is_quantized_shape(shape, min_size) is expected


def test_load_and_store_moment_round_trip():
  """``store_moment`` quantises a qualifying shape (``load_moment`` then dequantises it) and
  hands any other float32 moment back as it is."""
  x = torch.randn(16, 16)
  stored = moments.store_moment(x, signed=True, moment_bits=8, min_size=256)
  assert isinstance(stored, moments.QuantizedMoment)
  want = moments.dequantize_moment(moments.quantize_moment(x, signed=True), signed=True)
  assert torch.equal(moments.load_moment(stored, signed=True), want)
  for bits, min_size in ((None, 256), (8, 257)):
    assert moments.store_moment(x, True, bits, min_size) is x
    assert moments.load_moment(x, signed=True) is x
  zero = moments.init_moment((16, 16), False, 8, min_size=256)
  assert torch.equal(moments.load_moment(zero, signed=False), torch.zeros(16, 16))
  like = torch.ones(16, 16).T
  kept = moments.init_moment((16, 16), False, 8, like=like)
  assert kept.dtype == torch.float32 and kept.stride() == like.stride() and not kept.any()


def test_rejects_non_matrices():
  with pytest.raises(ValueError, match="2-D"):
    moments.quantize_moment(torch.ones(4096), signed=True)


@pytest.mark.parametrize("bits", [None, 8])
def test_moment_bits_accepts_none_and_8(bits):
  moments.check_moment_bits(bits)


@pytest.mark.parametrize("bits", [4, 16, 8.0, True, "8"])
def test_moment_bits_rejects_everything_else(bits):
  with pytest.raises(ValueError, match="`moment_bits`"):
    moments.check_moment_bits(bits)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_cuda_matches_cpu_without_synchronising(signed):
  for name, x in _inputs(signed).items():
    x = torch.from_numpy(np.asarray(x, np.float32))
    cpu = moments.quantize_moment(x, signed)
    x_gpu = x.cuda()
    moments.quantize_moment(x_gpu, signed)  # the first call copies the tables over
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
      gpu = moments.quantize_moment(x_gpu, signed)
      x_hat = moments.dequantize_moment(gpu, signed)
    finally:
      torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(gpu.codes.cpu(), cpu.codes), name
    assert torch.equal(gpu.absmax.cpu(), cpu.absmax), name
    assert torch.equal(x_hat.cpu(), moments.dequantize_moment(cpu, signed)), name

"""Tests of the group-wise quantiser and INT4 packing against NumPy (docs/spec.md section 3)."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from qgalore_torch._src import quantization


def brute_force_quantize(x, bits, group_size):
  """docs/spec.md section 3 as a loop over groups, in float32; returns unpacked codes.

  The zero point is not clamped to [0, Q] (docs/spec.md section 3.3): it differs from the
  authors' clamped formula only for groups of a single sign.
  """
  flat = np.asarray(x, np.float32).reshape(-1)
  levels = np.float32(2**bits - 1)
  codes, scales, zeros = [], [], []
  for start in range(0, flat.size, group_size):
    group = flat[start : start + group_size]
    lo, hi = group.min(), group.max()
    s = np.float32(max(hi - lo, np.float32(1e-5))) / levels
    z = np.round(-lo / s)
    for w in group:
      codes.append(int(min(max(np.round(w / s) + z, 0), levels)))
    scales.append(s)
    zeros.append(z)
  return np.array(codes, np.uint8), np.array(scales, np.float32), np.array(zeros, np.float32)


def brute_force_pack(codes):
  """Two codes per byte, low nibble first; an odd tail leaves the high nibble 0."""
  out = []
  for k in range(0, len(codes), 2):
    high = codes[k + 1] if k + 1 < len(codes) else 0
    out.append(int(codes[k]) | (int(high) << 4))
  return np.array(out, np.uint8)


def _inputs():
  rng = np.random.default_rng(0)
  return {
    "random": rng.standard_normal((6, 40)).astype(np.float32),
    "constant": np.full((3, 8), 0.75, np.float32),
    "zeros": np.zeros((2, 8), np.float32),
    "single_sign_positive": rng.uniform(0.5, 2.0, (4, 8)).astype(np.float32),
    "single_sign_negative": -rng.uniform(0.5, 2.0, (4, 8)).astype(np.float32),
    "partial_last_group_odd_size": rng.standard_normal((5, 7)).astype(np.float32),
    "tiny_range": (1e-7 * rng.standard_normal((2, 16))).astype(np.float32),
    "large": (1e4 * rng.standard_normal((3, 33))).astype(np.float32),
  }


@pytest.mark.parametrize("name", list(_inputs()))
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("group_size", [1, 5, 8, 256])
def test_quantize_matches_brute_force(name, bits, group_size):
  x = _inputs()[name]
  codes, scales, zeros = brute_force_quantize(x, bits, group_size)
  q = quantization.quantize(torch.from_numpy(x), bits=bits, group_size=group_size)
  expected_codes = brute_force_pack(codes) if bits <= 4 else codes
  np.testing.assert_array_equal(q.codes.numpy(), expected_codes)
  np.testing.assert_array_equal(q.scale.numpy(), scales)
  np.testing.assert_array_equal(q.zero.numpy(), zeros)
  assert q.codes.dtype == torch.uint8
  assert q.scale.dtype == q.zero.dtype == torch.float32
  w_hat = quantization.dequantize(q, x.shape, bits=bits, group_size=group_size)
  group_of = np.arange(x.size) // group_size
  expected_w_hat = scales[group_of] * (codes.astype(np.float32) - zeros[group_of])
  np.testing.assert_array_equal(w_hat.numpy(), expected_w_hat.reshape(x.shape))


def test_constant_group_is_exact_when_zero_is_representable():
  x = torch.zeros(3, 8)
  q = quantization.quantize(x, bits=4, group_size=8)
  np.testing.assert_allclose(q.scale.numpy(), 1e-5 / 15)
  assert torch.equal(quantization.dequantize(q, (3, 8), bits=4, group_size=8), x)


def test_single_sign_groups_are_not_clipped():
  """The authors' clamped zero point would decode [1, 2] as [1, 1] and a lone 1.0 as 1e-5."""
  q = quantization.quantize(torch.tensor([1.0, 2.0, 1.0]), bits=4, group_size=2)
  w_hat = quantization.dequantize(q, (3,), bits=4, group_size=2)
  np.testing.assert_allclose(w_hat.numpy(), [1.0, 2.0, 1.0], rtol=1e-6)
  np.testing.assert_array_equal(q.zero.numpy(), np.float32([-15.0, -1.5e6]))


def test_bf16_input_is_quantised_as_float32():
  x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
  a = quantization.quantize(x, bits=4, group_size=16)
  b = quantization.quantize(x.float(), bits=4, group_size=16)
  for u, v in zip(a, b, strict=True):
    assert torch.equal(u, v)


@pytest.mark.parametrize("size", [0, 1, 2, 7, 8, 255])
def test_pack_unpack_round_trip(size):
  codes = torch.randint(0, 16, (size,), generator=torch.Generator().manual_seed(size))
  codes = codes.to(torch.uint8)
  packed = quantization.pack_int4(codes)
  assert packed.dtype == torch.uint8
  assert packed.numel() == (size + 1) // 2
  np.testing.assert_array_equal(packed.numpy(), brute_force_pack(codes.numpy()))
  assert torch.equal(quantization.unpack_int4(packed, size), codes)


def test_pack_layout_low_nibble_first():
  packed = quantization.pack_int4(torch.tensor([1, 2, 15], dtype=torch.uint8))
  assert packed.tolist() == [1 | (2 << 4), 15]


def test_quantized_nbytes_counts_packed_codes_and_group_params():
  q = quantization.quantize(torch.randn(8, 64), bits=4, group_size=256)
  assert quantization.quantized_nbytes(q) == 8 * 64 // 2 + 2 * 8
  q8 = quantization.quantize(torch.randn(8, 64), bits=8, group_size=256)
  assert quantization.quantized_nbytes(q8) == 8 * 64 + 2 * 8


@settings(max_examples=60, deadline=None)
@given(
  values=st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=200),
  bits=st.integers(1, 8),
  group_size=st.integers(1, 64),
)
def test_error_is_at_most_half_a_step(values, bits, group_size):
  """|w - w_hat| <= s/2 in every group, up to float32 rounding of w / s and s * (q - z)."""
  x = np.asarray(values, np.float32)
  q = quantization.quantize(torch.from_numpy(x), bits=bits, group_size=group_size)
  w_hat = quantization.dequantize(q, x.shape, bits=bits, group_size=group_size).numpy()
  for g, start in enumerate(range(0, x.size, group_size)):
    group = x[start : start + group_size]
    s = q.scale[g].item()
    slack = 4 * np.finfo(np.float32).eps * (np.abs(group).max() + s * 2**bits)
    err = np.abs(group - w_hat[start : start + group_size])
    assert err.max() <= s / 2 + slack


@pytest.mark.parametrize(
  "kwargs, error, match",
  [
    ({"bits": 0}, ValueError, "`bits`"),
    ({"bits": 9}, ValueError, "`bits`"),
    ({"bits": 4.0}, TypeError, "`bits`"),
    ({"group_size": 0}, ValueError, "`group_size`"),
    ({"group_size": True}, TypeError, "`group_size`"),
  ],
)
def test_bad_arguments_raise_naming_them(kwargs, error, match):
  with pytest.raises(error, match=match):
    quantization.quantize(torch.ones(4), **kwargs)


@pytest.mark.parametrize(
  "size, bits, group_size", [(1, 4, 256), (999, 4, 256), (1000, 4, 7), (513, 8, 256), (64, 2, 3)]
)
def test_codes_scales_zeros_match_jax_bit_for_bit(size, bits, group_size):
  jax = pytest.importorskip("jax")
  from qgalore_jax._src import quantization as jax_quantization

  rng = np.random.default_rng(size)
  for magnitude in (1e-4, 1.0, 50.0):
    x = (magnitude * rng.standard_normal((1, size))).astype(np.float32)
    ours = quantization.quantize(torch.from_numpy(x), bits, group_size)
    theirs = jax_quantization.quantize(jax.numpy.asarray(x), bits, group_size)
    for name, a, b in zip(ours._fields, ours, theirs, strict=True):
      np.testing.assert_array_equal(a.numpy(), np.asarray(b), err_msg=name)


def test_noise_gives_stochastic_codes_with_round_to_nearest_scale_and_zero():
  rng = np.random.default_rng(7)
  x = rng.standard_normal((5, 37)).astype(np.float32)
  u = rng.uniform(size=(185,)).astype(np.float32)  # any shape of x's size, row-major
  q = quantization.quantize(torch.from_numpy(x), 8, 16, noise=torch.from_numpy(u))
  nearest = quantization.quantize(torch.from_numpy(x), 8, 16)
  assert torch.equal(q.scale, nearest.scale) and torch.equal(q.zero, nearest.zero)
  group = np.arange(x.size) // 16
  s, z = q.scale.numpy()[group], q.zero.numpy()[group]
  expected = np.clip(np.floor(x.reshape(-1) / s + u) + z, 0, 255).astype(np.uint8)
  np.testing.assert_array_equal(q.codes.numpy(), expected)
  with pytest.raises(ValueError, match="noise"):
    quantization.quantize(torch.from_numpy(x), 8, 16, noise=torch.zeros(3))


@pytest.mark.parametrize("size, bits, group_size", [(999, 4, 256), (1000, 8, 7), (64, 2, 3)])
def test_codes_with_noise_match_jax_bit_for_bit(size, bits, group_size):
  jax = pytest.importorskip("jax")
  from qgalore_jax._src import quantization as jax_quantization

  rng = np.random.default_rng(size)
  x = rng.standard_normal((1, size)).astype(np.float32)
  u = rng.uniform(size=(1, size)).astype(np.float32)
  ours = quantization.quantize(torch.from_numpy(x), bits, group_size, noise=torch.from_numpy(u))
  theirs = jax_quantization.quantize(
    jax.numpy.asarray(x), bits, group_size, noise=jax.numpy.asarray(u)
  )
  for name, a, b in zip(ours._fields, ours, theirs, strict=True):
    np.testing.assert_array_equal(a.numpy(), np.asarray(b), err_msg=name)

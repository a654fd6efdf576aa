"""Tests of the group-wise quantiser and INT4 packing against a brute-force NumPy version."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from qgalore_jax import dequantize
from qgalore_jax import pack_int4
from qgalore_jax import quantize
from qgalore_jax import quantized_nbytes
from qgalore_jax import unpack_int4
from qgalore_jax._src import quantization


@functools.partial(jax.jit, static_argnums=(1, 2))
def quantize_round_trip(x, bits, group_size):
  """quantize then dequantize, compiled once per shape (eager dispatch compiles every op)."""
  q = quantize(x, bits, group_size)
  return q, dequantize(q, x.shape, bits, group_size)


def brute_force_quantize(x, bits, group_size):
  """docs/spec.md section 3, one group at a time, in float32 NumPy."""
  flat = np.asarray(x, np.float32).reshape(-1)
  levels = np.float32(2**bits - 1)
  codes, scales, zeros = [], [], []
  for start in range(0, flat.size, group_size):
    g = flat[start : start + group_size]
    s = np.float32(max(np.float32(g.max() - g.min()), np.float32(1e-5))) / levels
    z = np.round(-g.min() / s)  # not clamped: docs/spec.md section 3.3
    for w in g:
      codes.append(int(np.clip(np.round(w / s) + z, 0, levels)))
    scales.append(s)
    zeros.append(np.float32(z))
  return np.array(codes, np.uint8), np.array(scales, np.float32), np.array(zeros, np.float32)


def brute_force_dequantize(codes, scales, zeros, group_size):
  groups = np.arange(len(codes)) // group_size
  return np.array([scales[g] * (np.float32(c) - zeros[g]) for g, c in zip(groups, codes)])


EDGE_CASES = {
  "random": np.random.default_rng(0).normal(size=(7, 37)),
  "constant_group": np.full((4, 64), 0.3),
  "all_zero": np.zeros((2, 50)),
  "single_sign_positive": np.random.default_rng(1).uniform(0.5, 2.0, size=(3, 40)),
  "single_sign_negative": -np.random.default_rng(2).uniform(0.5, 2.0, size=(3, 40)),
  "huge": np.random.default_rng(3).normal(size=(5, 30)) * 1e30,
  "tiny": np.random.default_rng(4).normal(size=(5, 30)) * 1e-30,
  "odd_count": np.random.default_rng(5).normal(size=(3, 11)),
  "halfway_ties": np.array([[0.0, 0.5, 1.5, 2.5, 3.5, 15.0]]),
}


@pytest.mark.parametrize("case", sorted(EDGE_CASES))
@pytest.mark.parametrize("bits,group_size", [(4, 16), (4, 256), (8, 32), (2, 5), (1, 7)])
def test_quantize_matches_brute_force(case, bits, group_size):
  x = EDGE_CASES[case].astype(np.float32)
  want_codes, want_scales, want_zeros = brute_force_quantize(x, bits, group_size)
  q, got = quantize_round_trip(jnp.asarray(x), bits, group_size)
  codes = np.asarray(unpack_int4(q.codes, x.size) if bits <= 4 else q.codes)
  np.testing.assert_array_equal(codes, want_codes)
  np.testing.assert_array_equal(np.asarray(q.scale), want_scales)
  np.testing.assert_array_equal(np.asarray(q.zero), want_zeros)
  want = brute_force_dequantize(want_codes, want_scales, want_zeros, group_size).reshape(x.shape)
  np.testing.assert_array_equal(np.asarray(got), want)


def test_quantize_known_vector():
  # One group [-1, 0, 0.5, 1] at 2 bits: s = 2/3, z = round(1.5) = 2 (half to even),
  # codes round([-1.5, 0, 0.75, 1.5]) + 2 = [-2, 0, 1, 2] + 2 -> clamp -> [0, 2, 3, 3].
  q = quantize(jnp.array([-1.0, 0.0, 0.5, 1.0]), bits=2, group_size=4)
  np.testing.assert_array_equal(np.asarray(unpack_int4(q.codes, 4)), [0, 2, 3, 3])
  np.testing.assert_allclose(np.asarray(q.scale), [2 / 3], rtol=1e-7)
  np.testing.assert_array_equal(np.asarray(q.zero), [2.0])


def test_pack_int4_layout():
  # Element 2k in the low nibble, 2k+1 in the high nibble, odd tail leaves high nibble 0.
  packed = pack_int4(jnp.array([1, 2, 15, 0, 7], jnp.uint8))
  np.testing.assert_array_equal(np.asarray(packed), [0x21, 0x0F, 0x07])
  assert packed.dtype == jnp.uint8


@given(st.lists(st.integers(0, 15), min_size=1, max_size=300))
@settings(max_examples=50, deadline=None)
def test_pack_unpack_round_trip(values):
  codes = jnp.array(values, jnp.uint8)
  packed = pack_int4(codes)
  assert packed.shape == ((len(values) + 1) // 2,)
  np.testing.assert_array_equal(np.asarray(unpack_int4(packed, len(values))), values)


@given(
  values=st.lists(st.floats(-1e4, 1e4, width=32), min_size=96, max_size=96),
  bits=st.integers(1, 8),
  group_size=st.sampled_from([1, 3, 7, 16, 64, 256]),
)
@settings(max_examples=60, deadline=None)
def test_error_within_half_step(values, bits, group_size):
  flat = np.array(values, np.float32)
  q, got = quantize_round_trip(jnp.asarray(flat), bits, group_size)
  got = np.asarray(got)
  s = np.repeat(np.asarray(q.scale), group_size)[: flat.size]
  # Half a step, plus float32 rounding of w / s and of s * (q - z).
  slack = 4 * np.finfo(np.float32).eps * (np.abs(flat) + s * 2**bits)
  assert np.all(np.abs(flat - got) <= s / 2 + slack)


def test_single_sign_groups_are_not_clipped():
  # With the authors' clamp z = clamp(round(-min / s), 0, Q), [1, 2] would decode as [1, 1] and a
  # lone 1.0 as 1e-5. The unclamped zero point keeps both.
  q = quantize(jnp.array([1.0, 2.0, 1.0]), bits=4, group_size=2)
  np.testing.assert_allclose(np.asarray(dequantize(q, (3,), 4, 2)), [1.0, 2.0, 1.0], rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(q.zero), [-15.0, -1e5 * 15])


def test_packed_bytes():
  # A 1024 x 4096 projector at 4 bits in groups of 256: 0.5 byte/element + 8 bytes/group.
  q = quantize(jnp.zeros((1024, 4096)), bits=4, group_size=256)
  assert quantized_nbytes(q) == 1024 * 4096 // 2 + (1024 * 4096 // 256) * 8


@pytest.mark.parametrize(
  "kwargs,err",
  [
    ({"bits": 0}, ValueError),
    ({"bits": 9}, ValueError),
    ({"bits": 4.0}, TypeError),
    ({"group_size": 0}, ValueError),
    ({"group_size": 2.5}, TypeError),
  ],
)
def test_bad_arguments(kwargs, err):
  with pytest.raises(err, match=r"bits|group_size"):
    quantize(jnp.ones(4), **{"bits": 4, "group_size": 4, **kwargs})


def brute_force_stochastic_codes(x, u, bits, group_size):
  """docs/spec.md section 6's rounding, one group at a time: clamp(floor(w / s + u) + z, 0, Q)."""
  flat = np.asarray(x, np.float32).reshape(-1)
  levels = np.float32(2**bits - 1)
  codes = []
  for start in range(0, flat.size, group_size):
    g = flat[start : start + group_size]
    s = np.float32(max(np.float32(g.max() - g.min()), np.float32(1e-5))) / levels
    z = np.round(-g.min() / s)
    codes += list(np.clip(np.floor(g / s + u[start : start + group_size]) + z, 0, levels))
  return np.array(codes, np.uint8)


@pytest.mark.parametrize("case", ["random", "single_sign_positive", "odd_count", "halfway_ties"])
@pytest.mark.parametrize("bits,group_size", [(4, 16), (8, 32), (2, 5)])
def test_quantize_with_noise_matches_brute_force(case, bits, group_size):
  x = EDGE_CASES[case].astype(np.float32)
  u = np.random.default_rng(6).uniform(size=x.size).astype(np.float32)
  # The noise may have any shape of x's size: it is read in row-major order.
  q = quantize(jnp.asarray(x), bits, group_size, noise=jnp.asarray(u))
  nearest = quantize(jnp.asarray(x), bits, group_size)
  np.testing.assert_array_equal(np.asarray(q.scale), np.asarray(nearest.scale))
  np.testing.assert_array_equal(np.asarray(q.zero), np.asarray(nearest.zero))
  codes = np.asarray(unpack_int4(q.codes, x.size) if bits <= 4 else q.codes)
  np.testing.assert_array_equal(codes, brute_force_stochastic_codes(x, u, bits, group_size))


def test_quantize_with_noise_is_unbiased_and_checks_its_size():
  x = jnp.full((1, 256), 0.3).at[0, 0].set(0.0).at[0, 1].set(1.0)  # 0.3 * 255 = 76.5
  draws = [
    quantize(x, 8, 256, noise=jax.random.uniform(jax.random.key(i), (256,))) for i in range(8)
  ]
  mean_code = np.mean([np.asarray(q.codes[2:], np.float64) for q in draws])
  assert abs(mean_code - 76.5) < 0.05
  with pytest.raises(ValueError, match="noise"):
    quantize(x, 8, 256, noise=jnp.zeros(255))


def test_exact_divide_is_correctly_rounded_on_every_path():
  """The quotient equals NumPy's IEEE float32 division, on the CPU path and the GPU one.

  The GPU path (float64 quotient, rounded once) runs here on the CPU, so it is checked
  against the same reference; inputs include divisors 2**b - 1 of every bit width, where
  a reciprocal multiply is 1 ulp off for some numerators. Quotients stay in the normal
  range: XLA's CPU backend flushes subnormal results to zero.
  """
  rng = np.random.default_rng(0)
  num = np.concatenate(
    [
      rng.standard_normal(50_000),
      rng.uniform(-1, 1, 50_000) * 10.0 ** rng.integers(-15, 15, 50_000),
    ]
  ).astype(np.float32)
  den = (rng.uniform(0.1, 2.0, num.size) * 10.0 ** rng.integers(-15, 15, num.size)).astype(
    np.float32
  )
  want = num / den
  for divide in (quantization.exact_divide, quantization._float64_divide):
    np.testing.assert_array_equal(np.asarray(jax.jit(divide)(num, den)), want)
  for bits in range(1, 9):
    q = np.float32(2**bits - 1)
    got = jax.jit(lambda x, q=q: quantization.exact_divide(x, jnp.float32(q)))(num)
    np.testing.assert_array_equal(np.asarray(got), num / q)
  reciprocal = num * (np.float32(1) / np.float32(15))
  assert np.any(reciprocal != num / np.float32(15))  # the inputs can tell the two apart


def test_exact_divide_takes_the_float64_path_on_gpus():
  """Lowered for CUDA and ROCm (no GPU needed): a float64 division, rounded to float32."""
  x = np.ones(8, np.float32)
  for platform, wide in (("cpu", False), ("cuda", True), ("rocm", True)):
    traced = jax.jit(quantization.exact_divide).trace(x, x)
    text = traced.lower(lowering_platforms=(platform,)).as_text()
    assert ("stablehlo.divide" in text) and (("xf64>" in text) == wide), platform

"""Tests of the SR generator against a pure-Python reference and fixed vectors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qgalore_jax import uniforms
from qgalore_jax._src.generator import lowbias32
from qgalore_jax._src.generator import sketch
from qgalore_jax._src.generator import sketch_key
from qgalore_jax._src.generator import stream_key

MASK32 = 0xFFFFFFFF


def py_lowbias32(x):
  """lowbias32 on Python ints, written from its definition (docs/spec.md section 6.3)."""
  x &= MASK32
  x ^= x >> 16
  x = (x * 0x7FEB352D) & MASK32
  x ^= x >> 15
  x = (x * 0x846CA68B) & MASK32
  return x ^ (x >> 16)


def py_hash(seed, step, tensor_id, index):
  key = py_lowbias32(py_lowbias32(seed % 2**32 ^ 0x9E3779B9) ^ step % 2**32)
  key = py_lowbias32(key ^ tensor_id % 2**32)
  return py_lowbias32((py_lowbias32(index ^ key) + key) & MASK32)


def py_uniforms(seed, step, tensor_id, size):
  return np.array(
    [(py_hash(seed, step, tensor_id, i) >> 8) / 2**24 for i in range(size)], np.float32
  )


# Fixed vectors, shared with qgalore_torch's tests: (seed, step, tensor id) -> key, and the
# hashes of elements 0, 1, 2, 255, 256, 65535.
KNOWN = {
  (0, 0, 0): (0x944FB554, [0x91130914, 0x4028D282, 0x4CA773F0, 0x9E809433, 0xD4A17213, 0xEEED2A9B]),
  (1, 0, 0): (0xB98A617E, [0xE2B1BE96, 0xCAB57DF7, 0x988CC844, 0x1743EAD9, 0x4366487E, 0xC234FE0B]),
  (0, 1, 0): (0xC67C684D, [0x3134756E, 0x7A540EEA, 0xC3896262, 0x6615148C, 0x5BFA5705, 0x97C65205]),
  (0, 0, 1): (0xB2FCF063, [0x52330095, 0x46A7F9EA, 0xA6C2D23F, 0x768AFDBD, 0x197071DF, 0xDFE6F57D]),
  (1234, 5678, 7): (
    0x76DF4541,
    [0x6025E24E, 0x13FE4A27, 0xD137C8B6, 0xC1FF1AC1, 0x5023D546, 0x36FE3BDF],
  ),
  (2**32 - 1, 2**31, 3): (
    0x82F0DA95,
    [0xB009D0AD, 0x6DFC2ED8, 0xF8F00476, 0xE1DC2DEB, 0x393650E1, 0x2CBFB672],
  ),
}
KNOWN_INDICES = [0, 1, 2, 255, 256, 65535]
KNOWN_LOWBIAS32 = {0: 0, 1: 0x688990C0, 2: 0xD1132181, 0xDEADBEEF: 0xE628C683, MASK32: 0x6768824A}


def test_lowbias32_fixed_vectors():
  x = jnp.array(list(KNOWN_LOWBIAS32), jnp.uint32)
  np.testing.assert_array_equal(np.asarray(lowbias32(x)), list(KNOWN_LOWBIAS32.values()))
  for x, h in KNOWN_LOWBIAS32.items():
    assert py_lowbias32(x) == h


@pytest.mark.parametrize("key", list(KNOWN))
def test_generator_fixed_vectors(key):
  expected_key, expected_hashes = KNOWN[key]
  assert int(stream_key(*key)) == expected_key
  u = np.asarray(uniforms(*key, (65536,)))
  np.testing.assert_array_equal(u[KNOWN_INDICES] * 2**24, [h >> 8 for h in expected_hashes])
  assert [py_hash(*key, i) for i in KNOWN_INDICES] == expected_hashes


def test_generator_matches_python_reference_and_traced_keys():
  expected = py_uniforms(99, 12, 5, 300)
  np.testing.assert_array_equal(np.asarray(uniforms(99, 12, 5, (300,))), expected)
  traced = jax.jit(lambda s, t, i: uniforms(s, t, i, (3, 100)))
  np.testing.assert_array_equal(
    np.asarray(traced(jnp.int32(99), jnp.int32(12), jnp.uint32(5))).reshape(-1), expected
  )
  # Negative int32 steps wrap modulo 2**32, as Python ints do.
  assert int(jax.jit(stream_key)(0, jnp.int32(-1), 0)) == int(stream_key(0, 2**32 - 1, 0))


def test_generator_statistics():
  u = np.asarray(uniforms(0, 0, 0, (1 << 16,)), np.float64)
  assert abs(u.mean() - 0.5) < 0.005
  assert abs(u.var() - 1 / 12) < 0.002
  counts = np.bincount((u * 64).astype(int), minlength=64)
  expected = u.size / 64
  chi2 = ((counts - expected) ** 2 / expected).sum()
  assert chi2 < 110  # 63 degrees of freedom: P(chi2 > 110) < 1e-4
  # Neighbouring elements and neighbouring keys are uncorrelated.
  assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.02
  for other in [(0, 1, 0), (0, 0, 1), (1, 0, 0), (0, 2, 0)]:
    v = np.asarray(uniforms(*other, (1 << 16,)))
    assert abs(np.corrcoef(u, v)[0, 1]) < 0.02
    assert np.mean(u == v) < 1e-3


def test_generator_rejects_bad_keys():
  with pytest.raises(TypeError, match="seed"):
    uniforms(0.5, 0, 0, (4,))
  with pytest.raises(TypeError, match="step"):
    uniforms(0, jnp.float32(1.0), 0, (4,))


def py_sketch(seed, step, tensor_id, slice_index, size):
  """docs/spec.md section 2.6 on Python ints: +1 where the top bit of the hash is 0."""
  key = py_lowbias32(py_lowbias32(seed % 2**32 ^ 0x9E3779B9) ^ step % 2**32)
  key = py_lowbias32(py_lowbias32(py_lowbias32(key ^ tensor_id % 2**32) ^ 0x736B6574) ^ slice_index)
  hashes = [py_lowbias32((py_lowbias32(i ^ key) + key) & MASK32) for i in range(size)]
  return np.array([1.0 - 2.0 * (h >> 31) for h in hashes], np.float32), key


# Fixed vectors, shared with qgalore_torch's tests: (seed, step, tensor id, slice) -> sketch
# key, and the signs of elements 0..7 as a bit string ("1" for +1).
KNOWN_SKETCHES = {
  (0, 0, 0, 0): (0x2E2262A7, "10101011"),
  (1234, 5678, 7, 3): (0x3383F47B, "10001100"),
}


@pytest.mark.parametrize("key", list(KNOWN_SKETCHES), ids=str)
def test_sketch_matches_python_reference_and_fixed_vectors(key):
  want, want_key = py_sketch(*key, 24 * 5)
  assert want_key == KNOWN_SKETCHES[key][0]
  assert int(sketch_key(*key)) == want_key
  got = jax.jit(lambda t, s: sketch(key[0], t, key[2], s, (24, 5)))(key[1], key[3])
  np.testing.assert_array_equal(np.asarray(got).reshape(-1), want)
  assert "".join("1" if v > 0 else "0" for v in want[:8]) == KNOWN_SKETCHES[key][1]


def test_sketch_is_balanced_and_differs_from_the_rounding_stream():
  s = np.asarray(sketch(0, 0, 0, 0, (256, 256)))
  assert set(np.unique(s)) == {-1.0, 1.0}
  assert abs(s.mean()) < 4 / 256  # 4 standard deviations of a mean of 65,536 signs
  from_uniforms = 1.0 - 2.0 * (np.asarray(uniforms(0, 0, 0, (256, 256))) >= 0.5)
  assert abs(np.mean(s * from_uniforms)) < 4 / 256
  other_slice = np.asarray(sketch(0, 0, 0, 1, (256, 256)))
  assert abs(np.mean(s * other_slice)) < 4 / 256

"""Tests of the SR generator (docs/spec.md section 6) against a pure-Python reference.

The fixed vectors are shared with ``qgalore_jax``'s generator tests.
"""

import numpy as np
import pytest
import torch

from qgalore_torch import uniforms
from qgalore_torch._src.generator import lowbias32
from qgalore_torch._src.generator import sketch
from qgalore_torch._src.generator import sketch_key
from qgalore_torch._src.generator import stream_key

MASK32 = 0xFFFFFFFF


def py_lowbias32(x):
  """lowbias32 on Python ints, written from its definition (docs/spec.md section 6.3)."""
  x &= MASK32
  x ^= x >> 16
  x = (x * 0x7FEB352D) & MASK32
  x ^= x >> 15
  x = (x * 0x846CA68B) & MASK32
  return x ^ (x >> 16)


def py_hash_key(seed, step, tensor_id):
  key = py_lowbias32(py_lowbias32(seed % 2**32 ^ 0x9E3779B9) ^ step % 2**32)
  return py_lowbias32(key ^ tensor_id % 2**32)


def py_hash(seed, step, tensor_id, index):
  key = py_hash_key(seed, step, tensor_id)
  return py_lowbias32((py_lowbias32(index ^ key) + key) & MASK32)


# The fixed vectors of qgalore_jax's generator_test: (seed, step, tensor id) -> key, and the
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

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.mark.parametrize("device", DEVICES)
def test_lowbias32_fixed_vectors_and_no_overflow(device):
  x = torch.tensor(list(KNOWN_LOWBIAS32), dtype=torch.int64, device=device)
  assert lowbias32(x).tolist() == list(KNOWN_LOWBIAS32.values())
  # Values near 2**32, where a plain int64 product would need 64 bits.
  rng = np.random.default_rng(0)
  values = [MASK32, MASK32 - 1, 2**31, *rng.integers(0, 2**32, 1000).tolist()]
  hashed = lowbias32(torch.tensor(values, dtype=torch.int64, device=device)).tolist()
  assert hashed == [py_lowbias32(v) for v in values]


@pytest.mark.parametrize("key", list(KNOWN))
@pytest.mark.parametrize("device", DEVICES)
def test_generator_fixed_vectors(key, device):
  expected_key, expected_hashes = KNOWN[key]
  assert int(stream_key(*key)) == expected_key
  u = uniforms(*key, (65536,), device=device)
  assert (u[KNOWN_INDICES] * 2**24).long().tolist() == [h >> 8 for h in expected_hashes]
  assert [py_hash(*key, i) for i in KNOWN_INDICES] == expected_hashes


def test_generator_keys_from_tensors_and_statistics():
  assert int(stream_key(torch.tensor(3), torch.tensor(-1), torch.tensor(2, dtype=torch.int32))) == (
    int(stream_key(3, 2**32 - 1, 2))
  )
  with pytest.raises(TypeError, match="step"):
    uniforms(0, torch.tensor(1.0), 0, (4,))
  with pytest.raises(TypeError, match="seed"):
    uniforms(True, 0, 0, (4,))
  u = uniforms(5, 0, 0, (1 << 16,)).double()
  assert abs(u.mean().item() - 0.5) < 0.005
  counts = torch.bincount((u * 64).long(), minlength=64).double()
  chi2 = ((counts - u.numel() / 64) ** 2 / (u.numel() / 64)).sum().item()
  assert chi2 < 110  # 63 degrees of freedom: P(chi2 > 110) < 1e-4
  for other in [(5, 1, 0), (5, 0, 1), (6, 0, 0)]:
    v = uniforms(*other, (1 << 16,)).double()
    assert abs(torch.corrcoef(torch.stack([u, v]))[0, 1].item()) < 0.02


# The fixed vectors of qgalore_jax's sketch tests: (seed, step, tensor id, slice) -> sketch key,
# and the signs of elements 0..7 ("1" for +1), computed there from the definition.
KNOWN_SKETCHES = {
  (0, 0, 0, 0): (0x2E2262A7, "10101011"),
  (1234, 5678, 7, 3): (0x3383F47B, "10001100"),
}


@pytest.mark.parametrize("key", list(KNOWN_SKETCHES), ids=str)
def test_sketch_matches_python_reference_and_fixed_vectors(key):
  seed, step, tensor_id, slice_index = key
  want_key = py_lowbias32(
    py_lowbias32(py_hash_key(seed, step, tensor_id) ^ 0x736B6574) ^ slice_index
  )
  assert want_key == int(sketch_key(*key)) == KNOWN_SKETCHES[key][0]
  hashes = [py_lowbias32((py_lowbias32(i ^ want_key) + want_key) & MASK32) for i in range(120)]
  want = np.array([1.0 - 2.0 * (h >> 31) for h in hashes], np.float32)
  got = sketch(seed, torch.tensor(step), tensor_id, slice_index, (24, 5))
  np.testing.assert_array_equal(got.numpy().reshape(-1), want)
  assert "".join("1" if v > 0 else "0" for v in want[:8]) == KNOWN_SKETCHES[key][1]

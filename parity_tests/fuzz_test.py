"""Property-based parity: JAX and torch bit-identical on random shapes and extreme values.

Hypothesis draws the matrix (any shape up to 24 x 40), the group size and the bit width, and
float32 values that include zeros, subnormals, huge magnitudes and ranges of many orders.
Both backends must then agree bit for bit on what docs/spec.md fixes: the weight quantiser
(codes, packed bytes, scales, zeros; section 3), INT4 packing (section 3.5) and the 8-bit
moment codec (codes and absmax; section 8). Non-finite inputs are left out: the spec fixes
no codes for them.
"""

import jax
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import qgalore_jax
import qgalore_torch

FINITE = st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=True)
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def matrices(draw, max_rows=24, max_cols=40):
  """A float32 matrix: raw draws from every float32, or a random matrix at one scale."""
  shape = draw(st.tuples(st.integers(1, max_rows), st.integers(1, max_cols)))
  if draw(st.booleans()):
    return draw(hnp.arrays(np.float32, shape, elements=FINITE))
  seed = draw(st.integers(0, 2**31))
  scale = np.float32(10.0 ** draw(st.integers(-40, 38)))
  return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


@pytest.mark.slow
@SETTINGS
@given(w=matrices(), bits=st.integers(1, 8), group_size=st.sampled_from([1, 7, 16, 31, 64, 256]))
def test_weight_quantiser_is_bit_identical(w, bits, group_size):
  jq = qgalore_jax.quantize(w, bits, group_size)
  tq = qgalore_torch.quantize(torch.from_numpy(w), bits, group_size)
  for name in ("codes", "scale", "zero"):
    got, want = np.asarray(getattr(jq, name)), getattr(tq, name).numpy()
    assert got.dtype == want.dtype and np.array_equal(got, want, equal_nan=True), name


@SETTINGS
@given(codes=hnp.arrays(np.uint8, st.integers(1, 301), elements=st.integers(0, 15)))
def test_int4_packing_is_bit_identical_and_round_trips(codes):
  packed = np.asarray(qgalore_jax.pack_int4(codes))
  np.testing.assert_array_equal(packed, qgalore_torch.pack_int4(torch.from_numpy(codes)).numpy())
  np.testing.assert_array_equal(np.asarray(qgalore_jax.unpack_int4(packed, codes.size)), codes)


@pytest.mark.slow
@SETTINGS
@given(x=matrices(max_rows=40, max_cols=40), signed=st.booleans())
def test_moment_codec_is_bit_identical(x, signed):
  x = x if signed else np.abs(x)
  jm = jax.jit(qgalore_jax.quantize_moment, static_argnums=1)(x, signed)
  tm = qgalore_torch.quantize_moment(torch.from_numpy(x), signed)
  np.testing.assert_array_equal(np.asarray(jm.codes), tm.codes.numpy())
  np.testing.assert_array_equal(np.asarray(jm.absmax), tm.absmax.numpy())

"""The SR uniforms and INT8 SR codes are bit-identical in JAX, torch and NumPy."""

import pytest

from parity_tests import generator


def test_uniforms_bit_identical(dev):
  for check in generator.measure_uniforms(dev):
    assert check.passed, check


@pytest.mark.parametrize("shape", generator.SHAPES, ids=str)
def test_int8_codes_from_flax_kernel_and_torch_weight(shape, dev):
  for check in generator.measure_int8(shape, dev):
    assert check.passed, check

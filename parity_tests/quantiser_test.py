"""JAX and torch quantisers give the same codes, packed bytes, scales and zeros."""

import pytest

from parity_tests import quantiser


@pytest.mark.parametrize("case", list(quantiser.CASES))
def test_quantiser_bit_identical(case, dev):
  for check in quantiser.measure(case, dev):
    assert check.passed, check

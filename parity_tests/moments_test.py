"""JAX and torch store 8-bit moments alike: the quantiser bit for bit, the optimizer to
the flips a last-bit rounding difference can cause (see ``moments.py``)."""

import pytest

from parity_tests import core
from parity_tests import moments


def test_code_maps_bit_identical(dev):
  for check in moments.measure_maps(dev):
    assert check.passed, check


@pytest.mark.parametrize("case", list(moments.CASES))
def test_moment_quantiser_bit_identical(case, dev):
  for check in moments.measure(case, dev):
    assert check.passed, check


@pytest.mark.slow
@pytest.mark.parametrize("lockstep", [True, False], ids=["lockstep", "free-running"])
def test_llama_block_with_8bit_moments_agrees(lockstep, dev):
  for check in moments.measure_optimizer(lockstep, dev.name):
    assert check.passed, check


def test_moment_quantiser_gpu_matches_cpu(gpu):
  cpu = core.device("cpu")
  for check in moments.measure_cross_device(cpu, gpu):
    assert check.passed, check

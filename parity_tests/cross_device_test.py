"""Each backend gives the same codes on CPU and GPU, and the same trajectory to rounding."""

import pytest

from parity_tests import core
from parity_tests import cross_device


@pytest.mark.gpu
def test_codes_do_not_depend_on_the_device(gpu):
  for check in cross_device.measure_codes(core.device("cpu"), gpu):
    assert check.passed, check


@pytest.mark.gpu
@pytest.mark.parametrize("int8", [False, True], ids=["float", "int8"])
def test_optimizer_cpu_vs_gpu(int8, gpu):
  for check in cross_device.measure_optimizer(core.device("cpu"), gpu, int8):
    assert check.passed, check

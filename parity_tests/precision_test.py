"""Relaxing matmul precision changes nothing on a CPU and stays within TF32 error on a GPU."""

from parity_tests import precision


def test_relaxed_precision_effect(dev):
  for check in precision.measure(dev):
    assert check.passed, check

"""Sketches bit for bit, randomized and warm-started bases to rounding, stacks slice by slice."""

from parity_tests import refresh


def test_refresh_parity(dev):
  checks = refresh.measure_all(dev)
  assert len(checks) == 3 + 6 + 2
  for check in checks:
    assert check.passed, check

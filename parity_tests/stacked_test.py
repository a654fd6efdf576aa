"""A stacked leaf in JAX (Flax layout) and the same stack in torch follow the same slices."""

from parity_tests import stacked


def test_stack_parity(dev):
  checks = stacked.measure(dev)
  assert len(checks) == 4
  for check in checks:
    assert check.passed, check

"""Both optimizers (and the authors' projector) refresh on the same steps over 2400 steps."""

from parity_tests import schedule


def test_schedule_identical_over_long_run(dev, authors_projector_cls):
  for check in schedule.measure(dev, authors_projector_cls):
    assert check.passed, check

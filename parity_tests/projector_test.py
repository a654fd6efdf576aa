"""Projectors agree across backends and layouts, and with the authors' GaLoreProjector."""

import pytest

from parity_tests import projector


@pytest.mark.parametrize("shape", projector.SHAPES, ids=str)
def test_projector_parity_and_oracle(shape, dev, authors_projector_cls):
  for check in projector.measure(shape, dev, authors_projector_cls):
    assert check.passed, check

"""Tests of the torch layout helpers (the twin of qgalore_jax's)."""

import pytest
import torch

from qgalore_torch._src import layout


def test_canonical_shape_is_the_weight_shape():
  assert layout.canonical_shape(torch.nn.Linear(3, 5).weight.shape) == (5, 3)
  with pytest.raises(ValueError, match=r"2-D.*\(4,\)"):
    layout.canonical_shape((4,))


def test_path_str():
  assert layout.path_str(0, 2) == "param group 0: params[2]"

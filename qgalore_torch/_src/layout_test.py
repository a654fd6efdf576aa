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


def test_stack_layout_of_a_fused_weight():
  qkv = layout.stack_layout((24, 3, 16), (-2,))
  assert qkv.batch == (1,) and qkv.batch_shape == (3,) and qkv.num_slices == 3
  assert qkv.matrix_shape == (24, 16)
  w = torch.arange(24 * 3 * 16, dtype=torch.float32).reshape(24, 3, 16)
  stack = qkv.to_stack(w)
  assert stack.shape == (3, 24, 16) and stack.data_ptr() == w.data_ptr()  # a view
  assert torch.equal(stack[2], w[:, 2, :])
  stack[1].zero_()
  assert not w[:, 1].any() and w[:, 2].all()
  assert torch.equal(qkv.from_stack(stack), w)


def test_stack_indices_are_row_major_in_the_order_given():
  w = torch.randn(2, 5, 3, 4)
  for batch_axes, batch_shape in (((0, 2), (2, 3)), ((2, 0), (3, 2))):
    stacked = layout.stack_layout(w.shape, batch_axes)
    assert stacked.batch_shape == batch_shape and stacked.matrix_shape == (5, 4)
    indices = list(stacked.indices())
    assert indices == [(i, j) for i in range(batch_shape[0]) for j in range(batch_shape[1])]
    stack = stacked.to_stack(w)
    for i, j in indices:
      a, b = (i, j) if batch_axes == (0, 2) else (j, i)
      assert torch.equal(stack[i, j], w[a, :, b, :])
  assert list(layout.stack_layout((4, 3), ()).indices()) == [()]

"""Tests of the canonical (out, in) view and the per-leaf input axes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qgalore_jax._src import layout


def test_canonical_view_of_both_layouts():
  kernel = jnp.arange(6.0).reshape(2, 3)  # Flax (in, out): canonical (3, 2)
  assert layout.canonical_shape(kernel.shape, 0) == (3, 2)
  assert layout.canonical_shape(kernel.shape, 1) == (2, 3)
  assert layout.to_canonical(kernel, 0).shape == (3, 2)
  assert layout.to_canonical(layout.to_canonical(kernel, 0), 0).tolist() == kernel.tolist()
  assert layout.to_canonical(kernel, 1) is kernel


def test_path_str_names_the_parameter():
  [(path, _)] = jax.tree_util.tree_flatten_with_path({"layers": [{"kernel": jnp.ones(2)}]})[0]
  assert layout.path_str(path) == "['layers'][0]['kernel']"
  assert layout.path_str(()) == "<root>"


def test_resolve_input_axes():
  params = {"a": jnp.ones((2, 3)), "b": jnp.ones((3, 2)), "skip": optax.MaskedNode()}
  assert layout.resolve_input_axes(params, 0, "f") == [0, 0]
  assert layout.resolve_input_axes(params, -1, "f") == [1, 1]
  axes = {"a": 1, "b": 0, "skip": optax.MaskedNode()}
  assert layout.resolve_input_axes(params, axes, "f") == [1, 0]
  assert layout.resolve_input_axes(params, lambda p: {"a": 0, "b": 1, "skip": 0}, "f") == [0, 1]


def test_resolve_input_axes_errors_name_the_parameter():
  with pytest.raises(ValueError, match=r"f projects 2-D.*\['v'\]"):
    layout.resolve_input_axes({"v": jnp.ones(3)}, 0, "f")
  with pytest.raises(ValueError, match=r"input_axis.*\['a'\].*2"):
    layout.resolve_input_axes({"a": jnp.ones((2, 2))}, {"a": 2}, "f")
  with pytest.raises(ValueError, match=r"structure.*given to f"):
    layout.resolve_input_axes({"a": jnp.ones((2, 2))}, {"b": 0}, "f")


def test_stack_layout_against_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 4, 5, 2)).astype(np.float32)  # (out_a, batch, in, out_b)
  lay = layout.DimensionNumbers(reduction_axis=2, output_axis=(0, 3), batch_axis=1).resolve(x.shape)
  assert lay.batch_shape == (4,) and lay.num_slices == 4 and lay.matrix_shape == (6, 5)
  assert not lay.reduction_first
  # Slice s: the output axes (0, 3) flattened row-major into rows, the input axis into columns.
  want = np.stack([x[:, s].transpose(0, 2, 1).reshape(6, 5) for s in range(4)])
  np.testing.assert_array_equal(lay.to_stack(jnp.asarray(x)), want)
  np.testing.assert_array_equal(
    lay.to_stack(jnp.asarray(x), transposed=True), want.transpose(0, 2, 1)
  )
  for transposed in (False, True):
    back = lay.from_stack(lay.to_stack(jnp.asarray(x), transposed), transposed)
    np.testing.assert_array_equal(back, x)
  slices = lay.to_slices(jnp.asarray(x))
  np.testing.assert_array_equal(slices, x.transpose(1, 0, 2, 3))
  np.testing.assert_array_equal(lay.from_slices(slices), x)
  one = lay.slice_layout
  assert (one.shape, one.batch, one.output, one.reduction) == ((3, 5, 2), (), (0, 2), (1,))
  np.testing.assert_array_equal(one.to_stack(slices[1])[0], want[1])


def test_flax_kernel_is_the_2d_case():
  kernel = jnp.arange(6.0).reshape(2, 3)
  lay = layout.input_axis_numbers(0).resolve(kernel.shape)
  assert lay.reduction_first and lay.matrix_shape == layout.canonical_shape(kernel.shape, 0)
  np.testing.assert_array_equal(lay.to_stack(kernel)[0], layout.to_canonical(kernel, 0))


def test_dimension_numbers_errors():
  with pytest.raises(ValueError, match=r"names axis 3 of w, which has shape \(2, 3\)"):
    layout.DimensionNumbers(3, 1).resolve((2, 3), "w")
  with pytest.raises(ValueError, match="every axis of w"):
    layout.DimensionNumbers(0, 1).resolve((2, 3, 4), "w")
  with pytest.raises(ValueError, match="every axis of w"):
    layout.DimensionNumbers(0, 0).resolve((2, 3), "w")
  with pytest.raises(ValueError, match=r"`batch_axis`.*int or a tuple of ints"):
    layout.DimensionNumbers(0, 1, [2]).resolve((2, 3, 4), "w")

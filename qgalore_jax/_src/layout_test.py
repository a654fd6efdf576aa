"""Tests of the canonical (out, in) view and the per-leaf input axes."""

import jax
import jax.numpy as jnp
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

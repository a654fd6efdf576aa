"""The canonical (out, in) view of a parameter, and parameter names (docs/spec.md section 1).

The twin of ``qgalore_jax._src.layout``. torch stores a linear weight as (out, in), the
canonical layout of docs/spec.md section 1, so a weight is its own canonical matrix W and no
transpose is needed (the JAX twin reads Flax kernels, stored (in, out), through their input
axis). Errors name a parameter by its place in the optimizer's param groups.
"""

from collections.abc import Sequence


def path_str(group_index: int, param_index: int) -> str:
  """The name of ``param_groups[group_index]["params"][param_index]`` in error messages.

  Example:
    >>> from qgalore_torch._src.layout import path_str
    >>> path_str(1, 3)
    'param group 1: params[3]'
  """
  return f"param group {group_index}: params[{param_index}]"


def canonical_shape(shape: Sequence[int]) -> tuple[int, int]:
  """(out, in) shape of a 2-D weight: its own shape, since torch stores weights (out, in).

  Raises:
    ValueError: if ``shape`` is not 2-D.
  """
  if len(shape) != 2:
    raise ValueError(f"a weight matrix is 2-D (out, in), got shape {tuple(shape)}")
  return int(shape[0]), int(shape[1])

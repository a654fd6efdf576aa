"""The canonical (out, in) view of a parameter, and parameter names (docs/spec.md section 1).

The twin of ``qgalore_jax._src.layout``. torch stores a linear weight as (out, in), the
canonical layout of docs/spec.md section 1, so a weight is its own canonical matrix W and no
transpose is needed (the JAX twin reads Flax kernels, stored (in, out), through their input
axis). A parameter with batch axes, such as stacked experts (E, out, in), is a stack of such
matrices (docs/spec.md section 1.3; :class:`StackLayout`). Errors name a parameter by its
place in the optimizer's param groups.
"""

import itertools
import math
from collections.abc import Iterator
from collections.abc import Sequence
from typing import NamedTuple

import torch


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


class StackLayout(NamedTuple):
  """A parameter read as its canonical stack of (out, in) matrices (docs/spec.md section 1.3).

  torch names the batch axes only: the two axes left over are ``(out, in)``, in that order,
  as ``nn.Linear`` stores a weight. Each index along the batch axes is one matrix, a slice,
  counted row-major. The twin of ``qgalore_jax``'s ``StackLayout``, whose stack is flattened
  to ``(S, m, n)``; here the batch axes stay unflattened, so that the stack is a view of the
  parameter for any strides and writing a slice writes the parameter.

  Example:
    >>> import torch
    >>> from qgalore_torch._src.layout import stack_layout
    >>> layout = stack_layout((24, 3, 16), batch_axes=(-2,))
    >>> layout.batch_shape, layout.matrix_shape, list(layout.indices())
    ((3,), (24, 16), [(0,), (1,), (2,)])
    >>> qkv = torch.zeros(24, 3, 16)
    >>> layout.to_stack(qkv)[1].fill_(1.0).shape, float(qkv[:, 1].sum())
    (torch.Size([24, 16]), 384.0)
  """

  shape: tuple[int, ...]  # the parameter's own shape
  batch: tuple[int, ...]  # batch axes of the parameter, non-negative, in the order given

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return tuple(self.shape[a] for a in self.batch)

  @property
  def num_slices(self) -> int:
    return math.prod(self.batch_shape)

  @property
  def matrix_shape(self) -> tuple[int, int]:
    """(m, n) = (out, in) of each slice: the two axes that are not batch axes."""
    out_dim, in_dim = (d for a, d in enumerate(self.shape) if a not in self.batch)
    return out_dim, in_dim

  def indices(self) -> Iterator[tuple[int, ...]]:
    """The batch index of each slice, row-major (slice ``s`` comes ``s``-th)."""
    return itertools.product(*(range(d) for d in self.batch_shape))

  def to_stack(self, x: torch.Tensor) -> torch.Tensor:
    """The view of ``x`` shaped ``batch_shape + (m, n)``: the batch axes moved to the front."""
    return x.movedim(self.batch, tuple(range(len(self.batch))))

  def from_stack(self, x: torch.Tensor) -> torch.Tensor:
    """Inverse of :meth:`to_stack`: a stack ``batch_shape + (m, n)`` in the parameter's layout."""
    return x.movedim(tuple(range(len(self.batch))), self.batch)


def stack_layout(shape: Sequence[int], batch_axes: Sequence[int] = ()) -> StackLayout:
  """The :class:`StackLayout` of a parameter of ``shape`` with these batch axes.

  Args:
    shape: the parameter's shape, ``len(batch_axes) + 2`` dims.
    batch_axes: ints, negative ones counting from the end (validated by the optimizer's
      group checks).
  """
  ndim = len(shape)
  return StackLayout(tuple(int(d) for d in shape), tuple(a % ndim for a in batch_axes))


def as_separate(x: torch.Tensor) -> torch.Tensor:
  """``x`` if it is laid out as a separate tensor would be, else such a copy of it.

  A separate tensor is contiguous and starts on a 64-byte boundary (torch's allocators
  align at least so). A slice of a stack need not be, and MKL's and cuBLAS's products pick
  their kernels by the operands' strides and alignment: with MKL 2024.2 on an AVX2 CPU,
  ``A @ B.T`` rounds differently when ``A`` does not start on a 16-byte boundary. Copying
  such a slice keeps every slice of a stack bit for bit equal to the same matrix held
  separately; a stack whose batch axes lead and whose per-slice tensors are multiples of 64
  bytes is never copied.
  """
  if x.is_contiguous() and x.data_ptr() % 64 == 0:
    return x
  return x.clone(memory_format=torch.contiguous_format)

"""Argument validation of the optimizer and the quantiser (docs/spec.md section 7).

Every check raises a ``TypeError`` or ``ValueError`` whose message names the argument, so a
bad hyperparameter fails at construction time instead of deep inside ``step()``.
"""

import math
import numbers

import torch

from qgalore_torch._src import moments
from qgalore_torch._src.layout import path_str


def check_int(value, name: str, minimum: int = 1) -> int:
  """Returns ``value`` if it is an int (not a bool) >= ``minimum``; else raises naming it."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"`{name}` must be an int, got {type(value).__name__} {value!r}")
  if value < minimum:
    raise ValueError(f"`{name}` must be >= {minimum}, got {value}")
  return int(value)


def check_choice(value, name: str, choices: tuple[str, ...]) -> str:
  """Returns ``value`` if it is one of the strings ``choices``; else raises naming it."""
  if not isinstance(value, str) or value not in choices:
    allowed = ", ".join(repr(c) for c in choices)
    raise ValueError(f"`{name}` must be one of {allowed}, got {value!r}")
  return value


def check_bits(value, name: str = "bits") -> int:
  """Returns ``value`` if it is an int in 1..8; else raises naming it."""
  value = check_int(value, name, minimum=1)
  if value > 8:
    raise ValueError(f"`{name}` must be in 1..8, got {value}")
  return value


def check_number(value, name: str, low=None, high=None, low_open=False, high_open=False):
  """Checks a real number against bounds; tensors are passed through unchecked.

  A tensor (torch accepts e.g. a tensor ``lr`` for schedules driven outside the optimizer)
  cannot be checked without reading its value, so it is returned unchanged.
  """
  if isinstance(value, bool):
    raise TypeError(f"`{name}` must be a number, got bool {value!r}")
  if not isinstance(value, numbers.Real):
    if isinstance(value, (str, bytes, type(None), tuple, list)):
      raise TypeError(f"`{name}` must be a number, got {type(value).__name__} {value!r}")
    return value
  if not math.isfinite(value):
    raise ValueError(f"`{name}` must be a finite number, got {value}")
  bad_low = low is not None and (value <= low if low_open else value < low)
  bad_high = high is not None and (value >= high if high_open else value > high)
  if bad_low or bad_high:
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    lo = "-inf" if low is None else low
    hi = "inf" if high is None else high
    raise ValueError(f"`{name}` must be in {left}{lo}, {hi}{right}, got {value}")
  return value


def check_group(group, index: int) -> None:
  """Validates one param group of ``QGaLoreAdamW`` (defaults merged in), naming the argument.

  Args:
    group: the param group, with the optimizer's defaults for the keys it does not set.
    index: its position among the optimizer's param groups, for error messages.
  """
  check_number(group["lr"], "lr", 0.0)
  betas = group["betas"]
  if not isinstance(betas, (tuple, list)) or len(betas) != 2:
    raise TypeError(f"`betas` must be a pair (beta1, beta2), got {betas!r}")
  check_number(betas[0], "betas[0]", 0.0, 1.0, high_open=True)
  check_number(betas[1], "betas[1]", 0.0, 1.0, high_open=True)
  check_number(group["eps"], "eps", 0.0)
  check_number(group["weight_decay"], "weight_decay", 0.0)
  moments.check_moment_bits(group["moment_bits"])
  check_int(group["min_8bit_size"], "min_8bit_size")
  for i, p in enumerate(group["params"]):
    if not isinstance(p, torch.Tensor) or not p.is_floating_point():
      raise TypeError(
        f"{path_str(index, i)} must be a floating-point tensor, got"
        f" {getattr(p, 'dtype', type(p).__name__)}"
      )
  batch_axes = check_batch_axes(group.get("batch_axes", ()), index)
  if "rank" not in group:
    if batch_axes:
      raise ValueError(
        f"param group {index} has `batch_axes` but no `rank`: batch axes split a parameter"
        " into matrices that are projected one by one, and a plain AdamW group has nothing"
        " per matrix; add `rank` or drop `batch_axes`"
      )
    return
  check_int(group["rank"], "rank")
  check_int(group["update_proj_gap"], "update_proj_gap")
  check_number(group["scale"], "scale")
  if group["proj_bits"] is not None:
    check_bits(group["proj_bits"], "proj_bits")
  check_int(group["proj_group_size"], "proj_group_size")
  check_number(group["cos_threshold"], "cos_threshold", -1.0, 1.0)
  gamma_proj = group["gamma_proj"]
  if isinstance(gamma_proj, bool) or not isinstance(gamma_proj, (int, float)):
    raise TypeError(f"`gamma_proj` must be a Python number, got {type(gamma_proj).__name__}")
  check_number(gamma_proj, "gamma_proj", 1.0)
  check_int(group["queue_size"], "queue_size")
  check_int(group["oversample"], "oversample", minimum=0)
  check_int(group["power_iters"], "power_iters", minimum=0)
  check_int(group["subspace_iters"], "subspace_iters", minimum=1)
  ndim = len(batch_axes) + 2
  in_range = all(-ndim <= a < ndim for a in batch_axes)
  if not in_range or len({a % ndim for a in batch_axes}) != len(batch_axes):
    raise ValueError(
      f"param group {index}: `batch_axes` must be distinct axes of its {ndim}-dim params"
      f" (negative ints count from the end), got {batch_axes}"
    )
  for i, p in enumerate(group["params"]):
    if p.dim() == ndim:
      continue
    if not batch_axes:
      raise ValueError(
        f"param group {index} has `rank`, so its params must be 2-D (out, in) matrices,"
        f" but params[{i}] has shape {tuple(p.shape)}; put it in a group without `rank`,"
        " or give the group `batch_axes` if it is a stack of matrices"
      )
    raise ValueError(
      f"param group {index} has `batch_axes={batch_axes}`, so its params must have"
      f" {ndim} dims (the batch axes, then out and in), but params[{i}] has shape"
      f" {tuple(p.shape)}"
    )


def check_batch_axes(batch_axes, index: int) -> tuple[int, ...]:
  """Returns the ``batch_axes`` of param group ``index`` as a tuple if it is a tuple or list
  of ints (not bools); else raises naming the group (docs/spec.md section 1.3)."""
  if not isinstance(batch_axes, (tuple, list)) or not all(
    isinstance(a, numbers.Integral) and not isinstance(a, bool) for a in batch_axes
  ):
    raise TypeError(
      f"param group {index}: `batch_axes` must be a tuple of ints, got"
      f" {type(batch_axes).__name__} {batch_axes!r}"
    )
  return tuple(int(a) for a in batch_axes)

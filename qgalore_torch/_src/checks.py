"""Argument validation shared by the optimizer and the quantiser (docs/spec.md section 7).

Every check raises a ``TypeError`` or ``ValueError`` whose message names the argument, so a
bad hyperparameter fails at construction time instead of deep inside ``step()``.
"""

import numbers


def check_int(value, name: str, minimum: int = 1) -> int:
  """Returns ``value`` if it is an int (not a bool) >= ``minimum``; else raises naming it."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"`{name}` must be an int, got {type(value).__name__} {value!r}")
  if value < minimum:
    raise ValueError(f"`{name}` must be >= {minimum}, got {value}")
  return int(value)


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
  if value != value:
    raise ValueError(f"`{name}` must be a number, got nan")
  bad_low = low is not None and (value <= low if low_open else value < low)
  bad_high = high is not None and (value >= high if high_open else value > high)
  if bad_low or bad_high:
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    lo = "-inf" if low is None else low
    hi = "inf" if high is None else high
    raise ValueError(f"`{name}` must be in {left}{lo}, {hi}{right}, got {value}")
  return value

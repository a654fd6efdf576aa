"""Argument validation shared by the builders: clear errors that name the argument."""

import math
import numbers

import jax

# Arguments of `qgalore_adamw` that fix shapes or control flow and so must stay Python
# values: pass them as `static_args` to `optax.inject_hyperparams`, which otherwise turns
# every numeric argument, defaults included, into an array (and calls every callable one
# as a schedule).
STATIC_ARGS = (
  "rank",
  "update_proj_gap",
  "proj_bits",
  "proj_group_size",
  "gamma_proj",
  "queue_size",
  "mask",
  "input_axis",
  "dimension_numbers",
  "mu_dtype",
  "moment_bits",
  "min_8bit_size",
  "skip_nonfinite",
  "projector_fn",
  "svd_method",
  "oversample",
  "power_iters",
  "subspace_iters",
  "seed",
)


def static_hint(value, name: str) -> str:
  """The end of an error message for ``value``: a hint when it is an array, else ``""``."""
  if isinstance(value, jax.Array):
    return (
      f"; `{name}` must be a static Python value, not an array. Under"
      " optax.inject_hyperparams use static_args=qgalore_jax.STATIC_ARGS"
    )
  return ""


def check_int(value, name: str, minimum: int = 1) -> int:
  """Returns ``value`` if it is an int (not a bool) >= ``minimum``; else raises naming it."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(
      f"`{name}` must be an int, got {type(value).__name__} {value!r}{static_hint(value, name)}"
    )
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
  """Checks a real number against bounds; traced or array values are passed through.

  Values that are not Python numbers (a jax array, e.g. from ``optax.inject_hyperparams``)
  cannot be checked at build time and are returned unchanged.
  """
  if isinstance(value, bool):
    raise TypeError(f"`{name}` must be a number, got bool {value!r}")
  if not isinstance(value, numbers.Real):
    if isinstance(value, (str, bytes, type(None))):
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

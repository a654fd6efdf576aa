"""8-bit moment parity (docs/spec.md section 8): quantiser and whole optimizer.

* The quantiser: both backends quantise the same float32 matrices (the JAX side jitted, as
  the optimizer runs it) with the signed and the unsigned map; codes, tile maxima and
  dequantised values are compared bit for bit, in the same layout and across layouts (JAX
  on ``x.T``, as a Flax kernel holds a torch weight, against torch on ``x``). The inputs
  cover random matrices, partial tiles, huge and tiny magnitudes, subnormals, zero tiles,
  values exactly on and one ulp around every threshold, and a NaN.
* The whole optimizer: the tiny LLaMA block of ``optimizer.py`` in shared-SVD mode with
  ``moment_bits=8`` (its moments are below the format's default 4096 elements, so the run
  passes ``min_8bit_size=optimizer.MOMENT_MIN_SIZE`` and quantises every 2-D moment). JAX's
  float32 Adam arithmetic rounds differently from torch's in the last bit (fused
  multiply-adds, ``pow``), and a moment one ulp from a threshold then gets the neighbouring
  code. Two runs separate the two effects:

  - lockstep: each JAX step starts from torch's stored moments, so every step compares one
    step's arithmetic. A code may differ by one step where ``y`` lies within ``n`` ulps
    (the moments' difference) of one of the 255 thresholds ``T``: ``n * sum(ulp(T))`` of
    the codes, ``n * 5.9e-6`` for a ``y`` uniform on [-1, 1] (signed map) and
    ``n * 1.2e-5`` on [0, 1] (unsigned). We allow ``LOCKSTEP_FRACTION = 1e-4``: 8 to 17
    ulps. The direction comes from the float32 moments, so updates and weights keep the
    float shared-mode tolerances; a dequantised moment may also be one code step off.
  - free-running: 200 steps without resynchronisation. A flipped code changes the next
    update and from then on the runs separate like the free-SVD runs of ``optimizer.py``:
    the tolerances are ``MOMENT_FLIPS`` times what one deliberately flipped moment code
    (:func:`flip_one_moment_code`, at the first step, the longest time to grow) does to
    torch's own run, and never less than the shared-mode tolerances.
"""

import dataclasses
import functools

import jax
import numpy as np
import torch

import qgalore_jax
import qgalore_torch
from parity_tests import core
from parity_tests import llama
from parity_tests import optimizer
from qgalore_jax._src import moments as jax_moments
from qgalore_torch._src import moments as torch_moments

COMPONENT = "8-bit moments"
LOCKSTEP_FRACTION = 1e-4
# A dequantised moment whose code differs is one map step away: at most the widest step of
# the signed map (0.01406) times its tile's maximum, itself at most max|moment|.
ONE_CODE_STEP = 0.0141
MOMENT_FLIPS = 4  # as optimizer.FREE_FLIPS: a sample of a chaotic process, not a bound


def _random(shape, seed=0, scale=1.0):
  return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


def _on_thresholds():
  """Tiles holding a 1.0 (or 2.0 or -1.0) and then every threshold of both maps, every map
  value, and each threshold's float32 neighbours, scaled by that first value."""
  values = []
  for table in (jax_moments.SIGNED_MAP, jax_moments.UNSIGNED_MAP):
    wide = table.astype(np.float64)
    t = ((wide[1:] + wide[:-1]) / 2).astype(np.float32)
    values += [t, table, np.nextafter(t, np.float32(2)), np.nextafter(t, np.float32(-2))]
  values = np.concatenate(values)
  values = values[np.abs(values) <= 1]
  count = -(-values.size // 255)
  body = np.zeros(count * 255, np.float32)
  body[: values.size] = values
  top = np.array([(1.0, 2.0, -1.0)[k % 3] for k in range(count)], np.float32)[:, None]
  tiles = np.concatenate([top, body.reshape(count, 255) * np.abs(top)], axis=1)
  return tiles.reshape(16 * count, 16)


def _subnormals():
  """Tiles of subnormals only, and subnormal x or x / a beside normal values."""
  x = np.zeros((32, 48), np.float32)
  x[:16, :16] = _random((16, 16), 7, 1e-40)
  x[16:, :16] = _random((16, 16), 8, 1e-39)
  x[:, 16:32] = _random((32, 16), 9, 1e-37)
  x[0, 16] = 1e-36
  x[:, 32:] = _random((32, 16), 10)
  x[1, 32], x[2, 33], x[3, 34] = 1e-39, 1e-38, 3e-38
  x[4, 32] = 1e10  # its tile's other values, divided by it, come out subnormal or tiny
  x[5, 33:40] = [1e-30, 1e-28, 2e-28, 1e-27, 1e-26, 1e-25, 1e-24]
  return x


def _with_nan():
  x = _random((32, 20), 11)
  x[3, 4] = np.nan
  return x


# name -> float32 matrix (used as is for the signed map, as |x| for the unsigned one)
CASES = {
  "random 64x64": lambda: _random((64, 64)),
  "partial tiles 37x70": lambda: _random((37, 70), 1),
  "rank-8 moments 32x8, 8x64": lambda: np.pad(_random((32, 8), 2), ((0, 0), (0, 56))),
  "one row 1x300": lambda: _random((1, 300), 3),
  "squared gradients, scales 1e-12..1": lambda: (
    (_random((48, 40), 4) * 10 ** np.random.default_rng(5).uniform(-6, 0, (48, 40))).astype(
      np.float32
    )
    ** 2
  ),
  "huge dynamic range e^-80..e^80": lambda: (
    _random((48, 48), 6) * np.exp(np.random.default_rng(6).uniform(-80, 80, (48, 48)))
  ).astype(np.float32),
  "tiny 1e-30": lambda: _random((20, 33), 12, 1e-30),
  "huge 1e30": lambda: _random((33, 17), 13, 1e30),
  "subnormals": _subnormals,
  "zero tiles beside nonzero": lambda: np.pad(_random((16, 16), 14), ((0, 17), (16, 3))),
  "on and around every threshold": _on_thresholds,
  "a NaN in one tile": _with_nan,
}


@functools.partial(jax.jit, static_argnums=1)
def _jax_quantise(x, signed):
  q = qgalore_jax.quantize_moment(x, signed)
  return q, qgalore_jax.dequantize_moment(q, signed)


def _torch_quantise(x: torch.Tensor, signed: bool):
  q = qgalore_torch.quantize_moment(x, signed)
  return q, qgalore_torch.dequantize_moment(q, signed)


def _inputs(case: str, signed: bool) -> np.ndarray:
  x = np.asarray(CASES[case](), np.float32)
  return x if signed else np.abs(x)


def _quantised(backend: str, dev: core.Device, x: np.ndarray, signed: bool) -> list:
  """``[codes, absmax, dequantised]`` of ``x`` (NumPy), computed on ``dev``."""
  if backend == "JAX":
    with core.on(dev):
      q, x_hat = _jax_quantise(jax.device_put(x, dev.jax), signed)
  else:
    q, x_hat = _torch_quantise(torch.from_numpy(x).to(dev.torch), signed)
  return [core.to_numpy(a) for a in (q.codes, q.absmax, x_hat)]


def measure(case: str, dev: core.Device) -> list[core.Check]:
  """Codes, tile maxima and dequantised values of ``case``, JAX vs torch, both maps.

  Each map compares two layouts: both backends on ``x``, and JAX on ``x.T`` (transposed
  back) against torch on a strided ``x.T`` view (transposed back).
  """
  parts = {"codes": ([], []), "absmax": ([], []), "dequantised": ([], [])}
  for signed in (True, False):
    x = _inputs(case, signed)
    same = zip(_quantised("JAX", dev, x, signed), _quantised("torch", dev, x, signed))
    jax_t = _quantised("JAX", dev, np.ascontiguousarray(x.T), signed)
    q, x_hat = _torch_quantise(torch.from_numpy(x).to(dev.torch).T, signed)
    torch_t = [core.to_numpy(a) for a in (q.codes, q.absmax, x_hat)]
    for name, (j, t), jt, tt in zip(parts, same, jax_t, torch_t, strict=True):
      parts[name][0].extend([j.ravel(), jt.T.ravel()])
      parts[name][1].extend([t.ravel(), tt.T.ravel()])
  return [
    core.compare(
      COMPONENT,
      f"quantiser: {case}",
      f"{name}, signed and unsigned, x and x.T",
      np.concatenate(j),
      np.concatenate(t),
      device=dev.name,
    )
    for name, (j, t) in parts.items()
  ]


def measure_maps(dev: core.Device) -> list[core.Check]:
  """The two maps and their thresholds, as each package holds them (float32 constants)."""
  # JAX appends +inf to its 255 thresholds (so a lookup past the last one is in range).
  pairs = {
    "signed map": (jax_moments.SIGNED_MAP, torch_moments.SIGNED_MAP),
    "unsigned map": (jax_moments.UNSIGNED_MAP, torch_moments.UNSIGNED_MAP),
    "signed thresholds": (jax_moments._SIGNED_THRESHOLDS[:255], torch_moments.SIGNED_THRESHOLDS),
    "unsigned thresholds": (
      jax_moments._UNSIGNED_THRESHOLDS[:255],
      torch_moments.UNSIGNED_THRESHOLDS,
    ),
  }
  return [
    core.compare(COMPONENT, "code maps", label, j, t, device=dev.name)
    for label, (j, t) in pairs.items()
  ]


def measure_all(dev: core.Device) -> list[core.Check]:
  return measure_maps(dev) + [c for case in CASES for c in measure(case, dev)]


def measure_cross_device(cpu: core.Device, gpu: core.Device) -> list[core.Check]:
  """Each backend's codes, tile maxima and dequantised values on the GPU vs the CPU."""
  checks = []
  for backend in ("JAX", "torch"):
    for case in CASES:
      got, want = [], []
      for signed in (True, False):
        x = _inputs(case, signed)
        got += [a.astype(np.float64).ravel() for a in _quantised(backend, gpu, x, signed)]
        want += [a.astype(np.float64).ravel() for a in _quantised(backend, cpu, x, signed)]
      checks.append(
        core.compare(
          COMPONENT,
          f"{backend} quantiser, GPU vs CPU",
          case,
          np.concatenate(got),
          np.concatenate(want),
          device="gpu",
        )
      )
  return checks


def flip_one_moment_code(opt, model, t):
  """After torch's step 0, q_proj's stored 8-bit first moment gets one code moved one step.

  The code moved is the one whose move by one step (towards the zero code) changes the
  dequantised moment most: the largest effect a flip at a threshold can have there. The
  step's own direction came from the float32 moments before they were stored, so the flip
  acts from step 1 on, as a flip made by the quantiser at step 0 would.
  """
  if t != 0:
    return
  state = opt.state[model.parameter("q")]
  codes = state["exp_avg"].to(torch.int64)
  table = torch.from_numpy(torch_moments.SIGNED_MAP).to(codes.device)
  moved = torch.where(codes > torch_moments.SIGNED_ZERO_CODE, codes - 1, codes + 1)
  absmax = state["exp_avg_absmax"].repeat_interleave(16, 0).repeat_interleave(16, 1)
  change = (table[moved] - table[codes]).abs() * absmax[: codes.shape[0], : codes.shape[1]]
  i = int(torch.argmax(change))
  codes.view(-1)[i] = moved.view(-1)[i]
  state["exp_avg"] = codes.to(torch.uint8)


def _compare_codes(case, quantity, got, want, max_step, max_fraction, basis, dev_name):
  """Codes may differ by at most ``max_step`` on at most ``max_fraction`` of them."""
  check = core.compare(
    COMPONENT, case, quantity, got, want, core.Tolerance(atol=max_step), dev_name
  )
  differ = int(np.count_nonzero(np.asarray(got) != np.asarray(want)))
  fraction = differ / max(np.asarray(want).size, 1)
  return dataclasses.replace(
    check,
    quantity=f"{quantity} ({differ} of {np.asarray(want).size} differ)",
    tolerance=f"<= {max_step:g} step on <= {max_fraction:.1e} of codes ({basis})",
    passed=check.passed and fraction <= max_fraction,
  )


def _is_codes(key: str) -> bool:
  return key.endswith(("codes, projected", "codes, other")) and "/" in key


@functools.cache
def flipped_trace(dev_name: str) -> dict:
  """Quantities of torch's free-running 8-bit run with one flipped moment code."""
  _, flipped = optimizer.run(
    False,
    "shared",
    core.device(dev_name),
    with_jax=False,
    moment_bits=8,
    perturb=flip_one_moment_code,
  )
  return optimizer.quantities(flipped, llama.init_params())


def measure_optimizer(lockstep: bool, dev_name: str) -> list[core.Check]:
  """The LLaMA block with 8-bit moments, shared SVD, float weights: JAX vs torch."""
  jt, tt = optimizer.traces(False, "shared", dev_name, moment_bits=8, lockstep=lockstep)
  init = llama.init_params()
  jax_q, torch_q = optimizer.quantities(jt, init), optimizer.quantities(tt, init)
  tol = optimizer.shared_tolerances(torch_q, int8=False)
  steps = len(tt.loss)
  checks = []
  if lockstep:
    case = f"shared SVD, 8-bit moments, lockstep, {steps} steps"
    for k in torch_q:
      if _is_codes(k):
        checks.append(
          _compare_codes(case, k, jax_q[k], torch_q[k], 1, LOCKSTEP_FRACTION, "8-17 ulps", dev_name)
        )
        continue
      if k.startswith("exp_avg") and "absmax" not in k:  # a dequantised moment
        scale = float(np.abs(torch_q[k]).max())
        tol[k] = core.Tolerance(
          atol=(optimizer.SHARED_NORMWISE + ONE_CODE_STEP) * scale,
          basis="1e-3 + 1 code step, x max|torch|",
        )
      checks.append(core.compare(COMPONENT, case, k, jax_q[k], torch_q[k], tol[k], dev_name))
    return checks
  flipped = flipped_trace(dev_name)
  case = f"shared SVD, 8-bit moments, free-running, {steps} steps"
  for k in torch_q:
    one_flip = np.abs(flipped[k].astype(np.float64) - torch_q[k])
    if _is_codes(k):
      max_step = max(1.0, float(one_flip.max()))
      fraction = min(1.0, MOMENT_FLIPS * float(np.mean(one_flip != 0)))
      checks.append(
        _compare_codes(
          case, k, jax_q[k], torch_q[k], max_step, fraction, "4 x 1 flipped code", dev_name
        )
      )
      continue
    atol = max(tol[k].atol, MOMENT_FLIPS * float(one_flip.max()))
    if tol[k].exact and not one_flip.any():
      bound = core.EXACT
    elif k == "loss":
      bound = core.Tolerance(
        atol=MOMENT_FLIPS * float(one_flip.max()),
        rtol=optimizer.LOSS_RTOL,
        basis="4 x 1 flipped moment code",
      )
    else:
      bound = core.Tolerance(atol=atol, basis="4 x 1 flipped moment code")
    checks.append(core.compare(COMPONENT, case, k, jax_q[k], torch_q[k], bound, dev_name))
  return checks

"""Matmul precision: what changes when the parity runs' "highest" settings are relaxed.

Parity runs use full float32 matmuls (:func:`parity_tests.core.matmul_precision` with
``highest=True``): JAX ``default_matmul_precision("highest")``, torch TF32 off and
``set_float32_matmul_precision("highest")``. Here the whole optimizer (shared-SVD mode,
float weights, a short run) is trained under both settings on each backend and the two
runs are compared. On a CPU neither library uses reduced-precision matmuls for float32, so
the runs are expected bit-identical; on an NVIDIA GPU with TF32 (Ampere and later), the
inputs of every matmul are rounded to 10 mantissa bits (relative 2**-11 ~ 5e-4). On a GPU
the differences are reported, not held to a tolerance: the SVD amplifies them (on an H100,
20 steps moved updates and moments by up to 4% of their largest value and flipped INT4 projector
codes by one step, see docs/gpu.md), and no bound follows from the matmul error alone. A
non-finite value still fails.
"""

import dataclasses

import numpy as np

from parity_tests import core
from parity_tests import llama
from parity_tests import optimizer

COMPONENT = "matmul precision"
STEPS = 20
REPORTED = core.Tolerance(atol=np.inf, basis="GPU: reported, not held; non-finite fails")


def _compare(dev: core.Device, case, quantity, got, want) -> core.Check:
  """Bit-exact on a CPU; on a GPU the difference is reported and only non-finite fails."""
  if dev.name == "cpu":
    return core.compare(COMPONENT, case, quantity, got, want, core.EXACT, dev.name)
  check = core.compare(COMPONENT, case, quantity, got, want, REPORTED, dev.name)
  finite = bool(np.all(np.isfinite(core.to_numpy(got))))
  return dataclasses.replace(check, passed=check.passed and finite)


def measure(dev: core.Device) -> list[core.Check]:
  """Each backend trained with relaxed matmul precision vs with the highest.

  The highest-precision run is the whole-optimizer suite's (cached); its first ``STEPS``
  steps see the same batches as the relaxed run.
  """
  init = llama.init_params()
  highest = optimizer.traces(False, "shared", dev.name)
  with core.matmul_precision(highest=False):
    relaxed = optimizer.run(False, "shared", dev, steps=STEPS)
  checks = []
  for backend, i in (("JAX", 0), ("torch", 1)):
    want = {k: v[:STEPS] for k, v in optimizer.quantities(highest[i], init).items()}
    got = optimizer.quantities(relaxed[i], init)
    case = f"{backend}: relaxed vs highest, {STEPS} steps"
    checks += [_compare(dev, case, k, got[k], want[k]) for k in want]
  return checks

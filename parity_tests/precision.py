"""Matmul precision: what changes when the parity runs' "highest" settings are relaxed.

Parity runs use full float32 matmuls (:func:`parity_tests.core.matmul_precision` with
``highest=True``): JAX ``default_matmul_precision("highest")``, torch TF32 off and
``set_float32_matmul_precision("highest")``. Here the whole optimizer (shared-SVD mode,
float weights, a short run) is trained under both settings on each backend and the two
runs are compared. On a CPU neither library uses reduced-precision matmuls for float32, so
the runs are expected bit-identical; on an NVIDIA GPU with TF32 (Ampere and later), the
inputs of every matmul are rounded to 10 mantissa bits (relative 2**-11 ~ 5e-4), so
updates move by up to ~1e-3 of their size, which the GPU tolerance below allows 10x over.
"""

from parity_tests import core
from parity_tests import llama
from parity_tests import optimizer

COMPONENT = "matmul precision"
STEPS = 20
TF32_NORMWISE = 1e-2


def _tolerance(dev: core.Device, reference) -> core.Tolerance:
  if dev.name == "cpu":
    return core.EXACT
  scale = float(abs(reference).max())
  return core.Tolerance(atol=TF32_NORMWISE * scale, basis="TF32, 1e-2 max|highest|")


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
    checks += [
      core.compare(COMPONENT, case, k, got[k], want[k], _tolerance(dev, want[k]), dev.name)
      for k in want
    ]
  return checks

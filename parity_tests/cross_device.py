"""CPU vs GPU, for each backend alone: the same inputs on both devices.

Codes that docs/spec.md fixes bit for bit (quantiser, SR uniforms, SR codes) must not depend on the
device. The SVD and the matmuls do (cuSOLVER vs LAPACK, different summation orders), so the
optimizer is compared in shared-SVD mode, where the only differences left are float32
rounding, under the whole-optimizer tolerance of that mode.
"""

import jax
import numpy as np
import torch

import qgalore_jax
import qgalore_torch
from parity_tests import core
from parity_tests import generator
from parity_tests import llama
from parity_tests import optimizer
from parity_tests import quantiser

COMPONENT = "CPU vs GPU"


def _quantised(backend: str, dev: core.Device, case: str) -> np.ndarray:
  """Every code, scale and zero of ``case`` at 1..8 bits on ``dev``, as one float64 vector."""
  make, group_size = quantiser.CASES[case]
  w = np.asarray(make(), np.float32)
  if backend == "JAX":
    with core.on(dev):
      out = quantiser.jax_quantize_all(jax.device_put(w, dev.jax), group_size)
    parts = [x for q, codes in out for x in (codes, q.scale, q.zero)]
  else:
    parts = []
    for bits in quantiser.BITS:
      q = qgalore_torch.quantize(torch.from_numpy(w).to(dev.torch), bits, group_size)
      codes = qgalore_torch.unpack_int4(q.codes, w.size) if bits <= 4 else q.codes
      parts += [codes, q.scale, q.zero]
  return np.concatenate([core.to_numpy(p).astype(np.float64).ravel() for p in parts])


def _uniforms(backend: str, dev: core.Device) -> np.ndarray:
  out = []
  for key in generator.KEYS:
    if backend == "JAX":
      with core.on(dev):
        out.append(core.to_numpy(qgalore_jax.uniforms(*key, (generator.SIZE,))))
    else:
      out.append(core.to_numpy(qgalore_torch.uniforms(*key, (generator.SIZE,), device=dev.torch)))
  return np.concatenate(out)


def measure_codes(cpu: core.Device, gpu: core.Device) -> list[core.Check]:
  """Quantiser outputs and SR uniforms of each backend on the CPU and the GPU: bit-exact."""
  checks = []
  for backend in ("JAX", "torch"):
    for case in quantiser.CASES:
      checks.append(
        core.compare(
          COMPONENT,
          f"{backend} quantiser",
          case,
          _quantised(backend, gpu, case),
          _quantised(backend, cpu, case),
          device="gpu",
        )
      )
    checks.append(
      core.compare(
        COMPONENT,
        f"{backend} SR uniforms",
        "4 keys",
        _uniforms(backend, gpu),
        _uniforms(backend, cpu),
        device="gpu",
      )
    )
  return checks


def measure_optimizer(cpu: core.Device, gpu: core.Device, int8: bool) -> list[core.Check]:
  """Each backend's shared-SVD LLaMA run on the GPU vs on the CPU."""
  init = llama.init_params()
  on_cpu = optimizer.traces(int8, "shared", cpu.name)
  on_gpu = optimizer.traces(int8, "shared", gpu.name)
  checks = []
  for backend, i in (("JAX", 0), ("torch", 1)):
    want = optimizer.quantities(on_cpu[i], init)
    got = optimizer.quantities(on_gpu[i], init)
    tol = optimizer.shared_tolerances(want, int8)
    case = f"{backend} optimizer, shared SVD, {'INT8' if int8 else 'float'}"
    checks += [core.compare(COMPONENT, case, k, got[k], want[k], tol[k], "gpu") for k in want]
  return checks

"""SR generator and INT8 weight parity (docs/spec.md section 6): uniforms and codes, bit for bit.

The uniforms of both backends are compared with each other and with a NumPy ``uint32``
implementation written here from the formula in ``docs/spec.md`` section 6.3 (an oracle independent
of both packages). INT8 weights are quantised from a Flax kernel (in, out) on the JAX side
and from the equivalent torch weight (out, in), then updated for several steps by stochastic
rounding with the same seed and tensor id: codes, scales and zeros must stay identical.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import torch

import qgalore_jax
import qgalore_torch
from parity_tests import core

COMPONENT = "SR generator / INT8"
KEYS = ((0, 0, 0), (1234, 5678, 7), (2**32 - 1, 2**31, 3), (99, 2**32 - 1, 2**31 + 5))
SIZE = 4099  # not a multiple of anything the kernels tile by
SHAPES = ((48, 48), (40, 72), (72, 40))  # torch (out, in): square, "left", "right"
INT8_STEPS = 4


def numpy_uniforms(seed: int, step: int, tensor_id: int, size: int) -> np.ndarray:
  """The generator of ``docs/spec.md`` section 6.3 in NumPy uint32 arithmetic (wraps mod 2**32)."""

  def lowbias32(x):
    x = np.asarray(x, np.uint32)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))

  with np.errstate(over="ignore"):
    key = lowbias32(np.uint32(seed % 2**32) ^ np.uint32(0x9E3779B9))
    key = lowbias32(key ^ np.uint32(step % 2**32))
    key = lowbias32(key ^ np.uint32(tensor_id % 2**32))
    hashed = lowbias32(lowbias32(np.arange(size, dtype=np.uint32) ^ key) + key)
  return (hashed >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)


def measure_uniforms(dev: core.Device) -> list[core.Check]:
  """Uniforms for several (seed, step, tensor id) keys: JAX, torch and NumPy agree."""
  jax_u, torch_u, numpy_u = [], [], []
  for key in KEYS:
    with core.on(dev):
      jax_u.append(core.to_numpy(qgalore_jax.uniforms(*key, (SIZE,))))
    torch_u.append(core.to_numpy(qgalore_torch.uniforms(*key, (SIZE,), device=dev.torch)))
    numpy_u.append(numpy_uniforms(*key, SIZE))
  jax_u, torch_u, numpy_u = map(np.concatenate, (jax_u, torch_u, numpy_u))
  case = f"{len(KEYS)} keys x {SIZE}"
  return [
    core.compare(COMPONENT, case, "uniforms, JAX vs torch", jax_u, torch_u, device=dev.name),
    core.compare(COMPONENT, case, "uniforms, JAX vs NumPy", jax_u, numpy_u, device=dev.name),
    core.compare(COMPONENT, case, "uniforms, torch vs NumPy", torch_u, numpy_u, device=dev.name),
  ]


def _weights(shape, seed):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=shape).astype(np.float32) * 0.05
  updates = rng.normal(size=(INT8_STEPS, *shape)).astype(np.float32) * 1e-3
  return w, updates


@functools.partial(jax.jit, static_argnames=("seed",))
def _jax_int8_step(qparams, update, step, tensor_ids, seed):
  return qgalore_jax.apply_updates(qparams, update, seed=seed, step=step, tensor_ids=tensor_ids)


def measure_int8(shape, dev: core.Device, seed=11, tensor_id=5) -> list[core.Check]:
  """INT8 codes of a Flax kernel (JAX) and its torch weight, at init and after SR updates."""
  w_OxI, updates = _weights(shape, sum(shape))
  with core.on(dev):
    qparams = qgalore_jax.quantize_params({"kernel": jnp.asarray(w_OxI.T)}, input_axis=0)
  weight = qgalore_torch.Int8Weight.from_float(torch.from_numpy(w_OxI).to(dev.torch))
  case = f"torch {shape[0]}x{shape[1]} / Flax kernel {shape[1]}x{shape[0]}"

  def fields():
    q = qparams["kernel"]
    return [(f, getattr(q, f), getattr(weight, f)) for f in ("codes", "scale", "zero")]

  checks = [
    core.compare(COMPONENT, case, f"init {f}", j, t, device=dev.name) for f, j, t in fields()
  ]
  sr = {f: ([], []) for f in ("codes", "scale", "zero")}
  for t in range(INT8_STEPS):
    with core.on(dev):
      update = {"kernel": jnp.asarray(updates[t].T)}
      qparams = _jax_int8_step(qparams, update, jnp.int32(t), {"kernel": tensor_id}, seed)
    qgalore_torch.apply_int8_update(
      weight, torch.from_numpy(updates[t]).to(dev.torch), seed=seed, step=t, tensor_id=tensor_id
    )
    for f, j, tt in fields():
      sr[f][0].append(core.to_numpy(j))
      sr[f][1].append(core.to_numpy(tt))
  checks += [
    core.compare(
      COMPONENT, case, f"SR {f}, {INT8_STEPS} steps", np.stack(j), np.stack(t), device=dev.name
    )
    for f, (j, t) in sr.items()
  ]
  return checks


def measure_all(dev: core.Device) -> list[core.Check]:
  return measure_uniforms(dev) + [c for shape in SHAPES for c in measure_int8(shape, dev)]

"""Cheaper-refresh parity (docs/spec.md section 2.6): sketches bit for bit, bases to rounding.

* The Rademacher sketch of a refresh, keyed by (seed, step, tensor id, slice index), must be
  bit-identical in both backends, on every device.
* ``randomized_projector`` from the same sketch, and from the same warm start, must give the
  same float32 basis to float32 rounding, on the well-conditioned matrices of the projector
  suite (a Flax kernel read as ``kernel.T`` in JAX, the (out, in) weight in torch).
* A stacked leaf trained with ``svd_method="subspace"`` in each backend (a scanned Flax
  kernel, a ``batch_axes`` parameter) follows the same per-slice schedule, and its float32
  projectors agree to float32 rounding: each slice draws the sketch of its own key.
"""

import jax
import jax.numpy as jnp
import numpy as np
import torch

import qgalore_jax
import qgalore_torch
from parity_tests import core
from parity_tests import projector
from parity_tests import stacked
from qgalore_jax._src import generator as jax_generator
from qgalore_jax._src import projector as jax_projector
from qgalore_torch._src import generator as torch_generator
from qgalore_torch._src import projector as torch_projector

COMPONENT = "cheaper refresh"
KEYS = ((0, 0, 0, 0), (1234, 5678, 7, 3), (2**32 - 1, 2**31, 2, 1))
SKETCH_SHAPE = (64, 24)
RANK, OVERSAMPLE, ITERS = 8, 4, 2
# Range finding adds QRs and products to the SVD; measured <= 3e-6 on CPU, the SVD suite's
# bound holds.
FLOAT_TOL = projector.FLOAT_TOL
STEPS = 60


def _sketches(key, dev):
  with core.on(dev):
    jax_sketch = jax.jit(lambda: jax_generator.sketch(*key, SKETCH_SHAPE))()
  return jax_sketch, torch_generator.sketch(*key, SKETCH_SHAPE, device=dev.torch)


def measure_sketches(dev: core.Device) -> list[core.Check]:
  return [
    core.compare(COMPONENT, f"key {key}", "sketch", *_sketches(key, dev), device=dev.name)
    for key in KEYS
  ]


def measure_projectors(dev: core.Device) -> list[core.Check]:
  checks = []
  for shape in projector.SHAPES:
    g = projector.well_conditioned(shape, seed=sum(shape))
    sketch_shape = jax_projector.sketch_shape(shape, RANK, OVERSAMPLE)
    previous = projector.well_conditioned(shape, seed=1)  # another basis to warm-start from
    previous = np.array(qgalore_jax.compute_projector(previous, RANK))
    for name in ("randomized", "warm start"):

      def jax_basis(kernel, previous, sketch_shape=sketch_shape, name=name):
        start = jax_generator.sketch(5, 3, 1, 0, sketch_shape)
        if name == "warm start":
          start = jax_projector.warm_start(start, previous)
        return jax_projector.randomized_projector(kernel.T, RANK, start, ITERS)

      with core.on(dev):
        got_jax = jax.jit(jax_basis, static_argnums=(2, 3))(jnp.asarray(g.T), jnp.asarray(previous))
      start = torch_generator.sketch(5, 3, 1, 0, sketch_shape, device=dev.torch)
      if name == "warm start":
        start = torch_projector.warm_start(start, torch.from_numpy(previous).to(dev.torch))
      g_torch = torch.from_numpy(g).to(dev.torch)
      got_torch = torch_projector.randomized_projector(g_torch, RANK, start, ITERS)
      case = f"torch {shape[0]}x{shape[1]}, rank {RANK}, {name}"
      checks.append(
        core.compare(COMPONENT, case, "float32 basis", got_jax, got_torch, FLOAT_TOL, dev.name)
      )
  return checks


def _jax_run(grads, dev):
  tx = qgalore_jax.scale_by_qgalore(
    rank=stacked.RANK, update_proj_gap=stacked.GAP, dimension_numbers=stacked.DIMS,
    proj_bits=None, svd_method="subspace", seed=11,
  )  # fmt: skip
  kernel = jnp.zeros((len(stacked.DRIFTS), stacked.SHAPE[1], stacked.SHAPE[0]))

  def step(state, g_LxOxI):
    _, state = tx.update(jnp.swapaxes(g_LxOxI, 1, 2), state, kernel)
    stats = qgalore_jax.projection_stats(state)
    return state, (stats["svd_count"], stats["gap"])

  with core.on(dev):
    state, (counts, gaps) = jax.jit(lambda s, x: jax.lax.scan(step, s, x))(
      tx.init(kernel), jnp.asarray(grads)
    )
  schedule = np.stack([counts, gaps], axis=-1).astype(np.int64)
  return schedule, np.asarray(state.projector)


def _torch_run(grads, dev):
  weight = torch.zeros((len(stacked.DRIFTS), *stacked.SHAPE), device=dev.torch)
  group = {"params": [weight], "rank": stacked.RANK, "batch_axes": (0,)}
  opt = qgalore_torch.QGaLoreAdamW(
    [group], lr=0.0, seed=11, update_proj_gap=stacked.GAP, proj_bits=None,
    svd_method="subspace",
  )  # fmt: skip
  trace = np.empty((len(grads), len(stacked.DRIFTS), 2), np.int64)
  for t, g in enumerate(torch.from_numpy(grads).to(dev.torch)):
    weight.grad = g
    opt.step()
    trace[t, :, 0] = opt.state[weight]["svd_count"].numpy()
    trace[t, :, 1] = opt.state[weight]["gap"].numpy()
  return trace, core.to_numpy(opt.state[weight]["proj_basis"])


def measure_stack(dev: core.Device) -> list[core.Check]:
  grads = stacked.stream()[:STEPS]
  (jax_schedule, jax_basis), (torch_schedule, torch_basis) = (
    _jax_run(grads, dev),
    _torch_run(grads, dev),
  )
  case = f"{len(stacked.DRIFTS)} x {stacked.SHAPE[0]}x{stacked.SHAPE[1]} stack, subspace"
  cmp = lambda quantity, a, b, tol=core.EXACT: core.compare(
    COMPONENT, case, quantity, a, b, tol, dev.name
  )
  return [
    cmp("SVD count and gap per slice per step", jax_schedule, torch_schedule),
    cmp("float32 projector per slice", jax_basis, torch_basis, FLOAT_TOL),
  ]


def measure_all(dev: core.Device) -> list[core.Check]:
  return measure_sketches(dev) + measure_projectors(dev) + measure_stack(dev)

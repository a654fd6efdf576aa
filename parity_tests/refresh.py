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
STEPS = 30  # refreshes at steps 0, 10 and 20: two warm starts per slice


def _sketches(key, dev):
  with core.on(dev):
    jax_sketch = jax.jit(lambda: jax_generator.sketch(*key, SKETCH_SHAPE))()
  return jax_sketch, torch_generator.sketch(*key, SKETCH_SHAPE, device=dev.torch)


def measure_sketches(dev: core.Device) -> list[core.Check]:
  return [
    core.compare(COMPONENT, f"key {key}", "sketch", *_sketches(key, dev), device=dev.name)
    for key in KEYS
  ]


def _jax_bases(kernels, previouses):
  """Per shape of the projector suite, the randomized basis and the warm-started one, in one
  jitted call (one compilation)."""
  bases = []
  for kernel, previous in zip(kernels, previouses, strict=True):
    sketch = jax_generator.sketch(
      5, 3, 1, 0, jax_projector.sketch_shape(kernel.T.shape, RANK, OVERSAMPLE)
    )
    for start in (sketch, jax_projector.warm_start(sketch, previous)):
      bases.append(jax_projector.randomized_projector(kernel.T, RANK, start, ITERS))
  return bases


def _torch_bases(g, previous, dev):
  sketch_shape = torch_projector.sketch_shape(g.shape, RANK, OVERSAMPLE)
  sketch = torch_generator.sketch(5, 3, 1, 0, sketch_shape, device=dev.torch)
  warm = torch_projector.warm_start(sketch, torch.from_numpy(previous).to(dev.torch))
  g = torch.from_numpy(g).to(dev.torch)
  return [torch_projector.randomized_projector(g, RANK, start, ITERS) for start in (sketch, warm)]


def _orthonormal_rows(r, k, seed=1):
  """A float32 r x k matrix with orthonormal rows: a previous basis to warm-start from."""
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(k, r)))
  return np.ascontiguousarray(q.T, np.float32)


def measure_projectors(dev: core.Device) -> list[core.Check]:
  gs = [projector.well_conditioned(shape, seed=sum(shape)) for shape in projector.SHAPES]
  previouses = [_orthonormal_rows(RANK, min(shape)) for shape in projector.SHAPES]
  with core.on(dev):
    got_jax = jax.jit(_jax_bases)([jnp.asarray(g.T) for g in gs], previouses)
  checks = []
  for i, (shape, g, previous) in enumerate(zip(projector.SHAPES, gs, previouses, strict=True)):
    got_torch = _torch_bases(g, previous, dev)
    for j, name in enumerate(("randomized", "warm start")):
      case = f"torch {shape[0]}x{shape[1]}, rank {RANK}, {name}"
      checks.append(
        core.compare(
          COMPONENT, case, "float32 basis", got_jax[2 * i + j], got_torch[j], FLOAT_TOL, dev.name
        )
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

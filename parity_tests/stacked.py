"""Stacked-matrix parity (docs/spec.md section 1.3): one stack, each backend in its layout.

A stack of three matrices, held by ``qgalore_jax`` as a scanned Flax kernel ``(L, in, out)``
with ``DimensionNumbers(1, 2, batch_axis=0)`` and by ``QGaLoreAdamW`` as ``(L, out, in)``
with ``batch_axes=(0,)``, sees a stream of gradients whose top singular vectors drift at a
different speed in each slice (:func:`parity_tests.schedule.drifting_gradients`), so each
slice follows its own schedule. Two runs:

* ``own SVD``: each backend with its own LAPACK SVD, no learning rate; the refresh steps,
  gaps and SVD counts of every slice on every step must be identical.
* ``shared SVD``: both take the float64 NumPy SVD (:func:`parity_tests.optimizer.numpy_projector`)
  and train with AdamW; the INT4 projector codes of every slice must be identical and the
  weights equal to float32 rounding (the tolerance of the whole-optimizer shared mode).
"""

import jax
import jax.numpy as jnp
import numpy as np
import torch

import qgalore_jax
import qgalore_torch
from parity_tests import core
from parity_tests import optimizer
from parity_tests import schedule

COMPONENT = "stacked matrices"
STEPS = 600
RANK, GAP, LR = 4, 10, 1e-2
SHAPE = (24, 16)  # (out, in) of every slice
DRIFTS = (0.05, 0.1, 0.3)  # per-step rotation of each slice's singular vectors (radians)
DIMS = qgalore_jax.DimensionNumbers(reduction_axis=1, output_axis=2, batch_axis=0)


def stream() -> np.ndarray:
  """float32 [steps, L, out, in]: the gradients of each slice, in torch's layout."""
  per_slice = [schedule.drifting_gradients(SHAPE, d, STEPS, seed=i) for i, d in enumerate(DRIFTS)]
  return np.stack(per_slice, axis=1)


def _jax_run(grads: np.ndarray, shared: bool, dev: core.Device) -> dict:
  projector_fn = optimizer.jax_numpy_projector if shared else None
  tx = qgalore_jax.qgalore_adamw(
    LR if shared else 0.0, rank=RANK, update_proj_gap=GAP, dimension_numbers=DIMS,
    projector_fn=projector_fn,
  )  # fmt: skip
  kernel = jnp.zeros((len(DRIFTS), SHAPE[1], SHAPE[0]))  # (L, in, out)

  def step(carry, g_LxOxI):
    w, state = carry
    updates, state = tx.update(jnp.swapaxes(g_LxOxI, 1, 2), state, w)
    stats = qgalore_jax.projection_stats(state)
    return (w + updates, state), (stats["svd_count"], stats["gap"])

  with core.on(dev):
    (w, state), (counts, gaps) = jax.jit(lambda c, x: jax.lax.scan(step, c, x))(
      (kernel, tx.init(kernel)), jnp.asarray(grads)
    )
  codes = state[0].inner_states["qgalore"].inner_state.projector.codes
  return {
    "weights": np.swapaxes(np.asarray(w), 1, 2),
    "schedule": np.stack([counts, gaps], axis=-1).astype(np.int64),  # [steps, L, 2]
    "codes": np.asarray(codes),
  }


def _torch_run(grads: np.ndarray, shared: bool, dev: core.Device) -> dict:
  weight = torch.zeros((len(DRIFTS), *SHAPE), device=dev.torch)
  opt = qgalore_torch.QGaLoreAdamW(
    [{"params": [weight], "rank": RANK, "update_proj_gap": GAP, "batch_axes": (0,)}],
    lr=LR if shared else 0.0,
    projector_fn=optimizer.torch_numpy_projector if shared else None,
  )
  trace = np.empty((STEPS, len(DRIFTS), 2), np.int64)
  for t, g in enumerate(torch.from_numpy(grads).to(dev.torch)):
    weight.grad = g
    opt.step()
    state = opt.state[weight]
    trace[t, :, 0] = state["svd_count"].numpy()
    trace[t, :, 1] = state["gap"].numpy()
  return {
    "weights": core.to_numpy(weight),
    "schedule": trace,
    "codes": core.to_numpy(opt.state[weight]["proj_codes"]),
  }


def measure(dev: core.Device) -> list[core.Check]:
  """Per-slice schedules (own SVDs) and weights and codes (shared SVD) of JAX vs torch."""
  grads = stream()
  case = f"{len(DRIFTS)} x {SHAPE[0]}x{SHAPE[1]} stack, {STEPS} steps"
  checks = []
  own_jax, own_torch = _jax_run(grads, False, dev), _torch_run(grads, False, dev)
  for quantity, index in (("SVD count per slice per step", 0), ("gap per slice per step", 1)):
    checks.append(
      core.compare(COMPONENT, f"{case}, own SVD", quantity, own_jax["schedule"][..., index],
                   own_torch["schedule"][..., index], device=dev.name)
    )  # fmt: skip
  shared_jax, shared_torch = _jax_run(grads, True, dev), _torch_run(grads, True, dev)
  shared = f"{case}, shared SVD"
  checks.append(
    core.compare(COMPONENT, shared, "INT4 projector codes", shared_jax["codes"],
                 shared_torch["codes"], device=dev.name)
  )  # fmt: skip
  moved = np.abs(shared_torch["weights"]).max()  # the weights start at zero
  tol = core.Tolerance(atol=optimizer.SHARED_NORMWISE * moved, basis="1e-3 max|W_t - W_0|")
  checks.append(
    core.compare(COMPONENT, shared, "weights", shared_jax["weights"], shared_torch["weights"], tol,
                 device=dev.name)
  )  # fmt: skip
  return checks

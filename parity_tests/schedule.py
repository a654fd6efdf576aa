"""Adaptive-schedule parity (docs/spec.md section 4): identical refresh steps, gaps and SVD counts.

Both optimizers (no learning rate: only their schedules matter) see the same long stream of
gradients on three small matrices, a "right", a "left" and a square one, held as Flax
kernels by ``scale_by_qgalore`` (run under ``lax.scan``) and as (out, in) weights by
``QGaLoreAdamW``. The top singular vectors drift: they rotate by a random walk of angles,
at a different speed per matrix, so the cosines between refreshes, and with them the
growth of each gap, differ (13, 12 and 33 SVDs in 2400 steps). Each backend uses
its own SVD. The authors' ``GaLoreProjector`` (sign-fixed) runs the same schedule as oracle.
"""

import jax
import jax.numpy as jnp
import numpy as np
import torch

import qgalore_jax
import qgalore_torch
from parity_tests import core
from parity_tests import projector

COMPONENT = "adaptive schedule"
STEPS = 2400
RANK = 4
GAP = 10
# torch (out, in) shape -> standard deviation of the per-step rotation angle (radians)
MATRICES = {"right": ((24, 16), 0.05), "left": ((16, 24), 0.1), "square": ((16, 16), 0.3)}


def _rotation(n, angle):
  r = np.eye(n)
  r[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
  return r


def drifting_gradients(shape, drift, steps=STEPS, seed=0) -> np.ndarray:
  """float32 [steps, m, n]: ``U_t diag(s) V_t^T + noise`` with U, V rotated in their first
  plane by a random walk of angles (steps of ``drift`` radians); singular values 4 .. 1."""
  rng = np.random.default_rng(seed)
  m, n = shape
  k = min(m, n)
  u0, _ = np.linalg.qr(rng.normal(size=(m, m)))
  v0, _ = np.linalg.qr(rng.normal(size=(n, n)))
  s = np.linspace(4.0, 1.0, k)
  out = np.empty((steps, m, n), np.float32)
  for t, angle in enumerate(np.cumsum(rng.normal(0.0, drift, steps))):
    u = u0 @ _rotation(m, angle)
    v = v0 @ _rotation(n, angle)
    out[t] = (u[:, :k] * s) @ v[:, :k].T + 0.01 * rng.normal(size=(m, n))
  return out


def _jax_schedule(grads_MxN: dict) -> dict:
  """Per-step (svd_count, gap) of each matrix under ``scale_by_qgalore`` (Flax kernels)."""
  tx = qgalore_jax.scale_by_qgalore(rank=RANK, update_proj_gap=GAP, input_axis=0)
  kernels = {name: jnp.zeros(g.shape[:0:-1]) for name, g in grads_MxN.items()}

  def step(state, grads):
    _, state = tx.update(grads, state)
    stats = qgalore_jax.projection_stats(state)
    return state, {k: (s["svd_count"], s["gap"]) for k, s in stats.items()}

  stream = {name: jnp.asarray(g.transpose(0, 2, 1)) for name, g in grads_MxN.items()}
  _, trace = jax.jit(lambda s, x: jax.lax.scan(step, s, x))(tx.init(kernels), stream)
  return {name: np.stack([c, g], axis=1).astype(np.int64) for name, (c, g) in trace.items()}


def _torch_schedule(grads_MxN: dict, dev: core.Device) -> dict:
  """Per-step (svd_count, gap) of each matrix under ``QGaLoreAdamW`` (lr 0: weights fixed)."""
  weights = {name: torch.zeros(g.shape[1:], device=dev.torch) for name, g in grads_MxN.items()}
  opt = qgalore_torch.QGaLoreAdamW(
    [{"params": list(weights.values()), "rank": RANK, "update_proj_gap": GAP}], lr=0.0
  )
  stream = {name: torch.from_numpy(g).to(dev.torch) for name, g in grads_MxN.items()}
  trace = {name: np.empty((STEPS, 2), np.int64) for name in grads_MxN}
  for t in range(STEPS):
    for name, w in weights.items():
      w.grad = stream[name][t]
    opt.step()
    for name, w in weights.items():
      trace[name][t] = (int(opt.state[w]["svd_count"]), int(opt.state[w]["gap"]))
  return trace


def _authors_schedule(authors_cls, grads_MxN: np.ndarray) -> np.ndarray:
  """Per-step (svd_count, gap) of the authors' projector, sign-fixed, float basis."""
  oracle = projector.sign_fixed_oracle(authors_cls, RANK, group_size=-1)
  oracle.quant = False
  oracle.update_proj_gap = GAP
  trace = np.empty((STEPS, 2), np.int64)
  for t, g in enumerate(torch.from_numpy(grads_MxN)):
    oracle.project(g, t)
    trace[t] = (oracle.svd_count, oracle.update_proj_gap)
  return trace


def measure(dev: core.Device, authors_cls=None) -> list[core.Check]:
  """Refresh steps, gaps and SVD counts of JAX, torch (and the authors) over ``STEPS``."""
  grads = {
    name: drifting_gradients(shape, drift, seed=i)
    for i, (name, (shape, drift)) in enumerate(MATRICES.items())
  }
  with core.on(dev):
    jax_trace = _jax_schedule(grads)
  torch_trace = _torch_schedule(grads, dev)
  checks = []
  for name, (shape, _) in MATRICES.items():
    case = f"{name} {shape[0]}x{shape[1]}, {STEPS} steps"
    j, t = jax_trace[name], torch_trace[name]
    checks += [
      core.compare(COMPONENT, case, "refresh steps", _refreshes(j), _refreshes(t), device=dev.name),
      core.compare(COMPONENT, case, "gap per step", j[:, 1], t[:, 1], device=dev.name),
      core.compare(COMPONENT, case, "SVD count per step", j[:, 0], t[:, 0], device=dev.name),
    ]
    if authors_cls is not None:
      a = _authors_schedule(authors_cls, grads[name])
      checks += [
        core.compare(COMPONENT, case, "JAX vs authors' (count, gap)", j, a, device=dev.name),
        core.compare(COMPONENT, case, "torch vs authors' (count, gap)", t, a, device=dev.name),
      ]
  return checks


def _refreshes(trace):
  """The 0-based steps on which the SVD count grew."""
  counts = np.concatenate([[0], trace[:, 0]])
  return np.flatnonzero(np.diff(counts)).astype(np.int64)

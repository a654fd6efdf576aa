"""qgalore_adamw inside Flax (NNX and linen) and orbax checkpoints; ``run_on_8_cpu_devices``,
which the sharded tests use (a mesh of 8 against one device: ``sharding_test.py`` on Explicit
axes, ``moments_test.py`` and ``examples/llama/mesh_test.py`` on Auto ones, the latter with
data-parallel batches)."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qgalore_jax import projection_stats
from qgalore_jax import qgalore_adamw


def test_flax_nnx_optimizer():
  from flax import nnx

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.up = nnx.Linear(8, 32, rngs=rngs)
      self.down = nnx.Linear(32, 4, rngs=rngs)

    def __call__(self, x):
      return self.down(nnx.relu(self.up(x)))

  x = jax.random.normal(jax.random.key(0), (64, 8))
  y = jax.random.normal(jax.random.key(1), (64, 4))
  model = MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, qgalore_adamw(1e-2, rank=4, update_proj_gap=5), wrt=nnx.Param)
  loss_fn = lambda m: jnp.mean((m(x) - y) ** 2)
  traces = []

  @nnx.jit
  def step(model, optimizer):
    traces.append(1)  # runs only while tracing
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  first = float(step(model, optimizer))
  for _ in range(60):
    last = float(step(model, optimizer))
  assert last < 0.7 * first
  assert len(traces) == 1  # the state keeps its structure inside nnx.Optimizer
  stats = projection_stats(optimizer.opt_state)
  assert int(stats["up"]["kernel"]["svd_count"]) >= 2
  assert stats["up"]["bias"] is None


def test_flax_linen_params():
  import flax.linen as nn

  model = nn.Sequential([nn.Dense(32), nn.relu, nn.Dense(4)])
  x = jax.random.normal(jax.random.key(0), (64, 8))
  y = jax.random.normal(jax.random.key(1), (64, 4))
  params = model.init(jax.random.key(2), x)
  tx = qgalore_adamw(1e-2, rank=4)
  state = tx.init(params)
  loss_fn = lambda p: jnp.mean((model.apply(p, x) - y) ** 2)

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  params, state, first = step(params, state)
  for _ in range(60):
    params, state, last = step(params, state)
  assert float(last) < 0.7 * float(first)
  kernel_stats = projection_stats(state)["params"]["layers_0"]["kernel"]
  assert int(kernel_stats["svd_count"]) == 1


def _regression_problem():
  k = jax.random.split(jax.random.key(3), 4)
  params = {
    "w1": jax.random.normal(k[0], (16, 48)) / 4,
    "b1": jnp.zeros(48),
    "w2": jax.random.normal(k[1], (48, 8)) / 7,
  }
  x = jax.random.normal(k[2], (32, 16))
  y = jax.random.normal(k[3], (32, 8))
  loss_fn = lambda p, x, y: jnp.mean((jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] - y) ** 2)
  return params, x, y, loss_fn


def test_orbax_checkpoint_resume_is_identical(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  params, x, y, loss_fn = _regression_problem()
  tx = qgalore_adamw(1e-2, rank=4, update_proj_gap=3)

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  def run(params, state, n):
    for _ in range(n):
      params, state = step(params, state)
    return params, state

  params, state = run(params, tx.init(params), 5)
  want_params, want_state = run(params, state, 7)

  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "ckpt", {"params": params, "opt_state": state})
    ckpt.wait_until_finished()
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params, "opt_state": state})
    restored = ckpt.restore(tmp_path / "ckpt", target)
  got_params, got_state = run(restored["params"], restored["opt_state"], 7)
  jax.tree.map(np.testing.assert_array_equal, got_params, want_params)
  jax.tree.map(np.testing.assert_array_equal, got_state, want_state)


def run_on_8_cpu_devices(script: str, *args: str, set_device_count: bool = True) -> str:
  """Runs ``script`` in a fresh process with 8 simulated CPU devices; it prints SHARDED_OK.

  ``set_device_count`` False leaves ``XLA_FLAGS`` unset, for a script that asks for the
  devices itself. Returns the script's standard output.
  """
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if set_device_count:
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  else:
    env.pop("XLA_FLAGS", None)
    env["OPENBLAS_NUM_THREADS"] = "1"
  root = pathlib.Path(__file__).resolve().parents[2]
  env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
  out = subprocess.run(
    [sys.executable, "-c", script, *args],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "SHARDED_OK" in out.stdout, out.stdout[-3000:]
  return out.stdout

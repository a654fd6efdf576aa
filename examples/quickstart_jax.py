"""Quick start: swap ``optax.adamw`` for ``qgalore_jax.qgalore_adamw`` in a Flax NNX loop.

Trains the same small MLP regression twice, with AdamW and with Q-GaLore (rank 32 of 128,
INT4 projector, adaptive refresh), and prints the losses, the refresh statistics and the
optimizer-state bytes of each. Runs in well under a minute on a CPU.

  python examples/quickstart_jax.py
"""

import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import qgalore_jax


class MLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs, width: int = 128):
    self.up = nnx.Linear(32, width, rngs=rngs)
    self.hidden = nnx.Linear(width, width, rngs=rngs)
    self.down = nnx.Linear(width, 8, rngs=rngs)

  def __call__(self, x):
    return self.down(nnx.gelu(self.hidden(nnx.gelu(self.up(x)))))


def make_data(n=2048):
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (n, 32))
  y = jnp.sin(x @ jax.random.normal(kw, (32, 8)))
  return x, y


def state_bytes(opt_state) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(nnx.state(opt_state)))


def train(tx, steps=400, batch=128):
  """Trains a fresh MLP with ``tx``; returns (losses, optimizer)."""
  x, y = make_data()
  model = MLP(nnx.Rngs(1))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, xb, yb):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(xb) - yb) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  losses = []
  for i in range(steps):
    j = (i * batch) % x.shape[0]
    losses.append(float(step(model, optimizer, x[j : j + batch], y[j : j + batch])))
  return losses, optimizer


def main():
  runs = {
    "optax.adamw": optax.adamw(3e-3),
    # `scale` multiplies the projected step (GaLore's alpha); the paper pairs 0.25 with a
    # larger learning rate.
    "qgalore_adamw": qgalore_jax.qgalore_adamw(3e-3, rank=32, update_proj_gap=100, scale=2.0),
  }
  for name, tx in runs.items():
    start = time.perf_counter()
    losses, optimizer = train(tx)
    seconds = time.perf_counter() - start
    print(
      f"{name:>14}: loss {losses[0]:.4f} -> {losses[-1]:.4f} in {len(losses)} steps"
      f" ({seconds:.1f} s), optimizer state {state_bytes(optimizer.opt_state) / 1024:.1f} KiB"
    )
    if name == "qgalore_adamw":
      stats = qgalore_jax.projection_stats(optimizer.opt_state)
      for layer in ("up", "hidden", "down"):
        s = stats[layer]["kernel"]
        print(f"{'':>16}{layer:>6}.kernel: gap {int(s['gap'])}, SVDs {int(s['svd_count'])}")


if __name__ == "__main__":
  main()

"""Gradient energy each ``svd_method`` captures on the main job's real gradients.

Trains the main example's LLaMA (``examples/llama``, the settings of
``benchmarks/svd_study.py``: tiny model, 300 steps, rank 32, unscanned) with ``qgalore`` and
its full-SVD refresh, and every ``--every`` steps takes the gradient of each projected matrix
(through ``train.train``'s ``wrap_step``; the training is untouched). On each gradient ``G``,
with ``A`` the gradient read so that the basis lives in its rows' space (docs/spec.md
section 2.6), it computes the basis of each method and its captured energy
``||A B^T||_F / ||A V_r^T||_F`` against the exact top-r ``V_r`` (float64 NumPy SVD):

- ``randomized``: the library's range finder from a sketch keyed by (seed 0, the step, the
  matrix's index), at ``power_iters`` 2 (the default) and 1;
- ``subspace``: warm-started from the exact basis of the same matrix ``--every`` steps
  earlier (the projector a refresh that long ago would have left), ``subspace_iters=1``.

Writes ``refresh_energy.json`` and ``.md``.

  OPENBLAS_NUM_THREADS=1 python -m benchmarks.refresh_energy
  python -m benchmarks.refresh_energy --steps 40 --every 10   # a short look
"""

import argparse
import dataclasses
import datetime
import functools
import json
import os
import pathlib
import platform
import statistics

import jax
import jax.numpy as jnp
import numpy as np

import qgalore_jax
from benchmarks import svd_study
from examples.llama import model
from examples.llama import train
from qgalore_jax._src import generator
from qgalore_jax._src import projector as proj

RESULTS = pathlib.Path(__file__).parent / "results"
OVERSAMPLE = 16
# (name, svd_method, iterations), at the library's defaults and power_iters=1.
METHODS = (("randomized", "randomized", 2), ("randomized q=1", "randomized", 1))
SUBSPACE = ("subspace", "subspace", 1)


class GradientTap:
  """Every ``every`` steps, the canonical (out, in) gradient of each projected matrix."""

  def __init__(self, graphdef, every: int):
    self.every = every
    self.grads: list[tuple[int, dict[str, np.ndarray]]] = []

    @jax.jit
    def grads_of(params, batch):
      float_params = qgalore_jax.dequantize_params(params)
      return jax.grad(functools.partial(train.loss_fn, graphdef))(float_params, batch)

    self._grads_of = grads_of

  def wrap(self, step_fn):
    def tapped_step(params, opt_state, batch, step):
      if int(step) % self.every == 0:  # before the step: it donates params
        grads, _ = jax.tree_util.tree_flatten_with_path(self._grads_of(params, batch))
        kernels = {
          svd_study._path_name(path): np.asarray(g, np.float32).T  # Flax (in, out) -> (out, in)
          for path, g in grads
          if model.is_projected(path, g)
        }
        self.grads.append((int(step), kernels))
      return step_fn(params, opt_state, batch, step)

    return tapped_step


@functools.partial(jax.jit, static_argnums=(1, 4, 5))
def _basis(g_MxN, rank, step, tensor_id, iters, oversample, previous_RxK=None):
  shape = proj.sketch_shape(g_MxN.shape, rank, oversample)
  start = generator.sketch(0, step, tensor_id, 0, shape)
  if previous_RxK is not None:
    start = proj.warm_start(start, previous_RxK)
  return proj.randomized_projector(g_MxN, rank, start, iters)


def energies(grads, rank: int) -> dict[str, list[float]]:
  """Per method, the captured energy of every (capture, matrix) pair (subspace: from the
  second capture on)."""
  out = {name: [] for name, _, _ in (*METHODS, SUBSPACE)}
  previous = {}
  for step, kernels in grads:
    for tensor_id, (name, g_MxN) in enumerate(kernels.items()):
      m, n = g_MxN.shape
      a_DxK = (g_MxN if m >= n else g_MxN.T).astype(np.float64)
      _, _, vt = np.linalg.svd(a_DxK, full_matrices=False)
      exact = np.linalg.norm(a_DxK @ vt[:rank].T)
      g = jnp.asarray(g_MxN)
      for method, _, iters in METHODS:
        basis = np.asarray(_basis(g, rank, step, tensor_id, iters, OVERSAMPLE), np.float64)
        out[method].append(float(np.linalg.norm(a_DxK @ basis.T) / exact))
      if name in previous:
        warm = _basis(g, rank, step, tensor_id, SUBSPACE[2], OVERSAMPLE, previous[name])
        basis = np.asarray(warm, np.float64)
        out[SUBSPACE[0]].append(float(np.linalg.norm(a_DxK @ basis.T) / exact))
      previous[name] = jnp.asarray(vt[:rank], jnp.float32)
  return out


def summary(values: list[float]) -> dict:
  return {"n": len(values), "median": statistics.median(values), "worst": min(values)}


def to_markdown(result) -> str:
  s = result["settings"]
  lines = [
    f"`python -m benchmarks.refresh_energy --steps {s['steps']} --every {s['every']}`: the"
    f" main example's LLaMA ({s['model']}, rank {s['rank']}, seed {s['seed']}) trained with"
    f" `qgalore` (full SVD); every {s['every']} steps the gradient of each of its"
    f" {s['matrices']} projected matrices, and the energy each method's basis captures,"
    " `||A B^T||_F / ||A V_r^T||_F` against the exact top-r (1 is the best possible)."
    f" `oversample={OVERSAMPLE}`; `subspace` warm-starts from the exact basis of the same"
    f" matrix {s['every']} steps earlier, with one iteration. {result['machine']},"
    f" jax {result['jax']}, {result['date']}.",
    "",
    "| method | gradients | median energy | worst energy | median energy lost |",
    "|---|---:|---:|---:|---:|",
  ]
  for name, r in result["energy"].items():
    lines.append(
      f"| {name} | {r['n']} | {r['median']:.6f} | {r['worst']:.6f} | {1 - r['median']:.1e} |"
    )
  return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
  os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=svd_study.DEFAULTS.steps)
  parser.add_argument("--every", type=int, default=svd_study.DEFAULTS.update_proj_gap)
  parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
  parser.add_argument("--run-dir", default="/tmp/refresh_energy_runs")
  args = parser.parse_args(argv)
  cfg = dataclasses.replace(
    svd_study.DEFAULTS, optimizer="qgalore", steps=args.steps, out_dir=args.run_dir
  )
  graphdef = train.init_state(cfg)[0]
  tap = GradientTap(graphdef, args.every)
  train.train(cfg, progress=False, wrap_step=tap.wrap)
  result = {
    "date": datetime.date.today().isoformat(),
    "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
    "jax": jax.__version__,
    "settings": {
      "model": cfg.model,
      "rank": cfg.rank,
      "seed": cfg.seed,
      "steps": cfg.steps,
      "every": args.every,
      "matrices": len(tap.grads[0][1]),
    },
    "energy": {k: summary(v) for k, v in energies(tap.grads, cfg.rank).items()},
  }
  markdown = to_markdown(result)
  print(markdown)
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "refresh_energy.json").write_text(json.dumps(result, indent=2) + "\n")
  (args.out / "refresh_energy.md").write_text(markdown)
  return result


if __name__ == "__main__":
  main()

"""Cost of a subspace refresh by ``svd_method``: full SVD, randomized, subspace iteration.

For each matrix shape (canonical ``(out, in)``: the attention ``hidden x hidden`` and the MLP
``ffn x hidden`` of the paper's LLaMA configs, at their ranks, ``benchmarks/llama_shapes.py``)
and each method of docs/spec.md section 2.6, the time of one refresh's basis computation
(for ``"randomized"`` and ``"subspace"`` the sketch is drawn inside the timed call, so
the hashing counts), in jitted JAX and in eager torch, on one CPU thread. All methods of a
shape run side by side in one process, so the ratios to the full SVD compare like with
like. JAX calls are compiled ahead of time (``jit(...).lower(...).compile()``) and torch is
warmed up on a small matrix, so no timed call compiles or loads a library.

Then the refresh spike at 60M: the median time of a jitted ``qgalore_adamw`` update over
the 56 projected matrices of LLaMA-60M on a refresh step (every matrix refreshes), over a
normal step, per method.

Results go to ``benchmarks/results/refresh_cost_cpu.json`` and ``.md``.

  python -m benchmarks.refresh_cost                  # 60M, 1B, 7B (about 8 minutes)
  python -m benchmarks.refresh_cost --configs 60M 1B --repeats 5
  python -m benchmarks.refresh_cost --quick          # tiny shapes, for the test
"""

import argparse
import datetime
import functools
import json
import os
import pathlib
import platform
import statistics
import time

RESULTS = pathlib.Path(__file__).parent / "results"
METHODS = ("full", "randomized", "subspace")
QUICK_SHAPES = {"quick": ((48, 32), (96, 32))}
QUICK_RANK = 8


def _single_thread():
  """One CPU thread for XLA, LAPACK and torch: the refresh is compared op for op."""
  os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
  os.environ.setdefault("OMP_NUM_THREADS", "1")
  flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()


def matrix_shapes(config: str) -> tuple[tuple[int, int], ...]:
  """Canonical (out, in) shapes of a config's projected matrices: attention and MLP."""
  from benchmarks import llama_shapes

  hidden, ffn, _ = llama_shapes.CONFIGS[config]
  return (hidden, hidden), (ffn, hidden)


def _gradient(shape, seed=0):
  """A float32 matrix with a decaying spectrum, as gradients have (values ~ 1/(1 + i))."""
  import numpy as np

  rng = np.random.default_rng(seed)
  m, n = shape
  k = min(m, n)
  left = rng.standard_normal((m, k), dtype=np.float32)
  right = rng.standard_normal((k, n), dtype=np.float32)
  return (left * (1.0 / (1.0 + np.arange(k, dtype=np.float32)))) @ right / np.sqrt(k)


def _time(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _jax_fns(shape, rank, opts):
  """Per method, a compiled JAX function ``(g, previous_RxK) -> basis_RxK``."""
  import jax
  import jax.numpy as jnp

  from qgalore_jax._src import generator
  from qgalore_jax._src import projector as proj

  sketch_shape = proj.sketch_shape(shape, rank, opts["oversample"])

  def basis(method, g, previous):
    if method == "full":
      return proj.compute_projector(g, rank)
    sketch = generator.sketch(0, 200, 3, 0, sketch_shape)
    if method == "randomized":
      return proj.randomized_projector(g, rank, sketch, opts["power_iters"])
    start = proj.warm_start(sketch, previous)
    return proj.randomized_projector(g, rank, start, opts["subspace_iters"])

  g = jax.ShapeDtypeStruct(shape, jnp.float32)
  prev = jax.ShapeDtypeStruct(proj.basis_shape(shape, rank), jnp.float32)
  return {m: jax.jit(lambda g, p, m=m: basis(m, g, p)).lower(g, prev).compile() for m in METHODS}


def _torch_fn(method, shape, rank, opts):
  from qgalore_torch._src import generator
  from qgalore_torch._src import projector as proj

  sketch_shape = proj.sketch_shape(shape, rank, opts["oversample"])

  def basis(g, previous):
    if method == "full":
      return proj.compute_projector(g, rank)
    sketch = generator.sketch(0, 200, 3, 0, sketch_shape)
    if method == "randomized":
      return proj.randomized_projector(g, rank, sketch, opts["power_iters"])
    start = proj.warm_start(sketch, previous)
    return proj.randomized_projector(g, rank, start, opts["subspace_iters"])

  return basis


def refresh_rows(shapes, opts, repeats):
  """One row per (config, shape, backend): seconds per method and ratios to full."""
  import jax
  import numpy as np
  import torch

  from qgalore_jax._src import projector as proj

  torch.set_num_threads(1)
  torch.linalg.svd(torch.ones(8, 8))  # load LAPACK before any timing
  torch.linalg.qr(torch.ones(8, 8))
  rows = []
  for config, shape_list in shapes.items():
    for shape in shape_list:
      rank = opts["rank"] or _rank(config)
      g = _gradient(shape)
      previous = np.asarray(proj.compute_projector(g, rank))  # a warm start that is close
      compiled = _jax_fns(shape, rank, opts)
      jg, jprev = jax.device_put(g), jax.device_put(previous)
      tg, tprev = torch.from_numpy(g), torch.from_numpy(previous.copy())
      for backend in ("jax", "torch"):
        seconds = {}
        for method in METHODS:
          if backend == "jax":
            fn = functools.partial(_run_jax, compiled[method], jg, jprev)
          else:
            fn = functools.partial(_torch_fn(method, shape, rank, opts), tg, tprev)
          seconds[method] = _time(fn, repeats)
        rows.append(
          {
            "config": config,
            "shape": list(shape),
            "rank": rank,
            "backend": backend,
            "seconds": seconds,
            "ratio": {m: seconds["full"] / seconds[m] for m in METHODS},
          }
        )
        print(_row_markdown(rows[-1]), flush=True)
  return rows


def _run_jax(compiled, g, previous):
  compiled(g, previous).block_until_ready()


def _rank(config):
  from benchmarks import llama_shapes

  return QUICK_RANK if config == "quick" else llama_shapes.RANKS[config]


def spike_rows(config, opts, repeats):
  """Refresh step vs normal step of a jitted ``qgalore_adamw`` update, per method."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  import qgalore_jax
  from benchmarks import llama_shapes

  if config == "quick":
    shapes = {"a": (32, 48), "b": (48, 32)}
    rank = QUICK_RANK
  else:
    hidden, ffn, layers = llama_shapes.CONFIGS[config]
    rank = llama_shapes.RANKS[config]
    block = {n: (hidden, hidden) for n in ("q", "k", "v", "o")}
    block |= {"gate": (hidden, ffn), "up": (hidden, ffn), "down": (ffn, hidden)}
    shapes = {f"{i}/{n}": s for i in range(layers) for n, s in block.items()}
  rng = np.random.default_rng(0)
  params = {k: jnp.asarray(rng.standard_normal(s, dtype=np.float32)) for k, s in shapes.items()}
  grads = {k: jnp.asarray(_gradient(s, seed=i)) for i, (k, s) in enumerate(shapes.items())}
  rows = []
  for method in METHODS:
    tx = qgalore_jax.qgalore_adamw(
      1e-3,
      rank=rank,
      svd_method=method,
      oversample=opts["oversample"],
      power_iters=opts["power_iters"],
      subspace_iters=opts["subspace_iters"],
    )
    update = jax.jit(tx.update)
    _, after = update(grads, tx.init(params), params)  # compiles; every matrix refreshed
    refresh_state = _at_step(after, 200)  # a multiple of the gap: every matrix refreshes
    step = {
      name: functools.partial(_run_update, update, grads, s, params)
      for name, s in (("normal", after), ("refresh", refresh_state))
    }
    step["refresh"]()  # the warm path of the refresh branch, once before timing
    normal, refresh = _time(step["normal"], repeats), _time(step["refresh"], repeats)
    rows.append(
      {
        "config": config,
        "method": method,
        "matrices": len(shapes),
        "rank": rank,
        "normal_ms": normal * 1e3,
        "refresh_ms": refresh * 1e3,
        "spike": refresh / normal,
      }
    )
    print(f"| {config} | {method} | {normal * 1e3:.1f} | {refresh * 1e3:.1f} |", flush=True)
  return rows


def _run_update(update, grads, state, params):
  import jax

  jax.block_until_ready(update(grads, state, params))


def _at_step(opt_state, step):
  """``opt_state`` with every count set to ``step`` (a multiple of the gap: a refresh step)."""
  import jax
  import jax.numpy as jnp

  from qgalore_jax import ScaleByQGaLoreState

  def set_count(x):
    if isinstance(x, ScaleByQGaLoreState):
      return x._replace(count=jnp.asarray(step, jnp.int32))
    return x

  return jax.tree.map(set_count, opt_state, is_leaf=lambda x: isinstance(x, ScaleByQGaLoreState))


def _row_markdown(row):
  s, r = row["seconds"], row["ratio"]
  m, n = row["shape"]
  return (
    f"| {row['config']} | {m} x {n} | {row['rank']} | {row['backend']} | {s['full']:.3f}"
    f" | {s['randomized']:.3f} ({r['randomized']:.1f}x) | {s['subspace']:.3f}"
    f" ({r['subspace']:.1f}x) |"
  )


def to_markdown(result) -> str:
  opts = result["settings"]
  lines = [
    f"Refresh cost per matrix, one CPU thread ({result['machine']}, {result['date']}).",
    f"`oversample={opts['oversample']}`, `power_iters={opts['power_iters']}`,"
    f" `subspace_iters={opts['subspace_iters']}`; median of {opts['repeats']} call(s);"
    " in parentheses: how many times cheaper than the full SVD of the same backend.",
    "",
    "| config | matrix (out x in) | rank | backend | full s | randomized s | subspace s |",
    "|---|---|---:|---|---:|---:|---:|",
    *(_row_markdown(row) for row in result["refresh"]),
  ]
  if result["spike"]:
    lines += [
      "",
      "Refresh spike: a jitted `qgalore_adamw` update on a step where every projected matrix"
      " refreshes, against a normal step (JAX, one CPU thread).",
      "",
      "| config | method | matrices | normal step ms | refresh step ms | spike |",
      "|---|---|---:|---:|---:|---:|",
    ]
    for row in result["spike"]:
      lines.append(
        f"| {row['config']} | {row['method']} | {row['matrices']} | {row['normal_ms']:.1f}"
        f" | {row['refresh_ms']:.1f} | {row['spike']:.1f}x |"
      )
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", nargs="+", default=["60M", "1B", "7B"])
  parser.add_argument("--spike-config", default="60M", help="'' to skip the spike")
  parser.add_argument("--repeats", type=int, default=1)
  parser.add_argument("--spike-repeats", type=int, default=3)
  parser.add_argument("--rank", type=int, default=None, help="default: the paper's per config")
  parser.add_argument("--oversample", type=int, default=16)
  parser.add_argument("--power-iters", type=int, default=2)
  parser.add_argument("--subspace-iters", type=int, default=1)
  parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test)")
  parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
  args = parser.parse_args(argv)
  _single_thread()
  opts = {
    "rank": QUICK_RANK if args.quick else args.rank,
    "oversample": args.oversample,
    "power_iters": args.power_iters,
    "subspace_iters": args.subspace_iters,
  }
  if args.quick:
    shapes, spike_config = QUICK_SHAPES, "quick"
  else:
    shapes, spike_config = {c: matrix_shapes(c) for c in args.configs}, args.spike_config
  result = {
    "date": datetime.date.today().isoformat(),
    "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    "settings": {**opts, "repeats": args.repeats, "spike_repeats": args.spike_repeats},
    "refresh": refresh_rows(shapes, opts, args.repeats),
    "spike": spike_rows(spike_config, opts, args.spike_repeats) if spike_config else [],
  }
  markdown = to_markdown(result)
  print(markdown)
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "refresh_cost_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
  (args.out / "refresh_cost_cpu.md").write_text(markdown)


if __name__ == "__main__":
  main()

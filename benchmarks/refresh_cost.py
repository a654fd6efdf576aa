"""Cost of a subspace refresh by ``svd_method``: full SVD, randomized, subspace iteration.

For each matrix shape (canonical ``(out, in)``: the attention ``hidden x hidden`` and the MLP
``ffn x hidden`` of the paper's LLaMA configs, at their ranks, ``benchmarks/llama_shapes.py``)
and each method of docs/spec.md section 2.6, the time of one refresh's basis computation
(for ``"randomized"`` and ``"subspace"`` the sketch is drawn inside the timed call, so
the hashing counts), in jitted JAX and in eager torch, on one CPU thread. All methods of a
shape run side by side in one process, so the ratios to the full SVD compare like with
like. JAX calls are compiled ahead of time (``jit(...).lower(...).compile()``) and torch is
warmed up on a small matrix, so no timed call compiles or loads a library.

Beside each ``"randomized"`` time, the gradient energy its basis captures against the exact
top-r, ``||A B^T||_F / ||A V_r^T||_F`` (``A`` the gradient read with the basis in its rows'
space), on a synthetic gradient with singular values ``~ 1/(1 + i)``. (``"subspace"`` starts
here from the exact basis of the same matrix, so its energy says nothing and is not shown.)

Then the refresh spike at 60M: the median time of a jitted ``qgalore_adamw`` update over
the 56 projected matrices of LLaMA-60M on a refresh step (every matrix refreshes), over a
normal step, per method.

Results go to ``benchmarks/results/refresh_cost_cpu.json`` and ``.md``; one progress line
per timed call goes to stdout.

  python -m benchmarks.refresh_cost                  # 60M, 1B, 7B (about 15 minutes)
  python -m benchmarks.refresh_cost --configs 7B --also-power-iters 1
  python -m benchmarks.refresh_cost --quick          # one tiny matrix, for the test
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
QUICK_SHAPES = {"quick": ((24, 16),)}
QUICK_RANK = 4
# The quick spike: one small matrix, one method (a smoke test of the timing, not a figure).
QUICK_SPIKE = ({"a": (16, 24)}, ("subspace",))


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


def _time(fn, repeats, label, budget_s=10.0):
  """Median seconds of ``repeats`` calls, fewer once ``budget_s`` is spent (at least one),
  and the last call's result; prints one progress line."""
  times = []
  while len(times) < repeats and sum(times) < budget_s:
    start = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  print(f"  {label}: {median:.3f} s (median of {len(times)})", flush=True)
  return median, out


def _energy(g_MxN, basis_RxK, exact_RxK):
  """``||A B^T||_F / ||A V_r^T||_F``: the gradient energy a basis captures, against the exact
  top-r (``A`` is ``G`` on the "right" side, ``G^T`` on the "left")."""
  import numpy as np

  m, n = g_MxN.shape
  a_DxK = g_MxN if m >= n else g_MxN.T
  captured = lambda b: np.linalg.norm(a_DxK @ np.asarray(b, np.float32).T)
  return float(captured(basis_RxK) / captured(exact_RxK))


def variants(opts) -> tuple[tuple[str, str, int], ...]:
  """``(name, svd_method, iterations)`` of each timed refresh: the three methods at the
  settings, then ``"randomized"`` at each extra ``power_iters`` of ``--also-power-iters``."""
  return (
    ("full", "full", 0),
    ("randomized", "randomized", opts["power_iters"]),
    ("subspace", "subspace", opts["subspace_iters"]),
    *((f"randomized q={q}", "randomized", q) for q in opts["also_power_iters"]),
  )


def refresh_basis(generator, proj, method, iters, rank, sketch_shape, g, previous, device=None):
  """One refresh's basis in either backend: the twin modules share names and arguments.

  ``device``: where torch draws the sketch (JAX's follows the computation; leave it None).
  """
  if method == "full":
    return proj.compute_projector(g, rank)
  kwargs = {} if device is None else {"device": device}
  sketch = generator.sketch(0, 200, 3, 0, sketch_shape, **kwargs)
  start = sketch if method == "randomized" else proj.warm_start(sketch, previous)
  return proj.randomized_projector(g, rank, start, iters)


def _jax_fn(method, iters, shape, rank, opts):
  """A compiled JAX function ``(g, previous_RxK) -> basis_RxK``."""
  import jax
  import jax.numpy as jnp

  from qgalore_jax._src import generator
  from qgalore_jax._src import projector as proj

  sketch_shape = proj.sketch_shape(shape, rank, opts["oversample"])
  fn = functools.partial(refresh_basis, generator, proj, method, iters, rank, sketch_shape)
  g = jax.ShapeDtypeStruct(shape, jnp.float32)
  prev = jax.ShapeDtypeStruct(proj.basis_shape(shape, rank), jnp.float32)
  compiled = jax.jit(fn).lower(g, prev).compile()
  return lambda g, previous: compiled(g, previous).block_until_ready()


def _torch_fn(method, iters, shape, rank, opts):
  """The eager torch function ``(g, previous_RxK) -> basis_RxK``."""
  from qgalore_torch._src import generator
  from qgalore_torch._src import projector as proj

  sketch_shape = proj.sketch_shape(shape, rank, opts["oversample"])
  return functools.partial(refresh_basis, generator, proj, method, iters, rank, sketch_shape)


def refresh_rows(shapes, opts, repeats):
  """One row per (config, shape, backend): seconds per variant, ratios to full, energies."""
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
      print(f"{config} {shape[0]} x {shape[1]}, rank {rank}: compiling", flush=True)
      jax_fns = {v[0]: _jax_fn(*v[1:], shape, rank, opts) for v in variants(opts)}
      # The full SVD (timed first) ignores `previous`; its basis is then the warm start of
      # "subspace": a start that is close, as after a short gap.
      previous = np.zeros(proj.basis_shape(shape, rank), np.float32)
      for backend in ("jax", "torch"):
        seconds, bases = {}, {}
        for name, method, iters in variants(opts):
          if backend == "jax":
            fn = functools.partial(jax_fns[name], *jax.device_put((g, previous)))
          else:
            basis = _torch_fn(method, iters, shape, rank, opts)
            fn = functools.partial(basis, torch.from_numpy(g), torch.from_numpy(previous))
          label = f"{config} {shape[0]} x {shape[1]} {backend} {name}"
          seconds[name], bases[name] = _time(fn, repeats, label)
          if name == "full":
            previous = np.asarray(bases["full"]).astype(np.float32)
        rows.append(
          {
            "config": config,
            "shape": list(shape),
            "rank": rank,
            "backend": backend,
            "seconds": seconds,
            "ratio": {name: seconds["full"] / t for name, t in seconds.items()},
            "energy": {
              name: _energy(g, bases[name], bases["full"])
              for name, method, _ in variants(opts)
              if method == "randomized"
            },
          }
        )
  return rows


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

  methods = METHODS
  if config == "quick":
    (shapes, methods), rank = QUICK_SPIKE, QUICK_RANK
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
  for method in methods:
    print(f"spike {config}, {len(shapes)} matrices, {method}: compiling", flush=True)
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
    normal, _ = _time(step["normal"], repeats, f"spike {config} {method} normal step")
    refresh, _ = _time(step["refresh"], repeats, f"spike {config} {method} refresh step")
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
  return rows


def _run_update(update, grads, state, params):
  import jax

  return jax.block_until_ready(update(grads, state, params))


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
  seconds, ratio, energy = row["seconds"], row["ratio"], row["energy"]
  m, n = row["shape"]
  cells = [row["config"], f"{m} x {n}", str(row["rank"]), row["backend"]]
  cells.append(f"{seconds['full']:.3f}")
  cells += [f"{seconds[name]:.3f} ({ratio[name]:.1f}x)" for name in list(seconds)[1:]]
  cells += [f"{1 - e:.1e}" for e in energy.values()]
  return "| " + " | ".join(cells) + " |"


def layer_rows(refresh):
  """Per (config, backend) with both matrices timed: one layer's refresh, 4 attention + 3 MLP."""
  by_key = {}
  for row in refresh:
    by_key.setdefault((row["config"], row["backend"]), []).append(row)
  layers = []
  for (config, backend), rows in by_key.items():
    if len(rows) != 2:
      continue
    attention, mlp = rows  # matrix_shapes order: (hidden, hidden), then (ffn, hidden)
    seconds = {
      name: 4 * attention["seconds"][name] + 3 * mlp["seconds"][name]
      for name in attention["seconds"]
    }
    ratio = {name: seconds["full"] / t for name, t in seconds.items()}
    layers.append({"config": config, "backend": backend, "seconds": seconds, "ratio": ratio})
  return layers


def to_markdown(result) -> str:
  opts = result["settings"]
  names = [name for name, _, _ in variants(opts)]
  energies = [name for name, method, _ in variants(opts) if method == "randomized"]
  versions = ", ".join(f"{k} {v}" for k, v in result["versions"].items())
  load = result["load_average"]
  lines = [
    f"Refresh cost per matrix, one CPU thread ({result['machine']}; {versions};"
    f" {result['date']}). `oversample={opts['oversample']}`,"
    f" `power_iters={opts['power_iters']}`, `subspace_iters={opts['subspace_iters']}`;"
    f" median of {opts['repeats']} calls (fewer once a timing has run 10 s; one for the"
    " largest full SVDs). In parentheses: how many times cheaper than the"
    " full SVD of the same backend, timed beside it. Energy lost: 1 minus the gradient"
    " energy the randomized basis captures against the exact top-r,"
    " `1 - ||A B^T||_F / ||A V_r^T||_F` (0 is the best possible), on a synthetic gradient"
    " with singular values ~ 1/(1 + i). The machine was shared: load"
    f" average {load['start']:.1f} at the start, {load['end']:.1f} at the end, so single"
    " times carry noise of tens of percent.",
    "",
    "| config | matrix (out x in) | rank | backend | "
    + " | ".join(f"{name} s" for name in names)
    + "".join(f" | energy lost, {name}" for name in energies)
    + " |",
    "|---|---|---:|---|" + "---:|" * (len(names) + len(energies)),
    *(_row_markdown(row) for row in result["refresh"]),
  ]
  layers = layer_rows(result["refresh"])
  if layers:
    lines += [
      "",
      "Per decoder layer (4 attention matrices and 3 MLP matrices, each timed above; the"
      " MLP's `down` has the `up` matrix's cost, read transposed): seconds of one refresh of"
      " the layer, and how many times cheaper than the full SVD.",
      "",
      "| config | backend | " + " | ".join(f"{name} s" for name in names) + " |",
      "|---|---|" + "---:|" * len(names),
    ]
    for row in layers:
      cells = [row["config"], row["backend"], f"{row['seconds']['full']:.1f}"]
      cells += [f"{row['seconds'][name]:.1f} ({row['ratio'][name]:.1f}x)" for name in names[1:]]
      lines.append("| " + " | ".join(cells) + " |")
  if result["spike"]:
    lines += [
      "",
      "Refresh spike: a jitted `qgalore_adamw` update on a step where every projected matrix"
      " refreshes, against a normal step (JAX, one CPU thread; median of"
      f" up to {opts['spike_repeats']} calls each, fewer past 10 s).",
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


def write(result, out: pathlib.Path) -> str:
  """Writes ``refresh_cost_cpu.json`` and ``.md`` into ``out``; returns the markdown."""
  markdown = to_markdown(result)
  out.mkdir(parents=True, exist_ok=True)
  (out / "refresh_cost_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
  (out / "refresh_cost_cpu.md").write_text(markdown)
  return markdown


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", nargs="+", default=["60M", "1B", "7B"])
  parser.add_argument("--spike-config", default="60M", help="'' to skip the spike")
  parser.add_argument(
    "--repeats", type=int, default=5, help="calls per refresh timing (fewer past 10 s)"
  )
  parser.add_argument("--spike-repeats", type=int, default=3)
  parser.add_argument("--rank", type=int, default=None, help="default: the paper's per config")
  parser.add_argument("--oversample", type=int, default=16)
  parser.add_argument("--power-iters", type=int, default=2)
  parser.add_argument("--subspace-iters", type=int, default=1)
  parser.add_argument(
    "--also-power-iters", type=int, nargs="*", default=[], help="extra randomized variants"
  )
  parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test)")
  parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
  args = parser.parse_args(argv)
  if not args.quick:  # the quick run shares a test process: its settings stay as they are
    _single_thread()
  opts = {
    "rank": QUICK_RANK if args.quick else args.rank,
    "oversample": args.oversample,
    "power_iters": args.power_iters,
    "subspace_iters": args.subspace_iters,
    "also_power_iters": args.also_power_iters,
  }
  if args.quick:
    shapes, spike_config = QUICK_SHAPES, "quick"
  else:
    shapes, spike_config = {c: matrix_shapes(c) for c in args.configs}, args.spike_config
  import jax
  import numpy as np
  import torch

  start = time.perf_counter()
  load_start = os.getloadavg()[0]
  result = {
    "date": datetime.date.today().isoformat(),
    "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
    "versions": {"jax": jax.__version__, "torch": torch.__version__, "numpy": np.__version__},
    "settings": {**opts, "repeats": args.repeats, "spike_repeats": args.spike_repeats},
    "refresh": refresh_rows(shapes, opts, args.repeats),
    "spike": spike_rows(spike_config, opts, args.spike_repeats) if spike_config else [],
  }
  result["load_average"] = {"start": load_start, "end": os.getloadavg()[0]}
  result["wall_seconds"] = time.perf_counter() - start
  print(write(result, args.out))


if __name__ == "__main__":
  main()

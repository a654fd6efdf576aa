"""Speed of one jitted optimizer update on the paper's LLaMA-60M or -130M parameter shapes.

Times ``jax.jit(tx.update)`` for ``qgalore_jax.qgalore_adamw`` (a normal step and a refresh
step, separately; also its normal step with 8-bit moments), ``optax.adamw``, our
``adamw_8bit`` and ``optax.contrib.galore`` at the same rank, on the
parameter shapes of the paper's LLaMA-60M (hidden 512, ffn 1376, 8 layers) or LLaMA-130M
(hidden 768, ffn 2048, 12 layers), vocab 32000, in Flax layout. Every optimizer projects the
same leaves. The rank defaults to the paper's for the config (128 for 60M, 256 for 130M).
Timings are medians of interleaved repeats after warm-up, so the ratios compare runs that saw
the same machine state.

A normal step is timed by calling the update again and again on a state whose count is 1
(no refresh is due); a refresh step on a state whose count is 0 (every projected matrix
runs its SVD). The first update, which compiles, is such a refresh step and is the refresh
steps' only warm-up; the 130M steps are repeated fewer times (``REPEATS``, ``REFRESH_REPEATS``) to
keep the run within 10 minutes on 2 CPU cores.

Each normal step is also set against the memory-bandwidth floor: the bytes it cannot avoid
moving (:func:`bytes_touched`) at the rate of a STREAM triad measured in the same run
(:func:`measure_bandwidth`). On a GPU, where a normal step is memory-bound, this says how
close each optimizer comes to the hardware's limit.

From the two timings, the mean time per step over a whole run (``--amortise-steps``, 10,000
by default) for each refresh schedule: a fixed gap (optax's GaLore; ours with
``gamma_proj=1``), our adaptive gap on stable gradients (every cosine 1: the schedule is run
on a constant gradient, 10 SVDs per matrix in 10k steps), and, when
``benchmarks/results/svd_study.json`` exists, our adaptive gap at the ratio of SVDs it
measured on the LLaMA example (see :func:`study_svd_ratio`). The formula is in
:func:`amortised_ms` and in the markdown.

Results go to ``benchmarks/results/update_speed_<backend>_<config>[_blocks].json`` and
``.md`` (e.g. ``update_speed_cpu_60M.md``). OpenBLAS, which JAX's CPU SVD calls, runs one
thread unless ``OPENBLAS_NUM_THREADS`` is set: its spinning worker threads slow SVDs on a
shared CPU many times over (see ``examples/llama/train.py``).

  python -m benchmarks.update_speed                  # 60M, all 2-D leaves projected
  python -m benchmarks.update_speed --config 130M    # 130M, rank 256
  python -m benchmarks.update_speed --only-blocks    # only q,k,v,o,gate,up,down (the paper's)
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from optax.contrib import GaLoreDimensionNumbers

import qgalore_jax
from benchmarks import tables
from benchmarks.llama_shapes import CONFIGS
from benchmarks.llama_shapes import RANKS
from benchmarks.llama_shapes import SPEED_CONFIGS
from benchmarks.llama_shapes import VOCAB
from benchmarks.llama_shapes import block_mask
from benchmarks.llama_shapes import is_shape
from benchmarks.llama_shapes import llama_param_shapes
from benchmarks.llama_shapes import nbytes

RESULTS = pathlib.Path(__file__).parent / "results"
SVD_STUDY = RESULTS / "svd_study.json"
# GaLore's ranks for the paper's configs (GaLore Table 2, used again by Q-GaLore).
# Timed refresh steps per case: a 130M refresh step takes several times a 60M one.
REFRESH_REPEATS = {"60M": 3, "130M": 1}
# Timed normal steps per case. On a shared CPU the samples of one case spread by +-20%
# (optax.adamw, a pure pass over memory, the most); 31 keeps the 60M medians steady.
REPEATS = {"60M": 31, "130M": 15}
# Names of the optimizers in the SVD study (``benchmarks/svd_study.py``): our adaptive
# schedule, and the fixed-gap ones to compare it with, by preference.
STUDY_ADAPTIVE = "qgalore"
STUDY_FIXED = ("qgalore-fixedgap", "galore", "qgalore-noquant")
_STUDY_SVD_KEYS = ("svd_count", "svds", "total_svds", "svd_total", "num_svds")
_STUDY_STEP_KEYS = ("steps", "num_steps", "total_steps")


FLOOR = "projection floor (2 matmuls + AdamW on the rest)"
Q8 = "qgalore_adamw (8-bit moments)"
ADAM8 = "qgalore_jax.adamw_8bit"
# The cases whose refresh step (every matrix's SVD) is timed too; 8-bit moments leave the
# SVD as it is.
REFRESHED = ("optax.contrib.galore", "qgalore_adamw", "qgalore_adamw (float proj)")


def projection_floor(mask, rank):
  """The two matmuls of our GaLore step, plus AdamW on the other leaves: what ours can't beat.

  For each projected Flax kernel, ``scale * P^T (P G)`` (or its "left" twin) with a fixed
  float32 basis held in the state, through ``qgalore_jax``'s own projection functions; the
  leaves that are not projected get AdamW as in every optimizer timed here. No
  low-rank moments, no quantisation: what is left of a GaLore step when everything but its
  matmuls costs nothing.
  """
  from qgalore_jax._src import projector as proj

  def init(params):  # only the projected leaves are routed here (optax.partition)
    def basis(p):
      shape = (p.shape[1], p.shape[0])  # canonical (out, in) of an (in, out) kernel
      r, k = proj.basis_shape(shape, rank)
      return jax.random.normal(jax.random.key(r * k), (r, k)) / jnp.sqrt(k)

    return jax.tree.map(basis, params)

  def update(grads, bases, params=None):
    del params

    def one(g, b):
      side = proj.projector_side((g.shape[1], g.shape[0]))
      return 0.25 * proj.project_back_transposed(proj.project(g.T, b), b, side)

    return jax.tree.map(one, grads, bases), bases

  labels = jax.tree.map(lambda m: "floor" if m else "adam", mask)
  return optax.chain(
    optax.partition(
      {"floor": optax.GradientTransformation(init, update), "adam": optax.scale_by_adam()}, labels
    ),
    optax.scale_by_learning_rate(1e-3),  # no weight decay, as in every row
  )


def optimizers(mask, rank, gap):
  galore_dims = jax.tree.map(lambda m: GaLoreDimensionNumbers(0, 1) if m else None, mask)
  return {
    # No weight decay anywhere (optax.adamw's default is 1e-4): with it, a step also reads
    # the parameters, and the rows would not compare the same work.
    "optax.adamw": optax.adamw(1e-3, weight_decay=0.0),
    "optax.contrib.galore": optax.contrib.galore(
      1e-3, rank=rank, update_proj_gap=gap, weight_dimension_numbers=galore_dims
    ),
    "qgalore_adamw": qgalore_jax.qgalore_adamw(1e-3, rank=rank, update_proj_gap=gap, mask=mask),
    "qgalore_adamw (float proj)": qgalore_jax.qgalore_adamw(
      1e-3, rank=rank, update_proj_gap=gap, mask=mask, proj_bits=None
    ),
    Q8: qgalore_jax.qgalore_adamw(1e-3, rank=rank, update_proj_gap=gap, mask=mask, moment_bits=8),
    ADAM8: qgalore_jax.adamw_8bit(1e-3),
    FLOOR: projection_floor(mask, rank),
  }


def measure_bandwidth(size=2**26, repeats=11):
  """Bytes per second of a jitted STREAM triad ``a + 2 b`` on float32 vectors of ``size``.

  The triad reads two vectors and writes one, ``3 * 4 * size`` bytes; the median of
  ``repeats`` timed calls after one warm-up call.
  """
  a, b = jnp.ones(size, jnp.float32), jnp.full(size, 0.5, jnp.float32)
  triad = jax.jit(lambda a, b: a + 2.0 * b)
  time_call(triad, a, b)
  seconds = statistics.median(time_call(triad, a, b) for _ in range(repeats))
  return 3 * 4 * size / seconds


def bytes_touched(update, grads, state, params):
  """``(read, written)``: the bytes a normal step cannot avoid, from the arrays themselves.

  It reads the gradients and the whole state, and the parameters if the updates depend on
  them (tried: parameters + 1); it writes the updates and the state leaves it changes (a
  projector that is only read, or a schedule that stays, costs no write).
  """
  updates, new_state = update(grads, state, params)
  shifted, _ = update(grads, state, jax.tree.map(lambda p: p + 1, params))
  reads_params = any(
    not bool(jnp.array_equal(u, v))
    for u, v in zip(jax.tree.leaves(updates), jax.tree.leaves(shifted), strict=True)
  )
  changed = [
    new
    for old, new in zip(jax.tree.leaves(state), jax.tree.leaves(new_state), strict=True)
    if not bool(jnp.array_equal(old, new))
  ]
  read = nbytes(grads) + nbytes(state) + (nbytes(params) if reads_params else 0)
  return read, nbytes(updates) + nbytes(changed)


def time_call(fn, *args):
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def schedule_svds(steps, gap, gamma_proj):
  """SVDs per matrix in ``steps`` steps of ``qgalore_jax``'s schedule on stable gradients.

  Runs ``scale_by_qgalore`` itself on a constant 4 x 3 gradient, so every cosine between
  successive top singular vectors is 1 (the most stable subspace there is).
  """
  g_MxN = jnp.arange(12.0).reshape(4, 3) ** 1.5
  tx = qgalore_jax.scale_by_qgalore(
    rank=1, update_proj_gap=gap, gamma_proj=gamma_proj, input_axis=1
  )

  def step(state, _):
    _, state = tx.update(g_MxN, state, g_MxN)
    return state, None

  run_all = jax.jit(lambda: jax.lax.scan(step, tx.init(g_MxN), length=steps)[0])
  (stats,) = jax.tree.leaves(
    qgalore_jax.projection_stats(run_all()), is_leaf=lambda x: isinstance(x, dict)
  )
  return int(stats["svd_count"])


def _named_dicts(node, name=None):
  """Yields ``(name, dict)`` for every dict in a JSON tree; its name is its ``optimizer`` or
  ``name`` field, else the key it sits under."""
  if isinstance(node, list):
    for item in node:
      yield from _named_dicts(item, name)
  elif isinstance(node, dict):
    name = node.get("optimizer", node.get("name", name))
    yield name, node
    for key, value in node.items():
      yield from _named_dicts(value, key if isinstance(value, dict) else name)


def study_svd_ratio(path):
  """The adaptive schedule's SVDs per step over a fixed gap's, from the SVD study's JSON.

  Reads, wherever they sit in the file, the records of the optimizers named
  ``STUDY_ADAPTIVE`` and ``STUDY_FIXED`` (an ``optimizer`` or ``name`` field, or the key of
  their dict) that hold an SVD count (``svd_count``, ``svds``, ...) and optionally a step
  count (``steps``, ...); several records of one optimizer are pooled. Without step counts
  both are taken to have run as many steps. Returns ``(ratio, details)``, or
  ``(None, reason)`` when the file or the records are absent.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    return None, f"{path.name} not found"
  try:
    study = json.loads(path.read_text())
  except (OSError, ValueError) as error:
    return None, f"{path.name} unreadable: {error}"
  number = lambda v: isinstance(v, int | float) and not isinstance(v, bool)
  records, gaps = {}, set()
  for name, node in _named_dicts(study):
    gaps |= {node["update_proj_gap"]} if number(node.get("update_proj_gap")) else set()
    svds = next((node[k] for k in _STUDY_SVD_KEYS if number(node.get(k))), None)
    steps = next((node[k] for k in _STUDY_STEP_KEYS if number(node.get(k))), None)
    if svds is not None and isinstance(name, str):
      records.setdefault(name, []).append((svds, steps))
  fixed = next((name for name in STUDY_FIXED if name in records), None)
  if STUDY_ADAPTIVE not in records or fixed is None:
    return None, f"{path.name} has no SVD counts of {STUDY_ADAPTIVE!r} and one of {STUDY_FIXED}"
  pooled = {}
  for name in (STUDY_ADAPTIVE, fixed):
    steps = [t for _, t in records[name]]
    pooled[name] = {
      "optimizer": name,
      "svds": sum(s for s, _ in records[name]),
      "steps": sum(steps) if None not in steps else None,
      "runs": len(steps),
    }
  adaptive, fixed = pooled[STUDY_ADAPTIVE], pooled[fixed]
  if fixed["svds"] <= 0 or (adaptive["steps"] is None) != (fixed["steps"] is None):
    return None, f"{path.name}: SVD counts {list(pooled.values())} cannot be compared"
  ratio = adaptive["svds"] / fixed["svds"]
  if adaptive["steps"] is not None:
    ratio *= fixed["steps"] / adaptive["steps"]
  details = {
    "file": path.name,
    "adaptive": adaptive,
    "fixed": fixed,
    "update_proj_gap": gaps.pop() if len(gaps) == 1 else None,
    "ratio": ratio,
  }
  return ratio, details


def amortised_ms(normal_ms, refresh_ms, svds_per_matrix, steps):
  """Mean time per step over ``steps`` steps in which every matrix runs ``svds_per_matrix`` SVDs.

  ``normal + (refresh - normal) * svds_per_matrix / steps``: the refresh step runs every
  matrix's SVD, so ``refresh - normal`` is the SVD cost of one refresh of all matrices.
  """
  return normal_ms + (refresh_ms - normal_ms) * svds_per_matrix / steps


def amortised_rows(medians, steps, gap, svd_study):
  """The amortised step times, one row per (optimizer, refresh schedule)."""
  fixed = schedule_svds(steps, gap, gamma_proj=1)
  if fixed != -(-steps // gap):  # optax's GaLore refreshes on every multiple of the gap
    raise RuntimeError(f"gamma_proj=1 ran {fixed} SVDs in {steps} steps at gap {gap}")
  stable = schedule_svds(steps, gap, gamma_proj=2)
  schedules = [
    ("optax.contrib.galore", f"fixed gap {gap}", fixed),
    ("qgalore_adamw", f"fixed gap {gap} (gamma_proj=1)", fixed),
    ("qgalore_adamw (float proj)", f"fixed gap {gap} (gamma_proj=1)", fixed),
    ("qgalore_adamw", "adaptive, stable gradients (all cosines 1)", stable),
  ]
  ratio, study = study_svd_ratio(svd_study)
  if ratio is not None:
    label = f"adaptive, {ratio:.2f}x {study['fixed']['optimizer']}'s SVDs (SVD study)"
    schedules.append(("qgalore_adamw", label, ratio * fixed))
  rows = [{"optimizer": "optax.adamw", "schedule": "no SVD", "svds_per_matrix": 0}]
  rows[0]["ms"] = medians["optax.adamw"]
  for name, schedule, svds in schedules:
    ms = amortised_ms(medians[name], medians[f"{name} [refresh]"], svds, steps)
    rows.append({"optimizer": name, "schedule": schedule, "svds_per_matrix": svds, "ms": ms})
  return rows, study


def run(
  config="60M",
  shapes=None,
  only_blocks=False,
  rank=None,
  gap=200,
  repeats=None,
  warmup=2,
  refresh_repeats=None,
  amortise_steps=10_000,
  svd_study=SVD_STUDY,
  bandwidth_size=None,
):
  """Times the updates and returns the result as a JSON-ready dict (see the module docstring).

  ``shapes`` (a ``llama_param_shapes`` tree) replaces the config's shapes, for tests;
  ``bandwidth_size`` is the length of the bandwidth triad's vectors (None:
  :func:`measure_bandwidth`'s), smaller for tests.
  """
  rank = RANKS[config] if rank is None else rank
  repeats = REPEATS[config] if repeats is None else repeats
  refresh_repeats = REFRESH_REPEATS[config] if refresh_repeats is None else refresh_repeats
  dims = dict(zip(("hidden", "ffn", "layers"), CONFIGS[config], strict=True))
  label = f"LLaMA-{config}" if shapes is None else "custom"
  shapes = llama_param_shapes(**dims) if shapes is None else shapes
  keys = iter(jax.random.split(jax.random.key(0), 1000))
  params = jax.tree.map(lambda s: jax.random.normal(next(keys), s) * 0.02, shapes, is_leaf=is_shape)
  grads = jax.tree.map(lambda p: jax.random.normal(next(keys), p.shape) * 1e-3, params)
  mask = block_mask(shapes, only_blocks)
  txs = optimizers(mask, rank, gap)

  cases = {}  # name -> (jitted update, state)
  for name, tx in txs.items():
    update = jax.jit(tx.update)
    state0 = tx.init(params)
    _, state1 = update(grads, state0, params)  # compiles; count 1: the next call is normal
    cases[name] = (update, state1)
    if name in REFRESHED:
      cases[f"{name} [refresh]"] = (update, state0)

  samples = {name: [] for name in cases}
  for name, (update, state) in cases.items():
    for _ in range(0 if name.endswith("[refresh]") else warmup):
      time_call(update, grads, state, params)
  for i in range(repeats):
    for name, (update, state) in cases.items():
      if name.endswith("[refresh]") and i >= refresh_repeats:
        continue
      samples[name].append(time_call(update, grads, state, params))
  medians = {name: statistics.median(s) * 1e3 for name, s in samples.items()}
  amortised, study = amortised_rows(medians, amortise_steps, gap, svd_study)
  bandwidth = measure_bandwidth() if bandwidth_size is None else measure_bandwidth(bandwidth_size)
  floor = {}
  for name, (update, state) in cases.items():
    if not name.endswith("[refresh]"):
      read, written = bytes_touched(update, grads, state, params)
      floor[name] = {"read": read, "written": written, "ms": (read + written) / bandwidth * 1e3}

  n_projected = sum(jax.tree.leaves(mask))
  return {
    "benchmark": f"jitted optimizer update, {label} parameter shapes",
    "date": datetime.date.today().isoformat(),
    "device": f"{jax.devices()[0].device_kind} ({platform.processor() or platform.machine()})",
    "backend": jax.default_backend(),
    "versions": {"jax": jax.__version__, "optax": optax.__version__},
    "settings": {
      "config": config,
      "shapes": label,
      **dims,
      "vocab": VOCAB,
      "parameters": sum(p.size for p in jax.tree.leaves(params)),
      "rank": rank,
      "update_proj_gap": gap,
      "projected_matrices": n_projected,
      "only_blocks": only_blocks,
      "repeats": repeats,
      "refresh_repeats": min(refresh_repeats, repeats),
      "warmup": warmup,
      "refresh_warmup": "the compiling call",
      "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
      "amortise_steps": amortise_steps,
    },
    "median_ms": medians,
    "samples_ms": {name: [s * 1e3 for s in samples[name]] for name in cases},
    "ratios": {
      "qgalore normal / optax.adamw": medians["qgalore_adamw"] / medians["optax.adamw"],
      "qgalore normal / optax galore normal": (
        medians["qgalore_adamw"] / medians["optax.contrib.galore"]
      ),
      "qgalore refresh / optax galore refresh": (
        medians["qgalore_adamw [refresh]"] / medians["optax.contrib.galore [refresh]"]
      ),
      "projection floor / optax.adamw": medians[FLOOR] / medians["optax.adamw"],
      "qgalore 8-bit moments / qgalore normal": medians[Q8] / medians["qgalore_adamw"],
      "adamw_8bit / optax.adamw": medians[ADAM8] / medians["optax.adamw"],
    },
    "amortised_ms": amortised,
    "svd_study": study,
    "bandwidth_bytes_per_s": bandwidth,
    "bandwidth_floor": floor,
  }


def _quartiles(samples):
  """First and third quartiles of the samples."""
  q = statistics.quantiles(samples, n=4)
  return q[0], q[2]


def bandwidth_lines(result):
  """The normal steps against the memory-bandwidth floor, as markdown lines."""
  return tables.bandwidth_lines(
    result,
    measured="a jitted STREAM triad (`a + 2 b`, 256 MiB vectors)",
    counted="(`bytes_touched`: it reads the gradients and its whole state, and the parameters"
    " if its updates depend on them; it writes the updates and the state it changes)",
  )


def to_markdown(result):
  settings = result["settings"]
  base = result["median_ms"]["optax.adamw"]
  lines = [
    f"Jitted update, {settings['shapes']} shapes ({settings['parameters']:,} parameters),"
    f" rank {settings['rank']}, {settings['projected_matrices']} projected matrices"
    f" ({'q,k,v,o,gate,up,down only' if settings['only_blocks'] else 'all 2-D'});"
    f" {result['backend']} ({result['device']}), jax {result['versions']['jax']},"
    f" optax {result['versions']['optax']}, {result['date']}; medians of"
    f" {settings['repeats']} interleaved repeats ({settings['refresh_repeats']} for refresh"
    " steps).",
    "",
    "| optimizer | step | median ms | middle half of samples, ms | vs optax.adamw |",
    "|---|---|---:|---:|---:|",
  ]
  quartiles = {
    name: _quartiles(samples) for name, samples in result["samples_ms"].items() if len(samples) >= 4
  }
  for name, ms in result["median_ms"].items():
    kind = "refresh (SVD)" if name.endswith("[refresh]") else "normal"
    label = name.removesuffix(" [refresh]")
    spread = "{:.0f}-{:.0f}".format(*quartiles[name]) if name in quartiles else ""
    lines.append(f"| {label} | {kind} | {ms:.1f} | {spread} | {ms / base:.2f}x |")
  lines.append("")
  for name, ratio in result["ratios"].items():
    lines.append(f"- {name}: **{ratio:.2f}x**")
  widths = [(q3 - q1) / 2 / result["median_ms"][name] for name, (q1, q3) in quartiles.items()]
  if widths:
    lines += [
      "",
      f"The middle half of one case's samples spans up to +-{max(widths):.0%} of its median"
      " here: ratios that differ by less than that are within this machine's noise.",
    ]
  lines += [
    "",
    f"The {FLOOR} row times only the projection and back-projection of every projected"
    " matrix, with a fixed basis, and AdamW on the other leaves (`projection_floor`): the"
    " least a step can cost that projects each matrix as the paper and this project do (the"
    " basis on the shorter side, the moments r x the longer side). It is not a floor for"
    " every GaLore: optax.contrib.galore puts the embedding's and head's basis on the long"
    " side (a 32000 x r float32 projector, r x 512 moments), moves less memory per step and"
    " can time under it. Where the floor exceeds optax.adamw, the two low-rank matmuls cost"
    " more on this machine than AdamW's passes over memory.",
  ]
  lines += bandwidth_lines(result)
  steps = settings["amortise_steps"]
  lines += [
    "",
    f"Mean time per step over {steps:,} steps, gap {settings['update_proj_gap']}:"
    " normal + (refresh - normal) x SVDs per matrix / steps. The timed refresh step runs the"
    " SVD of every matrix, so refresh - normal is the cost of refreshing them all once; the"
    " formula is exact when every matrix refreshes equally often, as on a fixed gap (and on"
    " stable gradients, where all matrices keep the same schedule). Under the adaptive"
    " schedule matrices refresh at different steps (each under its own `lax.cond`), and the"
    " count is then a mean over matrices weighted as if their SVDs cost the same.",
    "",
    "| optimizer | refresh schedule | SVDs per matrix | mean ms per step | vs optax.adamw |",
    "|---|---|---:|---:|---:|",
  ]
  for row in result["amortised_ms"]:
    lines.append(
      f"| {row['optimizer']} | {row['schedule']} | {row['svds_per_matrix']:.4g} |"
      f" {row['ms']:.1f} | {row['ms'] / base:.2f}x |"
    )
  study = result["svd_study"]
  lines.append("")
  if isinstance(study, dict):
    adaptive, fixed, gap = study["adaptive"], study["fixed"], study["update_proj_gap"]
    per = lambda r: f"{r['svds']} SVDs" + (f" in {r['steps']} steps" if r["steps"] else "")
    lines.append(
      f"SVD study (`{study['file']}`): {adaptive['optimizer']} {per(adaptive)},"
      f" {fixed['optimizer']} {per(fixed)}" + (f", initial gap {gap}" if gap else "") + ":"
      f" {study['ratio']:.3f} times the fixed gap's SVDs per step, applied to the fixed gap's"
      f" {steps:,}-step count."
    )
    horizon = adaptive["steps"] / adaptive["runs"] / gap if adaptive["steps"] and gap else None
    if horizon is not None and horizon < steps / settings["update_proj_gap"]:
      lines[-1] += (
        f" The study ran {horizon:g} initial gaps, this schedule"
        f" {steps / settings['update_proj_gap']:g}; gaps only grow, so the adaptive"
        " schedule's share of SVDs tends to fall with run length, and the study's ratio"
        " likely overstates it here."
      )
  else:
    lines.append(f"No SVD study row: {study}.")
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", choices=SPEED_CONFIGS, default="60M", help="LLaMA shapes")
  parser.add_argument("--only-blocks", action="store_true", help="project q,k,v,o,gate,up,down")
  parser.add_argument("--rank", type=int, default=None, help="default: the paper's for --config")
  parser.add_argument("--repeats", type=int, default=None, help=f"default: {REPEATS}")
  parser.add_argument(
    "--refresh-repeats", type=int, default=None, help=f"default: {REFRESH_REPEATS}"
  )
  parser.add_argument("--amortise-steps", type=int, default=10_000)
  parser.add_argument("--svd-study", type=pathlib.Path, default=SVD_STUDY)
  parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
  args = parser.parse_args(argv)
  os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # read when the first SVD loads OpenBLAS
  result = run(
    config=args.config,
    only_blocks=args.only_blocks,
    rank=args.rank,
    repeats=args.repeats,
    refresh_repeats=args.refresh_repeats,
    amortise_steps=args.amortise_steps,
    svd_study=args.svd_study,
  )
  markdown = to_markdown(result)
  print(markdown)
  args.out.mkdir(parents=True, exist_ok=True)
  stem = f"update_speed_{result['backend']}_{args.config}" + ("_blocks" if args.only_blocks else "")
  (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
  (args.out / f"{stem}.md").write_text(markdown)


if __name__ == "__main__":
  main()

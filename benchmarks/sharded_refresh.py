"""What a Q-GaLore step computes and communicates on 8 devices: SVD flops, collectives, time.

The LLaMA of ``--config`` (``examples/llama/model.py``; scanned, or with ``-unscanned`` a
2-D kernel per layer), FSDP-sharded over 8
simulated CPU devices as ``benchmarks/sharded_state.py`` shards it (each leaf along its
largest axis that 8 divides, a stack's layer axis whole), with ``qgalore_adamw`` (the
paper's rank for the config, float32 moments) on a mesh of Explicit axes. From the compiled
update (the gradient given sharded as its param):

* **SVD flops per device.** A step where every matrix refreshes (the first) runs one SVD per
  matrix, ``6 M N^2 + 20 N^3`` flops for an ``M x N`` matrix, ``M >= N`` (thin SVD with both
  sets of vectors; Golub and Van Loan). The SVD shapes are read from the compiled HLO (its
  LAPACK ``gesdd`` calls, checked against the expected shapes); each device runs the SVDs
  of ``L / 8`` slices of a stack of ``L`` that 8 divides, and of its share of the other
  leaves' matrices, stacked by shape and padded to a multiple of 8 (both refreshed inside
  ``shard_map``, docs/spec.md section 9.2).
* **Collectives**, from the HLO: those of a normal step (outside the refresh branches, the
  ``lax.cond`` branches that hold an SVD) and those a refresh adds, each with its kind,
  element type, shape on one device and what it moves, judged by the number of elements of
  the whole array it gathers, splits or sums: ``grad-sized`` (a gradient matrix or a stack
  of them), ``low-rank`` (a projected gradient or moment, m x r or r x n, or a stack),
  ``projector`` (basis, 4-bit codes, scales, top vector) or ``scalar`` (schedule numbers and
  flags, fewer elements than any low-rank matrix). A collective inside the per-slice loop
  runs once per slice of its stack.
* **Wall time** of the refresh step and of a normal step on 8 devices against 1 device,
  same shapes and data, both in this one process: the median of ``--repeats`` runs after a
  warm-up. On a CPU the 8 simulated devices share its cores, which bounds what the split
  can gain; the core count is recorded. ``--timing-layers`` times a model of fewer layers
  (the 1B's full refresh takes minutes on a CPU); the flops and collectives are always
  those of the full model.

Results go to ``benchmarks/results/sharded_refresh_<config>.json`` and ``.md``.

  python -m benchmarks.sharded_refresh --config 60m
  python -m benchmarks.sharded_refresh --config 1b --repeats 0 --no-count   # HLO only
  python -m benchmarks.sharded_refresh --config stacks-1b --repeats 1   # the 1B's shapes
  python -m benchmarks.sharded_refresh --config 60m-unscanned   # a 2-D kernel per layer
  python -m benchmarks.sharded_refresh --config stacks --repeats 0   # for the tests
"""

import argparse
import collections
import dataclasses
import datetime
import json
import math
import os
import pathlib
import re
import statistics
import sys
import time

from benchmarks import llama_shapes
from benchmarks import sharded_state
from benchmarks.tables import write_results

RESULTS = pathlib.Path(__file__).parent / "results"
DEVICES = sharded_state.DEVICES
STACKS = {"stacks": (48, 80), "stacks-1b": (2048, 5461)}  # (d, ff)
# The test config's 2-D kernels (as an unscanned model's): (attn, down) of them, neither
# count a multiple of 8.
MATRICES = (6, 3)
UNSCANNED = "-unscanned"
RANKS = {"stacks": 4, "stacks-1b": 512, **{k.lower(): r for k, r in llama_shapes.RANKS.items()}}
LABELS = ("grad-sized", "low-rank", "projector", "scalar", "other")

_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{$")
_CALLEE = re.compile(
  r"(?:calls|to_apply|body|condition|true_computation|false_computation)=%([\w.\-]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_SVD = re.compile(r'custom_call_target="[^"]*ge(?:sdd|svd)[^"]*"')
_SVD_OPERAND = re.compile(r"operand_layout_constraints=\{[a-z]+\d*\[(\d+),(\d+)\]")


def mesh_of(devices: int):
  """An Explicit mesh ``("fsdp",)`` over the first ``devices`` devices."""
  import jax

  explicit = (jax.sharding.AxisType.Explicit,)
  return jax.make_mesh((devices,), ("fsdp",), axis_types=explicit, devices=jax.devices()[:devices])


def abstract_problem(config: str, mesh, layers: int | None = None):
  """``(params, dimension_numbers)``: the params as ``jax.ShapeDtypeStruct`` placed on
  ``mesh``. A LLaMA config is the scanned model FSDP-sharded by ``sharded_state.fsdp_spec``
  (``layers`` replaces its depth), ``<config>-unscanned`` the model with a 2-D kernel per
  layer. ``stacks`` is two stacks of 8 kernels (in, out), each split along the side that
  its projection contracts, as FSDP splits a LLaMA's q and down kernels (``attn``: d x d,
  "right"; ``down``: in ff, out d, "left"), with ``(d, ff)`` = (48, 80) for the tests (no
  gradient, low-rank or projector array of rank 4 has another's element count) and the
  1B's (2048, 5461) for ``stacks-1b``; the test config adds 2-D kernels of both shapes
  (``MATRICES``), refreshed together by shape."""
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import qgalore_jax
  from examples.llama import model

  if config not in STACKS:
    cfg = model.CONFIGS[config.removesuffix(UNSCANNED)]
    cfg = cfg if layers is None else dataclasses.replace(cfg, num_layers=layers)
    scan = not config.endswith(UNSCANNED)
    llama, params = sharded_state.sharded_llama(cfg, mesh, scan)
    return params, model.dimension_numbers(llama)
  d, ff = STACKS[config]
  place = lambda shape, spec: jax.ShapeDtypeStruct(
    shape, "float32", sharding=NamedSharding(mesh, spec)
  )
  specs = {
    "attn": ((layers or 8, d, d), P(None, "fsdp", None)),
    "down": ((layers or 8, ff, d), P(None, None, "fsdp")),
  }
  params = {k: place(*v) for k, v in specs.items()}
  stacked = qgalore_jax.DimensionNumbers(reduction_axis=1, output_axis=2, batch_axis=0)
  numbers = {k: stacked for k in specs}
  if config == "stacks":
    attn, down = MATRICES
    kernel = qgalore_jax.DimensionNumbers(reduction_axis=0, output_axis=1)
    params |= {f"attn{i}": place((d, d), P("fsdp", None)) for i in range(attn)}
    params |= {f"down{i}": place((ff, d), P(None, "fsdp")) for i in range(down)}
    numbers |= {k: kernel for k in params if k not in specs}
  return params, numbers


def concrete(params):
  """``(params, grads)``: arrays of the abstract ``params``' shapes and shardings, drawn at
  random on the host (the same values on any mesh)."""
  import jax
  import numpy as np

  rng = np.random.default_rng(0)
  draw = lambda a: jax.device_put(0.02 * rng.standard_normal(a.shape, np.float32), a.sharding)
  return jax.tree.map(draw, params), jax.tree.map(draw, params)


@dataclasses.dataclass(frozen=True)
class Collective:
  kind: str
  dtype: str
  shape: str  # on one device: "f32[512,128]", or "8 x f32[1,64,64]" for a tuple of 8
  elements: int  # of the whole array it gathers, splits or sums (see `collectives`)
  device_bytes: int  # the buffer on one device: an all-gather's result, else its operand
  refresh_only: bool
  runs: int | None  # per step: a loop's known trip count (1 outside loops; None: dynamic)


def computations(hlo: str) -> tuple[dict[str, list[str]], str]:
  """The HLO module's computations, each as its instruction lines, and the entry's name."""
  comps, entry, name = {}, None, None
  for line in hlo.splitlines():
    match = _COMPUTATION.match(line)
    if match:
      name = match.group(1)
      comps[name] = []
      entry = name if line.startswith("ENTRY") else entry
    elif line == "}":
      name = None
    elif name is not None:
      comps[name].append(line)
  return comps, entry


def _callees(line: str) -> tuple[list[str], dict[str, int | None]]:
  """The computations one instruction calls, and of these the loop bodies with their
  known trip counts (None if not known)."""
  called = _CALLEE.findall(line)
  for group in _BRANCHES.findall(line):
    called += [c.strip().lstrip("%") for c in group.split(",")]
  trips = re.search(r'known_trip_count":\{"n":"(\d+)"', line)
  runs = int(trips.group(1)) if trips else None
  return called, {b: runs for b in re.findall(r"\bbody=%([\w.\-]+)", line)}


def _size(dims: str) -> int:
  return math.prod(int(d) for d in dims.split(",")) if dims else 1


def _group_size(line: str, devices: int) -> int:
  """Devices in one replica group of a collective (``devices`` if it names none)."""
  named = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", line)
  if named:
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", named.group(1)))
    return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", named.group(2)))
  iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line)
  if iota:
    return int(iota.group(2))
  listed = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
  return len(listed.group(1).split(",")) if listed else devices


def collectives(hlo: str, devices: int) -> tuple[list[Collective], list[tuple[int, int]]]:
  """Every collective of a compiled SPMD program, and the operand shape of each SVD call.

  Each instruction is counted once, as written in the HLO text. A collective is
  ``refresh_only`` where it is reached only through a conditional branch that holds an SVD.
  Its ``elements`` bound those of the whole array it works on: an all-reduce's operand (the
  first of a tuple), an all-gather's (the first of a tuple) times ``devices``, and an
  all-to-all's pieces on one device together times ``devices``.
  """
  comps, entry = computations(hlo)
  calls = {name: [_callees(line) for line in lines] for name, lines in comps.items()}
  holds = {}

  def holds_svd(name, path=()):
    if name not in holds:
      inner = [c for called, _ in calls.get(name, []) for c in called if c not in path]
      here = any(_SVD.search(line) for line in comps.get(name, []))
      holds[name] = here or any(holds_svd(c, (*path, name)) for c in inner)
    return holds[name]

  # Each computation reached from the entry, with how often it runs per step (None: a
  # dynamic loop), first without the refresh branches, then with them.
  runs, normal = {}, set()
  for refresh in (False, True):
    todo, seen = [(entry, 1)], set()
    while todo:
      name, times = todo.pop()
      if name in seen:
        continue
      seen.add(name)
      runs[name] = times
      if not refresh:
        normal.add(name)
      for line, (called, bodies) in zip(comps[name], calls[name], strict=True):
        branch = " conditional(" in line
        for c in called:
          if branch and not refresh and holds_svd(c):
            continue
          trips = bodies.get(c, 1)
          todo.append((c, None if times is None or trips is None else times * trips))
  found, svds = [], []
  for name in sorted(runs):
    for line in comps[name]:
      match = sharded_state.COLLECTIVE_LINE.match(line)
      if match:
        arrays = _ARRAY.findall(match.group(1))
        kind, (dtype, dims) = match.group(2), arrays[0]
        local = sum(_size(d) for _, d in arrays)
        itemsize = int(re.sub(r"\D", "", dtype) or 8) // 8 or 1  # pred: 1 byte
        # A tuple all-reduce or all-gather works on several arrays (combined collectives),
        # an all-to-all's tuple holds the pieces of one.
        if kind == "all-reduce":
          elements = _size(dims)
        elif kind == "all-gather":
          elements = _size(dims) // _group_size(line, devices) * devices
        else:
          elements = local * devices
        shape = f"{dtype}[{dims}]" if len(arrays) == 1 else f"{len(arrays)} x {dtype}[{dims}]"
        refresh_only = name not in normal
        found.append(
          Collective(kind, dtype, shape, elements, local * itemsize, refresh_only, runs[name])
        )
      if _SVD.search(line):
        m = _SVD_OPERAND.search(line)
        svds.append((int(m.group(1)), int(m.group(2))) if m else (0, 0))
  return found, svds


def label_sizes(layouts, rank: int, group_size: int = 256) -> dict:
  """Element counts of the float arrays of each kind, for one matrix and for a whole stack.

  ``grad-sized``: a gradient (m x n); ``low-rank``: a projected gradient or moment (m x r
  or r x n) or the float basis (r x k); ``projector``: the scales and zeros (one per group)
  and the top vector (k). The stored codes are told apart by their type, bytes.
  """
  sizes = {"grad-sized": set(), "low-rank": set(), "projector": set()}
  stacks = [(lay.matrix_shape, (lay.num_slices,)) for lay in layouts]
  units = sharded_state.refresh_units(layouts, DEVICES)
  stacks += [(shape, (n, padded)) for shape, n, padded in units]
  for (m, n), counts in stacks:
    r, k = min(rank, m, n), (n if m >= n else m)
    for times in (1, *counts):
      sizes["grad-sized"].add(times * m * n)
      sizes["low-rank"] |= {times * r * (m if m >= n else n), times * r * k}
      sizes["projector"] |= {times * -(-r * k // group_size), times * k}
  clash = sizes["grad-sized"] & (sizes["low-rank"] | sizes["projector"])
  if clash:
    raise ValueError(f"a gradient has the element count of a low-rank array: {sorted(clash)}")
  return sizes


def label(c: Collective, sizes: dict) -> str:
  """What ``c`` moves: by its type (bytes: projector codes; integers: counts and flags),
  else by the element count of its whole array (:func:`label_sizes`)."""
  if c.dtype in ("pred", "s32", "u32", "s64"):
    return "scalar"
  if c.dtype == "u8":
    return "projector"
  for name in ("grad-sized", "low-rank", "projector"):
    if c.elements in sizes[name]:
      return name
  if c.elements < min(sizes["low-rank"]):
    return "scalar"
  return "grad-sized" if c.elements >= min(sizes["grad-sized"]) else "other"


def collective_rows(found: list[Collective], sizes: dict) -> list[dict]:
  """The collectives grouped by step, label, kind, element type and shape on one device."""
  groups = collections.Counter()
  info = {}
  for c in found:
    key = ("refresh" if c.refresh_only else "every", label(c, sizes), c.kind, c.dtype, c.shape)
    groups[key] += 1
    info[key] = c
  rows = []
  for key in sorted(groups, key=lambda k: (k[0] == "refresh", LABELS.index(k[1]), k[2:])):
    c = info[key]
    runs = None if c.runs is None else groups[key] * c.runs
    rows.append(
      {
        "step": "every step" if key[0] == "every" else "refresh only",
        "moves": key[1],
        "kind": c.kind,
        "dtype": c.dtype,
        "shape_on_device": c.shape,
        "elements": c.elements,
        "in_hlo": groups[key],
        "runs_per_step": runs,
        "device_mb_per_step": None if runs is None else runs * c.device_bytes / 1e6,
      }
    )
  return rows


def compile_update(config: str, rank: int, layers: int | None, run: bool):
  """The update of ``qgalore_adamw`` on ``DEVICES`` devices, compiled with a hook that
  counts the SVDs as they run on every device (a partitioned debug callback, which moves
  nothing between devices), as ``(compiled, args, params, numbers, shapes)``: ``args`` are
  arrays (drawn at random) for a step where every matrix refreshes if ``run``, else None
  and nothing is allocated; each run appends the shape of each SVD to ``shapes``, once per
  device that runs it."""
  import jax

  import qgalore_jax

  shapes = []

  def counting(g, r):
    jax.debug.callback(lambda x: shapes.append(x.shape), g, partitioned=True)
    return qgalore_jax.compute_projector(g, r)

  mesh = mesh_of(DEVICES)
  params, numbers = abstract_problem(config, mesh, layers)
  tx = qgalore_jax.qgalore_adamw(1e-3, rank=rank, dimension_numbers=numbers, projector_fn=counting)
  with jax.set_mesh(mesh):
    if run:
      params, grads = concrete(params)
      args = (grads, jax.jit(tx.init)(params), params)
    else:
      place = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
      state = jax.eval_shape(tx.init, params)
      args = (params, jax.tree.map(place, state, qgalore_jax.state_shardings(tx, params)), params)
    compiled = jax.jit(tx.update).lower(*args).compile()
  return compiled, args if run else None, params, numbers, shapes


def analyse(compiled, params, numbers, rank: int) -> dict:
  """SVD flops per device and the collectives of ``compiled`` (:func:`compile_update`)."""
  layouts = sharded_state.projected_layouts(params, numbers)
  found, svd_shapes = collectives(compiled.as_text(), DEVICES)
  units = sharded_state.refresh_units(layouts, DEVICES)
  expected = sorted(tuple(sorted(shape)) for shape, _, _ in units)
  if sorted(tuple(sorted(s)) for s in svd_shapes) != expected:
    raise AssertionError(f"SVDs in the HLO {svd_shapes} are not the expected {expected}")
  split = sharded_state.svd_split(layouts, DEVICES)
  return {
    **split,
    "svd_fraction_per_device": split["svd_gflops_per_device"]
    / split["svd_gflops_per_refresh_step"],
    "svd_shapes_in_hlo": [list(s) for s in svd_shapes],
    "stacks": [{"matrix": list(lay.matrix_shape), "slices": lay.num_slices} for lay in layouts],
    "collectives": collective_rows(found, label_sizes(layouts, rank)),
  }


def count_svds(compiled, args, params, numbers, shapes) -> dict:
  """The SVDs that run on a step where every matrix refreshes, summed over the devices
  (``compile_update(..., run=True)``)."""
  import jax

  jax.block_until_ready(compiled(*args))
  jax.effects_barrier()
  split = sharded_state.svd_split(sharded_state.projected_layouts(params, numbers), DEVICES)
  return {
    "svds_per_refresh_step": split["svds_per_refresh_step"],
    "svds_run_all_devices": len(shapes),
    "svd_gflops_per_refresh_step": split["svd_gflops_per_refresh_step"],
    "svd_gflops_run_all_devices": sum(sharded_state.svd_flops(*s) for s in shapes) / 1e9,
  }


def time_steps(config: str, rank: int, layers: int | None, devices: int, repeats: int) -> dict:
  """Median wall seconds of the refresh step (every matrix refreshes) and of a normal step
  on ``devices`` devices, after one warm-up run of each."""
  import jax

  import qgalore_jax

  mesh = mesh_of(devices)
  params, numbers = abstract_problem(config, mesh, layers)
  tx = qgalore_jax.qgalore_adamw(1e-3, rank=rank, dimension_numbers=numbers)
  with jax.set_mesh(mesh):
    params, grads = concrete(params)
    first = jax.jit(tx.init)(params)
    update = jax.jit(tx.update)

    def seconds(state):
      times = []
      for _ in range(repeats + 1):  # the first run compiles and warms up
        start = time.perf_counter()
        out = jax.block_until_ready(update(grads, state, params))
        times.append(time.perf_counter() - start)
      return out, times[1:]

    (_, after), refresh = seconds(first)
    _, normal = seconds(after)
  median = lambda xs: statistics.median(xs) if xs else None
  return {
    "devices": devices,
    "refresh_s": median(refresh),
    "normal_s": median(normal),
    "refresh_runs_s": refresh,
    "normal_runs_s": normal,
  }


def measure(config: str, rank: int, repeats: int, timing_layers: int | None, count: bool) -> dict:
  import jax

  from examples.llama import model

  assert jax.device_count() == DEVICES, jax.devices()
  layers = 8 if config in STACKS else model.CONFIGS[config.removesuffix(UNSCANNED)].num_layers
  result = {
    "config": config,
    "rank": rank,
    "devices": DEVICES,
    "layers": layers,
    "jax": jax.__version__,
    "date": datetime.date.today().isoformat(),
    "cpu_cores": len(os.sched_getaffinity(0)),
    "load_average": os.getloadavg(),
    "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
    "repeats": repeats,
    "timing_layers": timing_layers or layers,
  }
  start = time.perf_counter()
  run = count and timing_layers is None
  compiled, args, params, numbers, shapes = compile_update(config, rank, None, run)
  result["compile_s"] = time.perf_counter() - start
  result["analysis"] = analyse(compiled, params, numbers, rank)
  if count and not run:  # count the SVDs as they run on the smaller model
    compiled, args, params, numbers, shapes = compile_update(config, rank, timing_layers, True)
  if count:
    result["svds_run"] = count_svds(compiled, args, params, numbers, shapes)
  del compiled, args
  if repeats:
    result["timing"] = [time_steps(config, rank, timing_layers, n, repeats) for n in (1, DEVICES)]
  return result


def scanned(config: str) -> str:
  """How ``config``'s layers are held: ``scanned`` (stacks) or as 2-D kernels."""
  if config == "stacks":
    return f"scanned, with {' and '.join(map(str, MATRICES))} 2-D kernels of each shape"
  return "unscanned: 2-D kernels" if config.endswith(UNSCANNED) else "scanned"


def table(result: dict) -> str:
  a, run = result["analysis"], result.get("svds_run")
  d = result["devices"]
  lines = [
    f"{result['config']} ({result['layers']} layers, {scanned(result['config'])}), rank"
    f" {result['rank']},"
    f" float32 moments, FSDP over an Explicit mesh of {d} devices (JAX {result['jax']},"
    f" {result['date']})",
    "",
    f"SVD flops of a step where every matrix refreshes (6 M N^2 + 20 N^3 per M x N SVD,"
    f" M >= N): {a['svds_per_refresh_step']} SVDs, {a['svd_gflops_per_refresh_step']:.2f}"
    f" GFLOP in all; the busiest device runs {a['svds_per_device']} of them,"
    f" {a['svd_gflops_per_device']:.2f} GFLOP: **{a['svd_fraction_per_device']:.3f} of the"
    f" total** (1/{d} = {1 / d:.3f}). The compiled update holds"
    f" {len(a['svd_shapes_in_hlo'])} SVD calls of the expected matrix shapes: one per stack"
    f" that splits over the {d} devices, one per matrix shape of the other leaves, refreshed"
    " together."
    + (
      ""
      if run is None
      else f" Counted as they ran ({result['timing_layers']} layers), the {d} devices ran"
      f" {run['svds_run_all_devices']} SVDs of {run['svd_gflops_run_all_devices']:.2f} GFLOP"
      f" together for the {run['svds_per_refresh_step']} matrices"
      f" ({run['svd_gflops_per_refresh_step']:.2f} GFLOP):"
      f" {run['svds_run_all_devices'] / run['svds_per_refresh_step']:.2f} runs of each"
      f" (1: each SVD on one device; {d}: on every device)."
    ),
    "",
    "Collectives of the compiled update: those of every step, then those a refresh adds."
    " Moves: what the whole array is (grad-sized: a gradient or a stack of them; low-rank:"
    " m x r, r x n or the r x k basis; projector: 4-bit codes, scales, top vector; scalar:"
    " schedule numbers, flags). Runs: per step, counting the per-slice loop's trips. MB:"
    " each device's buffer (an all-gather's result, else its operand) times runs.",
    "",
    "| step | moves | kind | element type | shape on one device | in HLO | runs | MB/device |",
    "|---|---|---|---|---|---:|---:|---:|",
  ]
  for row in a["collectives"]:
    runs = "per due slice" if row["runs_per_step"] is None else row["runs_per_step"]
    mb = row["device_mb_per_step"]
    lines.append(
      f"| {row['step']} | {row['moves']} | {row['kind']} | {row['dtype']} |"
      f" {row['shape_on_device']} | {row['in_hlo']} | {runs} |"
      f" {'-' if mb is None else f'{mb:.3f}'} |"
    )
  for step in ("every step", "refresh only"):
    rows = [r for r in a["collectives"] if r["step"] == step]
    grad = [r for r in rows if r["moves"] == "grad-sized"]
    mb = sum(r["device_mb_per_step"] or 0 for r in rows)
    lines.append("")
    lines.append(
      f"{step}: {sum(r['in_hlo'] for r in rows)} collectives in the HLO, {mb:.2f} MB per"
      f" device per step, of which {sum(r['device_mb_per_step'] or 0 for r in grad):.2f} MB"
      f" grad-sized ({sum(r['in_hlo'] for r in grad)} collectives)."
    )
  timing = result.get("timing")
  if timing:
    one, many = timing
    lines += [
      "",
      f"Wall time of the update (median of {result['repeats']} runs after a warm-up,"
      f" {result['timing_layers']} layers of these shapes), 1 device against {d} simulated"
      f" devices in one process on a CPU of {result['cpu_cores']} cores: the {d} devices"
      f" share those cores, so a split cannot run faster than {result['cpu_cores']} devices"
      " at once allow, and other jobs shared them too (load average"
      f" {result['load_average'][0]:.1f} at the end). One BLAS thread per LAPACK call"
      f" (OPENBLAS_NUM_THREADS={result['openblas_threads']}).",
      "",
      f"| step | 1 device (s) | {d} devices (s) | {d} devices / 1 |",
      "|---|---:|---:|---:|",
    ]
    for name, key in (("refresh (every matrix)", "refresh_s"), ("normal", "normal_s")):
      lines.append(f"| {name} | {one[key]:.3f} | {many[key]:.3f} | {many[key] / one[key]:.2f} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="60m", help="a key of examples.llama CONFIGS, or stacks")
  parser.add_argument("--rank", type=int, default=None, help="default: the paper's for the config")
  parser.add_argument("--repeats", type=int, default=3, help="timed runs per step (0: no timing)")
  parser.add_argument("--timing-layers", type=int, default=None, help="layers of the timed model")
  parser.add_argument(
    "--count",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="run a refresh step (of --timing-layers) and count the SVDs as they run",
  )
  parser.add_argument("--out", default=str(RESULTS), help="directory of the JSON and markdown")
  args = parser.parse_args(argv)
  path = pathlib.Path(args.out) / f"sharded_refresh_{args.config}.json"
  # One BLAS thread per LAPACK call: 8 simulated devices that each start a pool of threads
  # oversubscribe the cores, and a small SVD then takes many times longer.
  os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
  if sharded_state.rerun_on_devices("benchmarks.sharded_refresh", argv or sys.argv[1:]):
    return json.loads(path.read_text())
  rank = args.rank or RANKS[args.config.removesuffix(UNSCANNED)]
  result = measure(args.config, rank, args.repeats, args.timing_layers, args.count)
  write_results(path, result, table(result))
  return result


if __name__ == "__main__":
  main()

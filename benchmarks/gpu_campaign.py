"""One command for a GPU machine: parity, speed, SVD and memory, each phase saved as it ends.

  python -m benchmarks.gpu_campaign --out runs/gpu            # the whole campaign (<= 9 min)
  python -m benchmarks.gpu_campaign --out runs/gpu --smoke    # tiny shapes, any device
  python -m benchmarks.gpu_campaign --out runs/gpu --only parity,svd

The phases run in order of value (:data:`PHASES`): ``parity`` (the parity report on the GPU,
JAX vs torch and GPU vs CPU, then ``pytest -m gpu``), ``speed`` (``update_speed`` and
``torch_step_speed`` on the paper's LLaMA shapes), ``svd`` (one refresh-sized basis in each
library by each ``svd_method``: full SVD, randomized, subspace) and ``memory`` (the JAX step
compiled at LLaMA-7B, and ``layerwise_memory`` at LLaMA-7B widths, 2 and 4 layers,
extrapolated to 32), then ``conds`` (what one ``lax.cond`` per matrix costs a jitted step on
the device). The campaign keeps to ``--budget-s`` (:data:`CAMPAIGN_BUDGET_S`): each phase
leaves the later ones the time they need (:data:`PHASE_NEED_S`). Each phase writes
``<phase>.json`` into ``--out`` when it ends, and ``summary.md`` is rewritten after every
phase, so a run cut short keeps what it finished. A phase that raises is recorded as FAIL
with its traceback and the next one runs; the exit status is 1 if any phase failed. Without
a GPU, only ``--smoke`` runs the phases (on the CPU); otherwise each is recorded as SKIPPED
and the status is 1.

The authors' ``q-galore-torch`` and ``galore-torch`` are optional: ``--wheels DIR`` installs
the wheels in DIR (``pip install --no-deps --no-index``) first; without them the checks
that need them are skipped, and the summary says so.
"""

import argparse
import dataclasses
import functools
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
import traceback

import jax
import torch

import qgalore_torch
from benchmarks import layerwise_memory
from benchmarks import refresh_cost
from benchmarks import step_memory
from benchmarks import torch_step_speed
from benchmarks import update_speed
from benchmarks.llama_shapes import CONFIGS
from benchmarks.llama_shapes import RANKS
from benchmarks.llama_shapes import VOCAB
from benchmarks.llama_shapes import llama_param_shapes
from parity_tests import authors
from parity_tests import core
from parity_tests import generator
from parity_tests import quantiser
from parity_tests import report

PHASES = ("parity", "speed", "svd", "memory", "conds")
_REPO = pathlib.Path(__file__).parents[1]
# The library suites' GPU tests; the parity suites ran above, as the report's components.
GPU_SUITES = ("qgalore_torch", "qgalore_jax")
PYTEST_TIMEOUT_S = 120
PYTEST_WORKERS = 4  # pytest-xdist processes sharing the GPU (JAX does not preallocate)
# The speed phase's wall-clock budget, shared by its runs in order; a run gets what is left.
SPEED_BUDGET_S = 150
# config: (normal-step repeats, refresh-step repeats). A normal step takes milliseconds (on an
# H100, 3 to 17 ms at 60M), so its repeats are cheap; the time goes to compiling (JAX) and
# to refresh steps, one SVD per projected matrix (58 at 60M: 2.1 s on an H100), hence one
# refresh repeat. With 51/3 repeats, the JAX 60M run alone took 124 s on an H100.
SPEED_PLAN = {"60M": (21, 1), "350M": (21, 1), "1B": (11, 1), "7B": (11, 1)}
# Bytes per parameter that a speed run holds at least, all float32: parameters, gradients
# and AdamW's two moments (torch updates in place); JAX also holds every optimizer's state at
# once (8-bit AdamW: 2 more) and a jitted AdamW update's outputs (updates, new moments: 12).
# A config above the device's memory is skipped rather than left to fail.
MIN_BYTES_PER_PARAM = {"jax": 30, "torch": 16}
SVD_SHAPES = {"full": ((4096, 4096), (11008, 4096)), "smoke": ((256, 256), (688, 256))}
SVD_RANK = {"full": RANKS["7B"], "smoke": 64}
SVD_REPEATS = 3
# The refresh methods the svd phase times (docs/spec.md section 2.6), at qgalore_adamw's
# defaults.
SVD_METHODS = ("full", "randomized", "subspace")
SVD_OVERSAMPLE = 16
SVD_ITERS = {"full": 0, "randomized": 2, "subspace": 1}  # power_iters, subspace_iters
# The whole campaign's wall-clock budget (--budget-s), and the seconds each phase is expected
# to need: a phase gives up what the later chosen phases need, and a phase that would start
# after the deadline is skipped.
CAMPAIGN_BUDGET_S = 540
PHASE_NEED_S = {"parity": 200, "speed": 60, "svd": 60, "memory": 200, "conds": 20}
# The conds phase: as many conditionals as a LLaMA-60M update has projected matrices.
CONDS = {"full": 58, "smoke": 4}
MEMORY_LAYERS = (2, 4)
MEMORY_TARGET_LAYERS = 32
# The JAX step compiled at LLaMA-7B (32 scanned layers, rematerialised blocks) for XLA's
# buffer assignment on the device: (batch, sequence) as in the paper's two measurements.
JAX_MEMORY_BATCHES = {"full": ((16, 256), (1, 256)), "smoke": ((2, 16),)}
PAPER_PEAK_GB = {(16, 256): 15.26, (1, 256): 15.08}
# The smoke speed runs' model: one layer, as the compiles of its optimizers (7 in JAX) are
# most of the smoke campaign's time; benchmarks_test.py times 2-layer shapes.
TINY = {"hidden": 32, "ffn": 48, "layers": 1, "vocab": 64}


@dataclasses.dataclass(frozen=True)
class Context:
  """What every phase needs: where to write, how big to run, on which device."""

  out: pathlib.Path
  smoke: bool
  dev: core.Device
  deadline: float = float("inf")  # time.monotonic() by which the campaign should end
  later: tuple[str, ...] = ()  # the chosen phases after the running one

  def budget(self, cap: float) -> float:
    """Seconds the running phase may take: ``cap``, less what the later phases need."""
    reserve = sum(PHASE_NEED_S[name] for name in self.later)
    return max(10.0, min(cap, self.deadline - time.monotonic() - reserve))

  @property
  def torch_device(self) -> str:
    return "cuda" if self.dev.name == "gpu" else "cpu"


def _write_json(path: pathlib.Path, payload) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(payload, indent=1, default=str) + "\n")


def _installed(package: str) -> bool:
  return importlib.util.find_spec(package) is not None


def _free_device(ctx: Context) -> None:
  """Returns the GPU memory that this process no longer uses (torch caches it otherwise)."""
  gc.collect()
  if ctx.dev.name == "gpu":
    torch.cuda.empty_cache()


def _run_logged(command, log: pathlib.Path, timeout: float, env=None) -> tuple[int | None, str]:
  """Runs ``command`` from the repository root; saves its output to ``log``.

  Returns:
    ``(returncode, stdout)``; the return code is None when it ran past ``timeout`` seconds.
  """
  log.parent.mkdir(parents=True, exist_ok=True)
  try:
    done = subprocess.run(
      command, cwd=_REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    code, stdout, stderr = done.returncode, done.stdout, done.stderr
  except subprocess.TimeoutExpired as expired:
    decode = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else b or ""
    code, stdout, stderr = None, decode(expired.stdout), decode(expired.stderr)
  log.write_text(f"$ {' '.join(command)}\n{stdout}\n--- stderr ---\n{stderr}")
  return code, stdout


# --- parity ---------------------------------------------------------------------------------


def phase_parity(ctx: Context) -> dict:
  """The parity report on the device at full float32 matmuls, then ``pytest -m gpu``.

  Smoke mode runs the quantiser and generator components only, and no pytest.
  """
  authors_cls = authors.projector_cls()
  with core.matmul_precision(highest=True), core.single_threaded_torch():
    if ctx.smoke:
      checks = quantiser.measure_all(ctx.dev) + generator.measure_all(ctx.dev)
    else:
      checks = report.run_components(ctx.dev, authors_cls)
  env = report.environment(ctx.dev)
  notes = []
  if authors_cls is None:
    notes.append("q-galore-torch is not installed: the authors' oracle was skipped")
  if ctx.smoke:
    notes.append("smoke: quantiser and generator components only; pytest -m gpu not run")
  folder = ctx.out / "parity"
  folder.mkdir(parents=True, exist_ok=True)
  (folder / f"parity_{ctx.dev.name}.md").write_text(report.markdown(env, checks))
  _write_json(
    folder / f"parity_{ctx.dev.name}.json",
    {**env, "checks": [dataclasses.asdict(c) for c in checks]},
  )
  failed = [f"{c.component}: {c.case}: {c.quantity}" for c in checks if not c.passed]
  result = {
    "checks": len(checks),
    "passed": len(checks) - len(failed),
    "failed_checks": failed,
    "pytest": None,
  }
  details = [f"{result['passed']} of {len(checks)} parity checks pass"]
  if not ctx.smoke:
    _free_device(ctx)  # the suites' processes need the memory this one still caches
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
    if _installed("xdist"):
      command += ["-n", str(PYTEST_WORKERS)]
    log = folder / "pytest_gpu.txt"
    timeout = ctx.budget(PYTEST_TIMEOUT_S)
    code, stdout = _run_logged([*command, *GPU_SUITES], log, timeout)
    last = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    result["pytest"] = {"returncode": code, "last_line": last, "log": str(log)}
    if code is None:
      details.append(f"pytest -m gpu timed out after {timeout:.0f} s")
    else:
      details.append(f"pytest -m gpu: {last or f'exit {code}'}")
  passed = not failed and (result["pytest"] is None or result["pytest"]["returncode"] == 0)
  return {
    "status": "PASS" if passed else "FAIL",
    "details": "; ".join(details),
    "notes": notes,
    **result,
  }


# --- speed ----------------------------------------------------------------------------------


def speed_runs(ctx: Context) -> list[dict]:
  """The runs of the speed phase, in order: each config in JAX then torch, small first."""
  if ctx.smoke:
    return [
      {"backend": b, "config": "60M", "repeats": 2, "refresh_repeats": 1, "tiny": True}
      for b in ("jax", "torch")
    ]
  return [
    {"backend": b, "config": c, "repeats": r, "refresh_repeats": rr, "tiny": False}
    for c, (r, rr) in SPEED_PLAN.items()
    for b in ("jax", "torch")
  ]


def _parameters(config: str) -> int:
  """Parameters of a LLaMA config (``llama_shapes.llama_param_shapes``), counted from its sizes."""
  hidden, ffn, layers = CONFIGS[config]
  return 2 * VOCAB * hidden + layers * (4 * hidden**2 + 3 * hidden * ffn + 2 * hidden) + hidden


def _device_bytes(ctx: Context) -> int | None:
  if ctx.dev.name != "gpu":
    return None
  return torch.cuda.get_device_properties(0).total_memory


def speed_child(settings: dict) -> dict:
  """One speed run (in a fresh process): times it, writes its JSON and markdown, sums it up."""
  out = pathlib.Path(settings["out"])
  out.mkdir(parents=True, exist_ok=True)
  config, tiny = settings["config"], settings["tiny"]
  common = {"config": config, "repeats": settings["repeats"]}
  common["refresh_repeats"] = settings["refresh_repeats"]
  if settings["backend"] == "jax":
    shapes = llama_param_shapes(**TINY) if tiny else None
    steps = 1000 if tiny else 10_000
    result = update_speed.run(
      **common,
      shapes=shapes,
      rank=8 if tiny else None,
      amortise_steps=steps,
      bandwidth_size=2**16 if tiny else None,
    )
    markdown = update_speed.to_markdown(result)
    stem = f"update_speed_{result['backend']}_{config}"
  else:
    torch.set_num_threads(1)  # the benchmark's own default (see its docstring)
    shapes = torch_step_speed.torch_param_shapes(**TINY) if tiny else None
    result = torch_step_speed.run(
      **common,
      shapes=shapes,
      rank=8 if tiny else None,
      device=settings["device"],
      with_galore_torch=_installed("galore_torch"),
      breakdown=config == "60M",  # the breakdown's optimizers double the SVDs at setup
    )
    markdown = torch_step_speed.to_markdown(result)
    stem = f"torch_step_speed_{result['backend']}_{config}"
  stem += "_tiny" if tiny else ""
  (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
  (out / f"{stem}.md").write_text(markdown)
  return {
    "file": str(out / f"{stem}.json"),
    "device": result["device"],
    "median_ms": result["median_ms"],
    "ratios": result["ratios"],
  }


def phase_speed(ctx: Context) -> dict:
  """``update_speed`` (JAX) and ``torch_step_speed`` per config, each in a fresh process.

  A fresh process per run frees the device's memory between runs and lets a run that
  overruns the phase's budget (:data:`SPEED_BUDGET_S`) be stopped; the runs that no time
  is left for, or whose configs cannot fit in the device's memory, are recorded as skipped.
  """
  folder = ctx.out / "speed"
  budget = ctx.budget(SPEED_BUDGET_S)
  deadline = time.monotonic() + budget
  memory = _device_bytes(ctx)
  runs, notes = [], []
  if not _installed("galore_torch"):
    notes.append("galore-torch is not installed: its rows of torch_step_speed were skipped")
  for settings in speed_runs(ctx):
    settings = {**settings, "device": ctx.torch_device, "out": str(folder)}
    name = f"{settings['backend']} {settings['config']}" + (" (tiny)" if settings["tiny"] else "")
    row = {"run": name, **settings}
    need = MIN_BYTES_PER_PARAM[settings["backend"]] * _parameters(settings["config"])
    left = deadline - time.monotonic()
    if not settings["tiny"] and memory is not None and need > memory:
      row |= {"status": "SKIPPED", "reason": f"needs > {need / 2**30:.0f} GiB, device has"}
      row["reason"] += f" {memory / 2**30:.0f} GiB"
    elif left < 10:
      row |= {"status": "SKIPPED", "reason": f"the phase's {budget:.0f} s budget is spent"}
    else:
      command = [sys.executable, "-m", "benchmarks.gpu_campaign", "--speed-child"]
      command.append(json.dumps(settings))
      log = folder / f"{settings['backend']}_{settings['config']}.log"
      env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
      start = time.monotonic()
      code, stdout = _run_logged(command, log, left, env)
      row["wall_s"] = round(time.monotonic() - start, 1)
      if code is None:
        row |= {"status": "SKIPPED", "reason": f"stopped after {left:.0f} s: the budget ran out"}
      elif code != 0:
        row |= {"status": "FAIL", "reason": f"exit {code}, see {log}"}
      else:
        row |= {"status": "PASS", **json.loads(stdout.strip().splitlines()[-1])}
    runs.append(row)
  failed = [r["run"] for r in runs if r["status"] == "FAIL"]
  skipped = [f"{r['run']}: {r['reason']}" for r in runs if r["status"] == "SKIPPED"]
  timed = [r["run"] for r in runs if r["status"] == "PASS"]
  details = f"timed: {', '.join(timed) or 'none'}"
  details += f"; failed: {', '.join(failed)}" if failed else ""
  details += f"; skipped: {'; '.join(skipped)}" if skipped else ""
  return {
    "status": "FAIL" if failed or not timed else "PASS",
    "details": details,
    "notes": notes,
    "budget_s": budget,
    "runs": runs,
  }


# --- svd ------------------------------------------------------------------------------------


def _median_s(fn, warmup: int, repeats: int) -> tuple[float, list[float]]:
  """Median seconds of ``fn()`` (which waits for the device itself) after ``warmup`` calls."""
  for _ in range(warmup):
    fn()
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    samples.append(time.perf_counter() - start)
  return statistics.median(samples), samples


def phase_svd(ctx: Context) -> dict:
  """Times one refresh's basis per shape, library and ``svd_method`` (section 2.6).

  ``"full"`` is ``compute_projector`` (thin float32 SVD, top-r vectors); ``"randomized"``
  and ``"subspace"`` (warm-started from the full SVD's basis) use the defaults of
  ``qgalore_adamw``. JAX's are jitted (the compile is the first warm-up call) and timed to
  ``block_until_ready``; torch's are bracketed by ``torch.cuda.synchronize``. All take the
  same random gradient, on the device.
  """
  from qgalore_jax._src import generator as jax_generator
  from qgalore_jax._src import projector as jax_proj
  from qgalore_torch._src import generator as torch_generator
  from qgalore_torch._src import projector as torch_proj

  size = "smoke" if ctx.smoke else "full"
  rank = SVD_RANK[size]
  cuda = ctx.torch_device == "cuda"

  def basis_fn(generator_module, proj_module, method, shape):
    """``(grad, previous) -> basis`` of ``method`` at ``qgalore_adamw``'s defaults."""
    sketch_shape = proj_module.sketch_shape(shape, rank, SVD_OVERSAMPLE)
    args = (generator_module, proj_module, method, SVD_ITERS[method], rank, sketch_shape)
    return functools.partial(refresh_cost.refresh_basis, *args)

  def jax_call(fn, grad, previous):
    jax.block_until_ready(fn(grad, previous))

  def torch_call(fn, grad, previous):
    if cuda:
      torch.cuda.synchronize()
    fn(grad, previous, device=grad.device)
    if cuda:
      torch.cuda.synchronize()

  backends = (
    ("jax", jax_call, jax_generator, jax_proj, jax.jit),
    ("torch", torch_call, torch_generator, torch_proj, lambda fn: fn),
  )
  rows = []
  # One torch CPU thread: the CPU SVDs of a smoke run on a busy machine otherwise spend
  # seconds in spinning threads (see core.single_threaded_torch); CUDA SVDs are unaffected.
  with core.single_threaded_torch():
    for shape in SVD_SHAPES[size]:
      grad = torch.randn(shape, generator=torch.Generator().manual_seed(0))
      previous = qgalore_torch.compute_projector(grad, rank)  # the warm start of "subspace"
      on_device = {
        "jax": [jax.device_put(x.numpy(), ctx.dev.jax) for x in (grad, previous)],
        "torch": [x.to(ctx.torch_device) for x in (grad, previous)],
      }
      for library, call, generator_module, proj_module, wrap in backends:
        full_ms = None
        for method in SVD_METHODS:
          fn = wrap(basis_fn(generator_module, proj_module, method, tuple(shape)))
          timed = functools.partial(call, fn, *on_device[library])
          median, samples = _median_s(timed, warmup=2, repeats=SVD_REPEATS)
          full_ms = median * 1e3 if method == "full" else full_ms
          rows.append(
            {
              "library": library,
              "method": method,
              "shape": list(shape),
              "rank": rank,
              "median_ms": median * 1e3,
              "full_over_method": full_ms / (median * 1e3),
              "samples_ms": [s * 1e3 for s in samples],
            }
          )
  details = ", ".join(
    f"{r['library']} {r['method']} {r['shape'][0]}x{r['shape'][1]}: {r['median_ms']:.1f} ms"
    for r in rows
  )
  return {
    "status": "PASS",
    "details": f"median of {SVD_REPEATS}, rank {rank}: {details}",
    "notes": [],
    "warmup": 2,
    "repeats": SVD_REPEATS,
    "rows": rows,
  }


# --- memory ---------------------------------------------------------------------------------


def linear_fit(points: dict[int, float], at: int) -> dict:
  """The line through two ``(layers, bytes)`` points, and its value at ``at`` layers.

  Example:
    >>> linear_fit({2: 10.0, 4: 14.0}, at=32)
    {'intercept': 6.0, 'per_layer': 2.0, 'at_layers': 32, 'predicted': 70.0}
  """
  (x0, y0), (x1, y1) = sorted(points.items())
  slope = (y1 - y0) / (x1 - x0)
  intercept = y0 - slope * x0
  return {
    "intercept": intercept,
    "per_layer": slope,
    "at_layers": at,
    "predicted": intercept + slope * at,
  }


def phase_memory(ctx: Context) -> dict:
  """``layerwise_memory`` at LLaMA-7B widths with 2 and 4 layers, fitted to 32 layers.

  Every peak the benchmark reports (``cuda_allocated`` on a GPU, and the CPU measures) is
  fitted per mode with a line in the number of layers: the peaks exclude the parameters
  and optimizer state, which grow with the layers too but are not measured here.
  """
  hidden, ffn, _ = CONFIGS["7B"]
  width = {"hidden": hidden, "ffn": ffn, "heads": 32, "vocab": VOCAB}
  # The paper's 7B setting: INT8 block weights and 8-bit moments. The two modes run at once
  # (bytes are per process); on a CPU, one after the other (two threads would compete).
  paper = {"int8_weights": True, "moment_bits": 8}
  settings = {"batch": 2, "seq": 128, "rank": RANKS["7B"], "concurrent": True, **paper}
  if ctx.smoke:
    width = {"hidden": 64, "ffn": 128, "heads": 4, "vocab": 256}
    settings = {"batch": 2, "seq": 16, "rank": 16, "threads": 1, **paper}
  folder = ctx.out / "memory"
  folder.mkdir(parents=True, exist_ok=True)
  notes = []
  try:  # first: a compile, quick, and saved as it ends if the torch half is cut short
    jax_rows = jax_step_memory(ctx, folder)
  except Exception as error:  # the torch half still runs; the phase fails
    jax_rows = []
    notes.append(f"JAX step memory failed: {type(error).__name__}: {error}".splitlines()[0])
  points = {}
  for layers in MEMORY_LAYERS:
    config = {**width, "layers": layers}
    result = layerwise_memory.run(config=config, device=ctx.torch_device, **settings)
    stem = f"layerwise_memory_{result['backend']}_{layers}layers"
    _write_json(folder / f"{stem}.json", result)
    (folder / f"{stem}.md").write_text(layerwise_memory.to_markdown(result))
    points[layers] = result
  fits = {}
  measures = points[MEMORY_LAYERS[0]]["saving_bytes"]
  for measure in measures:
    for mode in layerwise_memory.MODES:
      ys = {n: r["modes"][mode]["peak_bytes"][measure] for n, r in points.items()}
      fits[f"{measure} {mode}"] = {"points": ys, **linear_fit(ys, MEMORY_TARGET_LAYERS)}
  primary = "cuda_allocated" if "cuda_allocated" in measures else "allocated"
  same = all(r["same_weights"]["identical"] for r in points.values())
  normal = fits[f"{primary} normal"]["predicted"] / 2**30
  layerwise = fits[f"{primary} layerwise"]["predicted"] / 2**30
  details = (
    f"torch {primary} peak at {MEMORY_TARGET_LAYERS} layers (fit of {MEMORY_LAYERS} layers):"
    f" normal {normal:.2f} GiB, layer-wise {layerwise:.2f} GiB;"
    f" same weights in both modes: {'yes' if same else 'NO'}"
  )
  if primary != "cuda_allocated":
    notes.append("no CUDA: CPU measures fitted instead")
  details += "; JAX ordinary step, XLA peak: " + ", ".join(
    f"{r['batch']}x{r['seq']} {r['peak'] / 2**30:.2f} GiB" for r in jax_rows
  )
  return {
    "status": "PASS" if same and jax_rows else "FAIL",
    "details": details,
    "notes": notes,
    "width": width,
    "settings": settings,
    "fits": fits,
    "jax_step": jax_rows,
    "paper_peak_gb": {f"{b}x{s}": gb for (b, s), gb in PAPER_PEAK_GB.items()},
  }


def jax_step_memory(ctx: Context, folder: pathlib.Path) -> list[dict]:
  """The JAX train step of the LLaMA example at 7B, compiled for the device, not run.

  ``benchmarks.step_memory.measure`` (INT8 weights, INT4 projector, rank 1024, scanned and
  rematerialised blocks) lowers the step on abstract inputs, so nothing of the model's size
  is allocated; the peak is XLA's buffer assignment for the device (arguments + outputs -
  donated + temporaries). It is the ordinary step: every gradient exists at once.
  """
  name, rank = ("tiny", 16) if ctx.smoke else ("7b", RANKS["7B"])
  rows = []
  for batch, seq in JAX_MEMORY_BATCHES["smoke" if ctx.smoke else "full"]:
    row = step_memory.measure(name, "qgalore-int8", batch, seq, rank, gap=200, remat=True)
    row["device"] = step_memory.device_name()
    row["paper_peak_gb"] = PAPER_PEAK_GB.get((batch, seq))
    rows.append(row)
    _write_json(folder / f"jax_step_memory_{name}.json", rows)
  return rows


# --- the campaign ---------------------------------------------------------------------------

# --- conds ----------------------------------------------------------------------------------


def phase_conds(ctx: Context) -> dict:
  """What one ``lax.cond`` per matrix costs in a jitted step, when no branch is taken.

  ``qgalore_adamw`` decides each matrix's refresh with its own ``lax.cond`` (docs/spec.md
  section 4). On an H100 its normal step at 60M shapes took 13.7 ms where the two GaLore
  matmuls and AdamW alone took 3.4 ms. This phase times a jitted function over 58 matrices
  of 512 x 1376 floats, each behind a ``lax.cond`` whose (device-side) predicate is false,
  against the same function without the conditionals. The difference per conditional is
  the overhead a refresh decision adds to a normal step on this device.
  """
  n = CONDS["smoke" if ctx.smoke else "full"]
  shape = (32, 64) if ctx.smoke else (512, 1376)
  with core.on(ctx.dev):
    xs = [jax.numpy.full(shape, float(i), jax.numpy.float32) for i in range(n)]
    due = jax.numpy.zeros(n, bool)

    def refresh(x):  # the branch not taken: a matrix product, standing in for the SVD
      return x @ x.T @ x

    def normal(x):
      return x * 2.0

    with_conds = jax.jit(
      lambda xs, due: [jax.lax.cond(due[i], refresh, normal, x) for i, x in enumerate(xs)]
    )
    plain = jax.jit(lambda xs, due: [normal(x) for x in xs])
    times = {}
    for name, fn in (("with conds", with_conds), ("without", plain)):
      median, _ = _median_s(lambda fn=fn: jax.block_until_ready(fn(xs, due)), warmup=3, repeats=51)
      times[name] = median * 1e3
  per_cond_us = (times["with conds"] - times["without"]) / n * 1e3
  return {
    "status": "PASS",
    "details": (
      f"{n} matrices {shape[0]}x{shape[1]}: {times['with conds']:.3f} ms with one lax.cond"
      f" each, {times['without']:.3f} ms without: {per_cond_us:.1f} us per conditional"
    ),
    "notes": [],
    "matrices": n,
    "shape": list(shape),
    "median_ms": times,
    "per_cond_us": per_cond_us,
  }


PHASE_FUNCTIONS = {
  "parity": phase_parity,
  "speed": phase_speed,
  "svd": phase_svd,
  "memory": phase_memory,
  "conds": phase_conds,
}


def _driver() -> str:
  try:
    done = subprocess.run(
      ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
      capture_output=True,
      text=True,
      timeout=20,
      check=False,
    )
  except (OSError, subprocess.TimeoutExpired) as error:
    return f"unknown ({error})"
  return done.stdout.strip().splitlines()[0] if done.returncode == 0 else "unknown"


def environment(dev: core.Device, smoke: bool) -> dict:
  """The parity report's environment, plus driver, CUDA and the campaign's mode."""
  env = report.environment(dev)
  env["mode"] = "smoke" if smoke else "full"
  if dev.name == "gpu":
    client = getattr(dev.jax, "client", None)
    platform_version = getattr(client, "platform_version", "unknown")
    env["driver"] = _driver()
    env["cuda"] = f"torch CUDA {torch.version.cuda}; JAX {platform_version}"
  else:
    env["driver"] = env["cuda"] = "no GPU"
  return env


def summary_markdown(env: dict, records: dict, wheels: str | None) -> str:
  """``summary.md``: the environment, then one line per phase (status, wall time, details)."""
  versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
  lines = [
    f"# GPU campaign ({env['mode']}): {env['device']}",
    "",
    f"- Date: {env['date']}",
    f"- Device: {env['device']}",
    f"- Driver: {env['driver']}; CUDA: {env['cuda']}",
    f"- Versions: Python {env['python']}, {versions}",
  ]
  lines += [f"- Wheels: {wheels}"] if wheels else []
  if "no_gpu" in env:
    lines.append(f"- No GPU: {env['no_gpu']}")
  lines += ["", "| phase | status | wall s | details |", "|---|---|---:|---|"]
  for name in PHASES:
    record = records[name]
    wall = f"{record['wall_s']:.1f}" if "wall_s" in record else ""
    text = "; ".join([record.get("details") or record.get("reason", ""), *record.get("notes", [])])
    lines.append(f"| {name} | {record['status']} | {wall} | {text.replace('|', '/')} |")
  return "\n".join(lines) + "\n"


def install_wheels(folder: pathlib.Path, out: pathlib.Path) -> str:
  """``pip install --no-deps --no-index`` of every wheel in ``folder``; says what happened."""
  wheels = sorted(folder.glob("*.whl"))
  if not wheels:
    return f"none found in {folder}"
  command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index"]
  code, _ = _run_logged([*command, *map(str, wheels)], out / "wheels.txt", 300)
  importlib.invalidate_caches()
  names = ", ".join(w.name for w in wheels)
  return f"installed {names}" if code == 0 else f"pip failed ({code}) on {names}, see wheels.txt"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """The command line.

  Example:
    >>> args = parse_args(["--out", "runs/gpu", "--only", "svd,parity"])
    >>> str(args.out), args.only, args.smoke
    ('runs/gpu', ['parity', 'svd'], False)
  """
  parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_campaign", description=__doc__)
  parser.formatter_class = argparse.RawDescriptionHelpFormatter
  parser.add_argument("--out", type=pathlib.Path, help="folder of the results")
  parser.add_argument("--smoke", action="store_true", help="tiny shapes: checks the campaign")
  parser.add_argument("--only", help=f"comma-separated phases among {', '.join(PHASES)}")
  parser.add_argument("--wheels", type=pathlib.Path, help="folder of wheels to install first")
  parser.add_argument(
    "--budget-s",
    type=float,
    default=CAMPAIGN_BUDGET_S,
    help=f"wall-clock seconds for the whole campaign (default {CAMPAIGN_BUDGET_S})",
  )
  parser.add_argument("--speed-child", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.speed_child is None and args.out is None:
    parser.error("--out is required")
  if args.only is not None:
    chosen = {name.strip() for name in args.only.split(",") if name.strip()}
    unknown = chosen - set(PHASES)
    if unknown or not chosen:
      parser.error(f"--only takes phases among {PHASES}, got {args.only!r}")
    args.only = [name for name in PHASES if name in chosen]
  return args


def main(argv: list[str] | None = None) -> int:
  """Runs the chosen phases in order; returns 1 if any failed or no GPU ran a full campaign."""
  args = parse_args(argv)
  if args.speed_child is not None:
    print(json.dumps(speed_child(json.loads(args.speed_child))))
    return 0
  # JAX would otherwise take 75% of the GPU at its first use, leaving torch and the
  # benchmarks' own processes the rest.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  if args.smoke:  # read when JAX's first CPU SVD loads OpenBLAS (see update_speed)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
  args.out.mkdir(parents=True, exist_ok=True)
  wheels = None if args.wheels is None else install_wheels(args.wheels, args.out)
  gpu, why = core.gpu_available()
  dev = core.device("gpu" if gpu else "cpu")
  env = environment(dev, args.smoke)
  if not gpu:
    env["no_gpu"] = why
  deadline = time.monotonic() + args.budget_s
  ctx = Context(out=args.out, smoke=args.smoke, dev=dev, deadline=deadline)
  chosen = args.only or list(PHASES)
  records = {
    name: {"status": "PENDING", "reason": "not run yet"}
    if name in chosen
    else {"status": "SKIPPED", "reason": "not in --only"}
    for name in PHASES
  }
  summary = args.out / "summary.md"
  summary.write_text(summary_markdown(env, records, wheels))
  for i, name in enumerate(chosen):
    start = time.monotonic()
    phase_ctx = dataclasses.replace(ctx, later=tuple(chosen[i + 1 :]))
    records[name] = {"status": "RUNNING", "reason": f"started {time.strftime('%H:%M:%S')}"}
    summary.write_text(summary_markdown(env, records, wheels))
    if not gpu and not args.smoke:
      record = {"status": "SKIPPED", "reason": f"no GPU ({why}); --smoke runs on the CPU"}
    elif start > deadline:
      record = {"status": "SKIPPED", "reason": f"the campaign's {args.budget_s} s budget is spent"}
    else:
      try:
        record = PHASE_FUNCTIONS[name](phase_ctx)
      except Exception as error:  # recorded with its traceback; the next phase runs
        record = {
          "status": "FAIL",
          "reason": f"{type(error).__name__}: {error}".splitlines()[0],
          "traceback": traceback.format_exc(),
        }
    record["wall_s"] = time.monotonic() - start
    records[name] = record
    _write_json(args.out / f"{name}.json", {"phase": name, "environment": env, **record})
    summary.write_text(summary_markdown(env, records, wheels))
    print(f"{name}: {record['status']} ({record['wall_s']:.1f} s)", flush=True)
    _free_device(ctx)
  failed = any(r["status"] == "FAIL" for r in records.values())
  return 1 if failed or not (gpu or args.smoke) else 0


if __name__ == "__main__":
  sys.exit(main())

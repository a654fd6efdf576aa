"""Speed of one ``QGaLoreAdamW.step()`` on the paper's LLaMA-60M or -130M parameter shapes.

The twin of ``benchmarks/update_speed.py``. Times ``step()`` of ``qgalore_torch.QGaLoreAdamW``
(INT4 projector, ``proj_bits=None``, and under ``torch.compile``), galore-torch 1.0's
pure-torch ``GaLoreAdamW`` (its ``adamw.py``: same rank, gap and scale 0.25,
``proj_type="std"``) and
``torch.optim.AdamW(foreach=True)`` on the parameter shapes of the paper's LLaMA-60M (hidden
512, ffn 1376, 8 layers) or LLaMA-130M (hidden 768, ffn 2048, 12 layers), vocab 32000, in torch
layout, (out, in). The rank defaults to the paper's for the config (128 for 60M, 256 for
130M), the gap to 200. Both GaLore variants project
the same matrices: by default the seven block matrices q,k,v,o,gate,up,down of every layer
(as the paper does); ``--all-2d`` adds the embeddings and the head. All optimizers share one
set of parameters and one set of fixed random gradients (the values do not change the cost).

For a breakdown of the normal step, the two GaLores are also timed (on optimizers of their
own) with gradients on the projected matrices only, and on the other parameters only.

A normal step is timed on an optimizer that has taken one step (its refresh) already, with
``update_proj_gap`` larger than the number of timed steps, so no matrix refreshes: the script
checks that no SVD ran (``svd_count`` of ours; galore-torch's projector tensor is the same
object before and after). A refresh step is timed on a separate optimizer whose step counters
are reset to 0 (outside the timer) before each call, so every projected matrix runs its SVD;
its first step, which creates the state, is its warm-up.
Timings are medians of interleaved repeats after warm-up (the order rotates each repeat), so
the ratios compare runs that saw the same machine state. One torch thread by default: on a
CPU shared with other jobs, every parallel region of a multi-threaded step waits for a
descheduled sibling thread (on 2 busy cores, 2 threads made single AdamW steps vary 20-fold).
The 130M refresh steps are repeated fewer times (``REFRESH_REPEATS``) to keep the run within
10 minutes on 2 CPU cores.

Results go to ``benchmarks/results/torch_step_speed_<device>_<config>[_all2d][_threads<n>]``
``.json`` and ``.md`` (e.g. ``torch_step_speed_cpu_60M.md``).

galore-torch's package ``__init__`` imports bitsandbytes, so ``adamw.py`` and its sibling
``galore_projector.py`` are loaded as files (install with
``pip install --no-deps galore-torch==1.0``); ``adamw.py`` also imports
``transformers.utils.versions.require_version``, which is stubbed while it loads when
transformers is not installed.

  python -m benchmarks.torch_step_speed               # 60M, q,k,v,o,gate,up,down projected
  python -m benchmarks.torch_step_speed --config 130M # 130M, rank 256
  python -m benchmarks.torch_step_speed --all-2d      # every 2-D parameter projected
  python -m benchmarks.torch_step_speed --threads 0   # torch's default thread count
  python -m benchmarks.torch_step_speed --device cuda
"""

import argparse
import datetime
import functools
import hashlib
import importlib
import importlib.util
import json
import pathlib
import platform
import statistics
import subprocess
import sys
import time
import types

import torch

import qgalore_torch
from benchmarks import tables
from benchmarks.llama_shapes import BLOCK_MATRICES
from benchmarks.llama_shapes import CONFIGS
from benchmarks.llama_shapes import RANKS
from benchmarks.llama_shapes import SPEED_CONFIGS
from benchmarks.llama_shapes import VOCAB
from benchmarks.llama_shapes import llama_param_shapes

RESULTS = pathlib.Path(__file__).parent / "results"
# GaLore's ranks for the paper's configs (GaLore Table 2, used again by Q-GaLore).
# Timed refresh steps per optimizer: a 130M refresh step takes several times a 60M one.
REFRESH_REPEATS = {"60M": 3, "130M": 1}
# The breakdown: a normal step with gradients on only some of the parameters.
SUBSETS = {"matrices only": lambda proj: proj, "others only": lambda proj: not proj}
_GALORE_FILES = "_galore_torch_files"
COMPILED = "QGaLoreAdamW (torch.compile)"


def torch_param_shapes(hidden, ffn, layers, vocab=VOCAB):
  """``llama_shapes.llama_param_shapes`` in torch layout, flat by dotted name.

  ``Linear`` weights are (out, in), the transpose of a Flax kernel; the embedding table is
  (vocab, hidden) in both layouts.
  """
  flat = {}

  def visit(prefix, tree):
    for key, value in tree.items():
      if isinstance(value, dict):
        visit(f"{prefix}{key}.", value)
      else:
        flat[prefix + key] = value[::-1] if len(value) == 2 and key != "embed" else value

  visit("", llama_param_shapes(hidden, ffn, layers, vocab))
  return flat


def source_version():
  """Which ``qgalore_torch`` was measured: the git commit and a digest of the package files.

  The digest covers the working tree, uncommitted edits included, so two results with the
  same digest timed the same code.
  """
  package = pathlib.Path(qgalore_torch.__file__).parent
  digest = hashlib.sha256()
  for path in sorted(package.rglob("*.py")):
    if not path.name.endswith("_test.py"):
      digest.update(path.read_bytes())
  git = ["git", "rev-parse", "--short", "HEAD"]
  done = subprocess.run(git, cwd=package, capture_output=True, text=True, check=False)
  commit = done.stdout.strip() if done.returncode == 0 else None
  return {"git_commit": commit, "qgalore_torch_sha256": digest.hexdigest()[:16]}


def is_projected(name, shape, all_2d):
  """True for the parameters both GaLore variants project."""
  return len(shape) == 2 and (all_2d or name.rsplit(".", 1)[-1] in BLOCK_MATRICES)


@functools.cache
def galore_torch_adamw():
  """galore-torch 1.0's ``AdamW`` class, loaded from its file (see the module docstring)."""
  spec = importlib.util.find_spec("galore_torch")
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError("galore-torch is needed: pip install --no-deps galore-torch==1.0")
  package = types.ModuleType(_GALORE_FILES)
  package.__path__ = list(spec.submodule_search_locations)
  stubs = {}
  if importlib.util.find_spec("transformers") is None:
    versions = types.ModuleType("transformers.utils.versions")
    versions.require_version = lambda requirement, hint=None: None
    stubs = {
      "transformers": types.ModuleType("transformers"),
      "transformers.utils": types.ModuleType("transformers.utils"),
      "transformers.utils.versions": versions,
    }
  sys.modules[_GALORE_FILES] = package
  sys.modules.update(stubs)
  try:
    return importlib.import_module(f"{_GALORE_FILES}.adamw").AdamW
  finally:
    for name in stubs:  # the stub must not stand in for transformers anywhere else
      del sys.modules[name]


def _build(name, params, projected, rank, gap):
  """One optimizer of :func:`optimizers`; all update the same ``params`` list."""
  matrices = [p for p, proj in zip(params, projected) if proj]
  others = [p for p, proj in zip(params, projected) if not proj]
  if name.startswith("QGaLoreAdamW"):
    groups = [{"params": matrices, "rank": rank}, {"params": others}]
    proj_bits = None if "float" in name else 4
    opt = qgalore_torch.QGaLoreAdamW(
      groups, lr=1e-3, weight_decay=0.0, update_proj_gap=gap, proj_bits=proj_bits
    )
    if "compile" in name:
      opt.step = torch.compile(opt.step)
    return opt
  if name.startswith("galore_torch"):
    galore = {"rank": rank, "update_proj_gap": gap, "scale": 0.25, "proj_type": "std"}
    groups = [{"params": matrices, **galore}, {"params": others}]
    return galore_torch_adamw()(groups, lr=1e-3, weight_decay=0.0, no_deprecation_warning=True)
  if name == "torch AdamW (fused)":
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, fused=True)
  return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, foreach=True)


def optimizers(params, projected, rank, gap, with_galore_torch):
  """The optimizers to compare, by name; all update the same ``params`` list.

  ``COMPILED`` is ours with ``opt.step = torch.compile(opt.step)``. On CUDA,
  ``torch.optim.AdamW(fused=True)`` (one kernel for every parameter) joins them.
  """
  names = ["QGaLoreAdamW", "QGaLoreAdamW (float proj)", "galore_torch GaLoreAdamW"]
  names = [*names[: 2 + with_galore_torch], COMPILED, "torch AdamW (foreach)"]
  if params[0].is_cuda:
    names.append("torch AdamW (fused)")
  return {name: _build(name, params, projected, rank, gap) for name in names}


def reset_step_counters(opt):
  """Sets every parameter's step counter to 0, so the next ``step()`` refreshes (both GaLores)."""
  for state in opt.state.values():
    if isinstance(state["step"], torch.Tensor):
      state["step"].zero_()
    else:
      state["step"] = 0


def svd_counts(opt):
  """SVDs so far per projected matrix of a ``QGaLoreAdamW``."""
  return [s["svd_count"] for s in opt.projection_stats() if s is not None]


def galore_torch_projectors(opt):
  """galore-torch's current projector tensors, to check that none was replaced."""
  return [s["projector"].ortho_matrix for s in opt.state.values() if "projector" in s]


def measure_bandwidth(device, size=2**26, repeats=11):
  """Bytes per second of a device-to-device copy of ``size`` float32 values.

  The copy reads and writes ``4 * size`` bytes each; the median of ``repeats`` timed
  copies after one warm-up copy.
  """
  src = torch.ones(size, device=device)
  dst = torch.empty_like(src)

  def copy():
    if device.type == "cuda":
      torch.cuda.synchronize(device)
    start = time.perf_counter()
    dst.copy_(src)
    if device.type == "cuda":
      torch.cuda.synchronize(device)
    return time.perf_counter() - start

  copy()
  return 2 * 4 * size / statistics.median(copy() for _ in range(repeats))


def _state_tensors(opt):
  return [t for state in opt.state.values() for t in state.values() if torch.is_tensor(t)]


def bytes_touched(opt, params, before):
  """``(read, written)``: the bytes one more normal ``opt.step()`` cannot avoid moving.

  It reads the parameters, their gradients and every state tensor; it writes the
  parameters and the state tensors that the step changes (a projector that is only read,
  or a counter that stays, costs no write). Found by taking that step on copies' evidence:
  the state is cloned, the step taken, and the tensors compared.
  """
  before(opt)
  old = [t.clone() for t in _state_tensors(opt)]
  opt.step()
  new = _state_tensors(opt)
  nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)
  grads = [p.grad for p in params if p.grad is not None]
  changed = [b for a, b in zip(old, new, strict=True) if not torch.equal(a, b)]
  read = nbytes(params) + nbytes(grads) + nbytes(new)
  return read, nbytes(params) + nbytes(changed)


def time_step(opt, device, before=None):
  if before is not None:
    before(opt)
  if device.type == "cuda":
    torch.cuda.synchronize(device)
  start = time.perf_counter()
  opt.step()
  if device.type == "cuda":
    torch.cuda.synchronize(device)
  return time.perf_counter() - start


def run(
  config="60M",
  shapes=None,
  all_2d=False,
  rank=None,
  gap=200,
  repeats=15,
  warmup=2,
  refresh_repeats=None,
  device="cpu",
  with_galore_torch=True,
  breakdown=True,
):
  """Times the steps and returns the result as a JSON-ready dict (see the module docstring).

  ``rank`` and ``refresh_repeats`` default to ``RANKS[config]`` and ``REFRESH_REPEATS[config]``;
  ``shapes`` (a ``torch_param_shapes`` dict) replaces the config's shapes, for tests.
  """
  source = source_version()
  rank = RANKS[config] if rank is None else rank
  refresh_repeats = REFRESH_REPEATS[config] if refresh_repeats is None else refresh_repeats
  hidden, ffn, layers = CONFIGS[config]
  named = torch_param_shapes(hidden, ffn, layers)
  label = f"LLaMA-{config}" if shapes is None or shapes == named else "custom"
  shapes = named if shapes is None else shapes
  if 1 + warmup + repeats >= gap:
    raise ValueError(f"`gap` must exceed the {1 + warmup + repeats} normal steps, got {gap}")
  device = torch.device(device)
  generator = torch.Generator().manual_seed(0)
  params, projected = [], []
  for name, shape in shapes.items():
    p = torch.nn.Parameter((torch.randn(shape, generator=generator) * 0.02).to(device))
    p.grad = (torch.randn(shape, generator=generator) * 1e-3).to(device)
    params.append(p)
    projected.append(is_projected(name, shape, all_2d))

  grads = [p.grad for p in params]

  def grads_on(selected):
    """A ``before`` hook: gradients on the selected parameters only (none on the others)."""

    def before(opt):
      for p, g, proj in zip(params, grads, projected):
        p.grad = g if selected(proj) else None

    return before

  every = grads_on(lambda proj: True)

  def refresh_all(opt):
    every(opt)
    reset_step_counters(opt)

  normal = optimizers(params, projected, rank, gap, with_galore_torch)
  galore_names = [name for name in ("QGaLoreAdamW", "galore_torch GaLoreAdamW") if name in normal]
  cases = {name: (opt, every) for name, opt in normal.items()}
  for name in galore_names:
    cases[f"{name} [refresh]"] = (_build(name, params, projected, rank, gap), refresh_all)
  if breakdown:
    for name in galore_names:
      for subset, selected in SUBSETS.items():
        opt = _build(name, params, projected, rank, gap)
        cases[f"{name} [{subset}]"] = (opt, grads_on(selected))
  for opt, before in cases.values():
    before(opt)
    opt.step()  # initialises state; the GaLores refresh, so the next step is a normal one
  galore_torch_cases = [name for name in cases if "galore_torch" in name and "refresh" not in name]
  projectors_before = {name: galore_torch_projectors(cases[name][0]) for name in galore_torch_cases}

  samples = {name: [] for name in cases}
  for name, (opt, before) in cases.items():
    for _ in range(0 if name.endswith("[refresh]") else warmup):
      time_step(opt, device, before)
  names = list(cases)
  for i in range(repeats):
    for name in names[i % len(names) :] + names[: i % len(names)]:
      if name.endswith("[refresh]") and len(samples[name]) >= refresh_repeats:
        continue
      opt, before = cases[name]
      samples[name].append(time_step(opt, device, before))
  every(None)
  medians = {name: statistics.median(samples[name]) * 1e3 for name in cases}

  # The normal steps must not have refreshed (and the refresh steps must have); with
  # gradients on the others only, the matrices never had a step.
  for name, (opt, _) in cases.items():
    if not name.startswith("QGaLoreAdamW") or name.endswith("[refresh]"):
      continue
    if set(svd_counts(opt)) != ({0} if name.endswith("[others only]") else {1}):
      raise RuntimeError(f"{name}: a timed normal step ran an SVD: {svd_counts(opt)}")
  refreshes = 1 + len(samples["QGaLoreAdamW [refresh]"])
  if set(svd_counts(cases["QGaLoreAdamW [refresh]"][0])) != {refreshes}:
    raise RuntimeError("QGaLoreAdamW: a timed refresh step did not run its SVDs")
  for name, before in projectors_before.items():
    after = galore_torch_projectors(cases[name][0])
    if any(a is not b for a, b in zip(after, before, strict=True)):
      raise RuntimeError(f"{name}: a timed normal step refreshed its projector")

  ratios = {
    "ours under torch.compile / ours (normal step)": medians[COMPILED] / medians["QGaLoreAdamW"],
    "ours / torch AdamW (foreach)": medians["QGaLoreAdamW"] / medians["torch AdamW (foreach)"],
    "ours (float proj) / torch AdamW (foreach)": (
      medians["QGaLoreAdamW (float proj)"] / medians["torch AdamW (foreach)"]
    ),
  }
  if "torch AdamW (fused)" in medians:
    ratios["ours / torch AdamW (fused)"] = medians["QGaLoreAdamW"] / medians["torch AdamW (fused)"]
  if with_galore_torch:
    ratios = {
      "ours / galore_torch (normal step; target <= 1.0)": (
        medians["QGaLoreAdamW"] / medians["galore_torch GaLoreAdamW"]
      ),
      "ours (float proj) / galore_torch (normal step)": (
        medians["QGaLoreAdamW (float proj)"] / medians["galore_torch GaLoreAdamW"]
      ),
      "ours / galore_torch (refresh step)": (
        medians["QGaLoreAdamW [refresh]"] / medians["galore_torch GaLoreAdamW [refresh]"]
      ),
      **ratios,
    }
  if with_galore_torch and breakdown:
    for subset in SUBSETS:
      ratios[f"ours / galore_torch (normal step, {subset})"] = (
        medians[f"QGaLoreAdamW [{subset}]"] / medians[f"galore_torch GaLoreAdamW [{subset}]"]
      )
  bandwidth = measure_bandwidth(device)
  floor = {}
  for name, opt in normal.items():
    read, written = bytes_touched(opt, params, every)
    floor[name] = {"read": read, "written": written, "ms": (read + written) / bandwidth * 1e3}
  every(None)
  if device.type == "cuda":
    device_name = torch.cuda.get_device_name(device)
  else:
    device_name = f"cpu ({platform.processor() or platform.machine()})"
  return {
    "benchmark": f"torch optimizer step(), {label} parameter shapes",
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "device": device_name,
    "backend": device.type,
    "versions": {"torch": torch.__version__, "qgalore_torch": qgalore_torch.__version__},
    "source": source,
    "settings": {
      "config": config,
      "shapes": label,
      "hidden": hidden,
      "ffn": ffn,
      "layers": layers,
      "vocab": VOCAB,
      "parameters": sum(p.numel() for p in params),
      "rank": rank,
      "update_proj_gap": gap,
      "scale": 0.25,
      "lr": 1e-3,
      "weight_decay": 0.0,
      "projected_matrices": sum(projected),
      "all_2d": all_2d,
      "breakdown": breakdown,
      "repeats": repeats,
      "refresh_repeats": refresh_repeats,
      "warmup": warmup,
      "refresh_warmup": "the first step",
      "torch_threads": torch.get_num_threads(),
    },
    "checks": {"no_refresh_in_normal_steps": True, "every_refresh_step_ran_svd": True},
    "median_ms": medians,
    "samples_ms": {name: [s * 1e3 for s in samples[name]] for name in cases},
    "ratios": ratios,
    "bandwidth_bytes_per_s": bandwidth,
    "bandwidth_floor": floor,
  }


def bandwidth_lines(result):
  """The normal steps against the memory-bandwidth floor, as markdown lines."""
  return tables.bandwidth_lines(
    result,
    measured="a device-to-device copy (256 MiB, bytes read + written)",
    counted="(parameters, gradients and state read; parameters and the state it changes written)",
  )


def to_markdown(result):
  settings = result["settings"]
  base = result["median_ms"]["torch AdamW (foreach)"]
  lines = [
    f"`step()`, {settings['shapes']} shapes ({settings['parameters']:,} parameters), rank"
    f" {settings['rank']}, gap {settings['update_proj_gap']},"
    f" {settings['projected_matrices']} projected matrices"
    f" ({'all 2-D' if settings['all_2d'] else 'q,k,v,o,gate,up,down only'});"
    f" {result['device']}, {settings['torch_threads']} threads, torch"
    f" {result['versions']['torch']}, {result['date']}; medians of {settings['repeats']}"
    f" interleaved repeats ({settings['refresh_repeats']} for refresh steps).",
    "",
    "| optimizer | step | median ms | vs torch AdamW (foreach) |",
    "|---|---|---:|---:|",
  ]
  kinds = {"refresh": "refresh (SVD)", **{subset: f"normal, {subset}" for subset in SUBSETS}}
  for name, ms in result["median_ms"].items():
    label, _, subset = name.removesuffix("]").partition(" [")
    kind = kinds[subset] if subset else "normal"
    lines.append(f"| {label} | {kind} | {ms:.3g} | {ms / base:.2f}x |")
  lines.append("")
  for name, ratio in result["ratios"].items():
    lines.append(f"- {name}: **{ratio:.2f}x**")
  lines += bandwidth_lines(result)
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--all-2d", action="store_true", help="also project embeddings and head")
  parser.add_argument(
    "--no-breakdown", action="store_true", help="skip the steps with some gradients only"
  )
  parser.add_argument("--config", choices=SPEED_CONFIGS, default="60M", help="LLaMA shapes")
  parser.add_argument("--rank", type=int, default=None, help="default: the paper's for --config")
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument(
    "--refresh-repeats", type=int, default=None, help=f"default: {REFRESH_REPEATS}"
  )
  parser.add_argument("--device", default="cpu")
  parser.add_argument("--threads", type=int, default=1, help="torch threads; 0: torch's default")
  parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
  args = parser.parse_args(argv)
  if args.threads:
    torch.set_num_threads(args.threads)
  result = run(
    config=args.config,
    all_2d=args.all_2d,
    rank=args.rank,
    repeats=args.repeats,
    refresh_repeats=args.refresh_repeats,
    device=args.device,
    breakdown=not args.no_breakdown,
  )
  markdown = to_markdown(result)
  print(markdown)
  args.out.mkdir(parents=True, exist_ok=True)
  stem = f"torch_step_speed_{result['backend']}_{args.config}" + ("_all2d" if args.all_2d else "")
  stem += "" if args.threads == 1 else f"_threads{torch.get_num_threads()}"
  (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
  (args.out / f"{stem}.md").write_text(markdown)


if __name__ == "__main__":
  main()

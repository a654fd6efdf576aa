"""Do the two fast float32 paths of the torch step pay? Each against the plain path it replaces.

``qgalore_torch._src.functional`` has one numeric path per kind of leaf and two variants of
its float32 write-back that save memory traffic. This script times each variant against
the plain path on the same tensors, leaf kind by leaf kind, on the parameter shapes of the
paper's LLaMA configs (torch layout, as ``benchmarks/torch_step_speed.py`` builds them):

* ``in slices``: a plain (AdamW) leaf, contiguous float32 on the CPU, updated by
  ``adamw_in_slices_`` (``CPU_SLICE`` elements at a time, the slices staying in the cache),
  against the whole-tensor path ``adam_direction`` then ``apply_update`` (full-size
  temporaries). The leaves: the embedding and the head, the RMSNorm scales.
* ``in matmul``: a projected float32 matrix (q,k,v,o,gate,up,down, the paper's rank for the
  config, a fixed orthonormal basis), projected and given its Adam direction as in
  ``projected_step_``, then written back by ``apply_in_matmul_`` (the update and the decay
  added by the back-projecting ``addmm``) against ``project_back`` then ``apply_update``.

Each path keeps its own copy of the parameters and moments, from the same start, and both
read the same fixed random gradients (their values do not change the cost). One timed call
updates all of one step's leaves of a kind, so the data comes from memory as in a real
step. Every repeat times every (kind, path) once, in an order that rotates from repeat to
repeat; all repeats of one torch thread count run before the next count. Timings are
medians after warm-up; the ratio plain / fast is that of the medians, and its middle half
is that of the ratios within each repeat.

After the repeats of each thread count the two copies are compared (the result records it
and the script raises if a check fails). The slices run the same elementwise operations in
the same order, so parameters and moments must be bit-identical. The matmul variant rounds
``W`` once where the plain path rounds the back-projected update first, so only the
moments must be bit-identical; the parameters must agree to within one float32 rounding
per step (``max |fast - plain| <= steps * eps * max |W|``).

Results go to ``benchmarks/results/torch_step_variants_cpu_<config>[_wd<decay>]``
``.json`` and ``.md``.

  python -m benchmarks.torch_step_variants                    # 60M, 1 thread and torch's default
  python -m benchmarks.torch_step_variants --config 130M      # 130M, rank 256
  python -m benchmarks.torch_step_variants --threads 1,2 --weight-decay 0.1
"""

import argparse
import datetime
import functools
import json
import pathlib
import platform
import statistics
import time
from typing import NamedTuple

import torch

import qgalore_torch
from benchmarks.llama_shapes import CONFIGS
from benchmarks.llama_shapes import RANKS
from benchmarks.llama_shapes import SPEED_CONFIGS
from benchmarks.torch_step_speed import is_projected
from benchmarks.torch_step_speed import source_version
from benchmarks.torch_step_speed import torch_param_shapes
from qgalore_torch._src import functional
from qgalore_torch._src import projector as proj

RESULTS = pathlib.Path(__file__).parent / "results"
# QGaLoreAdamW's defaults.
BETAS, EPS, LR, SCALE = (0.9, 0.999), 1e-8, 1e-3, 0.25
SLICES, MATMUL = "in slices", "in matmul"
# variant: (its fast path, the plain path it replaces)
VARIANTS = {
  SLICES: ("`adamw_in_slices_`", "`adam_direction` + `apply_update`"),
  MATMUL: ("`apply_in_matmul_`", "`project_back` + `apply_update`"),
}
PATHS = ("fast", "plain")


class Leaf(NamedTuple):
  """One leaf's tensors as one path sees them (the gradient and basis are shared)."""

  param: torch.Tensor  # float32, (out, in) or (n,)
  grad: torch.Tensor  # float32, the parameter's shape; read only
  exp_avg: torch.Tensor  # float32, the parameter's shape, or the low-rank shape if projected
  exp_avg_sq: torch.Tensor  # float32, as exp_avg
  basis_RxK: torch.Tensor | None  # float32 (r, k) orthonormal rows if projected, else None


def slices_fast(leaf, step, weight_decay, slice_size=functional.CPU_SLICE):
  """A plain leaf, fast: the in-place update in cache-sized slices."""
  functional.adamw_in_slices_(
    leaf.param,
    leaf.grad,
    leaf.exp_avg,
    leaf.exp_avg_sq,
    step,
    *BETAS,
    EPS,
    LR,
    weight_decay,
    slice_size=slice_size,
  )


def slices_plain(leaf, step, weight_decay):
  """A plain leaf, plain: whole-tensor operations with full-size temporaries."""
  direction = functional.adam_direction(leaf.grad, leaf.exp_avg, leaf.exp_avg_sq, step, *BETAS, EPS)
  functional.apply_update(leaf.param, direction, LR, weight_decay)


def _low_rank_direction(leaf, step):
  """The Adam direction of the projected gradient, as ``projected_step_`` computes it."""
  low_rank = proj.project(leaf.grad, leaf.basis_RxK)
  return functional.adam_direction(
    low_rank, leaf.exp_avg, leaf.exp_avg_sq, step, *BETAS, EPS, scratch=low_rank
  )


def matmul_fast(leaf, step, weight_decay):
  """A projected matrix, fast: the update and decay added by the back-projecting ``addmm``."""
  u = _low_rank_direction(leaf, step)
  side = proj.projector_side(tuple(leaf.param.shape))
  functional.apply_in_matmul_(leaf.param, u, leaf.basis_RxK, side, LR, weight_decay, SCALE)


def matmul_plain(leaf, step, weight_decay):
  """A projected matrix, plain: the (m, n) back-projected update, then ``apply_update``."""
  u = _low_rank_direction(leaf, step)
  side = proj.projector_side(tuple(leaf.param.shape))
  direction = proj.project_back(u, leaf.basis_RxK, side).mul_(SCALE)
  functional.apply_update(leaf.param, direction, LR, weight_decay)


STEP_FNS = {
  (SLICES, "fast"): slices_fast,
  (SLICES, "plain"): slices_plain,
  (MATMUL, "fast"): matmul_fast,
  (MATMUL, "plain"): matmul_plain,
}


def leaf_kinds(shapes):
  """A step's leaves grouped by variant and shape: ``{(variant, shape): [names]}``.

  The projected matrices (q,k,v,o,gate,up,down) take the matmul variant, the others the
  slices; slices first, then in the order of ``shapes``.
  """
  kinds = {}
  for name, shape in shapes.items():
    variant = MATMUL if is_projected(name, shape, all_2d=False) else SLICES
    kinds.setdefault((variant, tuple(shape)), []).append(name)
  return dict(sorted(kinds.items(), key=lambda item: list(VARIANTS).index(item[0][0])))


def kind_label(shape, names):
  """``"q, k, v, o (512, 512)"``: the leaves' last name parts, then the shape."""
  parts = dict.fromkeys(name.rsplit(".", 1)[-1] for name in names)
  return f"{', '.join(parts)} {tuple(shape)}"


def make_leaves(variant, shape, count, rank, generator):
  """``count`` leaves of one kind, as ``{"fast": [Leaf], "plain": [Leaf]}`` (equal copies)."""
  leaves = {path: [] for path in PATHS}
  for _ in range(count):
    param = torch.randn(shape, generator=generator) * 0.02
    grad = torch.randn(shape, generator=generator) * 1e-3
    basis_RxK = None
    moment_shape = shape
    if variant == MATMUL:
      r, k = proj.basis_shape(shape, rank)
      basis_RxK = torch.linalg.qr(torch.randn(k, r, generator=generator)).Q.T.contiguous()
      moment_shape = proj.project(grad, basis_RxK).shape
    for path in PATHS:
      moments = torch.zeros(moment_shape), torch.zeros(moment_shape)
      leaves[path].append(Leaf(param.clone(), grad, *moments, basis_RxK))
  return leaves


def compare(fast, plain, steps):
  """How far the fast path's leaves are from the plain path's, after ``steps`` steps."""
  moments_identical = all(
    torch.equal(getattr(a, key), getattr(b, key))
    for a, b in zip(fast, plain, strict=True)
    for key in ("exp_avg", "exp_avg_sq")
  )
  differing = sum(int((a.param != b.param).sum()) for a, b in zip(fast, plain, strict=True))
  max_diff = max(float((a.param - b.param).abs().max()) for a, b in zip(fast, plain))
  max_param = max(float(b.param.abs().max()) for b in plain)
  return {
    "steps": steps,
    "moments_identical": moments_identical,
    "parameters_identical": differing == 0,
    "parameters_differing": differing / sum(b.param.numel() for b in plain),
    # In float32 eps (2**-23) of the largest |W|: at most one rounding of W per step.
    "parameters_max_diff_eps": max_diff / (torch.finfo(torch.float32).eps * max_param),
  }


def check(variant, record):
  """Raises unless the two paths agree as the module docstring says they must."""
  if not record["moments_identical"]:
    raise RuntimeError(f"{variant}: the fast path changed the moments' bits: {record}")
  if variant == SLICES and not record["parameters_identical"]:
    raise RuntimeError(f"{variant}: the fast path changed the parameters' bits: {record}")
  if record["parameters_max_diff_eps"] > record["steps"]:
    raise RuntimeError(f"{variant}: the parameters differ by more than rounding: {record}")


def time_call(step_fn, leaves, step, weight_decay):
  """Seconds to update all ``leaves`` of one kind."""
  start = time.perf_counter()
  for leaf in leaves:
    step_fn(leaf, step, weight_decay)
  return time.perf_counter() - start


def _middle_half(samples):
  """First and third quartiles, or ``None`` for fewer than four samples."""
  if len(samples) < 4:
    return None
  q = statistics.quantiles(samples, n=4)
  return [q[0], q[2]]


def run(
  config="60M",
  shapes=None,
  rank=None,
  threads=(1, 0),
  repeats=25,
  warmup=2,
  weight_decay=0.0,
  slice_size=functional.CPU_SLICE,
):
  """Times both paths of both variants and returns a JSON-ready dict (see the module docstring).

  ``threads``: torch thread counts, 0 for torch's default (repeated counts run once);
  ``rank`` defaults to ``RANKS[config]``; ``shapes`` (a ``torch_param_shapes`` dict)
  replaces the config's shapes, for tests; ``slice_size`` is the in-slices path's slice.
  """
  source = source_version()
  step_fns = {**STEP_FNS, (SLICES, "fast"): functools.partial(slices_fast, slice_size=slice_size)}
  rank = RANKS[config] if rank is None else rank
  hidden, ffn, layers = CONFIGS[config]
  named = torch_param_shapes(hidden, ffn, layers)
  label = f"LLaMA-{config}" if shapes is None or shapes == named else "custom"
  shapes = named if shapes is None else shapes
  default_threads = torch.get_num_threads()
  threads = list(dict.fromkeys(n or default_threads for n in threads))
  generator = torch.Generator().manual_seed(0)
  kinds = leaf_kinds(shapes)
  keys = {kind: f"{kind[0]}: {kind_label(kind[1], names)}" for kind, names in kinds.items()}
  leaves = {kind: make_leaves(*kind, len(names), rank, generator) for kind, names in kinds.items()}
  cases = [(kind, path) for kind in kinds for path in PATHS]
  timings, totals, checks = {}, {}, {}
  steps = 0
  try:
    for n in threads:
      torch.set_num_threads(n)
      samples = {case: [] for case in cases}
      for i in range(warmup + repeats):
        steps += 1
        step = torch.tensor(float(steps))
        for kind, path in cases[i % len(cases) :] + cases[: i % len(cases)]:
          seconds = time_call(step_fns[kind[0], path], leaves[kind][path], step, weight_decay)
          if i >= warmup:
            samples[kind, path].append(seconds * 1e3)
      timings[str(n)] = {}
      for kind in kinds:
        fast, plain = samples[kind, "fast"], samples[kind, "plain"]
        fast_ms, plain_ms = statistics.median(fast), statistics.median(plain)
        timings[str(n)][keys[kind]] = {
          "fast_ms": fast_ms,
          "plain_ms": plain_ms,
          "ratio": plain_ms / fast_ms,
          "ratio_middle_half": _middle_half([p / f for p, f in zip(plain, fast, strict=True)]),
          "fast_samples_ms": fast,
          "plain_samples_ms": plain,
        }
      totals[str(n)] = {}
      checks[str(n)] = {}
      for variant in VARIANTS:
        mine = [kind for kind in kinds if kind[0] == variant]
        if not mine:
          continue
        fast_ms = sum(timings[str(n)][keys[kind]]["fast_ms"] for kind in mine)
        plain_ms = sum(timings[str(n)][keys[kind]]["plain_ms"] for kind in mine)
        totals[str(n)][variant] = {
          "fast_ms": fast_ms,
          "plain_ms": plain_ms,
          "ratio": plain_ms / fast_ms,
        }
        fast = [leaf for kind in mine for leaf in leaves[kind]["fast"]]
        plain = [leaf for kind in mine for leaf in leaves[kind]["plain"]]
        checks[str(n)][variant] = compare(fast, plain, steps)
        check(variant, checks[str(n)][variant])
  finally:
    torch.set_num_threads(default_threads)
  return {
    "benchmark": f"fast float32 paths of the torch step, {label} parameter shapes",
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "device": f"cpu ({platform.processor() or platform.machine()})",
    "backend": "cpu",
    "versions": {"torch": torch.__version__, "qgalore_torch": qgalore_torch.__version__},
    "source": source,
    "settings": {
      "config": config,
      "shapes": label,
      "rank": rank,
      "scale": SCALE,
      "lr": LR,
      "betas": list(BETAS),
      "eps": EPS,
      "weight_decay": weight_decay,
      "slice_elements": slice_size,
      "repeats": repeats,
      "warmup": warmup,
      "torch_threads": threads,
    },
    "variants": {variant: {"fast": f, "plain": p} for variant, (f, p) in VARIANTS.items()},
    "kinds": {
      keys[kind]: {"variant": kind[0], "shape": list(kind[1]), "leaves": len(names)}
      for kind, names in kinds.items()
    },
    "timings": timings,
    "totals": totals,
    "checks": checks,
  }


def _check_line(variant, by_threads):
  """One markdown bullet saying how the two paths' results compare."""
  records = {n: checks[variant] for n, checks in by_threads.items() if variant in checks}
  fast, plain = VARIANTS[variant]
  counts = " and at ".join(records)
  steps = max(record["steps"] for record in records.values())
  if all(record["parameters_identical"] for record in records.values()):
    return (
      f"- {variant} ({fast} vs {plain}): parameters and moments **bit-identical**, checked"
      f" after the repeats at {counts} threads ({steps} steps in all)."
    )
  differing = max(record["parameters_differing"] for record in records.values())
  max_eps = max(record["parameters_max_diff_eps"] for record in records.values())
  return (
    f"- {variant} ({fast} vs {plain}): moments **bit-identical**; parameters differ in"
    f" {differing:.2%} of the elements, by at most {max_eps:.2f} eps x max |W| after"
    f" {steps} steps (checked at {counts} threads): the fast path rounds `W` once per step,"
    " the plain path rounds the back-projected update first."
  )


def to_markdown(result):
  settings = result["settings"]
  lines = [
    f"Fast float32 paths of the torch step against the plain paths they replace, on"
    f" {settings['shapes']} shapes: rank {settings['rank']}, weight decay"
    f" {settings['weight_decay']}, slices of {settings['slice_elements']:,} elements;"
    f" {result['device']}, torch {result['versions']['torch']}, {result['date']}; medians of"
    f" {settings['repeats']} interleaved repeats. Per leaf: a leaf of the kind; per step: all"
    " of one step's leaves of the kind, timed together. A plain / fast ratio above 1: the"
    " fast path pays.",
    "",
    "| threads | variant | leaf kind | leaves | fast ms, per leaf | plain ms, per leaf"
    " | fast ms, per step | plain ms, per step | plain / fast | middle half |",
    "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for n, rows in result["timings"].items():
    for key, row in rows.items():
      kind = result["kinds"][key]
      count = kind["leaves"]
      spread = "{:.2f}-{:.2f}".format(*row["ratio_middle_half"]) if row["ratio_middle_half"] else ""
      lines.append(
        f"| {n} | {kind['variant']} | {key.split(': ', 1)[1]} | {count} |"
        f" {row['fast_ms'] / count:.3f} | {row['plain_ms'] / count:.3f} |"
        f" {row['fast_ms']:.1f} | {row['plain_ms']:.1f} | {row['ratio']:.2f}x | {spread} |"
      )
    for variant, total in result["totals"][n].items():
      count = sum(k["leaves"] for k in result["kinds"].values() if k["variant"] == variant)
      lines.append(
        f"| {n} | {variant} | **all** | {count} | | | {total['fast_ms']:.1f} |"
        f" {total['plain_ms']:.1f} | **{total['ratio']:.2f}x** | |"
      )
  lines.append("")
  for variant in VARIANTS:
    if any(variant in checks for checks in result["checks"].values()):
      lines.append(_check_line(variant, result["checks"]))
  return "\n".join(lines) + "\n"


def _thread_counts(text):
  """``"1,0"`` -> ``[1, 0]``."""
  return [int(n) for n in text.split(",")]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", choices=SPEED_CONFIGS, default="60M", help="LLaMA shapes")
  parser.add_argument("--rank", type=int, default=None, help="default: the paper's for --config")
  parser.add_argument("--repeats", type=int, default=25)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--weight-decay", type=float, default=0.0)
  parser.add_argument("--slice-elements", type=int, default=functional.CPU_SLICE)
  parser.add_argument(
    "--threads",
    type=_thread_counts,
    default=[1, 0],
    help="comma-separated torch thread counts; 0: torch's default (default: 1,0)",
  )
  parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
  args = parser.parse_args(argv)
  result = run(
    config=args.config,
    rank=args.rank,
    threads=args.threads,
    repeats=args.repeats,
    warmup=args.warmup,
    weight_decay=args.weight_decay,
    slice_size=args.slice_elements,
  )
  markdown = to_markdown(result)
  print(markdown)
  args.out.mkdir(parents=True, exist_ok=True)
  stem = f"torch_step_variants_{result['backend']}_{args.config}"
  stem += f"_wd{args.weight_decay:g}" if args.weight_decay else ""
  (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
  (args.out / f"{stem}.md").write_text(markdown)


if __name__ == "__main__":
  main()

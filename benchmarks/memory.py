"""Weights and optimizer-state bytes of the paper's LLaMA configs, allocation-free.

Every JAX figure is read from the real ``init`` of each optimizer (and from
``qgalore_jax.quantize_params`` for INT8 weights) through ``jax.eval_shape``: nothing is
allocated, so the 7B row costs nothing. Bytes are what the arrays store (packed INT4 codes
count half a byte per element). GaLore variants project the 7 block matrices of every layer
(q, k, v, o, gate, up, down) at the paper's rank; embeddings, norms and the head get AdamW.
The "Q-GaLore + 8-bit moments" row appears when ``qgalore_adamw`` has ``moment_bits``.

The torch figures are the bytes of every tensor in ``QGaLoreAdamW.state_dict()["state"]``
after one ``step()``, with the same param groups. The state is per parameter and depends only
on its shape and its group's settings, so each distinct (shape, group) is stepped once, on an
optimizer of its own, and its bytes are multiplied by how many parameters share it: exactly
the sum over the whole model, with one matrix of each shape alive at a time. Projected matrices
are real CPU tensors (the first step runs an SVD, whose top vector is copied to the CPU: meta
tensors cannot do that); the others are ``meta`` tensors, whose AdamW step allocates nothing.
Gradients are zeros: values do not change which tensors the state holds. ``--torch-check``
steps one whole model of a config for real and checks that it gives the same bytes.

  python -m benchmarks.memory                    # all configs; torch for all but 7B
  python -m benchmarks.memory --torch-configs    # JAX only (seconds)
  python -m benchmarks.memory --configs 7B --torch-configs 7B  # 7B's SVDs: ~5 CPU minutes

Tables are printed and written to ``benchmarks/results/memory.{json,md,png}``.

The paper's Table 1 estimates (weights + optimizer state, bf16 training, 8-bit Adam states
in Q-GaLore) are printed beside ours; see the markdown for where and why they differ.
"""

import argparse
import collections
import datetime
import inspect
import json
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import optax
import torch
from optax.contrib import GaLoreDimensionNumbers

import qgalore_jax
import qgalore_torch
from benchmarks.llama_shapes import CONFIGS
from benchmarks.llama_shapes import RANKS
from benchmarks.llama_shapes import block_mask
from benchmarks.llama_shapes import is_shape
from benchmarks.llama_shapes import llama_param_shapes
from benchmarks.llama_shapes import nbytes
from benchmarks.torch_step_speed import is_projected
from benchmarks.torch_step_speed import torch_param_shapes

RESULTS = pathlib.Path(__file__).parent / "results"
GB = 1e9
Q8_LABEL = "Q-GaLore + 8-bit moments"
# arXiv 2407.08296 Table 1: estimated weights + optimizer-state memory, GB. Its Q-GaLore
# figure assumes 8-bit Adam states, so it is printed beside both of our Q-GaLore rows.
PAPER_GB = {
  "AdamW (bf16 weights)": {"60M": 0.36, "130M": 0.76, "350M": 2.06, "1B": 7.80},
  "GaLore (ours, float)": {"60M": 0.24, "130M": 0.52, "350M": 1.22, "1B": 4.38},
  "Q-GaLore (ours)": {"60M": 0.18, "130M": 0.39, "350M": 0.88, "1B": 3.08},
}
PAPER_GB[Q8_LABEL] = PAPER_GB["Q-GaLore (ours)"]
# torch state keys of the adaptive schedule (qgalore_torch.SubspaceState's fields).
SCHEDULE_KEYS = frozenset(qgalore_torch.SubspaceState._fields)
TORCH_PARTS = ("moments", "projector", "schedule", "step", "other")


def has_moment_bits(fn) -> bool:
  """Whether an optimizer constructor takes ``moment_bits`` (8-bit moments)."""
  return "moment_bits" in inspect.signature(fn).parameters


def state_components(state) -> dict[str, int]:
  """Optimizer-state bytes by component, from the field names along each leaf's path.

  A leaf counts as a moment when any field on its path is ``mu`` or ``nu``, however deeply
  it is nested: 8-bit moments (``mu.codes``, ``mu.absmax``) count as moments too.
  """
  parts = {"moments": 0, "projector": 0, "schedule": 0, "other": 0}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    names = {getattr(k, "name", None) for k in path}
    size = leaf.size * jnp.dtype(leaf.dtype).itemsize
    if names & {"mu", "nu"}:
      parts["moments"] += size
    elif "projector" in names:
      parts["projector"] += size
    elif "subspace" in names:
      parts["schedule"] += size
    else:
      parts["other"] += size
  return parts


def count_scalars(state) -> int:
  """How many step counters (``count`` fields) a JAX state holds."""
  paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
  return sum(getattr(path[-1], "name", None) == "count" for path in paths)


def setups(shapes, rank):
  """(name, weights pytree of ShapeDtypeStruct, optimizer) for one config."""
  mask = block_mask(shapes)
  f32 = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), shapes, is_leaf=is_shape)
  bf16 = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.bfloat16), shapes, is_leaf=is_shape)
  int8_blocks = jax.eval_shape(lambda p: qgalore_jax.quantize_params(p, mask=mask), bf16)
  galore_dims = jax.tree.map(lambda m: GaLoreDimensionNumbers(0, 1) if m else None, mask)
  ours = dict(rank=rank, mask=mask)
  rows = [
    ("AdamW (f32 weights)", f32, optax.adamw(1e-3)),
    ("AdamW (bf16 weights)", bf16, optax.adamw(1e-3)),
    (
      "GaLore (optax.contrib)",
      bf16,
      optax.contrib.galore(1e-3, rank=rank, weight_dimension_numbers=galore_dims),
    ),
    ("GaLore (ours, float)", bf16, qgalore_jax.qgalore_adamw(1e-3, proj_bits=None, **ours)),
    ("Q-GaLore (ours)", int8_blocks, qgalore_jax.qgalore_adamw(1e-3, **ours)),
  ]
  if has_moment_bits(qgalore_jax.qgalore_adamw):
    tx = qgalore_jax.qgalore_adamw(1e-3, moment_bits=8, **ours)
    rows.append((Q8_LABEL, int8_blocks, tx))
  return rows


def measure_shapes(name: str, shapes, rank: int) -> list[dict]:
  """One row per optimizer: weights and state bytes of a config given by its shapes.

  Each row also keeps ``state_f32``, the state's bytes when every parameter is float32
  (what the torch optimizer's state is compared with).
  """
  f32 = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), shapes, is_leaf=is_shape)
  rows = []
  for label, weights, tx in setups(shapes, rank):
    float_view = jax.eval_shape(qgalore_jax.dequantize_params, weights)
    state = jax.eval_shape(tx.init, float_view)
    state_f32 = jax.eval_shape(tx.init, f32)
    parts = state_components(state)
    rows.append(
      {
        "config": name,
        "optimizer": label,
        "rank": rank,
        "weights": nbytes(weights),
        **parts,
        "total": nbytes(weights) + sum(parts.values()),
        "paper_gb": PAPER_GB.get(label, {}).get(name),
        "state_f32": nbytes(state_f32),
        "counts_f32": count_scalars(state_f32),
      }
    )
  return rows


def measure(name: str) -> list[dict]:
  hidden, ffn, layers = CONFIGS[name]
  return measure_shapes(name, llama_param_shapes(hidden, ffn, layers), RANKS[name])


def torch_cases() -> dict[str, tuple[bool, dict]]:
  """``QGaLoreAdamW`` set-ups to measure, by the label of the JAX row each mirrors.

  Each is ``(project, keyword arguments)``: whether the block matrices form a ``rank`` group.
  """
  cases = {
    "AdamW (f32 weights)": (False, {}),
    "GaLore (ours, float)": (True, {"proj_bits": None}),
    "Q-GaLore (ours)": (True, {"proj_bits": 4}),
  }
  if has_moment_bits(qgalore_torch.QGaLoreAdamW):
    cases[Q8_LABEL] = (True, {"proj_bits": 4, "moment_bits": 8})
  return cases


def torch_components(state: dict) -> dict[str, int]:
  """Bytes of the tensors of ``optimizer.state_dict()["state"]``, by component."""
  parts = dict.fromkeys(TORCH_PARTS, 0)
  for per_param in state.values():
    for key, value in per_param.items():
      size = value.numel() * value.element_size()
      if key.startswith("exp_avg"):
        parts["moments"] += size
      elif key.startswith("proj_"):
        parts["projector"] += size
      elif key in SCHEDULE_KEYS:
        parts["schedule"] += size
      elif key == "step":
        parts["step"] += size
      else:
        parts["other"] += size
  return parts


def _stepped_optimizer(params, projected, rank, settings):
  """A ``QGaLoreAdamW`` over ``params`` after one step on zero gradients.

  ``projected[i]``: whether ``params[i]`` is in the group with ``rank``. Checks that every
  projected matrix ran its first SVD (the state after a step holds the refreshed projector).
  """
  groups = [
    {"params": [p for p, flag in zip(params, projected) if flag], "rank": rank},
    {"params": [p for p, flag in zip(params, projected) if not flag]},
  ]
  opt = qgalore_torch.QGaLoreAdamW([g for g in groups if g["params"]], lr=1e-3, **settings)
  for p in params:
    p.grad = torch.zeros_like(p)
  opt.step()
  stats = [s for s in opt.projection_stats() if s is not None]
  if any(s["svd_count"] != 1 for s in stats):
    raise RuntimeError("a projected matrix did not run its first SVD")
  return opt


def _projected(shapes: dict, project: bool) -> dict[str, bool]:
  return {n: project and is_projected(n, s, all_2d=False) for n, s in shapes.items()}


def torch_state_per_shape(shapes: dict, project: bool, rank: int, settings: dict) -> dict:
  """``torch_components`` of a whole model, stepping each distinct parameter once.

  ``shapes``: torch-layout shapes by dotted name; ``project``: whether the block matrices
  get a ``rank`` group. Projected parameters are real CPU tensors; the others are ``meta``
  tensors (see the module docstring).
  """
  projected = _projected(shapes, project)
  kinds = collections.Counter((tuple(shapes[n]), projected[n]) for n in shapes)
  total = dict.fromkeys(TORCH_PARTS, 0)
  for (shape, flag), count in kinds.items():
    p = torch.zeros(shape, device="cpu" if flag else "meta", requires_grad=True)
    opt = _stepped_optimizer([p], [flag], rank, settings)
    for key, value in torch_components(opt.state_dict()["state"]).items():
      total[key] += count * value
    del opt, p
  return total


def torch_state_full(shapes: dict, project: bool, rank: int, settings: dict) -> dict:
  """``torch_components`` of one step of a whole model on real CPU tensors (a check)."""
  projected = _projected(shapes, project)
  params = [torch.zeros(shape, requires_grad=True) for shape in shapes.values()]
  opt = _stepped_optimizer(params, list(projected.values()), rank, settings)
  return torch_components(opt.state_dict()["state"])


def measure_torch(name: str, shapes: dict, rank: int, jax_rows: list[dict], check: bool):
  """Torch state bytes of every case of ``torch_cases`` beside the JAX row it mirrors.

  ``shapes``: torch-layout shapes by dotted name (``torch_param_shapes``). ``check``: also
  step the whole model for real and record whether it gives the same bytes.
  """
  by_label = {r["optimizer"]: r for r in jax_rows if r["config"] == name}
  rows = []
  for label, (project, settings) in torch_cases().items():
    start = time.perf_counter()
    parts = torch_state_per_shape(shapes, project, rank, settings)
    seconds = time.perf_counter() - start
    jax_row = by_label[label]
    torch_total = sum(parts.values())
    # torch keeps a float32 `step` per parameter, JAX one int32 `count` per transform.
    counters = parts["step"] - 4 * jax_row["counts_f32"]
    row = {
      "config": name,
      "optimizer": label,
      "rank": rank,
      **{f"torch_{k}": v for k, v in parts.items()},
      "torch_state": torch_total,
      "jax_state_f32": jax_row["state_f32"],
      "jax_state": jax_row["total"] - jax_row["weights"],
      "difference": torch_total - jax_row["state_f32"],
      "counter_difference": counters,
      "unexplained": torch_total - jax_row["state_f32"] - counters,
      "seconds": round(seconds, 1),
    }
    if check:
      full = torch_state_full(shapes, project, rank, settings)
      row["full_model_check"] = {"torch_state": sum(full.values()), "same": full == parts}
    rows.append(row)
  return rows


MOMENTS_NOTE = {
  True: """- The paper's Q-GaLore and GaLore figures assume 8-bit Adam states (bitsandbytes). Our
  Q-GaLore row keeps float32 moments; the 8-bit row (`moment_bits=8`) stores every moment of
  at least 4096 elements, projected or not, as uint8 codes plus a float32 absmax per 16 x 16
  tile (smaller ones stay float32), which is what the paper assumes. That row comes out
  4-19% under the paper's estimates (60M 0.173 vs 0.18 GB, 1B 2.48 vs 3.08 GB). The paper
  does not spell out its accounting; ours counts exactly the bytes the arrays store.""",
  False: """- The paper's Q-GaLore and GaLore figures assume 8-bit Adam states (bitsandbytes); ours
  keep float32 moments (`qgalore_adamw` has no `moment_bits` in the measured tree, so the
  8-bit row is skipped), so the moments column is about 4x what 8-bit states would take.
  Weights and projector agree with the paper's accounting.""",
}


def notes(has_q8: bool, torch_rows: list[dict]) -> str:
  text = f"""
Weights are bf16 except in the first row; Q-GaLore holds the 7 block matrices of each layer in
INT8 (1.03 bytes per weight) and the rest in bf16. Where ours differ from the paper's Table 1:

{MOMENTS_NOTE[has_q8]}
- Our projector sits on the smaller side of each matrix (docs/spec.md section 2, the authors'
  convention), so the low-rank moments have the larger side: for a (1376, 512) MLP matrix at
  rank 128 the moments are 1376 x 128 and the projector 128 x 512. optax.contrib.galore does
  the opposite (bigger projector, smaller moments); its projector and moments are stored in
  the parameter dtype, ours in float32 (moments) and packed INT4 (projector).
- Leaves that are not projected (embeddings, head, norms) keep AdamW moments in their dtype
  (bf16 here), or 8-bit ones in the 8-bit row.
"""
  if torch_rows:
    checked = [r["config"] for r in torch_rows if r.get("full_model_check", {}).get("same")]
    checked = ", ".join(dict.fromkeys(checked)) or "no config"
    text += f"""
torch: bytes of the tensors of `QGaLoreAdamW.state_dict()["state"]` after one step, the same
param groups (block matrices in a `rank` group; AdamW: no `rank` group). Each distinct
(shape, group) was stepped once and multiplied by its count (exact: the state is per
parameter; whole models stepped for real gave the same bytes: {checked}). "JAX, f32
params" is `jax.eval_shape` of the same optax `init` on float32 params. The two agree but
for the step counters: torch keeps a float32 `step` per parameter, JAX one int32 `count` per
transform ("counters" column); "unexplained" is what is left. torch stores AdamW moments in
float32 whatever the parameter dtype, so beside the main table's bf16 rows (last column) its
embeddings' and head's moments take twice the bytes. INT8 weights do not change the state
(it depends on shapes only), so torch's Q-GaLore is stepped on float ones.
"""
    if not any(r["optimizer"] == Q8_LABEL for r in torch_rows):
      text += "`QGaLoreAdamW` has no `moment_bits` in the measured tree: no torch 8-bit row.\n"
  return text


def to_markdown(rows: list[dict], torch_rows: list[dict], has_q8: bool) -> str:
  lines = [
    f"Weights + optimizer state, GB (1e9 bytes), from `jax.eval_shape` of each `init`;"
    f" jax {jax.__version__}, optax {optax.__version__}, {datetime.date.today().isoformat()}.",
    "",
    "| config | optimizer | rank | weights | moments | projector | schedule + other | total"
    " | paper Table 1 |",
    "|---|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    paper = f"{r['paper_gb']:.2f}" if r["paper_gb"] is not None else ""
    lines.append(
      f"| {r['config']} | {r['optimizer']} | {r['rank']} | {r['weights'] / GB:.3f}"
      f" | {r['moments'] / GB:.3f} | {r['projector'] / GB:.4f}"
      f" | {(r['schedule'] + r['other']) / GB:.4f} | **{r['total'] / GB:.3f}** | {paper} |"
    )
  if torch_rows:
    lines += [
      "",
      f"Optimizer state alone, bytes: torch {torch.__version__} `QGaLoreAdamW.state_dict()`"
      " after one step vs JAX.",
      "",
      "| config | optimizer | torch state | JAX, f32 params | torch - JAX | counters"
      " | unexplained | JAX, main table |",
      "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in torch_rows:
      lines.append(
        f"| {r['config']} | {r['optimizer']} | {r['torch_state']:,} | {r['jax_state_f32']:,}"
        f" | {r['difference']:,} | {r['counter_difference']:,} | {r['unexplained']:,}"
        f" | {r['jax_state']:,} |"
      )
  return "\n".join(lines) + "\n" + notes(has_q8, torch_rows)


def plot(rows: list[dict], path: pathlib.Path) -> None:
  """A grouped bar chart of totals per config (skipped when matplotlib is missing)."""
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return
  configs = list(dict.fromkeys(r["config"] for r in rows))
  labels = list(dict.fromkeys(r["optimizer"] for r in rows))
  fig, axes = plt.subplots(1, len(configs), figsize=(3.2 * len(configs), 3.8), squeeze=False)
  for ax, config in zip(axes[0], configs, strict=True):
    totals = [r["total"] / GB for r in rows if r["config"] == config]
    ax.bar(range(len(labels)), totals, color=[f"C{i}" for i in range(len(labels))])
    ax.set_title(config)
    ax.set_xticks([])
    ax.set_ylabel("GB" if config == configs[0] else "")
  fig.legend(
    [plt.Rectangle((0, 0), 1, 1, color=f"C{i}") for i in range(len(labels))],
    labels,
    loc="lower center",
    ncol=min(len(labels), 3),
    fontsize="small",
  )
  fig.suptitle("Weights + optimizer state (jax.eval_shape of init)")
  fig.tight_layout(rect=(0, 0.13, 1, 1))
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_results(rows, torch_rows, out: pathlib.Path, has_q8: bool) -> str:
  """Writes memory.{json,md,png} under ``out``; returns the markdown."""
  markdown = to_markdown(rows, torch_rows, has_q8)
  out.mkdir(parents=True, exist_ok=True)
  result = {
    "date": datetime.date.today().isoformat(),
    "versions": {"jax": jax.__version__, "optax": optax.__version__, "torch": torch.__version__},
    "has_8bit_moments": has_q8,
    "jax": rows,
    "torch": torch_rows,
  }
  (out / "memory.json").write_text(json.dumps(result, indent=2) + "\n")
  (out / "memory.md").write_text(markdown)
  plot(rows, out / "memory.png")
  return markdown


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
  parser.add_argument(
    "--torch-configs",
    nargs="*",
    default=[name for name in CONFIGS if name != "7B"],
    choices=list(CONFIGS),
    help="configs whose torch state is measured (default all but 7B, whose SVDs take minutes)",
  )
  parser.add_argument(
    "--torch-check",
    nargs="*",
    default=["60M"],
    choices=list(CONFIGS),
    help="configs whose whole model is also stepped for real, as a check (default 60M)",
  )
  parser.add_argument("--threads", type=int, default=1, help="torch threads (the SVDs)")
  parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
  args = parser.parse_args(argv)
  os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
  torch.set_num_threads(args.threads)
  has_q8 = has_moment_bits(qgalore_jax.qgalore_adamw)
  if not has_q8:
    print("note: qgalore_jax.qgalore_adamw has no `moment_bits`: the 8-bit moments row is skipped")
  torch_configs = [name for name in args.configs if name in args.torch_configs]
  if torch_configs and not has_moment_bits(qgalore_torch.QGaLoreAdamW):
    print("note: qgalore_torch.QGaLoreAdamW has no `moment_bits`: no torch 8-bit moments row")
  start = time.perf_counter()
  rows = [row for name in args.configs for row in measure(name)]
  print(f"JAX: {time.perf_counter() - start:.1f} s")
  torch_rows = []
  for name in torch_configs:
    start = time.perf_counter()
    shapes = torch_param_shapes(*CONFIGS[name])
    torch_rows += measure_torch(name, shapes, RANKS[name], rows, name in args.torch_check)
    print(f"torch {name}: {time.perf_counter() - start:.1f} s")
  for r in torch_rows:
    if not r.get("full_model_check", {"same": True})["same"]:
      raise RuntimeError(f"torch per-shape and whole-model bytes differ: {r}")
  print(write_results(rows, torch_rows, args.out, has_q8))


if __name__ == "__main__":
  main()

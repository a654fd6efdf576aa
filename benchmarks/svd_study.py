"""SVD count and quality of adaptive vs fixed-gap subspace refresh on the main example.

Trains the LLaMA of ``examples/llama`` (Flax NNX, the standard-library corpus, the ``tiny``
model by default) with the example's own ``train.train``, once per optimizer, from the same
seed and data:

- ``adamw``: the full-rank reference (no SVDs);
- ``qgalore``: INT4 projector, INT8 weights and adaptive refresh (``gamma_proj=2``,
  docs/spec.md section 4);
- ``qgalore-fixedgap``: the same with the gap held fixed (``gamma_proj=1``);
- optionally (``--optimizers``) the float variants ``galore`` (optax) and ``qgalore-noquant``;
- optionally, ``qgalore`` with a cheaper refresh: ``qgalore-randomized``, ``qgalore-subspace``
  (``svd_method``, docs/spec.md section 2.6).

It records each Q-GaLore matrix's SVD count and refresh gap after every step (through
``train.train``'s ``wrap_step``; the training itself is untouched), checks them against an
independent count (a fixed gap must refresh ``matrices x ceil(steps / gap)`` times; an
adaptive run must have refreshed exactly at the steps where the step is a multiple of the
gap it held then), and writes ``svd_study.json``, ``svd_study.md`` and ``svd_study.png``
(held-out loss curves; cumulative SVDs against step) into ``--out-dir``.

The gap starts small (10) so that it can grow within a CPU-sized run: each matrix needs 5
refreshes (``queue_size`` cosines) before its gap can double.

Rerun (the results in ``benchmarks/results/``: 3 min 55 s wall on the quiet 2-core CPU
machine; 14.5 minutes while other jobs loaded it to a load average of 6-7)::

  OPENBLAS_NUM_THREADS=1 python -m benchmarks.svd_study
  python -m benchmarks.svd_study --optimizers adamw,qgalore,qgalore-fixedgap,galore,qgalore-noquant
  python -m benchmarks.svd_study --optimizers qgalore,qgalore-randomized,qgalore-subspace \\
    --out-dir benchmarks/results/svd_study_refresh
"""

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

import qgalore_jax
from examples.llama import model
from examples.llama import train

RESULTS = pathlib.Path(__file__).parent / "results"
DEFAULT_OPTIMIZERS = ("adamw", "qgalore", "qgalore-fixedgap")
CHEAPER_REFRESH = ("qgalore-randomized", "qgalore-subspace")  # svd_method, spec section 2.6
CHOICES = (*DEFAULT_OPTIMIZERS, "galore", "qgalore-noquant", "qgalore-8bit", *CHEAPER_REFRESH)
# The names whose gap may grow (gamma_proj = 2).
ADAPTIVE = ("qgalore", "qgalore-8bit", *CHEAPER_REFRESH)
GAMMA_PROJ = 2
PAPER_PERCENT = 36.2  # Q-GaLore's SVDs as % of GaLore's at comparable quality, 130M run
DEFAULTS = train.RunConfig(
  model="tiny",
  steps=300,
  update_proj_gap=10,
  eval_every=25,
  log_every=10,
  checkpoint_every=0,
  scan=False,  # one leaf per matrix: the schedules below are recorded and listed per layer
)


def _is_stats(x) -> bool:
  return isinstance(x, dict) and "svd_count" in x


def _schedule(opt_state):
  """``(svd_counts, gaps)``: int32 vectors over the projected matrices (params order)."""
  leaves = jax.tree.leaves(qgalore_jax.projection_stats(opt_state), is_leaf=_is_stats)
  return jnp.stack([s["svd_count"] for s in leaves]), jnp.stack([s["gap"] for s in leaves])


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


class Recorder:
  """Per-step SVD counts and gaps of the Q-GaLore matrices of one training run."""

  def __init__(self):
    self.names: list[str] | None = None  # None: the optimizer keeps no Q-GaLore state
    self.initial_gaps: np.ndarray | None = None
    self._steps: list[int] = []
    self._records: list = []

  def wrap(self, step_fn):
    """``step_fn`` (the example's jitted train step), recording after every call."""
    schedule = jax.jit(_schedule)

    def recorded_step(params, opt_state, batch, step):
      if not self._steps:  # first call: which matrices, and their gaps before any step
        try:
          shapes = jax.eval_shape(qgalore_jax.projection_stats, opt_state)
        except ValueError:  # adamw, optax's galore: no Q-GaLore state
          shapes = None
        if shapes is not None:
          paths, _ = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=_is_stats)
          self.names = [_path_name(path) for path, _ in paths]
          self.initial_gaps = np.asarray(schedule(opt_state)[1])
      params, opt_state, loss = step_fn(params, opt_state, batch, step)
      self._steps.append(int(step))
      if self.names is not None:
        self._records.append(schedule(opt_state))  # fresh buffers: safe from donation
      return params, opt_state, loss

    return recorded_step

  def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(steps, svd_counts, gaps)``: steps run, and ``[step, matrix]`` counts and gaps after
    each of them."""
    counts = np.array([np.asarray(c) for c, _ in self._records])
    gaps = np.array([np.asarray(g) for _, g in self._records])
    return np.array(self._steps), counts, gaps


def fixed_gap_count(num_matrices: int, steps: int, gap: int) -> int:
  """SVDs of a fixed gap: every matrix at steps 0, gap, 2 gap, ... below ``steps``."""
  return num_matrices * -(-steps // gap)


def replay_refresh_steps(initial_gap: int, gaps_after: np.ndarray) -> list[int]:
  """Steps at which a matrix refreshes (docs/spec.md section 4), given its gap after each step.

  A matrix refreshes at step ``s`` when ``s`` is a multiple of the gap it held before ``s``
  (the initial gap before step 0).
  """
  before = np.concatenate([[initial_gap], gaps_after[:-1]])
  return [s for s, gap in enumerate(before) if s % gap == 0]


def check_schedule(name: str, recorder: Recorder, cfg, svd_count: int) -> dict:
  """Checks the recorded schedule against independent counts; returns its summary.

  Raises:
    AssertionError: when a recorded count disagrees with the independent one.
  """
  steps, counts, gaps = recorder.arrays()
  assert list(steps) == list(range(cfg.steps)), "the run must start fresh at step 0"
  total = counts.sum(axis=1)
  assert int(total[-1]) == svd_count, (name, int(total[-1]), svd_count)
  matrices, refresh_steps = {}, {}
  for j, matrix in enumerate(recorder.names):
    increments = np.diff(np.concatenate([[0], counts[:, j]]))
    assert set(increments.tolist()) <= {0, 1}, (name, matrix, "more than one SVD in a step")
    recorded = np.flatnonzero(increments).tolist()
    replayed = replay_refresh_steps(int(recorder.initial_gaps[j]), gaps[:, j])
    assert recorded == replayed, (name, matrix, recorded, replayed)
    gap_changes = np.flatnonzero(np.diff(np.concatenate([[recorder.initial_gaps[j]], gaps[:, j]])))
    assert set(gap_changes.tolist()) <= set(recorded), (name, matrix, "gap grew off a refresh")
    refresh_steps[matrix] = recorded
    matrices[matrix] = {"svd_count": int(counts[-1, j]), "final_gap": int(gaps[-1, j])}
  num = len(recorder.names)
  if name not in ADAPTIVE:
    expected = fixed_gap_count(num, cfg.steps, cfg.update_proj_gap)
    assert svd_count == expected, (name, svd_count, expected)
    assert all(m["final_gap"] == cfg.update_proj_gap for m in matrices.values())
  final_gaps = [m["final_gap"] for m in matrices.values()]
  return {
    "cumulative_svds": total.astype(int).tolist(),
    "matrices": matrices,
    "refresh_steps": refresh_steps,
    "final_gap": {
      "min": min(final_gaps),
      "median": statistics.median(final_gaps),
      "max": max(final_gaps),
    },
  }


def run_one(cfg, name: str, progress: bool = True) -> dict:
  """Trains ``name`` with ``train.train`` and returns its row of the study."""
  run_cfg = dataclasses.replace(cfg, optimizer=name)
  recorder = Recorder()
  result = train.train(run_cfg, progress=progress, wrap_step=recorder.wrap)
  num_projected = len(model.PROJECTED) * model.CONFIGS[cfg.model].num_layers
  row = {
    "optimizer": name,
    "refresh": (
      "none"
      if name == "adamw"
      else f"adaptive (gamma_proj={GAMMA_PROJ})"
      if name in ADAPTIVE
      else "fixed"
    ),
    "learning_rate": result["learning_rate"],
    "steps": cfg.steps,
    "svd_count": int(result["svd_count"]),
    "eval_loss": float(result["eval_loss"]),
    "eval_ppl": math.exp(result["eval_loss"]),
    "wall_s": result["wall_s"],
    "eval_curve": result["eval_curve"],
    "train_curve": result["train_curve"],
  }
  if recorder.names is not None:
    assert len(recorder.names) == num_projected, (name, len(recorder.names), num_projected)
    row |= check_schedule(name, recorder, cfg, row["svd_count"])
  elif name == "galore":  # optax keeps no counter: its fixed schedule gives the count
    row["cumulative_svds"] = [
      fixed_gap_count(num_projected, s + 1, cfg.update_proj_gap) for s in range(cfg.steps)
    ]
  return row


def run(cfg, names=DEFAULT_OPTIMIZERS, progress: bool = True) -> dict:
  """Runs the study; returns what ``svd_study.json`` holds."""
  num_projected = len(model.PROJECTED) * model.CONFIGS[cfg.model].num_layers
  fixed = fixed_gap_count(num_projected, cfg.steps, cfg.update_proj_gap)
  rows = {}
  for name in names:
    row = run_one(cfg, name, progress)
    row["svd_percent_of_fixed"] = 100.0 * row["svd_count"] / fixed
    rows[name] = row
    percent = f" ({row['svd_percent_of_fixed']:.1f}% of fixed gap)" if row["svd_count"] else ""
    print(
      f"svd_study: {name}: {row['svd_count']} SVDs{percent}, held-out loss"
      f" {row['eval_loss']:.4f}, {row['wall_s']:.0f} s",
      file=sys.stderr,
    )
  return {
    "settings": {
      "model": cfg.model,
      "steps": cfg.steps,
      "batch_size": cfg.batch_size,
      "seq_len": model.CONFIGS[cfg.model].seq_len,
      "rank": cfg.rank,
      "update_proj_gap": cfg.update_proj_gap,
      "eval_every": cfg.eval_every,
      "eval_batches": cfg.eval_batches,
      "seed": cfg.seed,
      "dataset": cfg.dataset,
      "projected_matrices": num_projected,
      "fixed_gap_svds": fixed,
    },
    "environment": {
      "device": f"{jax.devices()[0].device_kind} ({platform.processor() or platform.machine()})",
      "cpu_count": os.cpu_count(),
      "jax": jax.__version__,
      "date": datetime.date.today().isoformat(),
    },
    "optimizers": rows,
  }


def _gap_grid(row: dict) -> list[str]:
  """Markdown grid, layer x matrix, of ``final gap (SVDs)``."""
  cells: dict[tuple[str, str], str] = {}
  for matrix, m in row["matrices"].items():
    parts = matrix.split("/")
    layer = next((p for p in parts if p.isdigit()), "?")
    kind = next((p for p in parts if p in model.PROJECTED), matrix)
    cells[layer, kind] = f"{m['final_gap']} ({m['svd_count']})"
  layers = sorted({layer for layer, _ in cells}, key=lambda s: (not s.isdigit(), s.zfill(4)))
  lines = [
    "| layer | " + " | ".join(model.PROJECTED) + " |",
    "|---|" + "---:|" * len(model.PROJECTED),
  ]
  for layer in layers:
    row_cells = [cells.get((layer, kind), "") for kind in model.PROJECTED]
    lines.append(f"| {layer} | " + " | ".join(row_cells) + " |")
  return lines


def markdown(study: dict) -> str:
  """The study's tables and a few sentences of numbers."""
  s, env, rows = study["settings"], study["environment"], study["optimizers"]
  names = "" if tuple(rows) == DEFAULT_OPTIMIZERS else f" --optimizers {','.join(rows)}"
  lines = [
    "# SVD count and quality: adaptive vs fixed-gap refresh",
    "",
    f"`python -m benchmarks.svd_study --steps {s['steps']} --update-proj-gap"
    f" {s['update_proj_gap']} --model {s['model']}{names}`: the main example's LLaMA ({s['model']},"
    f" {s['dataset']} corpus, batch {s['batch_size']} x {s['seq_len']} tokens, seed {s['seed']},"
    f" rank {s['rank']}), {s['steps']} steps from the same seed and data; initial refresh gap"
    f" {s['update_proj_gap']}, {s['projected_matrices']} projected matrices. Held-out loss over"
    f" {s['eval_batches']} fixed batches at the last step. {env['device']}, {env['cpu_count']}"
    f" CPUs, jax {env['jax']}, {env['date']}.",
    "",
    "| optimizer | refresh | lr | SVDs | % of fixed gap | held-out loss | held-out ppl |"
    " wall time |",
    "|---|---|---:|---:|---:|---:|---:|---:|",
  ]
  for name, r in rows.items():
    percent = f"{r['svd_percent_of_fixed']:.1f}%" if r["svd_count"] else "-"
    lines.append(
      f"| {name} | {r['refresh']} | {r['learning_rate']:g} | {r['svd_count']} | {percent} |"
      f" {r['eval_loss']:.4f} | {r['eval_ppl']:.2f} | {r['wall_s']:.0f} s |"
    )
  lines.append("")
  lines.append(
    f"A fixed gap of {s['update_proj_gap']} refreshes every matrix at steps 0,"
    f" {s['update_proj_gap']}, ...: {s['projected_matrices']} x"
    f" ceil({s['steps']} / {s['update_proj_gap']}) = {s['fixed_gap_svds']} SVDs. Every Q-GaLore"
    " run's per-step SVD counts and gaps were checked against this count and against a replay"
    " of docs/spec.md section 4's rule (a matrix refreshes when the step is a multiple of its"
    " current gap)."
  )
  adaptive = [n for n in rows if n in ADAPTIVE and "matrices" in rows[n]]
  for name in adaptive:
    r = rows[name]
    g = r["final_gap"]
    lines += [
      "",
      f"## Final gaps of `{name}` (per matrix)",
      "",
      f"Final gap min / median / max: {g['min']} / {g['median']:g} / {g['max']}"
      f" (initial {s['update_proj_gap']}). Cells: final gap (SVDs).",
      "",
      *_gap_grid(r),
    ]
  if "qgalore" in rows and "qgalore-fixedgap" in rows:
    a, f = rows["qgalore"], rows["qgalore-fixedgap"]
    diff = a["eval_loss"] - f["eval_loss"]
    lines += [
      "",
      "## Adaptive vs fixed gap",
      "",
      f"Adaptive refresh ran {a['svd_count']} SVDs, {a['svd_percent_of_fixed']:.1f}% of the"
      f" fixed gap's {f['svd_count']}, and ended at held-out loss {a['eval_loss']:.4f} against"
      f" {f['eval_loss']:.4f} ({diff:+.4f} nats, {100 * diff / f['eval_loss']:+.2f}%)."
      + (f" AdamW ended at {rows['adamw']['eval_loss']:.4f}." if "adamw" in rows else "")
      + f" The paper reports {PAPER_PERCENT}% of GaLore's SVDs at comparable quality on its"
      " 130M run (20k steps, initial gap 200).",
    ]
  cheaper = [n for n in CHEAPER_REFRESH if n in rows]
  if "qgalore" in rows and cheaper:
    full = rows["qgalore"]
    lines += [
      "",
      "## Cheaper refresh vs full SVD",
      "",
      "The same run with `svd_method` other than the full SVD (docs/spec.md section 2.6), at"
      " the default `oversample=16`, `power_iters=2`, `subspace_iters=1`; the adaptive"
      " schedule reads the cosines of each method's own projectors, so the SVD counts may"
      " differ.",
      "",
      "| refresh | SVDs | held-out loss | vs full SVD |",
      "|---|---:|---:|---:|",
      f"| full SVD (`qgalore`) | {full['svd_count']} | {full['eval_loss']:.4f} | - |",
    ]
    for name in cheaper:
      r = rows[name]
      diff = r["eval_loss"] - full["eval_loss"]
      lines.append(
        f"| {name.split('-')[1]} (`{name}`) | {r['svd_count']} | {r['eval_loss']:.4f} |"
        f" {100 * diff / full['eval_loss']:+.2f}% |"
      )
  return "\n".join(lines) + "\n"


def plot(study: dict, path) -> None:
  """PNG: held-out loss curves (left), cumulative SVDs against step (right)."""
  import matplotlib  # optional dependency, needed only here

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
  for i, (name, r) in enumerate(study["optimizers"].items()):
    color = f"C{i}"  # one colour per optimizer in both panels
    steps, losses = zip(*r["eval_curve"])
    left.plot(steps, losses, "o-", ms=3, color=color, label=name)
    if "cumulative_svds" in r:
      counts = r["cumulative_svds"]
      right.step(
        range(1, len(counts) + 1), counts, where="post", color=color, label=f"{name} ({counts[-1]})"
      )
  left.set_xlabel("step")
  left.set_ylabel("held-out loss (nats/token)")
  left.set_title("Held-out loss")
  left.grid(alpha=0.3)
  left.legend(fontsize=8)
  s = study["settings"]
  right.set_xlabel("step")
  right.set_ylabel(f"SVDs so far (all {s['projected_matrices']} matrices)")
  right.set_title(f"Cumulative SVDs (initial gap {s['update_proj_gap']})")
  right.grid(alpha=0.3)
  right.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write(study: dict, out_dir) -> dict[str, pathlib.Path]:
  """Writes ``svd_study.{json,md,png}`` into ``out_dir``; returns their paths."""
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  paths = {ext: out_dir / f"svd_study.{ext}" for ext in ("json", "md", "png")}
  paths["json"].write_text(json.dumps(study, indent=1) + "\n")
  paths["md"].write_text(markdown(study))
  plot(study, paths["png"])
  return paths


def parse_args(argv=None) -> argparse.Namespace:
  d = DEFAULTS
  p = argparse.ArgumentParser(prog="python -m benchmarks.svd_study", description=__doc__)
  p.add_argument("--steps", type=int, default=d.steps)
  p.add_argument("--update-proj-gap", "--gap", type=int, default=d.update_proj_gap)
  p.add_argument("--model", default=d.model, choices=sorted(model.CONFIGS))
  p.add_argument("--rank", type=int, default=d.rank)
  p.add_argument("--batch-size", type=int, default=d.batch_size)
  p.add_argument("--eval-every", type=int, default=d.eval_every)
  p.add_argument("--eval-batches", type=int, default=d.eval_batches)
  p.add_argument("--seed", type=int, default=d.seed)
  p.add_argument("--dataset", default=d.dataset, choices=("stdlib", "c4"))
  p.add_argument(
    "--optimizers",
    default=",".join(DEFAULT_OPTIMIZERS),
    help=f"comma-separated, from {', '.join(CHOICES)}",
  )
  p.add_argument("--out-dir", default=str(RESULTS), help="where svd_study.{json,md,png} go")
  p.add_argument(
    "--run-dir", default=None, help="where the runs' metrics.jsonl go (default: a temp dir)"
  )
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  args = p.parse_args(argv)
  unknown = set(args.optimizers.split(",")) - set(CHOICES)
  if unknown:
    p.error(f"unknown optimizers {sorted(unknown)}; choose from {', '.join(CHOICES)}")
  return args


def main(argv=None) -> dict:
  # The example's note: OpenBLAS threads spin on a busy machine and slow the CPU SVDs.
  os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
  args = parse_args(argv)
  with contextlib.ExitStack() as stack:
    run_dir = args.run_dir or stack.enter_context(tempfile.TemporaryDirectory())
    cfg = dataclasses.replace(
      DEFAULTS,
      model=args.model,
      steps=args.steps,
      update_proj_gap=args.update_proj_gap,
      rank=args.rank,
      batch_size=args.batch_size,
      eval_every=args.eval_every,
      eval_batches=args.eval_batches,
      seed=args.seed,
      dataset=args.dataset,
      out_dir=run_dir,
    )
    study = run(cfg, tuple(args.optimizers.split(",")), progress=not args.quiet)
  paths = write(study, args.out_dir)
  print(markdown(study))
  print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
  return study


if __name__ == "__main__":
  main()

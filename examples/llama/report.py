"""The end-of-run table and the compare mode's loss-curve plot."""

import math
import pathlib
import sys


def format_bytes(n: int) -> str:
  """``n`` bytes in MiB with two decimals (``"1.23 MiB"``)."""
  return f"{n / 2**20:.2f} MiB"


def markdown_table(results: list[dict]) -> str:
  """A markdown table with one row per run result (see ``train.train``)."""
  rows = [
    "| optimizer | lr | held-out loss | held-out ppl | weights + opt state | SVDs | wall time |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in results:
    memory = (
      f"{format_bytes(r['weight_bytes'] + r['opt_bytes'])}"
      f" ({format_bytes(r['weight_bytes'])} + {format_bytes(r['opt_bytes'])})"
    )
    rows.append(
      f"| {r['optimizer']} | {r['learning_rate']:g} | {r['eval_loss']:.4f} |"
      f" {math.exp(r['eval_loss']):.2f} | {memory} | {r['svd_count']} | {r['wall_s']:.0f} s |"
    )
  return "\n".join(rows) + "\n"


def plot_curves(results: list[dict], path: str | pathlib.Path) -> None:
  """Writes a PNG of training (thin) and held-out (markers) loss against step."""
  import matplotlib  # the compare mode only: matplotlib is optional

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for r in results:
    train_steps, train_loss = zip(*r["train_curve"])
    (line,) = ax.plot(train_steps, train_loss, lw=1, alpha=0.6, label=f"{r['optimizer']} train")
    eval_steps, eval_loss = zip(*r["eval_curve"])
    ax.plot(eval_steps, eval_loss, "o-", color=line.get_color(), label=f"{r['optimizer']} held-out")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats/token)")
  ax.set_title("LLaMA pre-training: loss by optimizer")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_compare(results: list[dict], out_dir: str | pathlib.Path) -> None:
  """Prints the compare table and writes it to ``compare.md``, then plots ``compare.png``.

  The table comes first, so a run whose plot fails still leaves its numbers. Without
  matplotlib the plot is skipped with one line on stderr.

  Args:
    results: one summary per run (see ``train.train``).
    out_dir: the folder of ``compare.md`` and ``compare.png``.
  """
  out_dir = pathlib.Path(out_dir)
  table = markdown_table(results)
  (out_dir / "compare.md").write_text(table)
  print()
  print(table)
  try:
    plot_curves(results, out_dir / "compare.png")
  except ModuleNotFoundError as e:
    if e.name != "matplotlib":
      raise
    print("plot skipped: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)

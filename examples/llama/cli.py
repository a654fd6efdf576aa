"""Command line and compare mode shared by the Flax and torch LLaMA examples."""

import argparse
import dataclasses
from collections.abc import Callable

from examples.llama import report


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """One training run (the command-line flags of the same names); each example subclasses
  it with its output folder and its tuned learning rates (``lr``)."""

  model: str = "tiny"
  optimizer: str = "qgalore"
  steps: int = 150
  batch_size: int = 16
  learning_rate: float | None = None  # None: optimizers.LEARNING_RATES[optimizer]
  warmup_fraction: float = 0.1
  rank: int = 32  # the paper: 128 (60M) to 1024 (1B, 7B)
  update_proj_gap: int = 50  # the paper: 200 (500 for 7B)
  eval_every: int = 50
  eval_batches: int = 8
  log_every: int = 10
  checkpoint_every: int = 100  # 0: no checkpoints
  seed: int = 0
  dataset: str = "stdlib"
  out_dir: str = "runs/llama"


INT_FLAGS = (
  "steps",
  "batch_size",
  "rank",
  "update_proj_gap",
  "eval_every",
  "eval_batches",
  "log_every",
  "checkpoint_every",
  "seed",
)


def compare(train: Callable, cfg, names: tuple[str, ...]) -> list[dict]:
  """Runs ``train`` for each optimizer in ``names`` from the same data and seed; prints the
  table and writes ``compare.md`` and ``compare.png`` into ``cfg.out_dir``
  (``report.write_compare``).

  Each optimizer runs at its tuned learning rate unless ``cfg.learning_rate`` is set.
  """
  results = [train(dataclasses.replace(cfg, optimizer=name)) for name in names]
  report.write_compare(results, cfg.out_dir)
  return results


def parser(prog: str, description: str, defaults, optimizer_names, model_names, extra_names=()):
  """The flags of both examples, with ``defaults`` (a ``RunConfig``) as defaults.

  ``optimizer_names`` are compared by default; ``extra_names`` may be chosen as well.
  """
  p = argparse.ArgumentParser(prog=prog, description=description)
  p.add_argument("--compare", action="store_true", help="train every optimizer; table+PNG")
  p.add_argument(
    "--optimizers",
    default=",".join(optimizer_names),
    help="comma-separated optimizers for --compare",
  )
  p.add_argument("--model", default=defaults.model, choices=sorted(model_names))
  p.add_argument(
    "--optimizer", default=defaults.optimizer, choices=(*optimizer_names, *extra_names)
  )
  p.add_argument("--dataset", default=defaults.dataset, choices=("stdlib", "c4"))
  for field in INT_FLAGS:
    p.add_argument(f"--{field.replace('_', '-')}", type=int, default=getattr(defaults, field))
  p.add_argument(
    "--learning-rate",
    type=float,
    default=None,
    help="peak learning rate (default: the tuned one of each optimizer)",
  )
  p.add_argument("--warmup-fraction", type=float, default=defaults.warmup_fraction)
  p.add_argument("--out-dir", default=defaults.out_dir)
  return p


def run_config(cls, args: argparse.Namespace):
  """A ``cls`` (a RunConfig dataclass) from the parsed flags of its fields."""
  fields = {f.name for f in dataclasses.fields(cls)}
  return cls(**{k: v for k, v in vars(args).items() if k in fields})

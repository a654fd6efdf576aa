"""Pre-train a LLaMA in PyTorch with AdamW or Q-GaLore; ``--compare`` runs them all.

Examples::

  python -m examples.torch_llama.train --compare --threads 1   # every optimizer, tiny model
  python -m examples.torch_llama.train --optimizer qgalore --steps 1000
  python -m examples.torch_llama.train --model 60m --dataset c4 --batch-size 512 --steps 10000

(the paper's 60M run adds ``--rank 128 --update-proj-gap 200 --learning-rate 0.015``).

The twin of ``examples.llama.train`` (Flax): the same configs, corpus, tokeniser, held-out
split, batches, learning rates and schedule, so the two examples' losses can be compared.
With ``qgalore`` the projected matrices are ``qgalore_torch.Int8Linear`` layers: autograd
gives their weights a float gradient, and ``QGaLoreAdamW`` writes the INT8 codes back with
stochastic rounding.

A run writes ``metrics.jsonl`` (one JSON object per log or eval event) and a checkpoint
``checkpoint.pt`` (model, optimizer and scheduler state dicts and the step, which is also
the data position) under ``--out-dir/<optimizer>`` and resumes from it.
"""

import argparse
import dataclasses
import json
import math
import os
import pathlib
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import qgalore_torch
from examples.llama import cli
from examples.llama import data
from examples.llama import report
from examples.torch_llama import model
from examples.torch_llama import optimizers


@dataclasses.dataclass(frozen=True)
class RunConfig(cli.RunConfig):
  """One training run (the command-line flags of the same names)."""

  out_dir: str = "runs/torch_llama"

  @property
  def lr(self) -> float:
    """The peak learning rate: ``learning_rate``, or the optimizer's tuned one."""
    if self.learning_rate is not None:
      return self.learning_rate
    return optimizers.LEARNING_RATES[self.optimizer]


def lr_factor(cfg: RunConfig, step: int) -> float:
  """The paper's schedule over the peak rate: linear warmup, cosine decay to a tenth.

  The same values as the Flax example's ``optax.warmup_cosine_decay_schedule``.
  """
  warmup = max(1, int(cfg.warmup_fraction * cfg.steps))
  if step < warmup:
    return step / warmup
  progress = min(1.0, (step - warmup) / max(1, cfg.steps - warmup))
  return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def init_state(cfg: RunConfig):
  """``(model, optimizer, scheduler)`` of a fresh run."""
  llama = model.build(model.CONFIGS[cfg.model], cfg.seed)
  low_rank = optimizers.LowRank(cfg.rank, cfg.update_proj_gap)
  optimizer = optimizers.build(cfg.optimizer, llama, cfg.lr, low_rank, cfg.seed)
  scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step))
  return llama, optimizer, scheduler


def loss_fn(llama: nn.Module, batch) -> torch.Tensor:
  """Mean next-token cross-entropy (nats) of ``llama`` on ``(inputs, targets)`` arrays."""
  inputs, targets = (torch.as_tensor(np.asarray(x), dtype=torch.long) for x in batch)
  logits = llama(inputs)
  return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def train_step(llama, optimizer, scheduler, batch) -> torch.Tensor:
  """One update; returns the batch's loss before it (a 0-dim tensor)."""
  loss = loss_fn(llama, batch)
  loss.backward()
  optimizer.step()
  optimizer.zero_grad(set_to_none=True)
  scheduler.step()
  return loss.detach()


@torch.no_grad()
def evaluate(llama: nn.Module, heldout) -> float:
  """Mean held-out loss over the fixed held-out batches."""
  return float(np.mean([float(loss_fn(llama, batch)) for batch in heldout]))


def weight_bytes(llama: nn.Module) -> int:
  """Bytes of the model's parameters (INT8 weights: codes plus group scales and zeros)."""
  total = 0
  for p in llama.parameters():
    if isinstance(p, qgalore_torch.Int8Weight):
      total += sum(t.nbytes for t in p.quantized())
    else:
      total += p.nbytes
  return total


def opt_bytes(optimizer: torch.optim.Optimizer) -> int:
  """Bytes of the optimizer's state tensors."""
  return sum(
    v.nbytes for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)
  )


def make_data(cfg: RunConfig):
  """``(train_batches(position), heldout_batches)``: those of the Flax example."""
  config = model.CONFIGS[cfg.model]
  return data.make_batches(
    cfg.dataset,
    model_name=cfg.model,
    seq_len=config.seq_len,
    vocab_size=config.vocab_size,
    batch_size=cfg.batch_size,
    eval_batches=cfg.eval_batches,
    seed=cfg.seed,
  )


def save_checkpoint(path: pathlib.Path, step: int, llama, optimizer, scheduler) -> None:
  """Writes model, optimizer and scheduler state and the step (= data position) to ``path``."""
  state = {
    "model": llama.state_dict(),
    "optimizer": optimizer.state_dict(),
    "scheduler": scheduler.state_dict(),
    "step": step,
  }
  tmp = path.with_suffix(".tmp")
  torch.save(state, tmp)
  tmp.replace(path)  # a crash mid-save leaves the previous checkpoint intact


def load_checkpoint(path: pathlib.Path, llama, optimizer, scheduler) -> int:
  """Loads a :func:`save_checkpoint` file into a fresh run's objects; returns the step."""
  state = torch.load(path, weights_only=True)
  llama.load_state_dict(state["model"])
  optimizer.load_state_dict(state["optimizer"])
  scheduler.load_state_dict(state["scheduler"])
  return state["step"]


def train(cfg: RunConfig, progress: bool = True) -> dict:
  """Trains one model; returns the summary that ``report.markdown_table`` prints."""
  run_dir = pathlib.Path(cfg.out_dir).resolve() / cfg.optimizer
  run_dir.mkdir(parents=True, exist_ok=True)
  llama, optimizer, scheduler = init_state(cfg)
  checkpoint = run_dir / "checkpoint.pt"
  start = 0
  if cfg.checkpoint_every and checkpoint.exists():
    start = load_checkpoint(checkpoint, llama, optimizer, scheduler)
    print(f"{cfg.optimizer}: resuming at step {start} from {checkpoint}", file=sys.stderr)
  train_batches, heldout = make_data(cfg)
  if progress:
    millions = model.param_count(model.CONFIGS[cfg.model]) / 1e6
    print(
      f"{cfg.optimizer}: {cfg.model} LLaMA (torch), {millions:.2f}M parameters", file=sys.stderr
    )
  tokens_per_step = cfg.batch_size * model.CONFIGS[cfg.model].seq_len
  train_curve, eval_curve = [], []
  with open(run_dir / "metrics.jsonl", "a" if start else "w") as metrics:
    log = lambda record: metrics.write(json.dumps(record) + "\n")
    bar = tqdm(range(start, cfg.steps), desc=cfg.optimizer, disable=not progress, file=sys.stderr)
    t0 = window_t0 = time.perf_counter()
    window_step = start
    for step, batch in zip(bar, train_batches(start)):
      loss = train_step(llama, optimizer, scheduler, batch)
      done = step + 1
      if done % cfg.log_every == 0 or done == cfg.steps:
        loss, now = float(loss), time.perf_counter()
        tokens_per_s = tokens_per_step * (done - window_step) / (now - window_t0)
        window_t0, window_step = now, done
        train_curve.append((done, loss))
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")
        log({"step": done, "train_loss": loss, "tokens_per_s": tokens_per_s})
      if done % cfg.eval_every == 0 or done == cfg.steps:
        eval_loss = evaluate(llama, heldout)
        eval_curve.append((done, eval_loss))
        log({"step": done, "eval_loss": eval_loss, "eval_ppl": math.exp(eval_loss)})
        bar.write(
          f"{cfg.optimizer} step {done}: held-out loss {eval_loss:.4f}"
          f" ppl {math.exp(eval_loss):.2f}",
          file=sys.stderr,
        )
        window_t0 = time.perf_counter()
      if cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
        save_checkpoint(checkpoint, done, llama, optimizer, scheduler)
    wall_s = time.perf_counter() - t0
  return {
    "optimizer": cfg.optimizer,
    "learning_rate": cfg.lr,
    "eval_loss": eval_curve[-1][1] if eval_curve else evaluate(llama, heldout),
    "weight_bytes": weight_bytes(llama),
    "opt_bytes": opt_bytes(optimizer),
    "svd_count": optimizers.svd_count(optimizer),
    "skipped_steps": optimizers.skipped_steps(optimizer),
    "wall_s": wall_s,
    "train_curve": train_curve,
    "eval_curve": eval_curve,
  }


def compare(cfg: RunConfig, names: tuple[str, ...] = optimizers.NAMES) -> list[dict]:
  """Trains each optimizer in ``names`` from the same data and seed (``cli.compare``)."""
  return cli.compare(train, cfg, names)


def parse_args(argv: list[str] | None = None) -> tuple[RunConfig, argparse.Namespace]:
  """The ``RunConfig`` and the raw namespace of the command line."""
  parser = cli.parser(
    "python -m examples.torch_llama.train",
    __doc__.split("\n")[0],
    RunConfig(),
    optimizers.NAMES,
    model.CONFIGS,
  )
  parser.add_argument(
    "--threads",
    type=int,
    default=0,
    help="torch CPU threads (default: torch's choice; 1 is fastest on a busy small machine)",
  )
  args = parser.parse_args(argv)
  return cli.run_config(RunConfig, args), args


def main(argv: list[str] | None = None) -> None:
  """Runs the command line: one training run, or ``--compare``."""
  # Small CPU SVDs go through OpenBLAS; its spinning worker threads slow them badly on a
  # busy machine.
  os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
  cfg, args = parse_args(argv)
  if args.threads:
    torch.set_num_threads(args.threads)
  if args.compare:
    # Compare runs are short and always start fresh, so they keep no checkpoints.
    compare(dataclasses.replace(cfg, checkpoint_every=0), tuple(args.optimizers.split(",")))
  else:
    print()
    print(report.markdown_table([train(cfg)]))


if __name__ == "__main__":
  main()

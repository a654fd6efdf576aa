"""Tests of the torch training loop: each optimizer learns, checkpoints resume exactly."""

import dataclasses
import json
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import qgalore_torch
from examples.llama import data
from examples.torch_llama import model
from examples.torch_llama import optimizers
from examples.torch_llama import train

TEST_MODEL = model.Config(
  vocab_size=data.BYTE_VOCAB_SIZE, d_model=32, d_ff=64, num_layers=1, num_heads=2, seq_len=16
)
CFG = train.RunConfig(
  model="test", steps=6, batch_size=4, rank=8, update_proj_gap=2, eval_every=3, eval_batches=2
)


@pytest.fixture(autouse=True)
def test_model(monkeypatch):
  monkeypatch.setitem(model.CONFIGS, "test", TEST_MODEL)


@pytest.fixture(autouse=True)
def one_thread():
  # Tiny matrices: on a busy 2-core machine one thread runs them several times faster.
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.mark.parametrize("name", optimizers.NAMES)
def test_train_steps_reduce_loss(name):
  cfg = dataclasses.replace(CFG, optimizer=name, steps=12, learning_rate=1e-2)
  llama, optimizer, scheduler = train.init_state(cfg)
  tokens = np.arange(4 * 17, dtype=np.int64).reshape(4, 17) % 7
  losses = [
    float(train.train_step(llama, optimizer, scheduler, (tokens[:, :-1], tokens[:, 1:])))
    for _ in range(cfg.steps)
  ]
  assert losses[-1] < 0.5 * losses[0]


def test_qgalore_holds_the_seven_matrices_in_int8():
  llama, optimizer, _ = train.init_state(dataclasses.replace(CFG, optimizer="qgalore"))
  weights = optimizers.projected_weights(llama)
  assert len(weights) == 7 * TEST_MODEL.num_layers
  assert all(isinstance(w, qgalore_torch.Int8Weight) for w in weights)
  assert optimizer.param_groups[0]["params"] == weights
  assert not isinstance(llama.lm_head.weight, qgalore_torch.Int8Weight)


def test_schedule_matches_the_flax_examples():
  optax = pytest.importorskip("optax", reason="the Flax example's schedule needs optax")
  cfg = dataclasses.replace(CFG, steps=40)
  warmup = int(cfg.warmup_fraction * cfg.steps)
  want = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, cfg.steps, cfg.lr / 10)
  for step in range(cfg.steps + 1):
    assert cfg.lr * train.lr_factor(cfg, step) == pytest.approx(float(want(step)), rel=1e-5)


def test_unknown_optimizer_is_rejected():
  with pytest.raises(ValueError, match="unknown optimizer"):
    optimizers.build("sgd", model.build(TEST_MODEL, 0), 1e-3, optimizers.LowRank(8, 2))


@pytest.mark.parametrize("name", optimizers.NAMES)
def test_checkpoint_resume_gives_the_identical_next_loss(tmp_path, name):
  cfg = dataclasses.replace(CFG, optimizer=name, out_dir=str(tmp_path))
  batches, _ = train.make_data(cfg)
  llama, optimizer, scheduler = train.init_state(cfg)
  for _, batch in zip(range(3), batches(0)):
    train.train_step(llama, optimizer, scheduler, batch)
  path = tmp_path / "checkpoint.pt"
  train.save_checkpoint(path, 3, llama, optimizer, scheduler)
  next_batches = [batch for _, batch in zip(range(2), batches(3))]
  want = [float(train.train_step(llama, optimizer, scheduler, b)) for b in next_batches]
  # Other weights and rounding seed: the checkpoint must restore both.
  fresh = train.init_state(dataclasses.replace(cfg, seed=1))
  assert train.load_checkpoint(path, *fresh) == 3
  got = [float(train.train_step(*fresh, b)) for b in next_batches]
  assert got == want


def test_train_resumes_and_compare_writes_the_table(tmp_path, capsys):
  out = str(tmp_path)
  args = ["--model", "test", "--steps", "2", "--batch-size", "2", "--rank", "8"]
  args += ["--update-proj-gap", "2", "--eval-every", "2", "--eval-batches", "1", "--log-every", "1"]
  train.main([*args, "--optimizer", "qgalore", "--checkpoint-every", "2", "--out-dir", out])
  train.main([*args, "--optimizer", "qgalore", "--steps", "3", "--out-dir", out])
  lines = (tmp_path / "qgalore" / "metrics.jsonl").read_text().splitlines()
  steps = [json.loads(line)["step"] for line in lines if "train_loss" in json.loads(line)]
  assert steps == [1, 2, 3]
  train.main([*args, "--compare", "--out-dir", out])
  table = (tmp_path / "compare.md").read_text()
  assert [row.split(" | ")[0] for row in table.splitlines()[2:]] == [
    f"| {name}" for name in optimizers.NAMES
  ]
  assert (tmp_path / "compare.png").exists()
  assert "| qgalore | 0.03 |" in capsys.readouterr().out


def test_compare_without_matplotlib_prints_and_writes_the_table(tmp_path, capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
  args = ["--compare", "--model", "test", "--optimizers", "adamw", "--steps", "2"]
  args += ["--batch-size", "2", "--eval-every", "2", "--eval-batches", "1", "--out-dir"]
  train.main([*args, str(tmp_path)])
  captured = capsys.readouterr()
  table = (tmp_path / "compare.md").read_text()
  assert "| adamw | 0.003 |" in table
  assert table in captured.out
  assert "plot skipped: matplotlib is not installed (pip install matplotlib)\n" in captured.err
  assert not (tmp_path / "compare.png").exists()


_SAVE_FOREVER = """
import pathlib, sys, torch
from examples.torch_llama import train

class Holder:  # stands in for the model, optimizer and scheduler: 8 MB of the step's value
  def __init__(self, step):
    self.step = step

  def state_dict(self):
    return {"w": torch.full((2_000_000,), float(self.step))}

path, step = pathlib.Path(sys.argv[1]), 0
while True:
  step += 1
  train.save_checkpoint(path, step, Holder(step), Holder(step), Holder(step))
  print(step, flush=True)
"""


@pytest.mark.slow
def test_a_save_killed_half_way_leaves_the_last_complete_checkpoint(tmp_path):
  """SIGKILL a process in the middle of a save: the checkpoint still loads whole.

  The parent watches the folder and kills the child while some file in it is partly
  written. ``save_checkpoint`` writes a temporary file and renames it, so
  ``checkpoint.pt`` is then the last complete save (which ``train.load_checkpoint``
  resumes exactly, see the test above); a direct ``torch.save`` would leave it truncated.
  """
  path = tmp_path / "checkpoint.pt"
  root = pathlib.Path(__file__).parents[2]
  for _ in range(3):
    child = subprocess.Popen(
      [sys.executable, "-c", _SAVE_FOREVER, str(path)], cwd=root, stdout=subprocess.PIPE, text=True
    )
    done = int(child.stdout.readline())  # one complete save: its size is a whole file's
    whole = path.stat().st_size
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # kill while a file is partly written
      sizes = [f.stat().st_size for f in tmp_path.iterdir() if f.exists()]
      if any(0 < size < whole for size in sizes):
        break
    child.kill()
    child.wait()
    assert time.monotonic() < deadline, "never saw a save in progress"
    state = torch.load(path, weights_only=True)
    assert state["step"] >= done
    for part in ("model", "optimizer", "scheduler"):
      assert torch.equal(state[part]["w"], torch.full((2_000_000,), float(state["step"])))

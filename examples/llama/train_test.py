"""Tests of the training loop: the train step learns, checkpoints resume exactly, the CLI."""

import dataclasses
import json
import pathlib
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from examples.llama import data
from examples.llama import model
from examples.llama import optimizers
from examples.llama import train

TEST_MODEL = model.Config(
  vocab_size=data.BYTE_VOCAB_SIZE, d_model=32, d_ff=64, num_layers=1, num_heads=2, seq_len=16
)
CFG = train.RunConfig(
  model="test", steps=6, batch_size=4, rank=8, update_proj_gap=2, eval_every=3, eval_batches=2
)


@pytest.fixture(autouse=True)
def test_model(monkeypatch):
  monkeypatch.setitem(model.CONFIGS, "test", TEST_MODEL)


# qgalore-noquant trains in the compare-mode test below (one compilation per optimizer).
@pytest.mark.parametrize("name", ["adamw", "galore", "qgalore"])
def test_train_step_reduces_loss(name):
  cfg = dataclasses.replace(CFG, optimizer=name, steps=12, learning_rate=1e-2)
  graphdef, params, opt_state, tx, int8_weights = train.init_state(cfg)
  step_fn = train.make_train_step(graphdef, tx, int8_weights, cfg.seed)
  tokens = np.arange(4 * 17, dtype=np.int32).reshape(4, 17) % 7
  losses = []
  for step in range(cfg.steps):
    params, opt_state, loss = step_fn(params, opt_state, (tokens[:, :-1], tokens[:, 1:]), step)
    losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0]
  # Every optimizer of the example is guarded: a batch whose gradients are NaN (a token id
  # past the vocabulary reads a NaN embedding row) is skipped whole and counted.
  before = [np.asarray(x) for x in jax.tree.leaves(params)]
  bad = tokens.copy()
  bad[0, 0] = TEST_MODEL.vocab_size
  params, opt_state, loss = step_fn(params, opt_state, (bad[:, :-1], bad[:, 1:]), cfg.steps)
  assert not np.isfinite(float(loss)) and optimizers.skipped_steps(opt_state) == 1
  for a, b in zip(jax.tree.leaves(params), before, strict=True):
    np.testing.assert_array_equal(np.asarray(a), b)


def train_steps(cfg):
  """Losses of ``cfg.steps`` train steps on fixed random batches, and the final state."""
  graphdef, params, opt_state, tx, int8_weights = train.init_state(cfg)
  ids = model.tensor_ids(model.CONFIGS[cfg.model], scan=cfg.scanned)
  step_fn = train.make_train_step(graphdef, tx, int8_weights, cfg.seed, ids)
  tokens = np.random.default_rng(0).integers(0, TEST_MODEL.vocab_size, (cfg.steps, 4, 17))
  losses = []
  for step, batch in enumerate(tokens.astype(np.int32)):
    params, opt_state, loss = step_fn(params, opt_state, (batch[:, :-1], batch[:, 1:]), step)
    losses.append(float(loss))
  return np.array(losses), opt_state


# Scan changes how XLA fuses and orders the sums, so the two models agree to float32 rounding
# (with float weights: at most one ulp of the loss, 5e-7), not bit for bit. With INT8 weights
# both layouts draw the same uniforms (``model.tensor_ids``), so a weight rounds alike unless
# a one-ulp difference moves it across a code boundary. A stack's optimizer against separate
# matrices with float weights: qgalore_jax/_src/stacked_test.py; the models' logits and
# gradients: model_test.py.
@pytest.mark.slow
def test_scanned_model_trains_to_the_unscanned_losses(monkeypatch):
  monkeypatch.setitem(model.CONFIGS, "test", dataclasses.replace(TEST_MODEL, num_layers=2))
  # Refreshes at steps 0 and 4.
  name = "qgalore"
  cfg = dataclasses.replace(CFG, optimizer=name, steps=8, update_proj_gap=4, learning_rate=1e-2)
  want, want_state = train_steps(dataclasses.replace(cfg, scan=False))
  got, got_state = train_steps(cfg)
  np.testing.assert_allclose(got[:2], want[:2], rtol=1e-6)  # step 0's learning rate is 0
  np.testing.assert_allclose(got, want, rtol=1e-5)
  low_rank = optimizers.LowRank(cfg.rank, cfg.update_proj_gap)
  svds = [optimizers.svd_count(name, s, cfg.steps, 14, low_rank) for s in (got_state, want_state)]
  assert svds == [2 * 14, 2 * 14]


def test_galore_runs_unscanned_and_says_so(tmp_path, capsys):
  cfg = dataclasses.replace(
    CFG, optimizer="galore", steps=2, eval_every=2, checkpoint_every=0, out_dir=str(tmp_path)
  )
  assert cfg.scan and not cfg.scanned
  assert not train.train(cfg, progress=False)["scanned"]
  assert "galore: optax's GaLore projects 2-D leaves only" in capsys.readouterr().err
  scanned = nnx.eval_shape(lambda: model.Llama(TEST_MODEL, nnx.Rngs(0), scan=True))
  with pytest.raises(ValueError, match="galore cannot train a scanned model"):
    optimizers.build("galore", 1e-3, optimizers.LowRank(rank=8, update_proj_gap=2), scanned)


def test_unknown_optimizer_is_rejected():
  with pytest.raises(ValueError, match="unknown optimizer"):
    optimizers.build("sgd", 1e-3, optimizers.LowRank(rank=8, update_proj_gap=2))


def test_c4_needs_a_t5_sized_vocabulary():
  with pytest.raises(ValueError, match="needs a vocabulary of 32000"):
    train.make_data(dataclasses.replace(CFG, dataset="c4"))


@pytest.mark.slow
def test_checkpoint_resume_gives_the_identical_next_loss(tmp_path):
  # qgalore has the richest state: INT8 weights, a packed INT4 projector, refresh schedules.
  name = "qgalore"
  cfg = dataclasses.replace(CFG, optimizer=name, out_dir=str(tmp_path), log_every=1)
  first = train.train(dataclasses.replace(cfg, checkpoint_every=3), progress=False)
  # Forget the final checkpoint: the second run resumes from step 3 (params, optimizer
  # state, data position) and must replay steps 4-6 exactly.
  shutil.rmtree(tmp_path / name / "checkpoints" / "6")
  second = train.train(dataclasses.replace(cfg, checkpoint_every=3), progress=False)
  assert second["train_curve"] == first["train_curve"][3:]
  assert second["eval_loss"] == first["eval_loss"]
  lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
  steps = [json.loads(line)["step"] for line in lines if "train_loss" in json.loads(line)]
  assert steps == [1, 2, 3, 4, 5, 6, 4, 5, 6]


def test_restore_checkpoint_returns_step_and_data_position(tmp_path):
  cfg = dataclasses.replace(CFG, optimizer="galore")
  _, params, opt_state, _, _ = train.init_state(cfg)
  with ocp.CheckpointManager(tmp_path) as manager:
    train.save_checkpoint(manager, 5, params, opt_state)
    got_params, _, step, position = train.restore_checkpoint(manager, params, opt_state)
  assert (step, position) == (5, 5)
  np.testing.assert_array_equal(got_params["lm_head"]["kernel"], params["lm_head"]["kernel"])


def test_a_checkpoint_of_another_rank_is_refused_naming_the_arrays(tmp_path):
  """Restoring a rank-8 state into a rank-4 run: a ValueError naming a low-rank moment."""
  cfg = dataclasses.replace(CFG, optimizer="qgalore")
  _, params, opt_state, _, _ = train.init_state(cfg)
  _, _, other_state, _, _ = train.init_state(dataclasses.replace(cfg, rank=4))
  with ocp.CheckpointManager(tmp_path) as manager:
    train.save_checkpoint(manager, 2, params, opt_state)
    with pytest.raises(ValueError, match=r"another configuration.*mu\..*saved \(1, 32, 8\)"):
      train.restore_checkpoint(manager, params, other_state)


def test_memory_counts_low_rank_state_and_int8_weights():
  opt_bytes, weight_bytes = {}, {}
  for name in optimizers.ALL_NAMES:
    _, params, opt_state, _, _ = train.init_state(dataclasses.replace(CFG, optimizer=name))
    opt_bytes[name], weight_bytes[name] = train.tree_bytes(opt_state), train.tree_bytes(params)
  assert weight_bytes["adamw"] == 4 * model.param_count(TEST_MODEL)
  assert opt_bytes["galore"] < opt_bytes["adamw"]
  assert opt_bytes["qgalore"] < opt_bytes["qgalore-noquant"] < opt_bytes["adamw"]
  assert opt_bytes["qgalore-fixedgap"] == opt_bytes["qgalore"]
  # A cheaper refresh keeps the same state (docs/spec.md section 2.6).
  assert opt_bytes["qgalore-randomized"] == opt_bytes["qgalore-subspace"] == opt_bytes["qgalore"]
  assert weight_bytes["qgalore-8bit"] == weight_bytes["qgalore"]
  assert opt_bytes["qgalore-8bit"] < 0.5 * opt_bytes["qgalore"]
  # The projected matrices hold one byte per weight plus a float32 scale and zero per 256.
  projected = 4 * 32 * 32 + 3 * 32 * 64
  assert weight_bytes["adamw"] - weight_bytes["qgalore"] == projected * (4 - 1 - 8 / 256)


def test_compare_mode_prints_a_table_and_writes_a_plot(tmp_path, capsys):
  train.main(
    [
      "--compare",
      "--model",
      "test",
      "--optimizers",
      "qgalore-noquant",
      "--steps",
      "2",
      "--batch-size",
      "2",
      "--eval-every",
      "2",
      "--eval-batches",
      "1",
      "--out-dir",
      str(tmp_path),
    ]
  )
  out = capsys.readouterr().out
  assert "| qgalore-noquant | 0.03 |" in out
  assert (tmp_path / "compare.png").stat().st_size > 0
  assert (tmp_path / "compare.md").read_text() in out


def test_blocks_are_scanned_unless_asked_not_to():
  cfg, _ = train.parse_args([])
  assert cfg.scan and not cfg.remat
  cfg, _ = train.parse_args(["--no-scan", "--remat"])
  assert not cfg.scan and cfg.remat


_SAVE_FOREVER = """
import pathlib, sys
import numpy as np
import orbax.checkpoint as ocp
from examples.llama import train

with ocp.CheckpointManager(pathlib.Path(sys.argv[1])) as manager:
  step = 0
  while True:
    step += 1
    value = np.full((2_000_000,), step, np.float32)  # 8 MB of the step's value
    train.save_checkpoint(manager, step, {"w": value}, {"mu": value})
    print(step, flush=True)
"""


@pytest.mark.slow
def test_a_save_killed_half_way_leaves_the_last_complete_checkpoint(tmp_path):
  """SIGKILL a process while orbax writes a checkpoint: the latest one restores whole.

  The parent kills the child while an orbax temporary folder exists, that is, in the middle
  of a save; ``restore_checkpoint`` then returns the last complete step, which resumes
  exactly (see ``test_checkpoint_resume_gives_the_identical_next_loss``).
  """
  root = pathlib.Path(__file__).parents[2]
  for _ in range(2):
    child = subprocess.Popen(
      [sys.executable, "-c", _SAVE_FOREVER, str(tmp_path)],
      cwd=root,
      stdout=subprocess.PIPE,
      text=True,
    )
    done = int(child.stdout.readline())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # kill while a save is in progress
      if any("tmp" in f.name for f in tmp_path.iterdir()):
        break
    child.kill()
    child.wait()
    assert time.monotonic() < deadline, "never saw a save in progress"
    fresh = {"w": np.zeros(2_000_000, np.float32)}
    with ocp.CheckpointManager(tmp_path) as manager:
      params, opt_state, step, _ = train.restore_checkpoint(manager, fresh, {"mu": fresh["w"]})
    assert step >= done
    np.testing.assert_array_equal(params["w"], np.full(2_000_000, step, np.float32))
    np.testing.assert_array_equal(opt_state["mu"], params["w"])

"""Runs the Hugging Face Trainer example for a few steps (skipped without transformers)."""

import pytest

pytest.importorskip("transformers", reason="the example needs `pip install transformers`")
pytest.importorskip("accelerate", reason="transformers.Trainer needs `pip install accelerate`")

import torch

import qgalore_torch
from examples import hf_trainer_qgalore


@pytest.fixture(autouse=True)
def one_thread():
  # A tiny model: on a busy 2-core machine one thread runs it several times faster.
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


def test_trainer_runs_qgalore_with_int8_weights(tmp_path, capsys):
  trainer = hf_trainer_qgalore.main(
    ["--steps", "3", "--update-proj-gap", "2", "--out-dir", str(tmp_path)]
  )
  losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
  assert len(losses) == 3
  q_proj = trainer.model.model.layers[0].self_attn.q_proj
  assert isinstance(q_proj, qgalore_torch.Int8Linear)
  optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
  stats = [s for s in optimizer.projection_stats() if s is not None]
  assert len(stats) == 7 * 2
  assert all(s["svd_count"] == 2 for s in stats)  # refreshed at steps 0 and 2
  assert "SVDs" in capsys.readouterr().out

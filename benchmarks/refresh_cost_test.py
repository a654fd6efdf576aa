"""``python -m benchmarks.refresh_cost --quick``: every method and backend timed, files written."""

import json

import pytest

from benchmarks import refresh_cost


def test_quick_run_times_every_method_and_writes_results(tmp_path, capsys):
  refresh_cost.main(["--quick", "--also-power-iters", "0", "--out", str(tmp_path)])
  result = json.loads((tmp_path / "refresh_cost_cpu.json").read_text())
  names = ["full", "randomized", "subspace", "randomized q=0"]
  assert [(r["backend"], r["shape"]) for r in result["refresh"]] == [
    ("jax", [24, 16]), ("torch", [24, 16])
  ]  # fmt: skip
  for row in result["refresh"]:
    assert list(row["seconds"]) == names and all(s > 0 for s in row["seconds"].values())
    assert row["ratio"]["full"] == 1.0
    # 16 columns: rank 4 + oversample 16 covers the whole space, so the range finder is exact.
    assert row["energy"] == pytest.approx({"randomized": 1.0, "randomized q=0": 1.0}, abs=1e-5)
  assert [(r["method"], r["matrices"]) for r in result["spike"]] == [("subspace", 1)]
  assert result["spike"][0]["normal_ms"] > 0 and result["spike"][0]["refresh_ms"] > 0
  markdown = (tmp_path / "refresh_cost_cpu.md").read_text()
  assert "| quick | 24 x 16 | 4 | jax |" in markdown and "| quick | subspace | 1 |" in markdown
  assert "quick 24 x 16 torch randomized q=0: " in capsys.readouterr().out  # a progress line


def test_a_layer_is_four_attention_and_three_mlp_matrices():
  row = lambda backend, full, randomized: {
    "config": "c", "backend": backend, "seconds": {"full": full, "randomized": randomized}
  }  # fmt: skip
  rows = [row("jax", 2.0, 1.0), row("jax", 4.0, 1.0), row("torch", 1.0, 1.0)]
  assert refresh_cost.layer_rows(rows) == [
    {
      "config": "c", "backend": "jax", "seconds": {"full": 20.0, "randomized": 7.0},
      "ratio": {"full": 1.0, "randomized": 20.0 / 7.0},
    }
  ]  # fmt: skip

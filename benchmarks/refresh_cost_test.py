"""``python -m benchmarks.refresh_cost --quick``: every method and backend timed, files written."""

import json

from benchmarks import refresh_cost


def test_quick_run_times_every_method_and_writes_results(tmp_path):
  refresh_cost.main(["--quick", "--out", str(tmp_path)])
  result = json.loads((tmp_path / "refresh_cost_cpu.json").read_text())
  assert [(r["backend"], r["shape"]) for r in result["refresh"]] == [
    ("jax", [48, 32]), ("torch", [48, 32]), ("jax", [96, 32]), ("torch", [96, 32])
  ]  # fmt: skip
  for row in result["refresh"]:
    assert set(row["seconds"]) == set(refresh_cost.METHODS)
    assert all(s > 0 for s in row["seconds"].values()) and row["ratio"]["full"] == 1.0
  assert [r["method"] for r in result["spike"]] == list(refresh_cost.METHODS)
  assert all(r["normal_ms"] > 0 and r["refresh_ms"] > 0 for r in result["spike"])
  assert "| quick | 48 x 32 | 8 | jax |" in (tmp_path / "refresh_cost_cpu.md").read_text()

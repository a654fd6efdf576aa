"""The GPU campaign in smoke mode: every phase runs, is saved and is listed in the summary."""

import json
import pathlib

import pytest

from benchmarks import gpu_campaign


@pytest.mark.slow
def test_smoke_campaign_writes_every_phase_and_the_summary(tmp_path):
  code = gpu_campaign.main(["--smoke", "--out", str(tmp_path)])
  summary = (tmp_path / "summary.md").read_text()
  assert summary.startswith("# GPU campaign (smoke): ")
  assert "- Date: " in summary and "- Versions: " in summary and "- Driver: " in summary
  for phase in gpu_campaign.PHASES:
    record = json.loads((tmp_path / f"{phase}.json").read_text())
    assert record["phase"] == phase and record["wall_s"] > 0
    assert record["status"] == "PASS", record.get("traceback", record)
    assert f"| {phase} | PASS |" in summary
  assert code == 0
  speed = json.loads((tmp_path / "speed.json").read_text())
  assert [run["backend"] for run in speed["runs"]] == ["jax", "torch"]
  assert all(pathlib.Path(run["file"]).exists() for run in speed["runs"])
  memory = json.loads((tmp_path / "memory.json").read_text())
  assert set(memory["fits"]["allocated normal"]["points"]) == {"2", "4"}
  (jax_step,) = memory["jax_step"]
  assert jax_step["int8_weights"] and jax_step["remat"] and jax_step["peak"] > jax_step["weights"]


def test_a_failing_phase_is_recorded_and_the_next_one_runs(tmp_path, monkeypatch):
  def broken(ctx):
    raise ValueError("boom")

  ran = []
  monkeypatch.setitem(gpu_campaign.PHASE_FUNCTIONS, "parity", broken)
  monkeypatch.setitem(
    gpu_campaign.PHASE_FUNCTIONS,
    "svd",
    lambda ctx: ran.append(ctx.smoke) or {"status": "PASS", "details": "ok", "notes": []},
  )
  code = gpu_campaign.main(["--smoke", "--only", "svd,parity", "--out", str(tmp_path)])
  assert code == 1 and ran == [True]
  parity = json.loads((tmp_path / "parity.json").read_text())
  assert parity["status"] == "FAIL" and "ValueError: boom" in parity["traceback"]
  summary = (tmp_path / "summary.md").read_text()
  assert "| parity | FAIL |" in summary and "| svd | PASS |" in summary
  assert "| speed | SKIPPED |  | not in --only |" in summary
  assert not (tmp_path / "speed.json").exists()


def test_without_a_gpu_a_full_run_records_every_phase_as_skipped(tmp_path, monkeypatch):
  monkeypatch.setattr(gpu_campaign.core, "gpu_available", lambda: (False, "no CUDA here"))
  assert gpu_campaign.main(["--out", str(tmp_path)]) == 1
  summary = (tmp_path / "summary.md").read_text()
  assert "- No GPU: no CUDA here" in summary
  for phase in gpu_campaign.PHASES:
    assert json.loads((tmp_path / f"{phase}.json").read_text())["status"] == "SKIPPED"
    assert f"| {phase} | SKIPPED |" in summary


def test_only_rejects_unknown_phases():
  with pytest.raises(SystemExit):
    gpu_campaign.parse_args(["--out", "x", "--only", "parity,speedy"])

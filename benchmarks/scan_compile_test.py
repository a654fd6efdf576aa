"""``python -m benchmarks.scan_compile`` on a two-layer model: both layouts, equal bytes."""

import json

import pytest

from benchmarks import scan_compile
from examples.llama import configs
from examples.llama import model


@pytest.mark.slow
def test_measures_both_layouts_and_checks_the_bytes(tmp_path, monkeypatch):
  small = configs.Config(vocab_size=32, d_model=16, d_ff=24, num_layers=2, num_heads=2, seq_len=8)
  monkeypatch.setitem(model.CONFIGS, "small", small)
  scan_compile.main(["--models", "small", "--steps", "1", "--compiles", "1", "--rank", "4",
                     "--out", str(tmp_path)])  # fmt: skip
  rows = json.loads((tmp_path / "scan_compile_cpu.json").read_text())["rows"]
  assert [row["layout"] for row in rows] == ["unscanned", "scanned"]
  keys = ("codes", "scales", "float", "opt_state")
  assert [rows[0][k] for k in keys] == [rows[1][k] for k in keys]
  assert all(row["compile_s"] > 0 and row["step_ms"] > 0 for row in rows)
  assert "| small | 2 | scanned |" in (tmp_path / "scan_compile_cpu.md").read_text()

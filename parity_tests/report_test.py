"""Tests of the command line of ``python -m parity_tests`` (no parity run: it takes minutes)."""

import json
import pathlib

from parity_tests import core
from parity_tests import report


def test_report_goes_to_the_ignored_folder_by_default():
  args = report.parse_args([])
  assert report.output_dirs(args) == [pathlib.Path("runs/parity")]


def test_update_results_also_rewrites_the_published_report():
  args = report.parse_args(["--out", "elsewhere", "--update-results"])
  assert report.output_dirs(args) == [pathlib.Path("elsewhere"), report.RESULTS]


def test_main_writes_the_published_report_only_when_asked(tmp_path, monkeypatch):
  published, out = tmp_path / "published", tmp_path / "out"
  monkeypatch.setattr(report, "RESULTS", published)
  monkeypatch.setattr(core, "devices_present", lambda: ["cpu"])
  check = core.Check("quantiser", "one case", "codes", "cpu", 0.0, 0.0, True, "bit-exact", True)
  monkeypatch.setattr(report, "run_components", lambda dev, authors_cls: [check])

  assert report.main(["--out", str(out)]) == 0
  assert json.loads((out / "parity_cpu.json").read_text())["checks"][0]["case"] == "one case"
  assert "| one case | codes |" in (out / "parity_cpu.md").read_text()
  assert not published.exists()

  assert report.main(["--out", str(out), "--update-results"]) == 0
  assert (published / "parity_cpu.json").exists()
  assert (published / "parity_cpu.md").exists()

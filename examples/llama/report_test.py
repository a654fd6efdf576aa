"""Tests of the end-of-run table and the loss-curve plot."""

import sys

from examples.llama import report

RESULTS = [
  {
    "optimizer": "adamw",
    "learning_rate": 0.003,
    "eval_loss": 2.0,
    "weight_bytes": 2**20,
    "opt_bytes": 2 * 2**20,
    "svd_count": 0,
    "wall_s": 61.4,
    "train_curve": [(10, 3.0), (20, 2.5)],
    "eval_curve": [(20, 2.0)],
  },
  {
    "optimizer": "qgalore",
    "learning_rate": 0.01,
    "eval_loss": 2.1,
    "weight_bytes": 2**19,
    "opt_bytes": 2**19,
    "svd_count": 84,
    "wall_s": 70.0,
    "train_curve": [(10, 3.1), (20, 2.6)],
    "eval_curve": [(20, 2.1)],
  },
]


def test_markdown_table():
  assert report.markdown_table(RESULTS) == (
    "| optimizer | lr | held-out loss | held-out ppl | weights + opt state | SVDs | wall time |\n"
    "|---|---|---|---|---|---|---|\n"
    "| adamw | 0.003 | 2.0000 | 7.39 | 3.00 MiB (1.00 MiB + 2.00 MiB) | 0 | 61 s |\n"
    "| qgalore | 0.01 | 2.1000 | 8.17 | 1.00 MiB (0.50 MiB + 0.50 MiB) | 84 | 70 s |\n"
  )


def test_plot_writes_a_png(tmp_path):
  report.plot_curves(RESULTS, tmp_path / "curves.png")
  assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_prints_and_writes_the_table_before_the_plot(tmp_path, capsys):
  report.write_compare(RESULTS, tmp_path)
  out = capsys.readouterr().out
  assert (tmp_path / "compare.md").read_text() == report.markdown_table(RESULTS)
  assert report.markdown_table(RESULTS) in out
  assert (tmp_path / "compare.png").exists()


def test_compare_without_matplotlib_skips_the_plot_in_one_line(tmp_path, capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
  report.write_compare(RESULTS, tmp_path)
  captured = capsys.readouterr()
  assert (tmp_path / "compare.md").read_text() == report.markdown_table(RESULTS)
  assert report.markdown_table(RESULTS) in captured.out
  assert captured.err == "plot skipped: matplotlib is not installed (pip install matplotlib)\n"
  assert not (tmp_path / "compare.png").exists()

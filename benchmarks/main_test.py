"""``python -m benchmarks``: the docs page gathers every results file under its heading."""

import importlib

bench_main = importlib.import_module("benchmarks.__main__")


def test_docs_page_has_a_section_per_result_with_its_command(tmp_path, monkeypatch):
  results = tmp_path / "results"
  results.mkdir()
  (results / "memory.md").write_text("| a | b |\n|---|---|\n| 1 | 2 |\n")
  (results / "svd_study.md").write_text("# SVD study\n\ntext\n")
  (results / "svd_study.png").write_bytes(b"png")
  monkeypatch.setattr(bench_main, "RESULTS", results)
  page = bench_main.docs()
  assert "## Memory of weights and optimizer state" in page
  assert "python -m benchmarks.memory\n" in page and "| 1 | 2 |" in page
  assert "### SVD study" in page  # a result's own heading goes under the page's
  assert "![SVD count and quality" in page and "svd_study.png" in page
  assert "Speed of the torch step" not in page  # no results file, no section


def test_only_runs_the_chosen_benchmarks(monkeypatch):
  ran = []

  class Fake:
    @staticmethod
    def main(argv):
      ran.append(argv)

  monkeypatch.setattr(bench_main.importlib, "import_module", lambda name: Fake)
  bench_main.run({"update_speed"})
  assert ran == [["--config", "60M"], ["--config", "130M"]]

"""Smoke test of the SVD-count study on a one-layer model: it runs, writes well-formed
results, and its SVD counts agree with counts made here from the refresh rule alone.

No timing is asserted.

  python -m pytest benchmarks/svd_study_test.py
"""

import itertools
import json
import math

import jax.numpy as jnp
import optax
import pytest

from benchmarks import svd_study
from examples.llama import data
from examples.llama import model
from examples.llama import train

TEST_MODEL = model.Config(
  vocab_size=data.BYTE_VOCAB_SIZE, d_model=32, d_ff=64, num_layers=1, num_heads=2, seq_len=16
)
STEPS, GAP = 24, 2
MATRICES = len(model.PROJECTED) * TEST_MODEL.num_layers
QUEUE_SIZE = 5  # cosines needed before a gap may grow (docs/spec.md section 4 default)
# AdamW's run adds only a compilation; its (absent) schedule is tested on its own below.
NAMES = ("qgalore", "qgalore-fixedgap")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  """The study's output folder. One test reads it (``test_study``): tests of one fixture
  may run on different pytest-xdist workers, each of which would run the study again."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setitem(model.CONFIGS, "test", TEST_MODEL)
    out = tmp_path_factory.mktemp("svd_study")
    svd_study.main(
      [
        *("--model", "test", "--steps", str(STEPS), "--gap", str(GAP), "--rank", "8"),
        *("--batch-size", "4", "--eval-every", "12", "--eval-batches", "2", "--quiet"),
        *("--optimizers", ",".join(NAMES)),
        *("--out-dir", str(out), "--run-dir", str(out / "runs")),
      ]
    )
  return out


def possible_gaps(refresh_steps: list[int], gap: int, gamma: int) -> set[int]:
  """Gaps a matrix may hold after ``refresh_steps``, if they follow docs/spec.md section 4: the
  first refreshes are at 0, gap, 2 gap, ...; the gap can grow (times ``gamma``) only at a refresh
  after ``QUEUE_SIZE`` cosines, at most once per refresh; the next refresh is at the next
  multiple of the gap. Empty when no gap sequence explains the steps."""
  assert refresh_steps[0] == 0
  gaps = {gap}
  for k, (prev, nxt) in enumerate(itertools.pairwise(refresh_steps)):
    # The gap in force after refresh k: unchanged, or grown at refresh k (k cosines so far).
    candidates = {g2 for g in gaps for g2 in ({g, g * gamma} if k >= QUEUE_SIZE else {g})}
    gaps = {g for g in candidates if (prev // g + 1) * g == nxt}
    if not gaps:
      return set()
  k = len(refresh_steps) - 1
  return {g2 for g in gaps for g2 in ({g, g * gamma} if k >= QUEUE_SIZE else {g})}


@pytest.mark.slow
def test_study(study):
  check_results_are_well_formed(study)
  check_fixed_gap_count_is_matrices_times_refreshes(study)
  check_adaptive_count_follows_the_refresh_rule(study)


def check_results_are_well_formed(study):
  results = json.loads((study / "svd_study.json").read_text())
  rows = results["optimizers"]
  assert list(rows) == list(NAMES)
  for name, row in rows.items():
    assert isinstance(row["svd_count"], int) and row["steps"] == STEPS
    assert math.isfinite(row["eval_loss"]) and row["eval_loss"] > 0
    assert [s for s, _ in row["eval_curve"]] == [12, 24], name
  md = (study / "svd_study.md").read_text()
  assert "| qgalore-fixedgap | fixed |" in md and "Final gaps of `qgalore`" in md
  assert (study / "svd_study.png").stat().st_size > 0
  assert (study / "runs" / "qgalore" / "metrics.jsonl").exists()


def check_fixed_gap_count_is_matrices_times_refreshes(study):
  row = json.loads((study / "svd_study.json").read_text())["optimizers"]["qgalore-fixedgap"]
  assert row["svd_count"] == MATRICES * math.ceil(STEPS / GAP) == 84
  assert len(row["refresh_steps"]) == MATRICES
  assert all(s == list(range(0, STEPS, GAP)) for s in row["refresh_steps"].values())
  assert row["cumulative_svds"] == [MATRICES * (s // GAP + 1) for s in range(STEPS)]
  assert row["svd_percent_of_fixed"] == 100.0


def check_adaptive_count_follows_the_refresh_rule(study):
  rows = json.loads((study / "svd_study.json").read_text())["optimizers"]
  row = rows["qgalore"]
  steps_of = row["refresh_steps"]
  assert len(steps_of) == MATRICES
  for matrix, steps in steps_of.items():
    gaps = possible_gaps(steps, GAP, svd_study.GAMMA_PROJ)
    final_gap = row["matrices"][matrix]["final_gap"]
    assert final_gap in gaps, (matrix, steps, final_gap)
    assert (steps[-1] // final_gap + 1) * final_gap >= STEPS, (matrix, "a refresh is missing")
    assert row["matrices"][matrix]["svd_count"] == len(steps)
  assert row["svd_count"] == sum(len(s) for s in steps_of.values())
  assert row["svd_count"] <= rows["qgalore-fixedgap"]["svd_count"]
  cumulative = [sum(r <= s for steps in steps_of.values() for r in steps) for s in range(STEPS)]
  assert row["cumulative_svds"] == cumulative
  gaps = [m["final_gap"] for m in row["matrices"].values()]
  assert row["final_gap"] == {"min": min(gaps), "median": sorted(gaps)[3], "max": max(gaps)}


def test_adamw_has_no_schedule_to_record():
  params = {"w": jnp.ones((4, 3))}
  tx = optax.adamw(1e-3)
  recorder = svd_study.Recorder()
  step_fn = recorder.wrap(lambda p, s, batch, step: (p, tx.update(p, s, p)[1], 0.0))
  step_fn(params, tx.init(params), None, 0)
  assert recorder.names is None and recorder.arrays()[1].size == 0


def test_a_wrong_count_is_caught():
  recorder = svd_study.Recorder()
  recorder.names, recorder.initial_gaps = ["w"], [2]
  recorder._steps = [0, 1, 2, 3]
  # Refreshes at steps 0 and 1 with a gap of 2: step 1 is not a multiple of the gap.
  recorder._records = [([1], [2]), ([2], [2]), ([2], [2]), ([2], [2])]
  cfg = train.RunConfig(steps=4, update_proj_gap=2)
  with pytest.raises(AssertionError):
    svd_study.check_schedule("qgalore", recorder, cfg, 2)


def test_cheaper_refresh_section_compares_each_method_with_the_full_svd():
  row = lambda svds, loss: {
    "refresh": "adaptive (gamma_proj=2)", "learning_rate": 0.03, "svd_count": svds,
    "svd_percent_of_fixed": 50.0, "eval_loss": loss, "eval_ppl": math.exp(loss), "wall_s": 1.0,
  }  # fmt: skip
  study = {
    "settings": {
      "steps": 300, "update_proj_gap": 10, "model": "tiny", "dataset": "stdlib",
      "batch_size": 16, "seq_len": 128, "seed": 0, "rank": 32, "projected_matrices": 28,
      "eval_batches": 8, "fixed_gap_svds": 840,
    },
    "environment": {"device": "cpu", "cpu_count": 2, "jax": "0", "date": "2026-01-01"},
    "optimizers": {"qgalore": row(420, 1.6), "qgalore-subspace": row(410, 1.608)},
  }  # fmt: skip
  md = svd_study.markdown(study)
  assert "| full SVD (`qgalore`) | 420 | 1.6000 | - |" in md
  assert "| subspace (`qgalore-subspace`) | 410 | 1.6080 | +0.50% |" in md
  assert "randomized" not in md.split("## Cheaper refresh")[1].split("|---|")[1]

"""``python -m benchmarks.sharded_refresh`` on two stacks of 8 matrices and 9 2-D matrices,
8 simulated devices."""

import json

from benchmarks import sharded_refresh


def test_a_normal_step_moves_no_gradient_and_a_refresh_runs_each_svd_once(tmp_path):
  sharded_refresh.main(["--config", "stacks", "--repeats", "0", "--out", str(tmp_path)])
  result = json.loads((tmp_path / "sharded_refresh_stacks.json").read_text())
  rows = result["analysis"]["collectives"]
  every = [r for r in rows if r["step"] == "every step"]
  # The projections reduce low-rank results; no collective of a normal step moves an array
  # with a gradient's (or a stack of gradients') element count.
  assert {r["moves"] for r in every} <= {"low-rank", "projector", "scalar"}, every
  assert any(r["moves"] == "low-rank" for r in every), every
  # A refresh sends each gradient stack to the devices that refresh its slices ...
  refresh = [r for r in rows if r["step"] == "refresh only"]
  assert any(r["moves"] == "grad-sized" and r["kind"] == "all-to-all" for r in refresh), rows
  # ... and each SVD runs on one device: counted as they run, over all 8 devices, each of
  # the 16 stacked and 9 2-D matrices' SVDs ran once (not once per device). A device runs
  # 2 of the stacks' slices and of the 2-D matrices, padded to 8 of each shape, 1 + 1.
  run = result["svds_run"]
  assert run["svds_run_all_devices"] == run["svds_per_refresh_step"] == 16 + 9, run
  assert result["analysis"]["svds_per_device"] == 2 + 2
  assert len(result["analysis"]["svd_shapes_in_hlo"]) == 4

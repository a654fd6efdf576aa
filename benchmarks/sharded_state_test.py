"""``python -m benchmarks.sharded_state`` on a two-layer model: 8 devices, bytes per device."""

import json

from benchmarks import sharded_state


def test_state_bytes_per_device_are_near_an_even_split(tmp_path):
  sharded_state.main(["--config", "tiny", "--rank", "8", "--no-refresh", "--out", str(tmp_path)])
  result = json.loads((tmp_path / "sharded_state_tiny.json").read_text())
  assert [row["moments"] for row in result["rows"]] == ["float32", "8-bit"]
  for row in result["rows"]:
    even = row["total_bytes"] / result["devices"]
    # Every device holds its share and the replicated arrays; none holds more than 1.25x.
    assert even <= row["max_device_bytes"] <= sharded_state.GOAL * even, row
    assert row["replicated_bytes"] < row["max_device_bytes"]
  assert "| 8-bit |" in (tmp_path / "sharded_state_tiny.md").read_text()

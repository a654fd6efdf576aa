"""``python -m benchmarks.jax_layerwise_memory`` on the tiny config: the JSON it writes."""

import json

import pytest

from benchmarks import jax_layerwise_memory


@pytest.mark.slow
def test_writes_the_layerwise_peak_in_bytes(tmp_path):
  out = tmp_path / "m.json"
  argv = ["--config", "tiny", "--batch", "2", "--seq", "32", "--json", str(out)]
  # This process's JAX backend has started: XLA's default scheduler is the one it can use.
  argv += ["--scheduler", "concurrency"]
  jax_layerwise_memory.main([*argv, "--variants", "qgalore-layerwise-8bit"])
  result = json.loads(out.read_text())
  (layerwise,) = result["rows"]
  assert result["peak_bytes"] == layerwise["peak_bytes"]
  assert result["settings"]["scheduler"] == "concurrency"
  # The peak holds at least the donated weights and state, and the breakdown is there.
  assert layerwise["peak_bytes"] >= layerwise["weights"] + layerwise["opt_state"]
  assert layerwise["breakdown"]["block_inputs"] == 4 * 2 * 32 * 128 * 2  # layers, B, T, D, bf16
  assert out.with_suffix(".md").read_text().count("| TINY |") == 1

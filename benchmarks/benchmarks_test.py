"""Smoke tests of the torch benchmarks on tiny shapes: they run and write well-formed results.

No timing or memory figure is asserted (the machine's load decides those); only the checks
that the scripts make themselves and the shape of what they write.

  python -m pytest benchmarks/benchmarks_test.py
"""

import importlib.util
import json

import pytest
import torch

from benchmarks import layerwise_memory
from benchmarks import torch_step_speed

TINY_SHAPES = torch_step_speed.torch_param_shapes(hidden=32, ffn=48, layers=2, vocab=64)
TINY_MODEL = dict(hidden=32, ffn=48, layers=2, heads=4, vocab=64)
HAS_GALORE_TORCH = importlib.util.find_spec("galore_torch") is not None


@pytest.fixture
def one_thread():
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


def test_llama_shapes_and_projected_matrices():
  shapes = torch_step_speed.torch_param_shapes(512, 1376, 8)
  assert shapes["layers.7.gate"] == (1376, 512) and shapes["layers.7.down"] == (512, 1376)
  assert shapes["layers.0.q"] == (512, 512) and shapes["layers.0.mlp_norm"] == (512,)
  assert shapes["embed"] == shapes["lm_head"] == (32000, 512)
  assert sum(torch.Size(s).numel() for s in shapes.values()) == 58_073_600
  blocks = [n for n, s in shapes.items() if torch_step_speed.is_projected(n, s, all_2d=False)]
  every_2d = [n for n, s in shapes.items() if torch_step_speed.is_projected(n, s, all_2d=True)]
  assert len(blocks) == 7 * 8 and len(every_2d) == 7 * 8 + 2


def test_tiny_model_has_the_shapes_the_speed_benchmark_times():
  model = layerwise_memory.TinyLlama(**TINY_MODEL)
  shapes = {n.removesuffix(".weight"): tuple(p.shape) for n, p in model.named_parameters()}
  sizes = {k: v for k, v in TINY_MODEL.items() if k != "heads"}
  assert shapes == torch_step_speed.torch_param_shapes(**sizes)


@pytest.mark.parametrize("all_2d, breakdown", [(False, True), (True, False)])
def test_step_speed_runs_and_checks_its_steps(all_2d, breakdown, one_thread):
  result = torch_step_speed.run(
    shapes=TINY_SHAPES,
    all_2d=all_2d,
    rank=4,
    gap=10,
    repeats=2,
    warmup=1,
    refresh_repeats=1,
    with_galore_torch=HAS_GALORE_TORCH,
    breakdown=breakdown,
  )
  expected = {"QGaLoreAdamW", "QGaLoreAdamW (float proj)", "torch AdamW (foreach)"}
  galores = ["QGaLoreAdamW", *["galore_torch GaLoreAdamW"] * HAS_GALORE_TORCH]
  expected |= {galores[-1]}
  for name in galores:
    expected |= {f"{name} [refresh]"}
    expected |= {f"{name} [matrices only]", f"{name} [others only]"} if breakdown else set()
  assert set(result["median_ms"]) == expected
  assert all(len(s) == 1 if "refresh" in n else 2 for n, s in result["samples_ms"].items())
  assert result["settings"]["projected_matrices"] == 7 * 2 + 2 * all_2d
  assert all(ratio > 0 for ratio in result["ratios"].values())
  assert json.loads(json.dumps(result)) == result
  markdown = torch_step_speed.to_markdown(result)
  assert markdown.count("\n| ") == len(expected) + 1  # header and one row per case


def test_step_speed_rejects_a_gap_a_normal_step_could_reach():
  with pytest.raises(ValueError, match="`gap`"):
    torch_step_speed.run(shapes=TINY_SHAPES, gap=5, repeats=3, warmup=1)


def test_step_speed_main_writes_json_and_markdown(one_thread, tmp_path, monkeypatch):
  monkeypatch.setattr(torch_step_speed, "torch_param_shapes", lambda *_: TINY_SHAPES)
  if not HAS_GALORE_TORCH:
    pytest.skip("main compares with galore-torch: pip install --no-deps galore-torch==1.0")
  torch_step_speed.main(
    ["--rank", "4", "--repeats", "2", "--refresh-repeats", "1", "--out", str(tmp_path)]
  )
  result = json.loads((tmp_path / "torch_step_speed_cpu.json").read_text())
  assert result["settings"]["rank"] == 4
  assert (tmp_path / "torch_step_speed_cpu.md").read_text().startswith("`step()`")


def test_layerwise_memory_runs_both_modes_and_checks_weights():
  result = layerwise_memory.run(
    config=TINY_MODEL, batch=2, seq=8, rank=4, threads=1, concurrent=True
  )
  assert result["same_weights"]["identical"]
  assert result["same_weights"]["max_abs_diff"] == 0.0
  for mode in layerwise_memory.MODES:
    peaks = result["modes"][mode]["peak_bytes"]
    assert set(peaks) == {"allocated", "rss"}
    assert peaks["allocated"] > 0 and peaks["rss"] >= 0
    assert result["modes"][mode]["svd_counts"] == [1]  # the measured iterations did not refresh
  assert json.loads(json.dumps(result)) == result
  markdown = layerwise_memory.to_markdown(result)
  assert markdown.count("\n| ") == 2 * 2 + 1 and "identical" in markdown

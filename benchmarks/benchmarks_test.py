"""Smoke tests of the speed and torch benchmarks on tiny shapes: they run and write results.

No timing or memory figure is asserted (the machine's load decides those); only the checks
that the scripts make themselves and the shape of what they write.

  python -m pytest benchmarks/benchmarks_test.py
"""

import functools
import importlib.util
import json

import pytest
import torch

from benchmarks import layerwise_memory
from benchmarks import torch_step_speed
from benchmarks import torch_step_variants
from benchmarks import update_speed
from benchmarks.llama_shapes import llama_param_shapes

TINY_SHAPES = torch_step_speed.torch_param_shapes(hidden=32, ffn=48, layers=2, vocab=64)
TINY_MODEL = dict(hidden=32, ffn=48, layers=2, heads=4, vocab=64)
HAS_GALORE_TORCH = importlib.util.find_spec("galore_torch") is not None


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
  expected = {"QGaLoreAdamW", "QGaLoreAdamW (float proj)", torch_step_speed.COMPILED}
  expected |= {"torch AdamW (foreach)"}
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
  steps, floor = markdown.split("Against the memory-bandwidth floor")
  assert steps.count("\n| ") == len(expected) + 1  # header and one row per case
  normal = [name for name in expected if "[" not in name]
  assert floor.count("\n| ") == len(normal) + 1 and set(result["bandwidth_floor"]) == set(normal)


def test_step_speed_bytes_touched_counts_adamw_by_hand():
  """AdamW reads p, g, m, v and its step counters, and writes p, m, v and the counters."""
  params = [torch.nn.Parameter(torch.randn(shape)) for shape in ((6, 5), (7,))]
  grads = [torch.randn_like(p) for p in params]

  def before(opt):
    for p, g in zip(params, grads, strict=True):
      p.grad = g

  opt = torch.optim.AdamW(params, foreach=True)
  before(opt)
  opt.step()
  n, counters = 6 * 5 + 7, 2 * 4  # float32 values; one float32 step counter per parameter
  read, written = torch_step_speed.bytes_touched(opt, params, before)
  assert (read, written) == (4 * n * 4 + counters, 4 * n * 3 + counters)


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
  result = json.loads((tmp_path / "torch_step_speed_cpu_60M.json").read_text())
  assert result["settings"]["rank"] == 4 and result["settings"]["config"] == "60M"
  assert (tmp_path / "torch_step_speed_cpu_60M.md").read_text().startswith("`step()`")


def test_step_speed_config_sets_the_papers_rank(one_thread, monkeypatch):
  monkeypatch.setattr(torch_step_speed, "torch_param_shapes", lambda *_: TINY_SHAPES)
  result = torch_step_speed.run(
    config="130M", repeats=2, warmup=1, with_galore_torch=False, breakdown=False
  )
  assert result["settings"]["rank"] == 256 and result["settings"]["refresh_repeats"] == 1
  assert result["benchmark"].endswith("LLaMA-130M parameter shapes")


def test_step_variants_main_writes_results_and_checks_the_bits(tmp_path, monkeypatch):
  monkeypatch.setattr(torch_step_variants, "torch_param_shapes", lambda *_: TINY_SHAPES)
  # Slices of 300 elements: several per leaf, the last one partial.
  argv = ["--rank", "4", "--repeats", "4", "--warmup", "1", "--threads", "1,2"]
  argv += ["--slice-elements", "300"]
  torch_step_variants.main([*argv, "--weight-decay", "0.1", "--out", str(tmp_path)])
  result = json.loads((tmp_path / "torch_step_variants_cpu_60M_wd0.1.json").read_text())
  assert result["settings"]["torch_threads"] == [1, 2] and result["settings"]["rank"] == 4
  slices, matmul = torch_step_variants.SLICES, torch_step_variants.MATMUL
  kinds = {key: (k["variant"], k["leaves"]) for key, k in result["kinds"].items()}
  assert kinds == {
    f"{slices}: embed, lm_head (64, 32)": (slices, 2),
    f"{slices}: attn_norm, mlp_norm, final_norm (32,)": (slices, 5),
    f"{matmul}: q, k, v, o (32, 32)": (matmul, 8),
    f"{matmul}: gate, up (48, 32)": (matmul, 4),
    f"{matmul}: down (32, 48)": (matmul, 2),
  }
  for n in ("1", "2"):
    assert set(result["timings"][n]) == set(kinds) and set(result["totals"][n]) == {slices, matmul}
    assert all(len(row["fast_samples_ms"]) == 4 for row in result["timings"][n].values())
    assert result["checks"][n][slices]["parameters_identical"]
    assert result["checks"][n][slices]["moments_identical"]
    assert result["checks"][n][matmul]["moments_identical"]
  assert result["checks"]["2"][slices]["steps"] == 10  # two thread counts of 1 + 4 steps
  markdown = (tmp_path / "torch_step_variants_cpu_60M_wd0.1.md").read_text()
  assert markdown.count("\n| ") == 1 + 2 * (5 + 2)  # header; per thread count kinds + totals
  assert "parameters and moments **bit-identical**" in markdown


def test_step_variants_check_raises_on_changed_bits():
  slices, matmul = torch_step_variants.SLICES, torch_step_variants.MATMUL
  leaves = torch_step_variants.make_leaves(matmul, (8, 4), 1, 2, torch.Generator())
  fast, plain = leaves["fast"][0], leaves["plain"][0]
  fast.param[0, 0] = torch.nextafter(fast.param[0, 0], torch.tensor(1.0))
  record = torch_step_variants.compare([fast], [plain], steps=1)
  torch_step_variants.check(matmul, record)  # one rounding of W: allowed
  with pytest.raises(RuntimeError, match="parameters' bits"):
    torch_step_variants.check(slices, record)
  fast.exp_avg[0, 0] = 1.0
  with pytest.raises(RuntimeError, match="moments' bits"):
    torch_step_variants.check(matmul, torch_step_variants.compare([fast], [plain], steps=1))


def test_schedule_svds_follows_the_documented_schedules():
  # The documented stable schedule (0, 200, ..., 1200, 1600, 3200, 6400), at a tenth of the
  # gap: 0, 20, ..., 120, 160, 320, 640; a fixed gap refreshes at 0, 20, ..., 1000.
  assert update_speed.schedule_svds(1000, 20, gamma_proj=2) == 10
  assert update_speed.schedule_svds(1001, 20, gamma_proj=1) == 51


def test_amortised_ms_adds_the_svd_cost_per_step():
  assert update_speed.amortised_ms(100.0, 1100.0, 50, 10_000) == pytest.approx(105.0)
  assert update_speed.amortised_ms(100.0, 1100.0, 0, 10_000) == 100.0


@pytest.mark.parametrize(
  "study, ratio",
  [
    (
      {
        "runs": [{"optimizer": "qgalore", "svd_count": 30, "steps": 1000}],
        "more": [{"optimizer": "galore", "svd_count": 120, "steps": 2000}],
      },
      0.5,
    ),
    ({"galore": {"svds": 100}, "qgalore": {"svds": 25}, "adamw": {"svds": 0}}, 0.25),
    (
      {
        "settings": {"steps": 300, "update_proj_gap": 10},
        "optimizers": {
          "adamw": {"optimizer": "adamw", "steps": 300, "svd_count": 0},
          "qgalore": {
            "optimizer": "qgalore",
            "steps": 300,
            "svd_count": 210,
            "matrices": {"layers.0.q": {"svd_count": 5, "final_gap": 40}},
          },
          "galore": {"optimizer": "galore", "steps": 300, "svd_count": 900},
          "qgalore-fixedgap": {"optimizer": "qgalore-fixedgap", "steps": 300, "svd_count": 420},
        },
      },
      0.5,
    ),
    (
      {"steps": 500, "by": {"qgalore": {"svd_count": 20}, "qgalore-noquant": {"svd_count": 40}}},
      0.5,
    ),
    (
      [
        {"name": "qgalore", "total_svds": 3},
        {"name": "qgalore", "total_svds": 5},
        {"name": "galore", "total_svds": 16},
      ],
      0.5,
    ),
    ({"qgalore": {"svd_count": 20, "steps": 100}, "galore": {"svd_count": 40}}, None),
    ({"qgalore": {"svd_count": 20}, "qgalore-noquant": {"svd_count": 0}}, None),
    ({"qgalore": {"svd_count": 20}}, None),
    ({"qgalore": {"svd_count": "many"}, "galore": {"svd_count": 40}}, None),
    (None, None),
  ],
)
def test_study_svd_ratio_reads_what_it_can(study, ratio, tmp_path):
  path = tmp_path / "svd_study.json"
  path.write_text(json.dumps(study))
  got, details = update_speed.study_svd_ratio(path)
  assert got == ratio
  assert isinstance(details, dict) == (ratio is not None)


def test_study_svd_ratio_skips_missing_and_broken_files(tmp_path):
  assert update_speed.study_svd_ratio(tmp_path / "absent.json") == (None, "absent.json not found")
  (tmp_path / "broken.json").write_text("{")
  assert update_speed.study_svd_ratio(tmp_path / "broken.json")[0] is None


@pytest.mark.slow
def test_update_speed_main_writes_json_and_markdown_per_config(tmp_path, monkeypatch):
  tiny = llama_param_shapes(hidden=32, ffn=48, layers=2, vocab=64)
  monkeypatch.setattr(update_speed, "llama_param_shapes", lambda **_: tiny)
  study = tmp_path / "svd_study.json"
  study.write_text(json.dumps({"qgalore": {"svd_count": 4}, "galore": {"svd_count": 8}}))
  short = ["--rank", "4", "--repeats", "2", "--refresh-repeats", "1", "--amortise-steps", "100"]
  small_triad = functools.partial(update_speed.measure_bandwidth, size=2**16, repeats=3)
  monkeypatch.setattr(update_speed, "measure_bandwidth", small_triad)
  update_speed.main(["--config", "130M", *short, "--svd-study", str(study), "--out", str(tmp_path)])
  result = json.loads((tmp_path / "update_speed_cpu_130M.json").read_text())
  assert result["settings"]["config"] == "130M" and result["settings"]["rank"] == 4
  cases = {"optax.adamw", "optax.contrib.galore", "qgalore_adamw", "qgalore_adamw (float proj)"}
  refresh = {f"{c} [refresh]" for c in cases - {"optax.adamw"}}
  normal_only = {update_speed.FLOOR, update_speed.Q8, update_speed.ADAM8}
  assert set(result["median_ms"]) == cases | refresh | normal_only
  assert all(len(s) == 1 if "refresh" in n else 2 for n, s in result["samples_ms"].items())
  # gap 200 over 100 steps: one SVD per matrix on any schedule; the study halves it.
  svds = [row["svds_per_matrix"] for row in result["amortised_ms"]]
  assert svds == [0, 1, 1, 1, 1, 0.5]
  assert result["svd_study"]["ratio"] == 0.5
  markdown = (tmp_path / "update_speed_cpu_130M.md").read_text()
  assert markdown.startswith("Jitted update, LLaMA-130M shapes")
  assert set(result["bandwidth_floor"]) == cases | normal_only
  assert result["bandwidth_bytes_per_s"] > 0
  rows = len(result["median_ms"]) + len(result["amortised_ms"]) + len(result["bandwidth_floor"])
  assert markdown.count("\n| ") == 3 + rows and "SVD study" in markdown


def test_bytes_touched_counts_what_a_step_must_move():
  """Hand counts: AdamW reads g, m, v (and W only with weight decay), writes u, m, v."""
  import jax
  import jax.numpy as jnp
  import optax

  import qgalore_jax

  params = {"w": jnp.ones((64, 32)), "b": jnp.ones(32)}
  grads = jax.tree.map(lambda p: p * 0.1, params)
  n = 4 * (64 * 32 + 32)  # float32 bytes of one copy of the parameters
  count = 4  # optax's int32 step counter
  for wd, reads_params in ((0.0, False), (0.1, True)):
    tx = optax.adamw(1e-3, weight_decay=wd)
    update = jax.jit(tx.update)
    _, state = update(grads, tx.init(params), params)
    read, written = update_speed.bytes_touched(update, grads, state, params)
    assert read == n + 2 * n + count + reads_params * n
    assert written == n + 2 * n + count
  # Q-GaLore on a normal step: the INT4 projector and the schedule are read, not written.
  tx = qgalore_jax.qgalore_adamw(1e-3, rank=4, mask={"w": True, "b": False})
  update = jax.jit(tx.update)
  state0 = tx.init(params)
  _, state = update(grads, state0, params)
  read, written = update_speed.bytes_touched(update, grads, state, params)
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  assert read == n + state_bytes
  # (out 32, in 64) kernel, rank 4: "left", low-rank moments 4 x 64; AdamW on b; 2 counters.
  assert written == n + 2 * 4 * (4 * 64) + 2 * 4 * 32 + 2 * count


def test_projection_floor_is_two_matmuls_with_its_basis():
  """Against NumPy: a (in, out) kernel's canonical gradient G = g^T, projected and back."""
  import jax.numpy as jnp
  import numpy as np

  rng = np.random.default_rng(0)
  params = {"tall": jnp.zeros((8, 24)), "wide": jnp.zeros((24, 8)), "bias": jnp.zeros(8)}
  mask = {"tall": True, "wide": True, "bias": False}
  tx = update_speed.projection_floor(mask, rank=3)
  state = tx.init(params)
  bases = state[0].inner_states["floor"].inner_state
  grads = {k: jnp.asarray(rng.normal(size=p.shape), jnp.float32) for k, p in params.items()}
  out, _ = tx.update(grads, state, params)
  out = {k: -v / 1e-3 for k, v in out.items()}  # undo the learning rate (params are 0)
  # tall kernel (in 8, out 24): G is 24 x 8, m >= n, "right": P is 3 x 8, G P^T P.
  p = np.asarray(bases["tall"])
  want = 0.25 * (np.asarray(grads["tall"]).T @ p.T @ p)
  np.testing.assert_allclose(np.asarray(out["tall"]).T, want, rtol=1e-5, atol=1e-6)
  # wide kernel (in 24, out 8): G is 8 x 24, m < n, "left": basis rows are P^T (3 x 8).
  p = np.asarray(bases["wide"]).T
  want = 0.25 * (p @ p.T @ np.asarray(grads["wide"]).T)
  np.testing.assert_allclose(np.asarray(out["wide"]).T, want, rtol=1e-5, atol=1e-6)
  # The bias gets AdamW: its first step is the sign of the gradient, up to float32's
  # rounding of 1 - b2 (1.3e-5, halved by the square root).
  np.testing.assert_allclose(np.asarray(out["bias"]), np.sign(grads["bias"]), rtol=1e-5)


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

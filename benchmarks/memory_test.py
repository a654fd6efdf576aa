"""Smoke tests of the memory benchmarks on tiny shapes: they run, write well-formed results,
and their byte counts match counts made here by hand from the shapes.

  python -m pytest benchmarks/memory_test.py
"""

import json
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import pytest

import qgalore_jax
from benchmarks import memory
from benchmarks import step_memory
from benchmarks.llama_shapes import llama_param_shapes
from benchmarks.torch_step_speed import torch_param_shapes
from examples.llama import model
from examples.llama.configs import Config

HIDDEN, FFN, LAYERS, VOCAB, RANK = 32, 48, 2, 160, 12
# Canonical (out, in) shapes of the 7 projected matrices of a layer.
BLOCKS = [(HIDDEN, HIDDEN)] * 4 + [(FFN, HIDDEN)] * 2 + [(HIDDEN, FFN)]
OTHERS = [(VOCAB, HIDDEN), (HIDDEN, VOCAB), (HIDDEN,)] + [(HIDDEN,)] * 2 * LAYERS
N_BLOCK = LAYERS * sum(m * n for m, n in BLOCKS)
N_OTHER = sum(math.prod(s) for s in OTHERS)
N_TENSORS = LAYERS * 7 + len(OTHERS)


def low_rank(m, n):
  """Shape of the low-rank moments: (m, r) when m >= n, else (r, n)."""
  r = min(RANK, m, n)
  return (m, r) if m >= n else (r, n)


def int4_projector_bytes(m, n):
  """Packed INT4 basis (r x k): half a byte per element, rounded up, + 8 bytes per group."""
  elements = min(RANK, m, n) * min(m, n)
  return -(-elements // 2) + 8 * -(-elements // 256)


def moment8_bytes(shape):
  """One 8-bit moment (docs/spec.md section 8): 2-D and >= 4096 elements: a byte per element plus
  a float32 absmax per 16 x 16 tile; otherwise float32."""
  if len(shape) == 2 and math.prod(shape) >= 4096:
    return math.prod(shape) + 4 * -(-shape[0] // 16) * -(-shape[1] // 16)
  return 4 * math.prod(shape)


@pytest.fixture(scope="module")
def jax_rows():
  shapes = llama_param_shapes(HIDDEN, FFN, LAYERS, VOCAB)
  return {r["optimizer"]: r for r in memory.measure_shapes("tiny", shapes, RANK)}


def test_state_components_counts_nested_moments():
  class Moment8(NamedTuple):
    codes: dict
    absmax: dict

  class State(NamedTuple):
    count: jax.ShapeDtypeStruct
    mu: Moment8
    nu: dict
    projector: qgalore_jax.QuantizedArray
    subspace: qgalore_jax.SubspaceState

  sds = jax.ShapeDtypeStruct
  state = State(
    count=sds((), jnp.int32),
    mu=Moment8({"w": sds((64, 32), jnp.uint8)}, {"w": sds((4, 2), jnp.float32)}),
    nu={"w": sds((64, 32), jnp.float32)},
    projector=qgalore_jax.QuantizedArray(
      sds((40,), jnp.uint8), sds((1,), jnp.float32), sds((1,), jnp.float32)
    ),
    subspace=qgalore_jax.SubspaceState(*[sds((5,), jnp.float32)] * 5),
  )
  parts = memory.state_components({"outer": [state]})
  assert parts == {"moments": 2048 + 32 + 8192, "projector": 48, "schedule": 100, "other": 4}


def test_jax_rows_match_counts_by_hand(jax_rows):
  n = N_BLOCK + N_OTHER
  adamw = jax_rows["AdamW (f32 weights)"]
  assert adamw["weights"] == 4 * n and adamw["moments"] == 2 * 4 * n
  bf16 = jax_rows["AdamW (bf16 weights)"]
  assert bf16["weights"] == 2 * n and bf16["moments"] == 2 * 2 * n
  ours = jax_rows["Q-GaLore (ours)"]
  int8_weights = LAYERS * sum(m * n + 8 * -(-m * n // 256) for m, n in BLOCKS)
  assert ours["weights"] == int8_weights + 2 * N_OTHER
  assert ours["projector"] == LAYERS * sum(int4_projector_bytes(m, n) for m, n in BLOCKS)
  low_rank_moments = LAYERS * sum(2 * 4 * math.prod(low_rank(m, n)) for m, n in BLOCKS)
  assert ours["moments"] == low_rank_moments + 2 * 2 * N_OTHER  # bf16 AdamW on the others
  assert ours["total"] == ours["weights"] + sum(ours[k] for k in memory.state_components({}))
  assert jax_rows["GaLore (ours, float)"]["projector"] == LAYERS * sum(
    4 * min(RANK, m, n) * min(m, n) for m, n in BLOCKS
  )


def test_8bit_moments_row(jax_rows):
  if not memory.has_moment_bits(qgalore_jax.qgalore_adamw):
    assert memory.Q8_LABEL not in jax_rows
    pytest.skip("qgalore_adamw has no moment_bits: the row is skipped")
  row = jax_rows[memory.Q8_LABEL]
  projected = LAYERS * sum(2 * moment8_bytes(low_rank(m, n)) for m, n in BLOCKS)
  assert row["moments"] == projected + sum(2 * moment8_bytes(s) for s in OTHERS)
  assert row["projector"] == jax_rows["Q-GaLore (ours)"]["projector"]


def test_torch_state_matches_whole_model_and_jax(jax_rows):
  shapes = torch_param_shapes(HIDDEN, FFN, LAYERS, VOCAB)
  rows = memory.measure_torch("tiny", shapes, RANK, list(jax_rows.values()), check=True)
  assert {r["optimizer"] for r in rows} == set(memory.torch_cases())
  for r in rows:
    assert r["full_model_check"]["same"], r
    assert r["torch_step"] == 4 * N_TENSORS  # a float32 `step` per parameter
    assert r["unexplained"] == 0, r
  by_label = {r["optimizer"]: r for r in rows}
  assert by_label["AdamW (f32 weights)"]["torch_moments"] == 2 * 4 * (N_BLOCK + N_OTHER)
  ours = by_label["Q-GaLore (ours)"]
  assert ours["torch_projector"] == jax_rows["Q-GaLore (ours)"]["projector"]


def test_memory_main_writes_results(tmp_path, monkeypatch):
  monkeypatch.setattr(memory, "CONFIGS", {"tiny": (HIDDEN, FFN, LAYERS)})
  monkeypatch.setitem(memory.RANKS, "tiny", RANK)
  memory.main(["--torch-check", "--out", str(tmp_path)])
  result = json.loads((tmp_path / "memory.json").read_text())
  labels = [r["optimizer"] for r in result["jax"]]
  assert len(labels) == 5 + result["has_8bit_moments"]
  assert len(result["torch"]) == len(memory.torch_cases())
  markdown = (tmp_path / "memory.md").read_text()
  assert markdown.count("\n| tiny | ") == len(labels) + len(result["torch"])
  assert (tmp_path / "memory.png").stat().st_size > 0


def test_step_memory_runs_and_donates(tmp_path, monkeypatch):
  # One layer: compiling the step is what costs (the adamw step is not compiled here; the
  # JAX rows above check AdamW's bytes).
  cfg = Config(vocab_size=64, d_model=16, d_ff=24, num_layers=1, num_heads=2, seq_len=8)
  monkeypatch.setitem(model.CONFIGS, "test", cfg)
  args = ["--models", "test", "--variants", "qgalore-int8", "--batch", "2", "--seq", "8"]
  args += ["--layouts", "scanned"]
  step_memory.main([*args, "--rank", "4", "--out", str(tmp_path)])
  result = json.loads((tmp_path / "step_memory.json").read_text())
  assert result["settings"]["batch"] == 2 and result["settings"]["seq"] == 8
  (row,) = result["rows"]
  # INT8 codes of q, k, v, o (16 x 16) and gate, up, down (16 x 24), with a float32 scale
  # and zero per group of 256; the embedding, head and 3 norms in float32.
  block_bytes = 4 * (16 * 16 + 8) + 3 * (16 * 24 + 2 * 8)
  assert row["weights"] == block_bytes + 4 * (2 * 64 * 16 + 3 * 16)
  # The optimizer's non-finite guard (optax.apply_if_finite) writes its bool `last_finite`
  # but never reads it, so jit prunes that byte from the arguments: not an argument, not
  # an alias.
  state = row["weights"] + row["opt_state"] - 1
  assert row["argument"] == state + 2 * 2 * 8 * 4 + 4  # inputs, targets, int32 step
  assert row["alias"] == state  # params and optimizer state donated, updated in place
  assert row["peak"] == row["argument"] + row["output"] - row["alias"] + row["temp"]
  assert row["temp"] > 0
  markdown = (tmp_path / "step_memory.md").read_text()
  assert markdown.count("\n| test | ") == 1

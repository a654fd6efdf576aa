"""Compile time, step time and memory of the main example's train step, scanned vs unscanned.

The train step is the example's own (``examples/llama/train.py``): ``make_train_step`` with
``qgalore`` (INT4 projector, adaptive refresh, the projected matrices held as INT8 codes
updated through ``qgalore_jax.int8_train_step``) on the Flax NNX LLaMA of
``examples/llama/model.py``, once with its decoder blocks in a Python loop (unscanned) and
once under ``nnx.scan`` over stacked weights (scanned), from the same seed.

For each model and each of the two:

- **compile**: wall-clock seconds to lower the jitted step on abstract inputs
  (``jax.ShapeDtypeStruct``) and compile it, the fastest of ``--compiles``. Unscanned, XLA
  compiles every block, and a refresh branch (an SVD) for each of their matrices;
  scanned, one block, and one refresh loop over the slices of each stacked kernel.
- **step**: median wall-clock milliseconds of steady-state steps (no refresh due: the gap
  is larger than the steps run), the two models' steps interleaved so that both see the
  same machine state; the first step, a refresh step, is the warm-up.
- **bytes**: weights (INT8 codes, their float32 scales and zeros, the float32 rest) and
  optimizer state, from shapes (``jax.eval_shape`` of the example's ``init_state``). The
  scanned model stores the same matrices as stacks, quantised and projected slice by slice
  (docs/spec.md section 1.3), so every figure must be equal; the script checks it.

Results go to ``benchmarks/results/scan_compile_<backend>.json`` and ``.md``.

  python -m benchmarks.scan_compile                   # tiny and 60m, batch 4
  python -m benchmarks.scan_compile --models tiny --steps 5
"""

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import qgalore_jax
from benchmarks.llama_shapes import RANKS
from benchmarks.llama_shapes import nbytes
from benchmarks.step_memory import abstract_state
from benchmarks.step_memory import device_name
from examples.llama import model
from examples.llama import train

RESULTS = pathlib.Path(__file__).parent / "results"
MB = 1e6
LAYOUTS = {"unscanned": False, "scanned": True}


def weight_bytes(params) -> dict:
  """Bytes of INT8 codes, of their scales and zeros, and of the float leaves of ``params``."""
  leaves = jax.tree.leaves(params, is_leaf=qgalore_jax.is_quantized)
  quantised = [p for p in leaves if qgalore_jax.is_quantized(p)]
  codes = sum(nbytes(p.codes) for p in quantised)
  scales = sum(nbytes((p.scale, p.zero)) for p in quantised)
  return {"codes": codes, "scales": scales, "float": nbytes(params) - codes - scales}


def run_config(name: str, scan: bool, batch: int, rank: int, gap: int) -> train.RunConfig:
  return dataclasses.replace(
    train.RunConfig(),
    model=name,
    optimizer="qgalore",
    scan=scan,
    batch_size=batch,
    rank=rank,
    update_proj_gap=gap,
  )


def compile_step(cfg: train.RunConfig, seq: int):
  """``(compiled step, lower_s, compile_s, bytes)`` on abstract inputs."""
  graphdef, params, opt_state, tx = abstract_state(cfg, int8_weights=True)
  step_fn = train.make_train_step(graphdef, tx, True, cfg.seed)
  tokens = jax.ShapeDtypeStruct((cfg.batch_size, seq), jnp.int32)
  start = time.perf_counter()
  lowered = step_fn.lower(params, opt_state, (tokens, tokens), jax.ShapeDtypeStruct((), jnp.int32))
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  done = time.perf_counter()
  sizes = weight_bytes(params) | {"opt_state": nbytes(opt_state)}
  return compiled, lowered_at - start, done - lowered_at, sizes


def measure(
  name: str, batch: int, seq: int, rank: int, gap: int, steps: int, compiles: int
) -> list[dict]:
  """One row per layout of model ``name``: compile time, step times and bytes.

  Each layout is compiled ``compiles`` times, the layouts in turn, and keeps its fastest:
  the first compilation in a process also pays for warming JAX's own caches.

  Raises:
    ValueError: if the two layouts' bytes differ, or ``steps`` would reach a refresh.
  """
  if steps >= gap:
    raise ValueError(f"{steps} timed steps would reach the refresh at step {gap}")
  rows, runs = {}, {}
  for _ in range(compiles):
    for layout, scan in LAYOUTS.items():
      compiled, lower_s, compile_s, sizes = compile_step(
        run_config(name, scan, batch, rank, gap), seq
      )
      print(
        f"{name} {layout}: lowered in {lower_s:.1f} s, compiled in {compile_s:.1f} s", flush=True
      )
      if (
        layout in rows
        and rows[layout]["lower_s"] + rows[layout]["compile_s"] <= lower_s + compile_s
      ):
        continue
      runs[layout] = {"step": compiled, "times": []}
      rows[layout] = {
        "model": name,
        "layout": layout,
        "layers": model.CONFIGS[name].num_layers,
        "batch": batch,
        "seq": seq,
        "rank": rank,
        "lower_s": lower_s,
        "compile_s": compile_s,
        **sizes,
      }
  vocab = model.CONFIGS[name].vocab_size
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, vocab, (batch, seq + 1)), jnp.int32)
  batch_data = (tokens[:, :-1], tokens[:, 1:])
  for layout, scan in LAYOUTS.items():
    _, params, opt_state, _, _ = train.init_state(run_config(name, scan, batch, rank, gap))
    # Step 0 refreshes every matrix (an SVD each): the warm-up, not timed as a normal step.
    *runs[layout]["state"], loss = runs[layout]["step"](params, opt_state, batch_data, jnp.int32(0))
    rows[layout]["first_loss"] = float(loss)
  for step in range(1, steps + 1):
    for run in runs.values():
      start = time.perf_counter()
      *run["state"], loss = run["step"](*run["state"], batch_data, jnp.int32(step))
      loss.block_until_ready()
      run["times"].append(time.perf_counter() - start)
  for layout, run in runs.items():
    rows[layout]["step_ms"] = 1e3 * statistics.median(run["times"])
    rows[layout]["step_ms_all"] = [1e3 * t for t in run["times"]]
  keys = ("codes", "scales", "float", "opt_state")
  unscanned, scanned = ([rows[layout][k] for k in keys] for layout in LAYOUTS)
  if unscanned != scanned:
    raise ValueError(f"{name}: bytes differ, unscanned {unscanned}, scanned {scanned}")
  return list(rows.values())


def to_markdown(result: dict) -> str:
  s = result["settings"]
  lines = [
    f"The example's `qgalore` train step (INT8 weights), batch {s['batch']}, initial gap"
    f" {s['update_proj_gap']}; compile: lower + compile on abstract inputs, wall clock, the"
    f" fastest of {s['compiles']}; step:"
    f" median of {s['steps']} interleaved steady-state steps after a refresh step;"
    f" {s['backend']} ({s['device']}), {s['cpu_count']} CPUs, jax {s['jax']}, {s['date']}.",
    "",
    "| model | layers | blocks | rank | compile | step | INT8 codes | scales + zeros | float"
    " weights | opt state |",
    "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in result["rows"]:
    lines.append(
      f"| {r['model']} | {r['layers']} | {r['layout']} | {r['rank']}"
      f" | {r['lower_s'] + r['compile_s']:.1f} s | {r['step_ms']:.0f} ms"
      f" | {r['codes'] / MB:.2f} MB | {r['scales'] / MB:.3f} MB | {r['float'] / MB:.2f} MB"
      f" | {r['opt_state'] / MB:.2f} MB |"
    )
  lines += ["", "| model | compile, unscanned / scanned | step, unscanned / scanned |"]
  lines.append("|---|---:|---:|")
  by_model = {}
  for r in result["rows"]:
    by_model.setdefault(r["model"], {})[r["layout"]] = r
  for name, pair in by_model.items():
    u, c = pair["unscanned"], pair["scanned"]
    compile_ratio = (u["lower_s"] + u["compile_s"]) / (c["lower_s"] + c["compile_s"])
    lines.append(f"| {name} | {compile_ratio:.2f}x | {u['step_ms'] / c['step_ms']:.2f}x |")
  lines += [
    "",
    "Weights and optimizer state are equal in both layouts (checked): the scanned model",
    "holds the same matrices as `(layers, in, out)` stacks, quantised and projected slice by",
    "slice.",
  ]
  return "\n".join(lines) + "\n"


def run(
  models, batch: int, seq: int | None, rank: int | None, gap: int, steps: int, compiles: int
) -> dict:
  """Measures every model in both layouts; returns the rows and the settings."""
  rows = []
  for name in models:
    model_seq = seq or model.CONFIGS[name].seq_len
    model_rank = rank or RANKS.get(name.upper(), train.RunConfig.rank)
    rows += measure(name, batch, model_seq, model_rank, gap, steps, compiles)
  settings = {
    "batch": batch,
    "update_proj_gap": gap,
    "steps": steps,
    "compiles": compiles,
    "backend": jax.default_backend(),
    "device": device_name(),
    "cpu_count": os.cpu_count(),
    "jax": jax.__version__,
    "date": datetime.date.today().isoformat(),
  }
  return {"settings": settings, "rows": rows}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="+", default=["tiny", "60m"], choices=list(model.CONFIGS))
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq", type=int, default=None, help="default: the model's seq_len")
  parser.add_argument("--rank", type=int, default=None, help="default: the paper's per model")
  parser.add_argument("--update-proj-gap", type=int, default=200)
  parser.add_argument("--steps", type=int, default=5, help="timed steps per layout")
  parser.add_argument("--compiles", type=int, default=2, help="compilations per layout")
  parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
  args = parser.parse_args(argv)
  os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
  result = run(
    args.models,
    args.batch,
    args.seq,
    args.rank,
    args.update_proj_gap,
    args.steps,
    args.compiles,
  )
  markdown = to_markdown(result)
  print(markdown)
  args.out.mkdir(parents=True, exist_ok=True)
  stem = f"scan_compile_{result['settings']['backend']}"
  (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
  (args.out / f"{stem}.md").write_text(markdown)


if __name__ == "__main__":
  main()

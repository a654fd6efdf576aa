"""Speed of one jitted optimizer update on the LLaMA-60M parameter shapes (issue 2).

Times ``jax.jit(tx.update)`` for ``qgalore_jax.qgalore_adamw`` (a normal step and a refresh
step, separately), ``optax.adamw`` and ``optax.contrib.galore`` at the same rank, on the
parameter shapes of the paper's LLaMA-60M (hidden 512, ffn 1376, 8 layers, vocab 32000) in
Flax layout. Every optimizer projects the same leaves. Timings are medians of interleaved
repeats after warm-up, so the ratios compare runs that saw the same machine state.

A normal step is timed by calling the update again and again on a state whose count is 1
(no refresh is due); a refresh step on a state whose count is 0 (every projected matrix
runs its SVD).

  python -m benchmarks.update_speed                # all 2-D leaves projected
  python -m benchmarks.update_speed --only-blocks  # only q,k,v,o,gate,up,down (the paper's)
"""

import argparse
import datetime
import json
import pathlib
import platform
import statistics
import time

import jax
import optax
from optax.contrib import GaLoreDimensionNumbers

import qgalore_jax
from benchmarks.llama_shapes import CONFIGS
from benchmarks.llama_shapes import VOCAB
from benchmarks.llama_shapes import block_mask
from benchmarks.llama_shapes import is_shape
from benchmarks.llama_shapes import llama_param_shapes

LLAMA_60M = dict(zip(("hidden", "ffn", "layers"), CONFIGS["60M"], strict=True)) | {"vocab": VOCAB}
RESULTS = pathlib.Path(__file__).parent / "results"


def optimizers(mask, rank, gap):
  galore_dims = jax.tree.map(lambda m: GaLoreDimensionNumbers(0, 1) if m else None, mask)
  return {
    "optax.adamw": optax.adamw(1e-3),
    "optax.contrib.galore": optax.contrib.galore(
      1e-3, rank=rank, update_proj_gap=gap, weight_dimension_numbers=galore_dims
    ),
    "qgalore_adamw": qgalore_jax.qgalore_adamw(1e-3, rank=rank, update_proj_gap=gap, mask=mask),
    "qgalore_adamw (float proj)": qgalore_jax.qgalore_adamw(
      1e-3, rank=rank, update_proj_gap=gap, mask=mask, proj_bits=None
    ),
  }


def time_call(fn, *args):
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def run(only_blocks=False, rank=128, gap=200, repeats=15, warmup=2, refresh_repeats=3):
  shapes = llama_param_shapes(**LLAMA_60M)
  keys = iter(jax.random.split(jax.random.key(0), 1000))
  params = jax.tree.map(lambda s: jax.random.normal(next(keys), s) * 0.02, shapes, is_leaf=is_shape)
  grads = jax.tree.map(lambda p: jax.random.normal(next(keys), p.shape) * 1e-3, params)
  mask = block_mask(shapes, only_blocks)
  txs = optimizers(mask, rank, gap)

  cases = {}  # name -> (jitted update, state)
  for name, tx in txs.items():
    update = jax.jit(tx.update)
    state0 = tx.init(params)
    _, state1 = update(grads, state0, params)  # count 1: the next call is a normal step
    cases[name] = (update, state1)
    if "qgalore" in name or "galore" in name:
      cases[f"{name} [refresh]"] = (update, state0)

  samples = {name: [] for name in cases}
  for update, state in cases.values():
    for _ in range(warmup):
      time_call(update, grads, state, params)
  for i in range(repeats):
    for name, (update, state) in cases.items():
      if name.endswith("[refresh]") and i >= refresh_repeats:
        continue
      samples[name].append(time_call(update, grads, state, params))
  medians = {name: statistics.median(s) * 1e3 for name, s in samples.items()}

  n_projected = sum(jax.tree.leaves(mask))
  return {
    "benchmark": "jitted optimizer update, LLaMA-60M parameter shapes",
    "date": datetime.date.today().isoformat(),
    "device": f"{jax.devices()[0].device_kind} ({platform.processor() or platform.machine()})",
    "backend": jax.default_backend(),
    "versions": {"jax": jax.__version__, "optax": optax.__version__},
    "settings": {
      **LLAMA_60M,
      "rank": rank,
      "update_proj_gap": gap,
      "projected_matrices": n_projected,
      "only_blocks": only_blocks,
      "repeats": repeats,
      "warmup": warmup,
    },
    "median_ms": medians,
    "ratios": {
      "qgalore normal / optax.adamw": medians["qgalore_adamw"] / medians["optax.adamw"],
      "qgalore normal / optax galore normal": (
        medians["qgalore_adamw"] / medians["optax.contrib.galore"]
      ),
      "qgalore refresh / optax galore refresh": (
        medians["qgalore_adamw [refresh]"] / medians["optax.contrib.galore [refresh]"]
      ),
    },
  }


def to_markdown(result):
  base = result["median_ms"]["optax.adamw"]
  lines = [
    f"Jitted update, LLaMA-60M shapes, rank {result['settings']['rank']}, "
    f"{result['settings']['projected_matrices']} projected matrices"
    f" ({'q,k,v,o,gate,up,down only' if result['settings']['only_blocks'] else 'all 2-D'});"
    f" {result['backend']} ({result['device']}), jax {result['versions']['jax']},"
    f" optax {result['versions']['optax']}, {result['date']}.",
    "",
    "| optimizer | step | median ms | vs optax.adamw |",
    "|---|---|---:|---:|",
  ]
  for name, ms in result["median_ms"].items():
    kind = "refresh (SVD)" if name.endswith("[refresh]") else "normal"
    label = name.removesuffix(" [refresh]")
    lines.append(f"| {label} | {kind} | {ms:.1f} | {ms / base:.2f}x |")
  lines.append("")
  for name, ratio in result["ratios"].items():
    lines.append(f"- {name}: **{ratio:.2f}x**")
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only-blocks", action="store_true", help="project q,k,v,o,gate,up,down")
  parser.add_argument("--rank", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
  args = parser.parse_args(argv)
  result = run(only_blocks=args.only_blocks, rank=args.rank, repeats=args.repeats)
  markdown = to_markdown(result)
  print(markdown)
  args.out.mkdir(parents=True, exist_ok=True)
  stem = f"update_speed_{result['backend']}" + ("_blocks" if args.only_blocks else "")
  (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
  (args.out / f"{stem}.md").write_text(markdown)


if __name__ == "__main__":
  main()

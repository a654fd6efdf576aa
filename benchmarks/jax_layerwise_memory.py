"""Peak memory of layer-wise Q-GaLore in JAX against the ordinary step, up to LLaMA-7B.

Each row compiles one train step of the scanned LLaMA of ``examples/llama`` on abstract
inputs (``jax.ShapeDtypeStruct``: nothing of the model's size is allocated) and reads XLA's
compiled memory analysis: peak = argument + output - alias (donated) + temp, as in
``benchmarks/step_memory.py``. The settings are the paper's 7B run: bfloat16 weights and
compute (the projected matrices INT8, group 256), untied head, vocabulary 32000, Q-GaLore
rank 1024 for 7B (``RANKS``), INT4 projector, activation checkpointing per block. Rows:

- ``adamw-bf16``: ``optax.adamw`` on bfloat16 weights, moments in bfloat16, blocks
  rematerialised (``nnx.remat``): the full-rank baseline.
- ``qgalore``: ``qgalore_jax.int8_train_step`` with ``qgalore_adamw`` (float32 low-rank
  moments), blocks rematerialised: every gradient exists before the update.
- ``qgalore-layerwise``: ``qgalore_jax.layerwise_train_step``, the same optimizer.
- ``qgalore-layerwise-8bit``: the same with 8-bit moments (``moment_bits=8``), the paper's
  setting.

``--real`` also runs a real layer-wise step on this machine's CPU, in a subprocess, and
compares its measured peak with the analysis (the process's resident high-water mark over
the step, ``VmHWM`` after ``/proc/self/clear_refs``, above the resident size before the
arguments were allocated; Linux only).

  python -m benchmarks.jax_layerwise_memory --config 7B --batch 16 --seq 256 --json out.json
  python -m benchmarks.jax_layerwise_memory                 # every config, batch 1 and 16
  python -m benchmarks.jax_layerwise_memory --config 130M --batch 2 --seq 256 --real
"""

import argparse
import datetime
import functools
import json
import os
import pathlib
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import qgalore_jax
from benchmarks.llama_shapes import RANKS
from benchmarks.llama_shapes import nbytes
from benchmarks.step_memory import device_name
from benchmarks.tables import write_results
from examples.llama import model
from examples.llama import train

RESULTS = pathlib.Path(__file__).parent / "results"
GB = 1e9
VARIANTS = ("adamw-bf16", "qgalore", "qgalore-layerwise", "qgalore-layerwise-8bit")
CONFIGS = ("60M", "350M", "1B", "7B")
# The authors' measured peaks (GB), 7B pre-training on one GPU (their repository's README;
# docs/benchmarks.md cites them): batch 16 x 256 with activation checkpointing, and batch 1.
PAPER = {("7B", 16): 15.26, ("7B", 1): 15.08}
DTYPE = jnp.bfloat16


SCHEDULERS = ("memory", "concurrency")
SCHEDULER_NAMES = {"memory": "memory-minimising", "concurrency": "default (concurrency)"}
MEMORY_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def use_scheduler(scheduler: str) -> None:
  """Selects XLA CPU's scheduler for this process's compilations (before JAX starts its CPU
  backend: the flag is read then; compiler options of a single compile do not set it)."""
  flags = os.environ.get("XLA_FLAGS", "").replace(MEMORY_SCHEDULER_FLAG, "").strip()
  flags = f"{flags} {MEMORY_SCHEDULER_FLAG}".strip() if scheduler == "memory" else flags
  if flags != os.environ.get("XLA_FLAGS", ""):
    if jax._src.xla_bridge.backends_are_initialized():
      raise RuntimeError(
        f"XLA reads its CPU scheduler from XLA_FLAGS when JAX starts its backends, which this"
        f" process has done: run the benchmark in a fresh process, or set XLA_FLAGS={flags!r}"
      )
    os.environ["XLA_FLAGS"] = flags


def _abstract(cfg_name: str, variant: str, rank: int, micro_batches: int = 1):
  """``(step_fn, qparams, opt_state)``: the jitted step and abstract arguments."""
  cfg = model.CONFIGS[cfg_name.lower()]

  def build():
    return model.init_params(cfg, seed=0, scan=True, remat=True)[1]

  graphdef = nnx.graphdef(
    nnx.eval_shape(lambda: model.Llama(cfg, nnx.Rngs(0), scan=True, remat=True, dtype=DTYPE))
  )
  to_bf16 = lambda x: jax.ShapeDtypeStruct(x.shape, DTYPE) if x.dtype == jnp.float32 else x
  params = jax.tree.map(to_bf16, jax.eval_shape(build))
  loss = functools.partial(train.loss_fn, graphdef)
  if variant == "adamw-bf16":
    tx = optax.adamw(1e-3, b2=0.95, weight_decay=0.0, mu_dtype=DTYPE)

    def step_fn(params, opt_state, batch, step):
      del step
      value, grads = jax.value_and_grad(loss)(params, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, value

    return jax.jit(step_fn, donate_argnums=(0, 1)), params, jax.eval_shape(tx.init, params)
  llama = nnx.eval_shape(lambda: model.Llama(cfg, nnx.Rngs(0), scan=True))
  dims = model.dimension_numbers(llama)
  tx = qgalore_jax.qgalore_adamw(
    1e-3,
    b2=0.95,
    rank=rank,
    update_proj_gap=200,
    scale=0.25,
    dimension_numbers=dims,
    moment_bits=8 if variant.endswith("8bit") else None,
  )
  qparams = jax.eval_shape(lambda p: qgalore_jax.quantize_params(p, dimension_numbers=dims), params)
  opt_state = jax.eval_shape(lambda q: tx.init(qgalore_jax.dequantize_params(q, DTYPE)), qparams)
  if variant == "qgalore":
    return qgalore_jax.int8_train_step(loss, tx, dtype=DTYPE), qparams, opt_state
  step = qgalore_jax.layerwise_train_step(
    *model.layerwise_fns(cfg, DTYPE), tx, dtype=DTYPE, micro_batches=micro_batches
  )
  return step, qparams, opt_state


def _breakdown(cfg_name: str, batch: int, seq: int, qparams) -> dict:
  """Bytes of the layer-wise step's main buffers, from the shapes."""
  cfg = model.CONFIGS[cfg_name.lower()]
  item = jnp.dtype(DTYPE).itemsize
  float_view = jax.eval_shape(lambda q: qgalore_jax.dequantize_params(q, DTYPE), qparams)
  block_grad = nbytes(float_view["layers"]) // cfg.num_layers
  return {
    "block_inputs": cfg.num_layers * batch * seq * cfg.d_model * item,
    "one_block_gradient": block_grad,
    "logits_float32": batch * seq * cfg.vocab_size * 4,
    "outer_gradients": nbytes({k: v for k, v in float_view.items() if k != "layers"}),
  }


def measure(cfg_name: str, variant: str, batch: int, seq: int, micro_batches: int = 1) -> dict:
  """Compiles one step on abstract inputs; its memory analysis in bytes."""
  rank = RANKS.get(cfg_name.upper(), 128)
  start = time.perf_counter()
  micro_batches = micro_batches if "layerwise" in variant else 1
  step_fn, qparams, opt_state = _abstract(cfg_name, variant, rank, micro_batches)
  tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  count = jax.ShapeDtypeStruct((), jnp.int32)
  compiled = step_fn.lower(qparams, opt_state, (tokens, tokens), count).compile()
  stats = compiled.memory_analysis()
  argument, output = stats.argument_size_in_bytes, stats.output_size_in_bytes
  alias, temp = stats.alias_size_in_bytes, stats.temp_size_in_bytes
  row = {
    "config": cfg_name.upper(),
    "variant": variant,
    "batch": batch,
    "seq": seq,
    "micro_batches": micro_batches,
    "rank": None if variant == "adamw-bf16" else rank,
    "weights": nbytes(qparams),
    "opt_state": nbytes(opt_state),
    "argument": argument,
    "output": output,
    "alias": alias,
    "temp": temp,
    "peak_bytes": argument + output - alias + temp,
    "paper_gb": PAPER.get((cfg_name.upper(), batch)) if variant.endswith("8bit") else None,
    "build_s": round(time.perf_counter() - start, 1),
  }
  if "layerwise" in variant:
    row["breakdown"] = _breakdown(cfg_name, batch, seq, qparams)
  return row


def _step_name(row: dict) -> str:
  parts = row.get("micro_batches", 1)
  return row["variant"] + (f", {parts} micro-batches" if parts > 1 else "")


def to_markdown(rows: list[dict], settings: dict, real: list[dict] = ()) -> str:
  lines = [
    f"One train step of the scanned LLaMA (`examples/llama`), XLA compiled memory analysis,"
    f" GB (1e9 bytes); bfloat16 weights and compute, INT8 projected weights, blocks"
    f" rematerialised; XLA CPU's {SCHEDULER_NAMES[settings['scheduler']]} scheduler;"
    f" {settings['backend']} ({settings['device']}), jax {settings['jax']}, {settings['date']}.",
    "",
    "| config | batch x seq | step | rank | weights | opt state | temp | peak | paper |",
    "|---|---|---|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    paper = f"{r['paper_gb']:.2f}" if r.get("paper_gb") else ""
    lines.append(
      f"| {r['config']} | {r['batch']} x {r['seq']} | {_step_name(r)} | {r['rank'] or ''}"
      f" | {r['weights'] / GB:.2f} | {r['opt_state'] / GB:.2f} | {r['temp'] / GB:.2f}"
      f" | **{r['peak_bytes'] / GB:.2f}** | {paper} |"
    )
  if real:
    lines += [
      "",
      "A real step on this CPU against the analysis (resident high-water mark over two steps,"
      " above the resident size before the arguments were allocated):",
      "",
      "| config | batch x seq | step | measured | analysis | measured / analysis |",
      "|---|---|---|---:|---:|---:|",
    ]
    for r in real:
      lines.append(
        f"| {r['config']} | {r['batch']} x {r['seq']} | {r['variant']}"
        f" | {r['measured'] / GB:.3f} GB | {r['analysis'] / GB:.3f} GB"
        f" | {r['measured'] / r['analysis']:.2f} |"
      )
  return "\n".join(lines) + "\n"


def _vm(field: str) -> int:
  text = pathlib.Path("/proc/self/status").read_text()
  return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) * 1024


REAL_SCRIPT = """
import json, pathlib, sys
import jax, jax.numpy as jnp, numpy as np
from benchmarks import jax_layerwise_memory as b
cfg_name, variant, batch, seq = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
step_fn, qparams, opt_state = b._abstract(cfg_name, variant, b.RANKS.get(cfg_name.upper(), 128))
tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
count = jax.ShapeDtypeStruct((), jnp.int32)
compiled = step_fn.lower(qparams, opt_state, (tokens, tokens), count).compile()
stats = compiled.memory_analysis()
base = b._vm("VmRSS")
pathlib.Path("/proc/self/clear_refs").write_text("5")
zeros = lambda s: jnp.zeros(s.shape, s.dtype)
qparams, opt_state = jax.tree.map(zeros, (qparams, opt_state))
batch_ = (jnp.zeros((batch, seq), jnp.int32),) * 2
for t in range(2):
  qparams, opt_state, loss = compiled(qparams, opt_state, batch_, jnp.int32(t))
  float(loss)
print(json.dumps({"measured": b._vm("VmHWM") - base,
                  "analysis": stats.argument_size_in_bytes + stats.output_size_in_bytes
                  - stats.alias_size_in_bytes + stats.temp_size_in_bytes}))
"""


def measure_real(cfg_name: str, variant: str, batch: int, seq: int) -> dict:
  """A real step's peak resident memory on this CPU against the analysis (a subprocess)."""
  env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", JAX_PLATFORMS="cpu")
  root = pathlib.Path(__file__).resolve().parents[1]
  env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
  out = subprocess.run(
    [sys.executable, "-c", REAL_SCRIPT, cfg_name, variant, str(batch), str(seq)],
    env=env,
    capture_output=True,
    text=True,
    check=True,
  )
  got = json.loads(out.stdout.strip().splitlines()[-1])
  return {"config": cfg_name.upper(), "variant": variant, "batch": batch, "seq": seq, **got}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", nargs="+", default=list(CONFIGS), type=str.upper)
  parser.add_argument("--batch", nargs="+", type=int, default=[1, 16])
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument(
    "--micro-batches",
    nargs="+",
    type=int,
    default=[1],
    help="micro-batches of the layer-wise rows (each value a row)",
  )
  parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
  parser.add_argument(
    "--scheduler",
    choices=SCHEDULERS,
    default="memory",
    help="XLA CPU's instruction scheduler: the memory-minimising one (the default here) or"
    " XLA's default, which orders for concurrency and keeps more buffers alive at once",
  )
  parser.add_argument("--json", help="write the rows here (default: benchmarks/results/)")
  parser.add_argument("--real", action="store_true", help="also run a real step on this CPU")
  args = parser.parse_args(argv)
  for name in args.config:
    if name.lower() not in model.CONFIGS:
      parser.error(f"unknown config {name}; choose from {', '.join(CONFIGS)}")
  use_scheduler(args.scheduler)
  rows, real = [], []
  for name in args.config:
    for batch in args.batch:
      for variant in args.variants:
        splits = args.micro_batches if "layerwise" in variant else [1]
        for micro_batches in splits:
          if batch % micro_batches:
            print(f"{name} batch {batch}: {micro_batches} micro-batches do not divide it; skipped")
            continue
          row = measure(name, variant, batch, args.seq, micro_batches)
          print(
            f"{name} batch {batch} x {args.seq} {_step_name(row)}: peak"
            f" {row['peak_bytes'] / GB:.2f} GB (built in {row['build_s']} s)",
            flush=True,
          )
          rows.append(row)
        if args.real and "layerwise" in variant:
          real.append(measure_real(name, variant, batch, args.seq))
          print(f"  real step on this CPU: {real[-1]}", flush=True)
  settings = {
    "seq": args.seq,
    "scheduler": args.scheduler,
    "backend": jax.default_backend(),
    "device": device_name(),
    "jax": jax.__version__,
    "date": datetime.date.today().isoformat(),
  }
  result = {"settings": settings, "rows": rows, "real": real}
  # The headline at the top level: the layer-wise peak in the paper's setting (8-bit
  # moments) of the first config and batch, or the first row's when that was not run.
  headline = [r for r in rows if r["variant"] == "qgalore-layerwise-8bit"] or rows
  result["peak_bytes"] = headline[0]["peak_bytes"]
  path = pathlib.Path(args.json) if args.json else RESULTS / "jax_layerwise_memory.json"
  write_results(path, result, to_markdown(rows, settings, real))


if __name__ == "__main__":
  main()

"""Peak memory of one jitted LLaMA train step, from XLA's compiled memory analysis.

The train step is the main example's (``examples/llama/train.py``): ``make_train_step`` on
the Flax NNX LLaMA of ``examples/llama/model.py``, with the parameters and the optimizer state
donated, and for ``qgalore`` the projected matrices held as INT8 codes and updated through
``qgalore_jax.int8_train_step``. The state comes from the example's own ``init_state`` under
``jax.eval_shape`` and the step is lowered on ``jax.ShapeDtypeStruct`` inputs, so nothing of
the model's size is allocated: only compiled. ``compiled.memory_analysis()`` gives XLA's
buffer assignment for the step: argument bytes (params, optimizer state, batch), output bytes,
alias bytes (outputs written into donated argument buffers) and temp bytes (everything else
live inside the step: activations, logits, gradients, the dequantised weights, the SVD
branch's work space); the step's peak is argument + output - alias + temp. One program
holds both branches of each matrix's refresh ``lax.cond``, so the peak covers a refresh (SVD)
step too. A "forward + backward only" row (the loss and its gradient, no optimizer) shows how
much of the peak the model itself takes.

  python -m benchmarks.step_memory                          # 60m and 130m, batch 8, seq 256
  python -m benchmarks.step_memory --models 60m --batch 16 --seq 128
  python -m benchmarks.step_memory --variants adamw galore qgalore-int8
"""

import argparse
import dataclasses
import datetime
import functools
import json
import os
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import optax

import qgalore_jax
from benchmarks.llama_shapes import RANKS
from benchmarks.llama_shapes import nbytes
from examples.llama import model
from examples.llama import train

RESULTS = pathlib.Path(__file__).parent / "results"
MB = 1e6
# name: (description, the example's optimizer name, INT8 weights). "grad-only" is the loss and
# its gradient alone, no optimizer: the part of the peak that the model itself takes.
VARIANTS = {
  "grad-only": ("forward + backward only", None, False),
  "adamw": ("optax.adamw", "adamw", False),
  "galore": ("optax.contrib.galore", "galore", False),
  "qgalore-int8": ("qgalore_adamw, INT8 weights", "qgalore", True),
  "qgalore-float": ("qgalore_adamw, float32 weights", "qgalore", False),
  "qgalore-noquant": ("qgalore_adamw, no quantisation", "qgalore-noquant", False),
}
DEFAULT_VARIANTS = ("grad-only", "adamw", "qgalore-int8", "qgalore-float")


def abstract_state(cfg: train.RunConfig, int8_weights: bool):
  """``(graphdef, params, opt_state, tx)`` of ``train.init_state``, shapes and dtypes only.

  ``int8_weights`` False with the ``qgalore`` optimizer gives its float view (the params
  ``init_state`` quantises, dequantised).
  """
  built = {}

  def init():
    graphdef, params, opt_state, tx, quantised = train.init_state(cfg)
    built.update(graphdef=graphdef, tx=tx, quantised=quantised)
    return params, opt_state

  params, opt_state = jax.eval_shape(init)
  if built["quantised"] and not int8_weights:
    params = jax.eval_shape(qgalore_jax.dequantize_params, params)
  elif int8_weights and not built["quantised"]:
    raise ValueError(f"optimizer {cfg.optimizer!r} has no INT8 weights")
  return built["graphdef"], params, opt_state, built["tx"]


def compile_step(cfg: train.RunConfig, optimizer: str | None, int8_weights: bool, seq: int):
  """``(compiled step, params, opt_state)`` of the example's train step, on abstract inputs.

  ``optimizer`` None: the loss and its gradient only (``opt_state`` is None).
  """
  cfg = dataclasses.replace(cfg, optimizer=optimizer or "adamw")
  graphdef, params, opt_state, tx = abstract_state(cfg, int8_weights)
  tokens = jax.ShapeDtypeStruct((cfg.batch_size, seq), jnp.int32)
  if optimizer is None:
    loss = functools.partial(train.loss_fn, graphdef)
    lowered = jax.jit(jax.value_and_grad(loss)).lower(params, (tokens, tokens))
    return lowered.compile(), params, None
  step_fn = train.make_train_step(graphdef, tx, int8_weights, cfg.seed)
  step = jax.ShapeDtypeStruct((), jnp.int32)
  return step_fn.lower(params, opt_state, (tokens, tokens), step).compile(), params, opt_state


def measure(
  model_name: str,
  variant: str,
  batch: int,
  seq: int,
  rank: int,
  gap: int,
  scan: bool = True,
  remat: bool = False,
) -> dict:
  """Compiles one train step on abstract inputs; returns its memory analysis in bytes.

  ``scan``: the example's blocks under ``nnx.scan`` (its default) or unscanned; optax's
  GaLore always runs unscanned (``optimizers.UNSCANNED``). ``remat``: each block's
  activations recomputed in the backward pass (the example's ``--remat``).
  """
  description, optimizer, int8_weights = VARIANTS[variant]
  cfg = dataclasses.replace(
    train.RunConfig(),
    model=model_name,
    batch_size=batch,
    rank=rank,
    update_proj_gap=gap,
    scan=scan,
    remat=remat,
    optimizer=optimizer or "adamw",
  )
  start = time.perf_counter()
  compiled, params, opt_state = compile_step(cfg, optimizer, int8_weights, seq)
  seconds = time.perf_counter() - start
  stats = compiled.memory_analysis()
  argument, output = stats.argument_size_in_bytes, stats.output_size_in_bytes
  alias, temp = stats.alias_size_in_bytes, stats.temp_size_in_bytes
  state = nbytes(params) + nbytes(opt_state)
  return {
    "model": model_name,
    "blocks": "scanned" if cfg.scanned else "unscanned",
    "remat": remat,
    "variant": variant,
    "optimizer": description,
    "int8_weights": int8_weights,
    "batch": batch,
    "seq": seq,
    "rank": rank if optimizer not in (None, "adamw") else None,
    "weights": nbytes(params),
    "opt_state": nbytes(opt_state),
    "argument": argument,
    "output": output,
    "alias": alias,
    "temp": temp,
    # Every buffer of the step: donated outputs reuse their arguments' buffers.
    "peak": argument + output - alias + temp,
    "xla_peak_field": getattr(stats, "peak_memory_in_bytes", None),
    "donated_fraction": alias / state,
    "build_s": round(seconds, 1),
  }


def to_markdown(rows: list[dict], settings: dict) -> str:
  lines = [
    f"One jitted train step of the LLaMA example (`examples/llama`), XLA memory analysis,"
    f" MB (1e6 bytes); batch {settings['batch']} x sequence {settings['seq']}, float32"
    f" compute; {settings['backend']} ({settings['device']}), jax {settings['jax']},"
    f" {settings['date']}.",
    "",
    "| model | blocks | optimizer | rank | weights | opt state | argument | output"
    " | alias (donated) | temp | peak | peak vs adamw | XLA peak field |",
    "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  key = lambda r: (r["model"], r["blocks"])
  adamw = {key(r): r["peak"] for r in rows if r["variant"] == "adamw"}
  for r in rows:
    ratio = f"{r['peak'] / adamw[key(r)]:.2f}x" if key(r) in adamw else ""
    field = f"{r['xla_peak_field'] / MB:.1f}" if r["xla_peak_field"] is not None else ""
    donated = f"{r['alias'] / MB:.1f} ({100 * r['donated_fraction']:.0f}%)"
    lines.append(
      f"| {r['model']} | {r['blocks']} | {r['optimizer']} | {r['rank'] or ''}"
      f" | {r['weights'] / MB:.1f}"
      f" | {r['opt_state'] / MB:.1f} | {r['argument'] / MB:.1f} | {r['output'] / MB:.1f}"
      f" | {donated} | {r['temp'] / MB:.1f} | **{r['peak'] / MB:.1f}** | {ratio} | {field} |"
    )
  return "\n".join(lines) + "\n" + NOTES


NOTES = """
- argument: params + optimizer state + batch; alias: the part of the outputs written into
  donated argument buffers (the percentage is of params + optimizer state: 100% means both
  are updated in place, no second copy); temp: XLA's temp allocation, every other buffer of
  the step, with buffers whose lifetimes do not overlap sharing memory. peak = argument +
  output - alias + temp: all the memory the compiled step uses. These are XLA's figures for
  the compiled program on this backend, not a measured process peak.
- XLA peak field: `memory_analysis().peak_memory_in_bytes` as reported. On the CPU build
  measured it came out within 1 kB of argument + output - alias in every row, leaving out the
  temp allocation, so it is shown, not used.
- temp holds the activations kept for the backward pass, the float32 logits (batch x sequence
  x vocabulary) and their gradient, the float32 gradients of all parameters, with INT8
  weights the dequantised float32 weights, and Q-GaLore's refresh branch (the SVD's work
  space). "forward + backward only" is `jax.value_and_grad` of the example's loss on the
  float32 parameters, no optimizer: its output is the gradients, its temp the model's own
  work space, the floor under every optimizer's peak at this batch.
- blocks: the example's decoder blocks under `nnx.scan` (its default) or unscanned
  (`--no-scan`). The model alone needs less scanned (the forward + backward rows); every
  optimizer needs more, Q-GaLore most. The likely cause: unscanned, XLA may schedule each
  matrix's update as soon as its gradient exists, inside the backward pass, and free the
  gradient early; scanned, the backward pass is one loop that returns every layer's
  gradient at once, and the optimizer then works on whole stacks, with a stack-sized buffer
  for each of its stages. Layer-wise updates inside the backward loop remove this
  (`qgalore_jax.layerwise_train_step`, `benchmarks/jax_layerwise_memory.py`).
"""


def device_name() -> str:
  device = jax.devices()[0]
  kind = getattr(device, "device_kind", "")
  return f"{kind} ({platform.machine()})" if device.platform == "cpu" else kind


def run(
  models, variants, batch: int, seq: int, rank: int | None, gap: int, layouts=("scanned",)
) -> dict:
  """Measures every (model, layout, variant); returns the rows and the settings."""
  rows = []
  for name in models:
    model_rank = rank or RANKS.get(name.upper(), 128)
    for layout in layouts:
      for variant in variants:
        row = measure(name, variant, batch, seq, model_rank, gap, scan=layout == "scanned")
        print(
          f"{name} {row['blocks']} {variant}: peak {row['peak'] / MB:.1f} MB,"
          f" built in {row['build_s']} s",
          flush=True,
        )
        rows.append(row)
  settings = {
    "batch": batch,
    "seq": seq,
    "update_proj_gap": gap,
    "backend": jax.default_backend(),
    "device": device_name(),
    "jax": jax.__version__,
    "optax": optax.__version__,
    "date": datetime.date.today().isoformat(),
  }
  return {"settings": settings, "rows": rows}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="+", default=["60m", "130m"], choices=list(model.CONFIGS))
  parser.add_argument(
    "--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS)
  )
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--rank", type=int, default=None, help="default: the paper's per model")
  parser.add_argument("--update-proj-gap", type=int, default=200)
  parser.add_argument(
    "--layouts",
    nargs="+",
    default=["scanned", "unscanned"],
    choices=["scanned", "unscanned"],
    help="the example's blocks under nnx.scan (its default) and/or unscanned (--no-scan)",
  )
  parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
  args = parser.parse_args(argv)
  os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
  result = run(
    args.models,
    args.variants,
    args.batch,
    args.seq,
    args.rank,
    args.update_proj_gap,
    args.layouts,
  )
  markdown = to_markdown(result["rows"], result["settings"])
  print(markdown)
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "step_memory.json").write_text(json.dumps(result, indent=2) + "\n")
  (args.out / "step_memory.md").write_text(markdown)


if __name__ == "__main__":
  main()

"""Step time of layer-wise Q-GaLore in JAX against the ordinary step (CPU or GPU).

Three jitted train steps of the scanned LLaMA of ``examples/llama`` with the example's
``qgalore`` optimizer (INT8 weights, INT4 projector; float32 compute, the example's
default), from the same weights and on the same batch:

- ``ordinary``: ``qgalore_jax.int8_train_step``, the blocks' activations kept for the
  backward pass (the example's default);
- ``ordinary-remat``: the same with each block rematerialised (``nnx.remat``, the
  example's ``--remat``): one more forward pass;
- ``layerwise``: ``qgalore_jax.layerwise_train_step`` (the example's ``--layerwise``).

Each step runs once to compile and to do its first refresh (every matrix's SVD on step 0),
then the three are timed in interleaved rounds (normal steps, no refresh: the gap is 200);
the table gives the median time per step and its ratio to ``ordinary``.

  python -m benchmarks.jax_layerwise_speed                      # 60M and 130M, batch 4 x 256
  python -m benchmarks.jax_layerwise_speed --config 60M --batch 8 --rounds 5
"""

import argparse
import datetime
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import qgalore_jax
from benchmarks.llama_shapes import RANKS
from benchmarks.step_memory import device_name
from benchmarks.tables import write_results
from examples.llama import model
from examples.llama import optimizers
from examples.llama import train

RESULTS = pathlib.Path(__file__).parent / "results"
STEPS = ("ordinary", "ordinary-remat", "layerwise")


def _steps(cfg_name: str):
  """``{name: (step, qparams, opt_state)}``, each from the same float weights."""
  cfg = model.CONFIGS[cfg_name.lower()]
  llama = nnx.eval_shape(lambda: model.Llama(cfg, nnx.Rngs(0), scan=True))
  dims = model.dimension_numbers(llama)
  low_rank = optimizers.LowRank(RANKS.get(cfg_name.upper(), 128), 200)
  tx, _ = optimizers.build("qgalore", 1e-3, low_rank, llama, guard=False)
  ids = model.tensor_ids(cfg, scan=True)
  out = {}
  for name in STEPS:
    graphdef, params = model.init_params(cfg, seed=0, scan=True, remat=name == "ordinary-remat")
    qparams = qgalore_jax.quantize_params(params, dimension_numbers=dims)
    opt_state = tx.init(params)
    if name == "layerwise":
      step = qgalore_jax.layerwise_train_step(*model.layerwise_fns(cfg), tx, tensor_ids=ids)
    else:
      step = train.make_train_step(graphdef, tx, True, 0, ids)
    out[name] = (step, qparams, opt_state)
  return out


def measure(cfg_name: str, batch: int, seq: int, rounds: int) -> dict:
  """Median seconds per normal step of each step function, timed in interleaved rounds."""
  cfg = model.CONFIGS[cfg_name.lower()]
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq + 1))
  data = (jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:]))
  state = _steps(cfg_name)
  times = {name: [] for name in STEPS}
  count = 0
  for r in range(rounds + 1):
    for name in STEPS:
      step, qparams, opt_state = state[name]
      start = time.perf_counter()
      qparams, opt_state, loss = step(qparams, opt_state, data, jnp.int32(count))
      jax.block_until_ready((qparams, opt_state, loss))
      if r:  # round 0 compiles and refreshes
        times[name].append(time.perf_counter() - start)
      state[name] = (step, qparams, opt_state)
    count += 1
    print(
      f"{cfg_name} round {r}: " + ", ".join(f"{n} {v[-1]:.2f} s" for n, v in times.items() if v),
      flush=True,
    )
  median = {name: statistics.median(v) for name, v in times.items()}
  return {
    "config": cfg_name.upper(),
    "batch": batch,
    "seq": seq,
    "rounds": rounds,
    "seconds": median,
    "ratio_to_ordinary": {name: median[name] / median["ordinary"] for name in STEPS},
  }


def to_markdown(rows: list[dict], settings: dict) -> str:
  lines = [
    f"Median seconds per normal step (interleaved rounds) of the scanned LLaMA with"
    f" Q-GaLore (INT8 weights), float32; {settings['backend']} ({settings['device']}),"
    f" jax {settings['jax']}, {settings['date']}.",
    "",
    "| config | batch x seq | ordinary | ordinary, remat | layer-wise | layer-wise / ordinary"
    " | layer-wise / ordinary, remat |",
    "|---|---|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    s, ratio = r["seconds"], r["ratio_to_ordinary"]
    lines.append(
      f"| {r['config']} | {r['batch']} x {r['seq']} | {s['ordinary']:.3f} s"
      f" | {s['ordinary-remat']:.3f} s | {s['layerwise']:.3f} s"
      f" | **{ratio['layerwise']:.2f}x** | {s['layerwise'] / s['ordinary-remat']:.2f}x |"
    )
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", nargs="+", default=["60M", "130M"], type=str.upper)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--json", help="write the rows here (default: benchmarks/results/)")
  args = parser.parse_args(argv)
  rows = [measure(name, args.batch, args.seq, args.rounds) for name in args.config]
  settings = {
    "backend": jax.default_backend(),
    "device": device_name(),
    "jax": jax.__version__,
    "date": datetime.date.today().isoformat(),
  }
  path = pathlib.Path(args.json) if args.json else RESULTS / "jax_layerwise_speed.json"
  write_results(path, {"settings": settings, "rows": rows}, to_markdown(rows, settings))


if __name__ == "__main__":
  main()

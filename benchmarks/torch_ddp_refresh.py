"""Refresh step of ``QGaLoreAdamW`` on 2 processes: ``refresh_mode="owner"`` vs ``"redundant"``.

Under DDP every process holds the same all-reduced gradient, so by default
(``"redundant"``) every process computes every refresh SVD. With ``refresh_mode="owner"``
the SVDs due on a step are dealt out to the processes (largest first, each to the least
loaded one), each computed once and its stored INT4 projector and schedule broadcast.

The script spawns 2 processes (gloo on the CPU, or NCCL on 2 GPUs with ``--device cuda``),
each holding the projected matrices of the paper's LLaMA-60M (or -130M): the seven block
matrices q,k,v,o,gate,up,down of every layer, in torch layout (out, in), rank 128 (256),
and the same fixed random gradients on both processes, as after DDP's all-reduce. No model
and no DDP wrapper: only the optimizer's step is timed. For each mode it times

* a refresh step: every matrix's step counter is reset to 0 (outside the timer), so every
  matrix refreshes;
* a normal step (no refresh), the part of a refresh step that is not the refresh;

as the slower process's wall time (a step ends for the job when its last process ends),
median of interleaved repeats after one warm-up each. It checks that the two modes end
with bit-identical weights on both processes and counts the SVDs each process ran. One
torch thread per process by default (2 processes on 2 cores).

Results go to ``benchmarks/results/torch_ddp_refresh_<device>_<config>.json`` and ``.md``.

  python -m benchmarks.torch_ddp_refresh                 # 60M, 2 processes, CPU
  python -m benchmarks.torch_ddp_refresh --config 130M
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import tempfile

import torch
import torch.distributed as dist

from benchmarks.llama_shapes import CONFIGS
from benchmarks.llama_shapes import RANKS
from benchmarks.llama_shapes import SPEED_CONFIGS
from benchmarks.torch_step_speed import is_projected
from benchmarks.torch_step_speed import reset_step_counters
from benchmarks.torch_step_speed import source_version
from benchmarks.torch_step_speed import time_step
from benchmarks.torch_step_speed import torch_param_shapes
from qgalore_torch import QGaLoreAdamW
from qgalore_torch import compute_projector

RESULTS = pathlib.Path(__file__).parent / "results"
MODES = ("redundant", "owner")
WORLD = 2


def matrix_shapes(config):
  """The projected (out, in) shapes of a LLaMA config, in parameter order."""
  hidden, ffn, layers = CONFIGS[config]
  shapes = torch_param_shapes(hidden, ffn, layers)
  return [s for n, s in shapes.items() if is_projected(n, s, all_2d=False)]


def _optimizers(shapes, rank, device):
  """One optimizer per mode, each with its own copy of the same matrices and gradients."""
  gen = torch.Generator().manual_seed(0)
  init = [0.02 * torch.randn(s, generator=gen) for s in shapes]
  grads = [torch.randn(s, generator=gen) for s in shapes]
  opts = {}
  for mode in MODES:
    params = [torch.nn.Parameter(w.to(device)) for w in init]
    for p, g in zip(params, grads, strict=True):
      p.grad = g.to(device)
    svds = []

    def counting_svd(grad_MxN, r, svds=svds):
      svds.append(1)
      return compute_projector(grad_MxN, r)

    opt = QGaLoreAdamW(
      [{"params": params, "rank": rank}],
      lr=1e-3,
      update_proj_gap=10**6,  # no refresh but step 0's, unless the counters are reset
      refresh_mode=mode,
      projector_fn=counting_svd,
    )
    opts[mode] = (opt, params, svds)
  return opts


def _timed(opt, device, reset):
  """The slower process's wall time of one ``opt.step()``, in seconds."""
  if reset:
    reset_step_counters(opt)
  dist.barrier()
  elapsed = torch.tensor([time_step(opt, device)], dtype=torch.float64, device=device)
  dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
  return float(elapsed)


def _worker(rank, init_file, config, repeats, threads, device_type, out):
  backend = "nccl" if device_type == "cuda" else "gloo"
  dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
  try:
    torch.set_num_threads(threads)
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    opts = _optimizers(matrix_shapes(config), RANKS[config], device)
    times = {(mode, kind): [] for mode in MODES for kind in ("refresh", "normal")}
    for opt, _, _ in opts.values():  # warm-up: the first step creates the state and refreshes
      _timed(opt, device, reset=False)
    svds_before = {mode: len(svds) for mode, (_, _, svds) in opts.items()}
    for i in range(repeats):
      order = MODES if i % 2 == 0 else MODES[::-1]
      for mode in order:
        for kind in ("refresh", "normal"):
          times[mode, kind].append(_timed(opts[mode][0], device, reset=kind == "refresh"))
    svds = {mode: (len(s) - svds_before[mode]) // repeats for mode, (_, _, s) in opts.items()}
    same = all(
      torch.equal(a, b) for a, b in zip(opts["owner"][1], opts["redundant"][1], strict=True)
    )
    result = {"times": times, "svds_per_refresh": svds, "owner_equals_redundant": same}
    torch.save(result, pathlib.Path(out, f"rank{rank}.pt"))
  finally:
    dist.destroy_process_group()


def run(config="60M", repeats=5, threads=1, device="cpu"):
  """Spawns the 2 processes and gathers their measurements."""
  load_before = os.getloadavg()[0]
  with tempfile.TemporaryDirectory() as out:
    args = (os.path.join(out, "init"), config, repeats, threads, device, out)
    torch.multiprocessing.spawn(_worker, args=args, nprocs=WORLD)
    ranks = [torch.load(pathlib.Path(out, f"rank{r}.pt")) for r in range(WORLD)]
  ms = lambda mode, kind: statistics.median(ranks[0]["times"][mode, kind]) * 1e3
  rows = {
    mode: {
      "refresh_step_ms": ms(mode, "refresh"),
      "normal_step_ms": ms(mode, "normal"),
      "refresh_ms": ms(mode, "refresh") - ms(mode, "normal"),
      "svds_per_refresh_per_process": [r["svds_per_refresh"][mode] for r in ranks],
      "refresh_step_samples_ms": [t * 1e3 for t in ranks[0]["times"][mode, "refresh"]],
    }
    for mode in MODES
  }
  if not all(r["owner_equals_redundant"] for r in ranks):
    raise AssertionError("owner and redundant refreshes gave different weights")
  shapes = matrix_shapes(config)
  return {
    "config": config,
    "rank": RANKS[config],
    "matrices": len(shapes),
    "processes": WORLD,
    "threads_per_process": threads,
    "backend": device,
    "repeats": repeats,
    "modes": rows,
    "owner_equals_redundant_bit_for_bit": True,
    "speedup_of_refresh_step": rows["redundant"]["refresh_step_ms"]
    / rows["owner"]["refresh_step_ms"],
    "torch": torch.__version__,
    "machine": platform.machine(),
    "processor": platform.processor(),
    "cpus": os.cpu_count(),
    "load_average_1min": [load_before, os.getloadavg()[0]],  # before and after: a shared CPU
    "date": datetime.date.today().isoformat(),
    **source_version(),
  }


def to_markdown(result):
  rows, load = result["modes"], result.get("load_average_1min", (float("nan"),) * 2)
  lines = [
    f"LLaMA-{result['config']}: {result['matrices']} projected matrices, rank {result['rank']},"
    f" {result['processes']} processes ({result['backend']}, {result['threads_per_process']}"
    f" torch thread each), median of {result['repeats']} repeats, slower process's wall time."
    f" {result['cpus']} CPUs; 1-minute load average {load[0]:.1f} before, {load[1]:.1f} after.",
    "",
    "| refresh_mode | refresh step (ms) | normal step (ms) | refresh alone (ms)"
    " | SVDs per process |",
    "|---|---|---|---|---|",
  ]
  for mode, row in rows.items():
    svds = " / ".join(str(n) for n in row["svds_per_refresh_per_process"])
    lines.append(
      f"| {mode} | {row['refresh_step_ms']:.0f} | {row['normal_step_ms']:.0f} |"
      f" {row['refresh_ms']:.0f} | {svds} |"
    )
  lines += [
    "",
    f"Refresh step, redundant / owner: {result['speedup_of_refresh_step']:.2f}x. The two"
    " modes' weights are bit-identical on both processes (checked).",
    "",
  ]
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", choices=SPEED_CONFIGS, default="60M", help="LLaMA shapes")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
  parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
  parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
  args = parser.parse_args(argv)
  result = run(args.config, args.repeats, args.threads, args.device)
  markdown = to_markdown(result)
  print(markdown)
  args.out.mkdir(parents=True, exist_ok=True)
  stem = f"torch_ddp_refresh_{args.device}_{args.config}"
  (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
  (args.out / f"{stem}.md").write_text(markdown)


if __name__ == "__main__":
  main()

"""Runs every benchmark at its default settings, then writes ``docs/benchmarks.md``.

  python -m benchmarks                     # everything (about 90 minutes on 2 CPU cores)
  python -m benchmarks --only memory svd_study
  python -m benchmarks --docs-only         # rebuild docs/benchmarks.md from results/

Each benchmark is also a module of its own (``python -m benchmarks.<name> --help``); each
prints its tables and writes JSON + markdown (and PNGs) into ``benchmarks/results/``. The
docs page gathers those markdown files under one heading per benchmark, with the command
that made them.
"""

import argparse
import datetime
import importlib
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs" / "benchmarks.md"

# (module, arguments of its main, title, what it measures, result stems in results/)
BENCHMARKS = (
  (
    "memory",
    [],
    "Memory of weights and optimizer state (allocation-free)",
    "Bytes of the real state of each optimizer, read from `jax.eval_shape` of its `init` for"
    " the paper's LLaMA configs, beside the paper's Table 1; then the torch backend's"
    " `state_dict()` bytes for the same configs.",
    ["memory"],
  ),
  (
    "step_memory",
    [],
    "Peak memory of a jitted train step (XLA memory analysis)",
    "The compiled memory of one full train step of the main example (forward, backward,"
    " optimizer, INT8 write-back), with parameters and optimizer state donated.",
    ["step_memory"],
  ),
  (
    "scan_compile",
    [],
    "Scanned vs unscanned blocks: compile time, step time, bytes",
    "The main example's `qgalore` train step with its decoder blocks under `nnx.scan` and in"
    " a Python loop: compile time, steady-state step time, and the bytes of weights and"
    " optimizer state (equal in both).",
    ["scan_compile_cpu", "scan_compile_gpu"],
  ),
  (
    "jax_layerwise_memory",
    [],
    "Layer-wise training in JAX: peak memory up to LLaMA-7B (XLA memory analysis)",
    "The compiled peak of one train step of the scanned LLaMA in the paper's 7B setting"
    " (bfloat16, INT8 block matrices, rank 1024 at 7B): AdamW, the ordinary Q-GaLore step"
    " and `qgalore_jax.layerwise_train_step` with float and 8-bit moments, at batch 1 and"
    " 16 x 256, beside the authors' measured peaks; compiled with XLA CPU's"
    " memory-minimising scheduler. Then the layer-wise step with micro-batches"
    " (`--config 7B --batch 16 64 --variants qgalore-layerwise-8bit --micro-batches 1 4 16"
    " --json benchmarks/results/jax_layerwise_memory_micro.json`), the 7B rows under XLA's"
    " default scheduler (`--config 7B --batch 1 16 --variants qgalore qgalore-layerwise-8bit"
    " --scheduler concurrency --json benchmarks/results/jax_layerwise_memory_concurrency.json`)"
    " and a real 130M step against its analysis (`--config 130M --batch 4 --variants"
    " qgalore-layerwise-8bit --real --json benchmarks/results/jax_layerwise_memory_real.json`).",
    [
      "jax_layerwise_memory",
      "jax_layerwise_memory_micro",
      "jax_layerwise_memory_concurrency",
      "jax_layerwise_memory_real",
    ],
  ),
  (
    "jax_layerwise_speed",
    [],
    "Layer-wise training in JAX: step time",
    "Median time of a normal train step of the scanned LLaMA with Q-GaLore and INT8 weights:"
    " the ordinary step, the ordinary step with rematerialised blocks, and the layer-wise"
    " step, timed in interleaved rounds.",
    ["jax_layerwise_speed"],
  ),
  (
    "sharded_state",
    [],
    "Optimizer state per device under FSDP (8 simulated devices)",
    "The scanned LLaMA-60M's `qgalore_adamw` state placed by `qgalore_jax.state_shardings`"
    " on a mesh of 8 CPU devices, params sharded FSDP-style: the bytes the fullest device"
    " holds (summed from `addressable_shards`) against total / 8, float32 and 8-bit moments;"
    " then the SVDs each device runs on a step where every matrix refreshes, and the"
    " collectives of the compiled update.",
    ["sharded_state"],
  ),
  (
    "sharded_refresh",
    ["--config", "60m"],
    "What a step communicates under FSDP (8 simulated devices)",
    "The scanned LLaMA-60M's `qgalore_adamw` update compiled on an Explicit mesh of 8 CPU"
    " devices, params FSDP-sharded: SVD flops per device on a step where every matrix"
    " refreshes (and the SVDs counted as they run), the collectives of a normal step and"
    " those a refresh adds, labelled by what they move, and the wall time against one device.",
    ["sharded_refresh_60m"],
  ),
  (
    "sharded_refresh",
    ["--config", "60m-unscanned"],
    "What a step communicates under FSDP, unscanned LLaMA-60M",
    "As above for the LLaMA-60M with a 2-D kernel per layer: the refresh stacks the"
    " gradients of the kernels of each shape and splits them over the devices, so each SVD"
    " runs on one device here too.",
    ["sharded_refresh_60m-unscanned"],
  ),
  (
    "sharded_refresh",
    ["--config", "1b", "--repeats", "0", "--no-count"],
    "What a step communicates under FSDP, LLaMA-1B (compiled only)",
    "As above for the 1B, from the compiled program only: its refresh step does not fit this"
    " machine's memory on 8 simulated devices.",
    ["sharded_refresh_1b"],
  ),
  (
    "sharded_refresh",
    ["--config", "stacks-1b", "--repeats", "1"],
    "Refresh wall time on LLaMA-1B shapes (8 simulated devices)",
    "Two stacks of 8 kernels of the 1B's shapes (2048 x 2048 and 5461 x 2048, split as FSDP"
    " splits q and down), rank 512: SVD flops, collectives and wall time, 1 device against 8.",
    ["sharded_refresh_stacks-1b"],
  ),
  (
    "update_speed",
    ["--config", "60M"],
    "Speed of the JAX update, LLaMA-60M shapes",
    "Jitted optimizer update: medians of interleaved repeats after warm-up; a normal step and"
    " a refresh step (every matrix runs its SVD) separately; each normal step against the"
    " memory-bandwidth floor; the amortised step over a realistic schedule.",
    ["update_speed_cpu_60M", "update_speed_gpu_60M"],
  ),
  (
    "update_speed",
    ["--config", "130M"],
    "Speed of the JAX update, LLaMA-130M shapes",
    "As above, on the 130M shapes at the paper's rank 256.",
    ["update_speed_cpu_130M", "update_speed_gpu_130M"],
  ),
  (
    "torch_step_speed",
    ["--config", "60M"],
    "Speed of the torch step, LLaMA-60M shapes",
    "`QGaLoreAdamW.step()` against galore-torch's pure-torch `GaLoreAdamW` and"
    " `torch.optim.AdamW(foreach=True)`, one torch thread, interleaved repeats.",
    ["torch_step_speed_cpu_60M", "torch_step_speed_cuda_60M"],
  ),
  (
    "torch_step_speed",
    ["--config", "130M"],
    "Speed of the torch step, LLaMA-130M shapes",
    "As above, on the 130M shapes at rank 256.",
    ["torch_step_speed_cpu_130M", "torch_step_speed_cuda_130M"],
  ),
  (
    "torch_step_variants",
    [],
    "Fast float32 paths of the torch step, LLaMA-60M shapes",
    "The two variants of the float32 write-back in `qgalore_torch._src.functional` against"
    " the plain paths they replace, on the same tensors: AdamW leaves updated in cache-sized"
    " slices (`adamw_in_slices_`), and projected matrices whose update is added by the"
    " back-projecting matmul (`apply_in_matmul_`); one thread and torch's default,"
    " interleaved repeats; the script checks that the two paths give the same moments and"
    " parameters (bit for bit, or to one rounding of `W` per step where the fast path rounds"
    " it once).",
    ["torch_step_variants_cpu_60M"],
  ),
  (
    "torch_ddp_refresh",
    [],
    "Refresh SVDs once per matrix on 2 processes (torch)",
    "A refresh step of `QGaLoreAdamW` on 2 processes holding the same all-reduced gradients"
    ' (as under DDP), LLaMA-60M\'s 56 projected matrices: `refresh_mode="redundant"` (every'
    ' process computes every SVD) against `"owner"` (each SVD on one process, its INT4'
    " projector broadcast); the script checks that both give bit-identical weights. See"
    " [distributed_torch.md](distributed_torch.md).",
    ["torch_ddp_refresh_cpu_60M", "torch_ddp_refresh_cuda_60M"],
  ),
  (
    "layerwise_memory",
    [],
    "Layer-wise updates in torch: peak memory of an iteration",
    "The optimizer step run inside `backward()` per parameter (post-accumulate-grad hooks)"
    " against the normal mode, on a 60M-shape model.",
    ["layerwise_memory_cpu", "layerwise_memory_cuda"],
  ),
  (
    "svd_study",
    [],
    "SVD count and quality: adaptive vs fixed-gap refresh",
    "The main example trained with adaptive refresh, with a fixed gap, and with AdamW, from"
    " the same seed and data.",
    ["svd_study"],
  ),
  (
    "refresh_cost",
    ["--also-power-iters", "1"],
    "Cost of a refresh: full SVD, randomized range finder, subspace iteration",
    "One refresh's basis per `svd_method` (docs/spec.md section 2.6) at the paper's LLaMA"
    " matrix shapes and ranks, jitted JAX and eager torch on one CPU thread, each method"
    " timed beside the full SVD; `power_iters=1` beside the default 2; then the refresh"
    " step of a whole 60M update against a normal step. Staggering the matrices' refreshes"
    " would not remove the spike at step 0: a matrix cannot take a projected step before"
    " its first basis exists, so all of them refresh there. It would spread the later"
    " refreshes (the adaptive gaps already drift apart per matrix), at three costs: a"
    " schedule that departs from the authors' (which the parity suite holds bit for bit), a"
    " phase per matrix in the state, and, in torch on a GPU, a synchronising SVD on many"
    " more steps instead of on a few. It is not built.",
    ["refresh_cost_cpu"],
  ),
  (
    "svd_study",
    [
      *("--optimizers", "qgalore,qgalore-randomized,qgalore-subspace"),
      *("--out-dir", "benchmarks/results/svd_study_refresh"),
    ],
    "Quality of a cheaper refresh: held-out loss and SVD count",
    "The SVD study's run of `qgalore` (full SVD) beside the same run with"
    ' `svd_method="randomized"` and `"subspace"`, from the same seed and data.',
    ["svd_study_refresh/svd_study"],
  ),
  (
    "refresh_energy",
    [],
    "Quality of a cheaper refresh: captured gradient energy on real gradients",
    "The main example's gradients, every 10 steps of a `qgalore` run, and the energy each"
    " method's basis captures against the exact top-r.",
    ["refresh_energy"],
  ),
)


def run(only: set[str] | None) -> None:
  """Runs the selected benchmarks in order, each through its own ``main``."""
  for name, args, title, _, _ in BENCHMARKS:
    if only and name not in only:
      continue
    print(f"\n=== {title}: python -m benchmarks.{name} {' '.join(args)}", flush=True)
    start = time.perf_counter()
    importlib.import_module(f"benchmarks.{name}").main(list(args))
    print(f"=== {name} took {time.perf_counter() - start:.0f} s", flush=True)


def docs() -> str:
  """``docs/benchmarks.md``: every results file present, under its benchmark's heading."""
  lines = [
    "# Benchmarks",
    "",
    "Every figure on this page was written by a script in `benchmarks/`; the command above",
    "each table reruns it. `python -m benchmarks` runs them all and rebuilds this page",
    "(`--docs-only` rebuilds it from `benchmarks/results/`). Speed is reported as ratios of",
    "runs interleaved in one process: on a CPU, absolute times say little. Each table names",
    "its machine, versions and date.",
    "",
    "No GPU has been available to the project yet: the GPU figures (GPU step times and the",
    "normal step against a GPU's memory-bandwidth floor) are not",
    "measured yet. The speed scripts write `*_gpu_*` results when JAX or torch runs on one, and",
    "this page shows them beside the CPU ones.",
    "",
  ]
  for name, args, title, what, stems in BENCHMARKS:
    found = [RESULTS / f"{stem}.md" for stem in stems if (RESULTS / f"{stem}.md").exists()]
    if not found:
      continue
    command = f"python -m benchmarks.{name} {' '.join(args)}".rstrip()
    lines += [f"## {title}", "", what, "", "```bash", command, "```", ""]
    for path in found:
      text = path.read_text().strip().splitlines()
      # The results' own headings go two levels down, under this page's.
      lines += ["##" + line if line.startswith("#") else line for line in text] + [""]
      png = path.with_suffix(".png")
      if png.exists():
        lines += [f"![{title}](../benchmarks/results/{png.relative_to(RESULTS)})", ""]
  lines.append(f"_Page built {datetime.date.today().isoformat()} by `python -m benchmarks`._")
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  names = sorted({b[0] for b in BENCHMARKS})
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", nargs="+", choices=names, help="run only these benchmarks")
  parser.add_argument("--docs-only", action="store_true", help="only rebuild the docs page")
  args = parser.parse_args(argv)
  if not args.docs_only:
    run(set(args.only) if args.only else None)
  DOCS.write_text(docs())
  print(f"wrote {DOCS.relative_to(ROOT)}")


if __name__ == "__main__":
  # CPU SVDs through OpenBLAS: its spinning worker threads slow a shared machine badly.
  os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
  sys.exit(main())

"""Optimizer-state bytes per device under FSDP, LLaMA-60M shapes on 8 simulated devices.

The main example's scanned model (``examples/llama/model.py``, ``scan=True``) is built
abstractly; its params are sharded FSDP-style over a mesh of 8 devices (each leaf along its
largest axis that 8 divides, the layer axis of a stacked leaf excepted), and the state of
``qgalore_adamw`` (rank 128, the model's ``dimension_numbers``) is allocated there with
``jax.jit(tx.init, out_shardings=qgalore_jax.state_shardings(tx, params))``, once with
float32 moments and once with ``moment_bits=8``. For each, the bytes every device holds
are summed from the state arrays' ``addressable_shards``; the table gives the most any
device holds against a perfect split, total / 8 (goal: at most 1.25 times), and what stays
replicated on every device.

The script runs itself in a subprocess with ``--xla_force_host_platform_device_count=8``
on the CPU. Results go to ``benchmarks/results/sharded_state.json`` and ``.md``.

  python -m benchmarks.sharded_state
  python -m benchmarks.sharded_state --config tiny     # a two-layer model, for the tests
"""

import argparse
import collections
import datetime
import json
import os
import pathlib
import re
import subprocess
import sys

RESULTS = pathlib.Path(__file__).parent / "results"
DEVICES = 8
GOAL = 1.25
MB = 1e6
_CHILD = "QGALORE_SHARDED_STATE_CHILD"


def fsdp_spec(path, shape, stacked: bool):
  """The leaf's FSDP spec: its largest axis that ``DEVICES`` divides, along "fsdp"."""
  from jax.sharding import PartitionSpec as P

  first = 1 if stacked else 0  # a stacked leaf keeps its layer axis whole
  axes = [a for a in range(first, len(shape)) if shape[a] % DEVICES == 0]
  if not axes:
    return P()
  axis = max(axes, key=lambda a: shape[a])
  return P(*("fsdp" if a == axis else None for a in range(len(shape))))


def sharded_llama(cfg, mesh, scan: bool = True):
  """The LLaMA of ``cfg`` (its blocks scanned, or a Python loop of 2-D kernels), built
  abstractly: ``(model, params)``, the params as ``jax.ShapeDtypeStruct`` placed
  FSDP-style on ``mesh`` (:func:`fsdp_spec`)."""
  import jax
  from flax import nnx
  from jax.sharding import NamedSharding

  from examples.llama import model

  llama = nnx.eval_shape(lambda: model.Llama(cfg, nnx.Rngs(0), scan=scan))
  abstract = nnx.to_pure_dict(nnx.state(llama, nnx.Param))

  def place(path, a):
    stacked = scan and jax.tree_util.keystr(path).startswith("['layers']")
    sharding = NamedSharding(mesh, fsdp_spec(path, a.shape, stacked))
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)

  return llama, jax.tree_util.tree_map_with_path(place, abstract)


def rerun_on_devices(module: str, argv) -> bool:
  """Reruns ``python -m module argv`` in a fresh process with ``DEVICES`` simulated CPU
  devices, unless this is that process; True where it did (the caller reads the results).
  """
  if os.environ.get(_CHILD) == "1":
    return False
  env = dict(os.environ, JAX_PLATFORMS="cpu", **{_CHILD: "1"})
  flag = f"--xla_force_host_platform_device_count={DEVICES}"
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flag).strip()
  root = pathlib.Path(__file__).resolve().parents[1]
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
  subprocess.run([sys.executable, "-m", module, *argv], env=env, cwd=root, check=True)
  return True


def measure(config: str, rank: int, refresh: bool = True) -> dict:
  import jax
  import jax.numpy as jnp

  import qgalore_jax
  from examples.llama import configs
  from examples.llama import model

  assert jax.device_count() == DEVICES, jax.devices()
  cfg = configs.Config(vocab_size=64, d_model=32, d_ff=48, num_layers=2, num_heads=2)
  cfg = cfg if config == "tiny" else model.CONFIGS[config]
  mesh = jax.make_mesh((DEVICES,), ("fsdp",))
  llama, params_abstract = sharded_llama(cfg, mesh)
  zeros = lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), params_abstract)
  params = jax.jit(zeros, out_shardings=jax.tree.map(lambda a: a.sharding, params_abstract))()
  rows = []
  report = None
  numbers = model.dimension_numbers(llama)
  for bits in (None, 8):
    tx = qgalore_jax.qgalore_adamw(1e-3, rank=rank, dimension_numbers=numbers, moment_bits=bits)
    state = jax.jit(tx.init, out_shardings=qgalore_jax.state_shardings(tx, params_abstract))(params)
    per_device = collections.Counter()
    replicated = 0
    for a in jax.tree.leaves(state):
      for shard in a.addressable_shards:
        per_device[shard.device.id] += shard.data.nbytes
      if a.sharding.is_fully_replicated:
        replicated += a.nbytes
    total = sum(a.nbytes for a in jax.tree.leaves(state))
    most = max(per_device.values())
    rows.append(
      {
        "moments": "float32" if bits is None else "8-bit",
        "total_bytes": total,
        "max_device_bytes": most,
        "min_device_bytes": min(per_device.values()),
        "replicated_bytes": replicated,
        "ratio_to_even_split": most / (total / DEVICES),
      }
    )
    if bits is None and refresh:
      report = refresh_report(tx, params, state, mesh, numbers)
    del state
  return {
    "refresh": report,
    "config": config,
    "rank": rank,
    "devices": DEVICES,
    "param_bytes": sum(a.nbytes for a in jax.tree.leaves(params)),
    "goal_ratio": GOAL,
    "jax": jax.__version__,
    "date": datetime.date.today().isoformat(),
    "rows": rows,
  }


COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
# A collective's line in HLO text: group 1 its result type (a tuple may hold spaces, e.g. an
# all-to-all of 8 pieces), group 2 its kind.
COLLECTIVE_LINE = re.compile(
  r"^\s*(?:ROOT )?%[\w.\-]+ = (.*?) (" + "|".join(COLLECTIVES) + r")(?:-start)?\(", re.M
)


def svd_flops(a: int, b: int) -> float:
  """Flops of a thin SVD of an a x b matrix with both sets of vectors: ``6 M N^2 + 20 N^3``
  (M = max, N = min; Golub and Van Loan, Matrix Computations, 4th ed., section 8.6.3)."""
  big, small = max(a, b), min(a, b)
  return 6 * big * small**2 + 20 * small**3


def refresh_report(tx, params, state, mesh, dimension_numbers) -> dict:
  """SVDs per device on a step where every matrix refreshes, and the collectives of the
  compiled update (the gradient given as a param-shaped array, sharded as the param)."""
  import jax

  update = jax.jit(lambda g, s, p: tx.update(g, s, p))
  with jax.set_mesh(mesh):
    hlo = update.lower(params, state, params).compile().as_text()
  found = collections.Counter(m.group(2) for m in COLLECTIVE_LINE.finditer(hlo))
  collectives = {kind: found[kind] for kind in COLLECTIVES}
  svd_calls = re.findall(r"custom_call_target=\"[a-z_]*gesdd", hlo)
  return {
    "collectives_in_hlo": collectives,
    "svd_calls_in_hlo": len(svd_calls),
    **svd_split(projected_layouts(params, dimension_numbers), mesh.size),
  }


def projected_layouts(params, dimension_numbers) -> list:
  """The ``StackLayout`` of each projected leaf (the rule of scale_by_qgalore)."""
  import jax

  from qgalore_jax._src import layout

  is_spec = lambda x: isinstance(x, layout.DimensionNumbers) or x is None
  leaves = jax.tree.leaves(params)
  numbers = dimension_numbers(params) if callable(dimension_numbers) else dimension_numbers
  if isinstance(numbers, layout.DimensionNumbers):  # one for every leaf
    numbers = [numbers] * len(leaves)
  pairs = zip(leaves, jax.tree.leaves(numbers, is_leaf=is_spec), strict=True)
  return [spec.resolve(p.shape) for p, spec in pairs if spec is not None]


def refresh_units(layouts, devices: int) -> list[tuple[tuple[int, int], int, int]]:
  """How a step where every matrix refreshes runs its SVDs on ``devices`` devices
  (docs/spec.md section 9.2): one stack split over the devices for each stack whose slices
  split evenly over them, and one for each matrix shape of the other leaves, their slices
  together, padded to a multiple of ``devices``. Each as ``(matrix shape, slices,
  padded)``; a device runs ``padded / devices`` SVDs of each, at most."""
  units = [(lay.matrix_shape, lay.num_slices) for lay in layouts if lay.num_slices % devices == 0]
  together = collections.Counter()
  for lay in layouts:
    if lay.num_slices % devices:
      together[lay.matrix_shape] += lay.num_slices
  units += together.items()
  return [(shape, n, -(-n // devices) * devices) for shape, n in units]


def svd_split(layouts, devices: int) -> dict:
  """SVDs and their flops on a step where every matrix refreshes, in all and on the
  busiest device (:func:`refresh_units`)."""
  svds_total = svds_device = flops_total = flops_device = 0
  for shape, slices, padded in refresh_units(layouts, devices):
    one = svd_flops(*shape)
    svds_total += slices
    svds_device += padded // devices
    flops_total += slices * one
    flops_device += padded // devices * one
  return {
    "svds_per_refresh_step": svds_total,
    "svds_per_device": svds_device,
    "svd_gflops_per_refresh_step": flops_total / 1e9,
    "svd_gflops_per_device": flops_device / 1e9,
  }


def table(result: dict) -> str:
  lines = [
    f"LLaMA-{result['config']} (scanned), rank {result['rank']}, FSDP over"
    f" {result['devices']} devices; optimizer state in MB (1e6 bytes)",
    "",
    "| moments | total | total / 8 | most on one device | ratio | replicated on each |",
    "|---|---|---|---|---|---|",
  ]
  for row in result["rows"]:
    lines.append(
      f"| {row['moments']} | {row['total_bytes'] / MB:.2f} |"
      f" {row['total_bytes'] / result['devices'] / MB:.2f} |"
      f" {row['max_device_bytes'] / MB:.2f} | {row['ratio_to_even_split']:.3f} |"
      f" {row['replicated_bytes'] / MB:.3f} |"
    )
  r = result["refresh"]
  if not r:
    return "\n".join(lines) + "\n"
  kinds = ", ".join(f"{n} {k}" for k, n in r["collectives_in_hlo"].items() if n)
  lines += [
    "",
    f"A step where every matrix refreshes runs {r['svds_per_refresh_step']} SVDs"
    f" ({r['svd_gflops_per_refresh_step']:.2f} GFLOP); each device runs"
    f" {r['svds_per_device']} of them ({r['svd_gflops_per_device']:.2f} GFLOP): a stack"
    " whose slices split evenly over the devices is refreshed slice by slice where each"
    " slice lives. Collectives in the compiled update (float32 moments; each counted once"
    f" in the HLO text, branches included): {kinds}.",
  ]
  return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="60m", help="a key of examples.llama.CONFIGS, or tiny")
  parser.add_argument("--rank", type=int, default=128)
  parser.add_argument(
    "--refresh",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="also compile the update and report its SVDs per device and collectives",
  )
  parser.add_argument("--out", default=str(RESULTS), help="directory of the JSON and markdown")
  args = parser.parse_args(argv)
  # 8 simulated devices need a fresh process
  if rerun_on_devices("benchmarks.sharded_state", argv or sys.argv[1:]):
    stem = (
      pathlib.Path(args.out) / f"sharded_state{'' if args.config == '60m' else '_' + args.config}"
    )
    return json.loads(stem.with_suffix(".json").read_text())
  result = measure(args.config, args.rank, args.refresh)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  stem = out / f"sharded_state{'' if args.config == '60m' else '_' + args.config}"
  stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
  stem.with_suffix(".md").write_text(table(result))
  print(table(result))
  return result


if __name__ == "__main__":
  main()

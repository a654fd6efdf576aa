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


def measure(config: str, rank: int) -> dict:
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import NamedSharding

  import qgalore_jax
  from examples.llama import configs
  from examples.llama import model

  assert jax.device_count() == DEVICES, jax.devices()
  cfg = configs.Config(vocab_size=64, d_model=32, d_ff=48, num_layers=2, num_heads=2)
  cfg = cfg if config == "tiny" else model.CONFIGS[config]
  llama = nnx.eval_shape(lambda: model.Llama(cfg, nnx.Rngs(0), scan=True))
  abstract = nnx.to_pure_dict(nnx.state(llama, nnx.Param))
  mesh = jax.make_mesh((DEVICES,), ("fsdp",))

  def place(path, a):
    stacked = jax.tree_util.keystr(path).startswith("['layers']")
    sharding = NamedSharding(mesh, fsdp_spec(path, a.shape, stacked))
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)

  params_abstract = jax.tree_util.tree_map_with_path(place, abstract)
  zeros = lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), params_abstract)
  params = jax.jit(zeros, out_shardings=jax.tree.map(lambda a: a.sharding, params_abstract))()
  rows = []
  for bits in (None, 8):
    tx = qgalore_jax.qgalore_adamw(
      1e-3, rank=rank, dimension_numbers=model.dimension_numbers(llama), moment_bits=bits
    )
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
    del state
  return {
    "config": config,
    "rank": rank,
    "devices": DEVICES,
    "param_bytes": sum(a.nbytes for a in jax.tree.leaves(params)),
    "goal_ratio": GOAL,
    "jax": jax.__version__,
    "date": datetime.date.today().isoformat(),
    "rows": rows,
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
  return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="60m", help="a key of examples.llama.CONFIGS, or tiny")
  parser.add_argument("--rank", type=int, default=128)
  parser.add_argument("--out", default=str(RESULTS), help="directory of the JSON and markdown")
  args = parser.parse_args(argv)
  if os.environ.get(_CHILD) != "1":  # 8 simulated devices need a fresh process
    env = dict(os.environ, JAX_PLATFORMS="cpu", **{_CHILD: "1"})
    flag = f"--xla_force_host_platform_device_count={DEVICES}"
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flag).strip()
    root = pathlib.Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "benchmarks.sharded_state", *(argv or sys.argv[1:])]
    subprocess.run(cmd, env=env, cwd=root, check=True)
    stem = (
      pathlib.Path(args.out) / f"sharded_state{'' if args.config == '60m' else '_' + args.config}"
    )
    return json.loads(stem.with_suffix(".json").read_text())
  result = measure(args.config, args.rank)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  stem = out / f"sharded_state{'' if args.config == '60m' else '_' + args.config}"
  stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
  stem.with_suffix(".md").write_text(table(result))
  print(table(result))
  return result


if __name__ == "__main__":
  main()

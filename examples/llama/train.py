"""Pre-train a LLaMA with AdamW, GaLore or Q-GaLore; ``--compare`` runs them all.

Examples::

  python -m examples.llama.train --compare           # every optimizer, tiny model, CPU
  python -m examples.llama.train --optimizer qgalore --steps 1000
  python -m examples.llama.train --model 60m --dataset c4 --batch-size 512 --steps 10000
  python -m examples.llama.train --mesh fsdp=8       # FSDP over 8 devices (CPU: simulated)

(the paper's 60M run adds ``--rank 128 --update-proj-gap 200 --learning-rate 0.015``).

The decoder blocks run under ``nnx.scan`` over stacked weights (``--no-scan``: a Python
loop over a list of blocks; ``--remat``: recompute block activations in the backward
pass). Scanned and unscanned models start from the same weights on a seed and train to
the same losses up to float rounding (and, with INT8 weights, up to the different
uniforms that stochastic rounding draws for a stack, docs/spec.md section 1.3). Optax's
``galore`` always runs unscanned (``optimizers.UNSCANNED``), and says so.

The train step is a pure function of ``(params, opt_state, batch, step)`` on a plain
pytree of parameters, jitted with the parameters and optimizer state donated. With
``qgalore`` the projected matrices live as INT8 codes: the step dequantises them, takes
the gradient with respect to the float weights, runs the optimizer and writes the codes
back with stochastic rounding (``qgalore_jax.int8_train_step``). ``--layerwise`` (a
``qgalore`` variant on the scanned model) fuses the update into the backward pass instead:
a reverse scan over the blocks updates each block as soon as its gradient exists, so the
full gradient never exists (``qgalore_jax.layerwise_train_step``, docs/layerwise.md). Its
optimizer is not guarded against non-finite steps (``skip_nonfinite`` needs the whole
gradient first).

``--mesh NAME=N`` shards the run FSDP-style over N devices (``examples/llama/mesh.py``):
each weight along its largest axis that N divides, the optimizer state after it
(``qgalore_jax.state_shardings``), each batch along its batch axis; checkpoints restore
onto the mesh. On a CPU it asks XLA for N simulated devices when ``XLA_FLAGS`` names no
count.

A run writes ``metrics.jsonl`` (one JSON object per log or eval event) and orbax
checkpoints (params, optimizer state, step, data position) under ``--out-dir/<optimizer>``
and resumes from the latest checkpoint there.
"""

import argparse
import dataclasses
import functools
import json
import math
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
from tqdm import tqdm

import qgalore_jax
from examples.llama import cli
from examples.llama import data
from examples.llama import mesh as mesh_lib
from examples.llama import model
from examples.llama import optimizers
from examples.llama import report


@dataclasses.dataclass(frozen=True)
class RunConfig(cli.RunConfig):
  """One training run (the command-line flags of the same names)."""

  out_dir: str = "runs/llama"
  scan: bool = True
  remat: bool = False
  layerwise: bool = False
  mesh: str | None = None  # "NAME=N": FSDP over N devices (examples/llama/mesh.py)

  @property
  def scanned(self) -> bool:
    """Whether the run's blocks are scanned: ``scan``, unless the optimizer cannot train a
    scanned model (``optimizers.UNSCANNED``)."""
    return self.scan and self.optimizer not in optimizers.UNSCANNED

  def check(self) -> None:
    """Raises ``ValueError`` for a bad ``mesh``, or ``layerwise`` with a model or optimizer
    it cannot train."""
    if self.mesh is not None:
      mesh_lib.parse(self.mesh)
    if not self.layerwise:
      return
    if self.optimizer not in optimizers.QGALORE_VARIANTS:
      raise ValueError(
        f"--layerwise trains with a qgalore variant, not {self.optimizer!r}: its update runs"
        " per block inside the backward pass"
      )
    if not self.scanned:
      raise ValueError("--layerwise needs the scanned model (drop --no-scan)")

  @property
  def lr(self) -> float:
    """The peak learning rate: ``learning_rate``, or the optimizer's tuned one."""
    if self.learning_rate is not None:
      return self.learning_rate
    return optimizers.LEARNING_RATES[self.optimizer]


def lr_schedule(cfg: RunConfig) -> optax.Schedule:
  """The paper's schedule: linear warmup, cosine decay to a tenth of the peak."""
  warmup = max(1, int(cfg.warmup_fraction * cfg.steps))
  return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, cfg.steps, cfg.lr / 10)


def loss_fn(graphdef, params, batch) -> jax.Array:
  """Mean next-token cross-entropy (nats) of the model ``graphdef`` with ``params``."""
  inputs, targets = batch
  logits = nnx.merge(graphdef, params)(inputs)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  return losses.mean()


def make_train_step(
  graphdef,
  tx: optax.GradientTransformation,
  int8_weights: bool,
  seed: int,
  tensor_ids=None,
  layerwise_model: str | None = None,
):
  """Jitted ``(params, opt_state, batch, step) -> (params, opt_state, loss)``.

  ``params`` and ``opt_state`` are donated; ``loss`` is the batch's loss before the
  update. With ``int8_weights`` this is ``qgalore_jax.int8_train_step``: ``params`` holds
  INT8 matrices, and ``seed``, ``step`` and ``tensor_ids`` (``model.tensor_ids``; None:
  the library's default) key their stochastic rounding. ``layerwise_model`` (a config name)
  gives ``qgalore_jax.layerwise_train_step`` on that scanned model instead.
  """
  if layerwise_model is not None:
    fns = model.layerwise_fns(model.CONFIGS[layerwise_model])
    return qgalore_jax.layerwise_train_step(*fns, tx, seed=seed, tensor_ids=tensor_ids)
  model_loss = functools.partial(loss_fn, graphdef)
  if int8_weights:
    return qgalore_jax.int8_train_step(model_loss, tx, seed=seed, tensor_ids=tensor_ids)

  def train_step(params, opt_state, batch, step):
    del step  # float weights round to nearest: no randomness
    loss, grads = jax.value_and_grad(model_loss)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(train_step, donate_argnums=(0, 1))


def make_eval_step(graphdef, int8_weights: bool):
  """Jitted ``(params, batch) -> loss``."""

  def eval_step(params, batch):
    float_params = qgalore_jax.dequantize_params(params) if int8_weights else params
    return loss_fn(graphdef, float_params, batch)

  return jax.jit(eval_step)


def tree_bytes(tree) -> int:
  """Bytes held by the arrays of ``tree`` (packed uint8 codes count one byte each)."""
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def init_state(cfg: RunConfig, mesh: jax.sharding.Mesh | None = None):
  """``(graphdef, params, opt_state, tx, int8_weights)`` of a fresh run.

  With a ``mesh`` (``mesh_lib.make_mesh``) the weights are sharded FSDP-style
  (``mesh_lib.param_shardings``) and the optimizer state after them
  (``qgalore_jax.state_shardings``). The weights are drawn on one device first, so that a
  sharded run starts from the same numbers as a single-device one.
  """
  graphdef, params = model.init_params(
    model.CONFIGS[cfg.model], cfg.seed, scan=cfg.scanned, remat=cfg.remat
  )
  llama = nnx.merge(graphdef, params)
  low_rank = optimizers.LowRank(cfg.rank, cfg.update_proj_gap)
  tx, int8_weights = optimizers.build(
    cfg.optimizer, lr_schedule(cfg), low_rank, llama, guard=not cfg.layerwise
  )
  if mesh is None:
    opt_state = tx.init(params)  # from the float weights, before they are quantised
  else:
    params = jax.device_put(params, mesh_lib.param_shardings(params, mesh, cfg.scanned))
    shardings = qgalore_jax.state_shardings(tx, params)
    opt_state = jax.jit(tx.init, out_shardings=shardings)(params)
  if int8_weights:
    params = qgalore_jax.quantize_params(
      params,
      group_size=optimizers.INT8_GROUP_SIZE,
      dimension_numbers=model.dimension_numbers(llama),
    )
    if mesh is not None:
      params = jax.device_put(params, mesh_lib.param_shardings(params, mesh, cfg.scanned))
  return graphdef, params, opt_state, tx, int8_weights


def pin_shardings(train_step, params, opt_state):
  """``train_step`` returning params and optimizer state placed as ``params`` and
  ``opt_state`` are (the loss replicated), still jitted with both donated: without this
  XLA picks the outputs' shardings, which may gather a weight whole or change from step
  to step (a recompilation). It runs under ``jax.set_mesh`` of the params' mesh, so that
  the optimizer sees the mesh while it is traced and splits each refresh's SVDs over the
  devices (docs/spec.md section 9.2) instead of running every SVD on every device."""
  shardings = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
  mesh = jax.tree.leaves(params)[0].sharding.mesh
  out = (shardings(params), shardings(opt_state), NamedSharding(mesh, PartitionSpec()))
  jitted = jax.jit(train_step, out_shardings=out, donate_argnums=(0, 1))

  @functools.wraps(train_step)
  def on_mesh(*args):
    with jax.set_mesh(mesh):
      return jitted(*args)

  return on_mesh


def make_data(cfg: RunConfig, mesh: jax.sharding.Mesh | None = None):
  """``(train_batches(position), heldout_batches)`` for the configured dataset; with a
  ``mesh``, each batch placed on it (``mesh_lib.batch_sharding``)."""
  config = model.CONFIGS[cfg.model]
  train_batches, heldout = data.make_batches(
    cfg.dataset,
    model_name=cfg.model,
    seq_len=config.seq_len,
    vocab_size=config.vocab_size,
    batch_size=cfg.batch_size,
    eval_batches=cfg.eval_batches,
    seed=cfg.seed,
  )
  if mesh is None:
    return train_batches, heldout
  place = functools.partial(jax.device_put, device=mesh_lib.batch_sharding(cfg.batch_size, mesh))
  placed = lambda position: map(place, train_batches(position))
  return placed, [place(batch) for batch in heldout]


def _drop_empty(tree):
  """``tree`` with zero-size arrays replaced by None: orbax refuses to save them, and
  optax's GaLore keeps (0, 0) projector placeholders for the leaves it does not project."""
  return jax.tree.map(lambda x: None if x.size == 0 else x, tree)


def save_checkpoint(manager: ocp.CheckpointManager, step: int, params, opt_state) -> None:
  """Saves params, optimizer state, step and data position (batches consumed)."""
  state = {
    "params": params,
    "opt_state": _drop_empty(opt_state),
    "step": np.array(step, np.int64),
    "data_position": np.array(step, np.int64),
  }
  manager.save(step, args=ocp.args.StandardSave(state))
  manager.wait_until_finished()


def restore_checkpoint(manager: ocp.CheckpointManager, params, opt_state):
  """``(params, opt_state, step, data_position)`` of the latest checkpoint.

  ``params`` and ``opt_state`` are a fresh run's: they give the structure, shapes and
  dtypes to restore into. A checkpoint whose arrays have other shapes (saved with another
  model, optimizer or rank) raises ``ValueError`` naming the arrays, before orbax reads any.
  """
  target = {
    "params": params,
    "opt_state": _drop_empty(opt_state),
    "step": np.array(0, np.int64),
    "data_position": np.array(0, np.int64),
  }
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  step = manager.latest_step()
  _check_saved_shapes(manager, step, abstract)
  got = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  restored_opt_state = jax.tree.map(
    lambda fresh, saved: fresh if saved is None else saved, opt_state, got["opt_state"]
  )
  return got["params"], restored_opt_state, int(got["step"]), int(got["data_position"])


def _check_saved_shapes(manager: ocp.CheckpointManager, step: int, abstract) -> None:
  """Raises ``ValueError`` naming every array whose saved shape differs from ``abstract``'s."""
  saved = {
    leaf.name: tuple(leaf.shape)
    for leaf in jax.tree.leaves(manager.item_metadata(step))
    if hasattr(leaf, "shape")
  }
  differ = []
  for path, want in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    name = jax.tree_util.keystr(path, simple=True, separator=".")
    if name in saved and saved[name] != tuple(want.shape):
      differ.append(f"{name} saved {saved[name]}, this run {tuple(want.shape)}")
  if differ:
    raise ValueError(
      f"checkpoint {step} in {manager.directory} was saved by another configuration"
      f" (model, optimizer or rank); {len(differ)} arrays differ: {'; '.join(differ[:3])}"
      f"{f'; and {len(differ) - 3} more' if len(differ) > 3 else ''}. Resume with the saved"
      " settings, or train into another --out-dir"
    )


def evaluate(eval_step, params, heldout) -> float:
  """Mean held-out loss over the fixed held-out batches."""
  return float(np.mean([eval_step(params, batch) for batch in heldout]))


def train(cfg: RunConfig, progress: bool = True, wrap_step=None) -> dict:
  """Trains one model; returns the summary that ``report.markdown_table`` prints.

  ``wrap_step``, if given, is applied to the jitted train step
  ``(params, opt_state, batch, step) -> (params, opt_state, loss)`` and must return a
  function of the same form: a way to watch every step (``benchmarks.svd_study`` records
  the refresh schedule so).
  """
  run_dir = pathlib.Path(cfg.out_dir).resolve() / cfg.optimizer
  run_dir.mkdir(parents=True, exist_ok=True)
  if cfg.scan and not cfg.scanned:
    print(f"{cfg.optimizer}: {optimizers.UNSCANNED[cfg.optimizer]}", file=sys.stderr)
  cfg.check()
  mesh = None if cfg.mesh is None else mesh_lib.make_mesh(cfg.mesh)
  graphdef, params, opt_state, tx, int8_weights = init_state(cfg, mesh)
  ids = model.tensor_ids(model.CONFIGS[cfg.model], scan=cfg.scanned)
  layerwise_model = cfg.model if cfg.layerwise else None
  train_step = make_train_step(graphdef, tx, int8_weights, cfg.seed, ids, layerwise_model)
  if mesh is not None:
    train_step = pin_shardings(train_step, params, opt_state)
  if wrap_step is not None:
    train_step = wrap_step(train_step)
  eval_step = make_eval_step(graphdef, int8_weights)
  start = position = 0
  manager = None
  if cfg.checkpoint_every:
    manager = ocp.CheckpointManager(run_dir / "checkpoints")
    if manager.latest_step() is not None:
      params, opt_state, start, position = restore_checkpoint(manager, params, opt_state)
      print(f"{cfg.optimizer}: resuming at step {start} from {manager.directory}", file=sys.stderr)
  train_batches, heldout = make_data(cfg, mesh)
  if progress:
    millions = model.param_count(model.CONFIGS[cfg.model]) / 1e6
    blocks = "scanned" if cfg.scanned else "unscanned"
    where = "" if mesh is None else f", FSDP over {cfg.mesh} ({mesh.devices.size} devices)"
    print(
      f"{cfg.optimizer}: {cfg.model} LLaMA, {millions:.2f}M parameters, {blocks} blocks{where}",
      file=sys.stderr,
    )
  tokens_per_step = cfg.batch_size * model.CONFIGS[cfg.model].seq_len
  train_curve, eval_curve = [], []
  with open(run_dir / "metrics.jsonl", "a" if start else "w") as metrics:
    log = lambda record: metrics.write(json.dumps(record) + "\n")
    bar = tqdm(range(start, cfg.steps), desc=cfg.optimizer, disable=not progress, file=sys.stderr)
    t0 = window_t0 = time.perf_counter()
    window_step = start
    for step, batch in zip(bar, train_batches(position)):
      params, opt_state, loss = train_step(params, opt_state, batch, step)
      done = step + 1
      if done % cfg.log_every == 0 or done == cfg.steps:
        loss, now = float(loss), time.perf_counter()
        tokens_per_s = tokens_per_step * (done - window_step) / (now - window_t0)
        window_t0, window_step = now, done
        train_curve.append((done, loss))
        skipped = None if cfg.layerwise else optimizers.skipped_steps(opt_state)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", skipped=skipped)
        log({"step": done, "train_loss": loss, "tokens_per_s": tokens_per_s, "skipped": skipped})
      if done % cfg.eval_every == 0 or done == cfg.steps:
        eval_loss = evaluate(eval_step, params, heldout)
        eval_curve.append((done, eval_loss))
        log({"step": done, "eval_loss": eval_loss, "eval_ppl": math.exp(eval_loss)})
        bar.write(
          f"{cfg.optimizer} step {done}: held-out loss {eval_loss:.4f}"
          f" ppl {math.exp(eval_loss):.2f}",
          file=sys.stderr,
        )
        window_t0 = time.perf_counter()
      if manager is not None and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
        save_checkpoint(manager, done, params, opt_state)
    wall_s = time.perf_counter() - t0
  num_projected = len(model.PROJECTED) * model.CONFIGS[cfg.model].num_layers
  low_rank = optimizers.LowRank(cfg.rank, cfg.update_proj_gap)
  return {
    "optimizer": cfg.optimizer,
    "scanned": cfg.scanned,
    "learning_rate": cfg.lr,
    "eval_loss": eval_curve[-1][1] if eval_curve else evaluate(eval_step, params, heldout),
    "weight_bytes": tree_bytes(params),
    "opt_bytes": tree_bytes(opt_state),
    "svd_count": optimizers.svd_count(cfg.optimizer, opt_state, cfg.steps, num_projected, low_rank),
    "skipped_steps": None if cfg.layerwise else optimizers.skipped_steps(opt_state),
    "wall_s": wall_s,
    "train_curve": train_curve,
    "eval_curve": eval_curve,
  }


def compare(cfg: RunConfig, names: tuple[str, ...] = optimizers.NAMES) -> list[dict]:
  """Trains each optimizer in ``names`` from the same data and seed (``cli.compare``)."""
  return cli.compare(train, cfg, names)


def parse_args(argv: list[str] | None = None) -> tuple[RunConfig, argparse.Namespace]:
  """The ``RunConfig`` and the raw namespace of the command line."""
  parser = cli.parser(
    "python -m examples.llama.train",
    __doc__.split("\n")[0],
    RunConfig(),
    optimizers.NAMES,
    model.CONFIGS,
    extra_names=[n for n in optimizers.ALL_NAMES if n not in optimizers.NAMES],
  )
  parser.add_argument(
    "--scan",
    action=argparse.BooleanOptionalAction,
    default=RunConfig.scan,
    help="apply the decoder blocks with nnx.scan over stacked weights (one block compiled"
    " whatever the depth); galore always runs unscanned: optax's GaLore projects 2-D leaves"
    " only (its dimension numbers have no batch axis)",
  )
  parser.add_argument(
    "--layerwise",
    action="store_true",
    help="update each block inside the backward pass (qgalore variants, scanned model):"
    " the full gradient never exists; steps are not guarded against NaN",
  )
  parser.add_argument(
    "--remat",
    action="store_true",
    help="recompute block activations in the backward pass (nnx.remat): less memory",
  )
  parser.add_argument(
    "--mesh",
    default=None,
    metavar="NAME=N",
    help="train FSDP-sharded over a one-axis mesh of N devices, e.g. fsdp=8: each weight"
    " split along its largest axis that N divides, the optimizer state after it, each batch"
    " along its batch axis. On a CPU the N devices are simulated"
    f" (XLA_FLAGS={mesh_lib.HOST_DEVICES_FLAG}=N, set here when XLA_FLAGS has no count)",
  )
  args = parser.parse_args(argv)
  if args.mesh is not None:
    try:
      mesh_lib.parse(args.mesh)
    except ValueError as e:
      parser.error(str(e))
  return cli.run_config(RunConfig, args), args


def main(argv: list[str] | None = None) -> None:
  """Runs the command line: one training run, or ``--compare``."""
  # JAX runs CPU SVDs through scipy's OpenBLAS, loaded at the first one. Its worker threads
  # spin while they wait, so on a busy machine 28 small SVDs took 43 s instead of 0.1 s.
  os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
  cfg, args = parse_args(argv)
  if cfg.mesh is not None:  # before JAX starts its backend, which reads the flag once
    mesh_lib.request_host_devices(mesh_lib.parse(cfg.mesh)[1])
    try:
      mesh_lib.make_mesh(cfg.mesh)  # too few devices: say so before building anything
    except ValueError as e:
      raise SystemExit(f"python -m examples.llama.train: error: {e}") from None
  if args.compare:
    # Compare runs are short and always start fresh, so they keep no checkpoints.
    compare(dataclasses.replace(cfg, checkpoint_every=0), tuple(args.optimizers.split(",")))
  else:
    print()
    print(report.markdown_table([train(cfg)]))


if __name__ == "__main__":
  main()

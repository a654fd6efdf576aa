"""Layer-wise training for scanned models: the update fused into the backward pass.

The gradient of a model whose blocks are stacked (scanned) is never held whole: a reverse
scan recomputes one block at a time, takes its VJP, runs the optimizer on that block's
slices of the weights and optimizer state, and writes them back in place (docs/spec.md
section 10). The JAX counterpart of the torch twin's ``register_layerwise_hooks``.
"""

import contextlib
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.extend
import jax.numpy as jnp
import optax

from qgalore_jax._src import int8
from qgalore_jax._src import trees
from qgalore_jax._src.alias import PER_LEAF
from qgalore_jax._src.layout import is_masked
from qgalore_jax._src.layout import path_str
from qgalore_jax._src.qgalore import BLOCK_INDEX
from qgalore_jax._src.qgalore import projection_stats

_MASKED = optax.MaskedNode()


@contextlib.contextmanager
def _block(i):
  token = BLOCK_INDEX.set(i)
  try:
    yield
  finally:
    BLOCK_INDEX.reset(token)


def _check_optimizer(optimizer) -> None:
  if not callable(getattr(optimizer, "update", None)):
    raise TypeError(
      f"`optimizer` must be an optax.GradientTransformation, got {type(optimizer).__name__}"
    )
  if not getattr(optimizer.update, PER_LEAF, False):
    raise ValueError(
      "layer-wise training applies each block's update as soon as that block's gradient"
      " exists, so the optimizer must update every parameter from its own gradient and"
      " state alone: build it with qgalore_adamw(...) with skip_nonfinite=False, unwrapped."
      " Transformations that need the whole gradient cannot run layer by layer:"
      " optax.clip_by_global_norm (the norm is known only after the last block),"
      " optax.apply_if_finite / skip_nonfinite=True (a NaN found in an early block comes"
      " after later blocks were updated), optax.MultiSteps (each call of the layer-wise step"
      " is one optimizer step on its whole batch: split a batch with micro_batches=k"
      " instead). For those, train with int8_train_step"
    )


def _take(a, i):
  """Block ``i`` of a stacked array or INT8 weight (layer axis first), as a stack of one."""
  if not int8.is_quantized(a):
    return jax.lax.dynamic_slice_in_dim(a, i, 1, 0)
  return a._replace(
    codes=_take(a.codes, i),
    scale=_take(a.scale, i),
    zero=_take(a.zero, i),
    layout=a.layout._replace(shape=(1, *a.layout.shape[1:])),
  )


def _put(a, block, i):
  """``a`` with block ``i`` replaced by ``block`` (from :func:`_take`)."""
  if not int8.is_quantized(a):
    return jax.lax.dynamic_update_slice_in_dim(a, block, i, 0)
  return a._replace(
    codes=_put(a.codes, block.codes, i),
    scale=_put(a.scale, block.scale, i),
    zero=_put(a.zero, block.zero, i),
  )


def _float(p, dtype):
  return p.dequantize(dtype) if int8.is_quantized(p) else p


def _select(state, treedef, keep):
  """The optimizer state of the leaves flagged in ``keep``, ``MaskedNode`` elsewhere."""
  return trees.map_param_trees(lambda j, v: v if keep[j] else _MASKED, treedef, state)


def _tensor_ids(flat, tensor_ids, qparams) -> list:
  """Per leaf: its matrices' SR tensor ids as an array of its batch shape (None if float)."""
  ids = (
    int8._default_ids(flat)
    if tensor_ids is None
    else int8._per_leaf(tensor_ids, qparams, "tensor_ids", int)
  )
  out = []
  for (path, p), t in zip(flat, ids, strict=True):
    if int8.is_quantized(p):
      out.append(jnp.asarray(int8._slice_ids(t, p, path), jnp.uint32).reshape(p.layout.batch_shape))
    else:
      out.append(None)
  return out


def _as_bits(x):
  """A 16-bit float array as uint16 bits: XLA's CPU backend widens bfloat16 buffers that a
  loop writes into to float32 (twice the memory); integer ones it keeps."""
  if jnp.issubdtype(x.dtype, jnp.floating) and jnp.dtype(x.dtype).itemsize == 2:
    return jax.lax.bitcast_convert_type(x, jnp.uint16)
  return x


def _from_bits(x, dtype):
  """Inverse of :func:`_as_bits`."""
  return jax.lax.bitcast_convert_type(x, dtype) if x.dtype != dtype else x


def _read_by(fn, tree, *args) -> list[bool]:
  """Per leaf of ``tree``: whether ``fn(tree, *args)`` reads it (from its jaxpr)."""
  leaves, treedef = jax.tree.flatten(tree)
  jaxpr = jax.make_jaxpr(lambda *xs: fn(treedef.unflatten(xs), *args))(*leaves).jaxpr
  used = set()
  for v in [*(v for eqn in jaxpr.eqns for v in eqn.invars), *jaxpr.outvars]:
    if isinstance(v, jax.extend.core.Var):
      used.add(v)
  return [v in used for v in jaxpr.invars]


def _after(x, tree):
  """``x``, in a program where it is computed only after every array of ``tree``.

  XLA schedules by data dependence only (the CPU compiler drops optimization barriers), so
  ``x`` passes through a conditional whose predicate reads one element of each array and
  whose branches both return ``x``."""
  firsts = [jnp.ravel(a)[:1].astype(jnp.float32) for a in jax.tree.leaves(tree)]
  if not firsts:
    return x
  pred = jnp.isfinite(jnp.concatenate(firsts)).all()
  return jax.lax.cond(pred, lambda x: x, lambda x: jax.tree.map(jnp.copy, x), x)


def _split(tree, parts: int, what: str):
  """Every leaf of ``tree`` split along its leading axis into ``parts`` equal parts,
  stacked on a new leading axis."""

  def split(a):
    size = jnp.shape(a)[0] if jnp.ndim(a) else None
    if size is None or size % parts:
      raise ValueError(
        f"micro_batches={parts} splits every leaf of {what} along its leading axis into"
        f" equal parts; got a leaf of shape {jnp.shape(a)}"
      )
    return a.reshape(parts, size // parts, *a.shape[1:])

  return jax.tree.map(split, tree)


def _merge(tree):
  """Inverse of :func:`_split`."""
  return jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), tree)


def _sum_f32(acc, tree):
  return jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, tree)


def _zeros_f32(tree):
  return jax.tree.map(lambda a: jnp.zeros(jnp.shape(a), jnp.float32), tree)


def _head_in_parts(head_fn, outer, xs, batches, head_read):
  """Loss and gradients of the head over micro-batches ``xs`` / ``batches`` (stacked on a
  leading axis): the mean of the parts' losses, its gradient with respect to each part's
  input, and with respect to the outer leaves the head reads (summed in float32; zeros
  elsewhere)."""
  parts = jax.tree.leaves(xs)[0].shape[0]
  leaves, outer_def = jax.tree.flatten(outer)
  read = [p for p, r in zip(leaves, head_read) if r]

  def with_read(values):
    it = iter(values)
    return outer_def.unflatten([next(it) if r else p for p, r in zip(leaves, head_read)])

  def part(acc, xs_c):
    x, b = xs_c
    loss = lambda r, x: head_fn(with_read(r), x, b) / parts
    value, (g_read, g_x) = jax.value_and_grad(loss, (0, 1))(read, x)
    return _sum_f32(acc, g_read), (value, g_x)

  g_read, (losses, g_x) = jax.lax.scan(part, _zeros_f32(read), (xs, batches))
  loss = losses.sum()
  it = iter(g_read)
  g_head = outer_def.unflatten(
    [next(it).astype(p.dtype) if r else jnp.zeros_like(p) for p, r in zip(leaves, head_read)]
  )
  return loss, g_head, g_x


def _block_vjp_in_parts(block_fn, params, xs, g_ys):
  """One block's VJP over micro-batches (inputs ``xs`` and output cotangents ``g_ys``
  stacked on a leading axis): the parameter gradients summed in float32 (returned in the
  parameters' dtypes) and each part's input cotangent."""

  def part(acc, xs_c):
    x, g_y = xs_c
    _, block_vjp = jax.vjp(block_fn, params, x)
    g_params, g_x = block_vjp(g_y)
    return _sum_f32(acc, g_params), g_x

  acc, g_xs = jax.lax.scan(part, _zeros_f32(params), (xs, g_ys))
  return jax.tree.map(lambda a, p: a.astype(p.dtype), acc, params), g_xs


def layerwise_train_step(
  embed_fn: Callable[[Any, Any], jax.Array],
  block_fn: Callable[[Any, jax.Array], jax.Array],
  head_fn: Callable[[Any, jax.Array, Any], jax.Array],
  optimizer: optax.GradientTransformation,
  *,
  blocks: str = "layers",
  seed: int = 0,
  dtype=jnp.float32,
  tensor_ids=None,
  micro_batches: int = 1,
):
  """A jitted layer-wise train step for a model whose blocks are scanned (stacked).

  The model is ``head_fn(outer, block_fn(...block_fn(embed_fn(outer, batch))...), batch)``,
  block ``i`` applied with slice ``i`` of every leaf of ``params[blocks]`` (stacked on a
  leading layer axis) and ``outer`` the other entries of the params. The step:

  1. runs the blocks forward in a scan, keeping only each block's input;
  2. differentiates ``head_fn`` and updates at once the outer parameters that ``embed_fn``
     does not read (the head, the final norm);
  3. runs a reverse scan over the blocks: each recomputes its block from its input, takes
     its VJP and updates that block's slices of the projected (Q-GaLore) weights and of
     their optimizer state in the scan carry, INT8 weights requantised by stochastic
     rounding as :func:`~qgalore_jax.apply_updates` does; the gradients of the block's
     other parameters (norm scales: small) are stacked;
  4. updates the rest (the embedding, the blocks' other parameters).

  The full gradient never exists: the largest gradient alive is one block's, besides the
  outer parameters' and the small stacked ones. The step computes what
  :func:`~qgalore_jax.int8_train_step` computes on the same model (docs/spec.md section
  10): the optimizer works per leaf and per slice of a stack. XLA compiles the blocks' VJPs
  differently in the two programs, so a few gradient elements can differ in their last bit,
  and over many steps the two runs drift apart as far as runs whose inputs differ by one
  ulp do (section 10.3).

  Limits (errors at the first call): ``optimizer`` must be a plain
  :func:`~qgalore_jax.qgalore_adamw` (``skip_nonfinite=False``, not wrapped), since
  global-norm clipping, ``apply_if_finite`` and ``optax.MultiSteps`` need the whole
  gradient before the first update. Each call is one optimizer step on its whole batch.

  Micro-batches (``micro_batches=k``): the batch is split into ``k`` equal parts along the
  leading axis of every leaf; the head and each block's recompute and VJP run on one part
  at a time, and each parameter's gradient is summed over the parts (in float32) before its
  one update, so the activations alive are one part's. The loss is the mean of the parts'
  ``head_fn`` values, the mean over the batch when ``head_fn`` returns a mean over equally
  many items per part. A refresh sees the whole batch's gradient. The block inputs of the
  whole batch are kept, as without micro-batches.

  Args:
    embed_fn: ``embed_fn(outer, batch) -> x``: ``outer`` is a dict of the float params
      without the ``blocks`` entry.
    block_fn: ``block_fn(block_params, x) -> x``: one block; ``block_params`` is the float
      slice of ``params[blocks]``, without the layer axis.
    head_fn: ``head_fn(outer, x, batch) -> loss``, a scalar.
    optimizer: from :func:`~qgalore_jax.qgalore_adamw`, initialised with
      ``optimizer.init(dequantize_params(qparams))``; its dimension numbers must read the
      layer axis 0 of each stacked leaf as its first batch axis, as
      :func:`~qgalore_jax.nnx_dimension_numbers` does for a scanned model.
    blocks: the key of the stacked blocks in the params.
    seed: seed of the stochastic rounding.
    dtype: dtype of the dequantised weights the model sees.
    tensor_ids: see :func:`~qgalore_jax.apply_updates`.
    micro_batches: parts to split each batch into (see above); 1: the whole batch at once.

  Returns:
    ``step(qparams, opt_state, batch, step) -> (qparams, opt_state, loss)``, jitted, with
    ``qparams`` (a dict, e.g. ``nnx.to_pure_dict`` of the state, with INT8 leaves from
    :func:`~qgalore_jax.quantize_params` or float ones) and ``opt_state`` donated;
    ``step`` is the 0-based update count, as for :func:`~qgalore_jax.int8_train_step`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from qgalore_jax import DimensionNumbers, layerwise_train_step, qgalore_adamw
    >>> from qgalore_jax import dequantize_params, quantize_params
    >>> keys = jax.random.split(jax.random.key(0), 3)
    >>> params = {"embed": jax.random.normal(keys[0], (16, 8)),
    ...           "layers": {"w": jax.random.normal(keys[1], (3, 8, 8)) / 3},
    ...           "head": jax.random.normal(keys[2], (8, 16)) / 3}
    >>> dims = {"embed": None, "layers": {"w": DimensionNumbers(1, 2, 0)}, "head": None}
    >>> qparams = quantize_params(params, dimension_numbers=dims, group_size=64)
    >>> tx = qgalore_adamw(1e-2, rank=4, dimension_numbers=dims)
    >>> opt_state = tx.init(dequantize_params(qparams))
    >>> embed = lambda p, tokens: p["embed"][tokens]
    >>> block = lambda p, x: x + jnp.tanh(x @ p["w"])
    >>> def head(p, x, tokens):
    ...   logp = jax.nn.log_softmax(x @ p["head"])
    ...   return -jnp.mean(jnp.take_along_axis(logp[:-1], tokens[1:, None], 1))
    >>> step = layerwise_train_step(embed, block, head, tx)
    >>> tokens = jnp.arange(12) % 16
    >>> qparams, opt_state, loss = step(qparams, opt_state, tokens, jnp.int32(0))
    >>> qparams["layers"]["w"].codes.shape
    (3, 64)
  """
  _check_optimizer(optimizer)
  if not isinstance(blocks, str):
    raise TypeError(f"`blocks` must be a str (a key of the params), got {blocks!r}")
  if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
    raise ValueError(f"`micro_batches` must be a positive int, got {micro_batches!r}")
  parts = micro_batches

  def step_fn(qparams, opt_state, batch, step):
    if not isinstance(qparams, dict) or blocks not in qparams:
      keys = f" with keys {sorted(qparams)}" if isinstance(qparams, dict) else ""
      raise ValueError(
        f"the params must be a dict with the stacked blocks under {blocks!r}; got"
        f" {type(qparams).__name__}{keys}"
      )
    flat, treedef = jax.tree_util.tree_flatten_with_path(qparams, is_leaf=int8.is_quantized)
    leaves = [p for _, p in flat]
    in_blocks = [bool(path) and getattr(path[0], "key", None) == blocks for path, _ in flat]
    depths = {p.shape[0] if len(p.shape) else None for p, b in zip(leaves, in_blocks) if b}
    if len(depths) != 1 or None in depths:
      shapes = [jnp.shape(p) for p, b in zip(leaves, in_blocks) if b]
      raise ValueError(
        f"every leaf under {blocks!r} must be stacked on a leading layer axis of one size;"
        f" got shapes {shapes}"
      )
    (num_blocks,) = depths
    stats = treedef.flatten_up_to(projection_stats(opt_state))
    for (path, p), b, st in zip(flat, in_blocks, stats):
      if b and st is not None and jnp.shape(st["gap"])[:1] != (num_blocks,):
        raise ValueError(
          f"parameter {path_str(path)} is projected as a stack of batch shape"
          f" {jnp.shape(st['gap'])}: its dimension numbers must read the layer axis 0 as"
          " their first batch axis"
        )
      if b and int8.is_quantized(p) and p.layout.batch[:1] != (0,):
        raise ValueError(
          f"INT8 parameter {path_str(path)} must read the layer axis 0 as its first batch"
          f" axis; its batch axes are {p.layout.batch}"
        )
    # Updated in the reverse scan: the projected block leaves (state per slice). The
    # blocks' other leaves (norm scales, whose 8-bit moments would tile across layers)
    # have their gradients stacked and are updated with the outer leaves.
    in_scan = [b and st is not None for b, st in zip(in_blocks, stats)]
    ids = _tensor_ids(flat, tensor_ids, qparams)
    masked = lambda tree: jax.tree.map(lambda _: _MASKED, tree, is_leaf=int8.is_quantized)
    outer_masked = {k: masked(v) for k, v in qparams.items() if k != blocks}

    def flat_of(outer=None, block=None):
      """Leaves of a params-shaped tree from its outer and block parts (masked if None)."""
      block = masked(qparams[blocks]) if block is None else block
      return treedef.flatten_up_to({**(outer_masked if outer is None else outer), blocks: block})

    def update(grads, params, state, keep, current, block=None):
      """Runs the optimizer on the leaves flagged in ``keep`` and applies its updates to
      ``current`` (with ``block``: block ``block``'s slices, stacks of one)."""
      pick = lambda values: treedef.unflatten([v if k else _MASKED for v, k in zip(values, keep)])
      with _block(block):
        upd, state = optimizer.update(pick(grads), state, pick(params))
      out = list(current)
      for j, u in enumerate(treedef.flatten_up_to(upd)):
        if keep[j]:
          tid = ids[j] if ids[j] is None or block is None else _take(ids[j], block)
          out[j] = int8._apply_leaf(out[j], u, flat[j][0], seed, step, tid)
      return out, state

    outer = {k: int8.dequantize_params(v, dtype) for k, v in qparams.items() if k != blocks}
    float_leaves = flat_of(outer)  # outer leaves in float; MaskedNode on the blocks

    def block_params(i, sliced=None):
      """Block ``i``'s float params without the layer axis (in-scan leaves from ``sliced``,
      their block ``i`` already taken, if given)."""
      values = []
      for j, (p, b) in enumerate(zip(leaves, in_blocks)):
        one = sliced[j] if sliced is not None and in_scan[j] else _take(p, i) if b else None
        values.append(_float(one, dtype)[0] if b else _MASKED)
      return treedef.unflatten(values)[blocks]

    # 1. Forward: the blocks in a scan, keeping each block's input (with micro-batches,
    # split along a new leading axis and run one part at a time).
    x0, embed_vjp = jax.vjp(lambda o: embed_fn(o, batch), outer)
    if parts > 1:
      batches = _split(batch, parts, "the batch")
      x0 = _split(x0, parts, "embed_fn's output")
    run_block = lambda p, x: block_fn(p, x) if parts == 1 else jax.lax.map(partial(block_fn, p), x)
    x_last, inputs = jax.lax.scan(
      lambda x, i: (run_block(block_params(i), x), _as_bits(x)), x0, jnp.arange(num_blocks)
    )

    # 2. The head: loss, gradients, and the update of what the embedding does not read.
    outer_def = jax.tree.structure(outer)
    read = flat_of(jax.tree.unflatten(outer_def, _read_by(embed_fn, outer, batch)))
    whole_head = lambda o, x: head_fn(o, x, batch)
    head_read = _read_by(whole_head, outer, x_last if parts == 1 else _merge(x_last))
    if parts == 1:
      loss, (g_head, g_x) = jax.value_and_grad(whole_head, (0, 1))(outer, x_last)
    else:
      loss, g_head, g_x = _head_in_parts(head_fn, outer, x_last, batches, head_read)
    early = [not b and not r for b, r in zip(in_blocks, read)]
    new_leaves, state_early = update(
      flat_of(g_head), float_leaves, _select(opt_state, treedef, early), early, leaves
    )
    # The reverse scan starts after the loss and these updates: XLA would otherwise put
    # them (and the head's weight gradient) after it, keeping the head's temporaries (the
    # logits, their gradient) alive through the whole scan.
    g_x = _after(g_x, [loss, state_early, *(v for v, e in zip(new_leaves, early) if e)])

    # 3. Reverse scan: each block's VJP and the update of its projected slices. The carry
    # holds the stacks and, read out by the previous iteration, block i's slices of them:
    # each iteration writes block i into the stacks, then reads block i - 1 from what it
    # wrote, so the stacks are only ever written in place (read in the same iteration
    # before the write, XLA would copy whole stacks to keep the old values readable).
    def take_block(stacks, state, i):
      now = [_take(c, i) if s else _MASKED for c, s in zip(stacks, in_scan)]
      sub = trees.map_param_trees(
        lambda j, v: _take(v, i) if in_scan[j] and not is_masked(v) else v, treedef, state
      )
      return now, sub

    def backward(carry, xs):
      g_x, stacks, state, now, sub = carry
      i, x_bits = xs
      x_in = _from_bits(x_bits, x0.dtype)
      params_i = block_params(i, now)
      if parts == 1:
        _, block_vjp = jax.vjp(block_fn, params_i, x_in)
        g_block, g_x = block_vjp(g_x)
      else:
        g_block, g_x = _block_vjp_in_parts(block_fn, params_i, x_in, g_x)
      g_flat = flat_of(block=g_block)
      grads = [g[None] if s else g for g, s in zip(g_flat, in_scan)]
      params = [p[None] if s else p for p, s in zip(flat_of(block=params_i), in_scan)]
      now, sub = update(grads, params, _after(sub, g_x), in_scan, now, block=i)
      stacks = [_put(c, n, i) if s else c for c, n, s in zip(stacks, now, in_scan)]
      state = trees.map_param_trees(
        lambda j, v, n: _put(v, n, i) if in_scan[j] and not is_masked(v) else v, treedef, state, sub
      )
      now, sub = take_block(stacks, state, jnp.maximum(i - 1, 0))
      stacked = [g if b and not s else _MASKED for g, b, s in zip(g_flat, in_blocks, in_scan)]
      return (g_x, stacks, state, now, sub), stacked

    stacks = [p if s else _MASKED for p, s in zip(new_leaves, in_scan)]
    state = _select(opt_state, treedef, in_scan)
    carry = (g_x, stacks, state, *take_block(stacks, state, num_blocks - 1))
    (g_x0, stacks, state_scan, _, _), stacked = jax.lax.scan(
      backward, carry, (jnp.arange(num_blocks), inputs), reverse=True
    )

    # 4. The embedding (its gradient plus the head's, for a leaf both read) and the blocks'
    # other leaves, with their stacked gradients.
    (g_embed,) = embed_vjp(g_x0 if parts == 1 else _merge(g_x0))
    # The head's gradient joins the embedding's only for a leaf both read (a tied
    # embedding): for the others it is zero, and keeping it through the scan costs memory.
    g_outer = outer_def.unflatten(
      [
        h + e if both else e
        for h, e, both in zip(
          outer_def.flatten_up_to(g_head), outer_def.flatten_up_to(g_embed), head_read
        )
      ]
    )
    late = [not e and not s for e, s in zip(early, in_scan)]
    grads = [st if b else g for st, g, b in zip(stacked, flat_of(g_outer), in_blocks)]
    params = [
      (_float(p, dtype) if b else f) if keep else _MASKED
      for p, f, b, keep in zip(leaves, float_leaves, in_blocks, late)
    ]
    new_leaves = [c if s else p for p, c, s in zip(new_leaves, stacks, in_scan)]
    new_leaves, state_late = update(
      grads, params, _select(opt_state, treedef, late), late, new_leaves
    )

    def merge(j, old, from_early, from_scan, from_late):
      del old
      return from_early if early[j] else from_scan if in_scan[j] else from_late

    new_state = trees.map_param_trees(
      merge,
      treedef,
      opt_state,
      state_early,
      state_scan,
      state_late,
      non_params=lambda old, from_early, from_scan, from_late: from_late,  # count + 1
    )
    return treedef.unflatten(new_leaves), new_state, loss

  return jax.jit(step_fn, donate_argnums=(0, 1))

"""Q-GaLore as an optax gradient transformation (docs/spec.md sections 1, 2, 4, 5, 7 and 9).

``scale_by_qgalore`` is the core transform: projected Adam on every leaf it is given, with
no learning rate and no decay. The user alias ``qgalore_adamw`` lives in ``alias.py``;
``projection_stats`` reads the refresh statistics out of either one's state.
"""

import collections
import contextvars
import functools
import itertools
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from qgalore_jax._src import generator
from qgalore_jax._src import layout
from qgalore_jax._src import moments
from qgalore_jax._src import projector as proj
from qgalore_jax._src import schedule
from qgalore_jax._src import sharding
from qgalore_jax._src import trees
from qgalore_jax._src.checks import check_bits
from qgalore_jax._src.checks import check_choice
from qgalore_jax._src.checks import check_int
from qgalore_jax._src.checks import check_number
from qgalore_jax._src.checks import static_hint
from qgalore_jax._src.quantization import QuantizedArray

# Set (to a traced int) while layer-wise training updates block ``i`` of each stack passed
# as a stack of that one block (layerwise.py): its slices are slices ``i * S + j`` of the
# whole stack.
BLOCK_INDEX: contextvars.ContextVar = contextvars.ContextVar("qgalore_block_index", default=None)


class ScaleByQGaLoreState(NamedTuple):
  """State of :func:`scale_by_qgalore`: arrays only, so it checkpoints with orbax.

  Like optax's states it is a tuple of pytrees shaped like the params, one array per
  projected matrix in each (``optax.MaskedNode`` where a leaf is not routed here), so that
  containers which wrap state per param (``flax.nnx.Optimizer``) see plain arrays.
  """

  count: jax.Array  # int32 []: updates done so far (the 0-based step of the next update)
  # Low-rank moments, [m, r] ("right") or [r, n] ("left"): trees of mu_dtype (mu) and
  # float32 (nu) arrays, or with moment_bits=8 a QuantizedMoment of two trees (codes, absmax).
  mu: Any
  nu: Any
  # QuantizedArray whose fields are trees (codes uint8 packed, scale and zero float32), or
  # a tree of float32 [r, k] bases when proj_bits is None.
  projector: Any
  subspace: schedule.SubspaceState  # whose fields are trees: gap, cosines, ... per matrix


def scale_by_qgalore(
  rank: int = 128,
  update_proj_gap: int = 200,
  scale: float = 0.25,
  proj_bits: int | None = 4,
  proj_group_size: int = 256,
  cos_threshold: float = 0.4,
  gamma_proj: float = 2,
  queue_size: int = 5,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  mu_dtype: Any | None = None,
  input_axis: int | Any | Callable[[optax.Params], Any] | None = None,
  moment_bits: int | None = None,
  min_8bit_size: int = moments.MIN_QUANTIZED_SIZE,
  projector_fn: Callable[[jax.Array, int], jax.Array] | None = None,
  dimension_numbers: Any = None,
  svd_method: str = "full",
  oversample: int = 16,
  power_iters: int = 2,
  subspace_iters: int = 1,
  seed: int = 0,
) -> optax.GradientTransformation:
  r"""Projected Adam in an adaptive, INT4-stored low-rank gradient subspace (Q-GaLore).

  Every leaf given to this transform is a 2-D matrix, read through its input axis, or a
  stack of matrices or an N-D kernel, read through its dimension numbers; either way each
  matrix (slice) is a canonical (out, in) matrix :math:`W \in \mathbb{R}^{m \times n}`
  (docs/spec.md sections 1.2 and 1.3), and everything below applies to each slice.
  With :math:`r = \min(\text{rank}, m, n)` and the projector :math:`P` found by SVD of the
  gradient :math:`G` on refresh steps (stored group-wise quantised, always used dequantised):

  .. math::

    R_t &= G_t P^\top \;(m \ge n) \quad\text{or}\quad P^\top G_t \;(m < n) \\
    \mu_t &= \beta_1 \mu_{t-1} + (1 - \beta_1) R_t, \qquad
    \nu_t = \beta_2 \nu_{t-1} + (1 - \beta_2) R_t^2 \\
    u_t &= \frac{\mu_t / (1 - \beta_1^t)}{\sqrt{\nu_t / (1 - \beta_2^t)} + \epsilon}, \qquad
    \text{update}_t = \text{scale} \cdot (u_t P \;\text{or}\; P u_t)

  Each matrix refreshes its projector on its own schedule (docs/spec.md section 4): every ``gap``
  steps, where ``gap`` starts at ``update_proj_gap`` and is multiplied by ``gamma_proj``
  whenever the mean cosine of the last ``queue_size`` successive top singular vectors is at
  least ``cos_threshold``. The SVD runs only on refresh steps, inside ``lax.cond``.

  A refresh whose gradient (or SVD) is not finite is skipped: the old projector and
  schedule are kept, and the matrix tries again at its next refresh step (every step while
  it has no projector yet). The moments follow optax's ``scale_by_adam`` semantics and are
  not protected; wrap the optimizer in ``optax.apply_if_finite`` to skip such steps whole.

  Args:
    rank: rank of the subspace; clamped to ``min(m, n)`` per matrix.
    update_proj_gap: initial refresh interval ``T`` in steps.
    scale: GaLore's ``alpha``, multiplies the back-projected update.
    proj_bits: bits of the stored projector (1..8; 4 or fewer are packed two per byte), or
      ``None`` for a float32 projector (plain GaLore storage).
    proj_group_size: elements per quantisation group of the projector.
    cos_threshold: mean cosine in [-1, 1] at or above which the gap grows.
    gamma_proj: growth factor of the gap (>= 1); 1 disables adaptive refresh.
    queue_size: number of recent cosines averaged (>= 1).
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to the root of the second moment.
    mu_dtype: dtype of the stored first moment; ``None`` keeps it float32.
    input_axis: for 2-D leaves, which axis is the input axis: ``0`` for Flax kernels
      (in, out), ``1`` for arrays stored (out, in); an int, a pytree of ints shaped like
      the params, or a callable on the params returning one. ``None`` (the default) is 0
      unless ``dimension_numbers`` is given. Shorthand for
      ``DimensionNumbers(reduction_axis=a, output_axis=1 - a)``.
    dimension_numbers: how to read each leaf as a stack of canonical (out, in) matrices
      (docs/spec.md section 1.3): a :class:`~qgalore_jax.DimensionNumbers` for every leaf, a
      pytree of them shaped like the params, or a callable on the params returning one
      (e.g. :func:`~qgalore_jax.nnx_dimension_numbers`). Each slice along the batch axes
      is its own matrix with its own projector, moments and schedule; only the slices due
      on a step run an SVD. Give this or ``input_axis``, not both.
    moment_bits: ``None`` for float32 moments, or 8 for 8-bit block-wise moments (codes
      plus a float32 absmax per 16 x 16 tile, for low-rank moments of at least
      ``min_8bit_size`` elements; see :func:`scale_by_adam_8bit` and ``docs/spec.md`` section 8).
    min_8bit_size: under ``moment_bits=8``, low-rank moments with fewer elements stay
      float32 (bitsandbytes' name and default).
    projector_fn: ``projector_fn(grad_MxN, rank)`` returning the float32 (r, k)
      sign-canonical basis of the float32 (m, n) canonical gradient, called on refresh
      steps inside ``lax.cond`` (it may use ``jax.pure_callback``); ``None`` is
      :func:`compute_projector`. The hook for a reference SVD in parity tests or another
      projector in research: storage, schedule and the finite check apply to its basis.
      It replaces the full SVD, so it requires ``svd_method="full"``.
    svd_method: how a refresh finds the basis (docs/spec.md section 2.6): ``"full"`` (the
      default), a thin SVD of the gradient; ``"randomized"``, a range finder from a
      Rademacher sketch with ``oversample`` extra columns and ``power_iters`` power
      iterations, then an SVD of the small ``(r + oversample) x k`` matrix; ``"subspace"``,
      ``subspace_iters`` iterations warm-started from the stored projector (a matrix's first
      refresh runs ``"randomized"``). The sketch is keyed by ``seed``, the step, the
      leaf's index among the params' leaves and the slice's index in its stack, so runs
      repeat and resume exactly and the torch twin draws the same one.
    oversample: extra sketch columns of ``"randomized"`` and ``"subspace"`` (>= 0).
    power_iters: power iterations of ``"randomized"`` (>= 0).
    subspace_iters: iterations of ``"subspace"`` (>= 1).
    seed: seed of the sketches (an int >= 0; only ``"randomized"`` and ``"subspace"``
      draw them).

  Returns:
    An ``optax.GradientTransformation`` whose updates have each gradient's dtype.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from qgalore_jax import scale_by_qgalore
    >>> params = {"w": jnp.ones((8, 4))}
    >>> tx = optax.chain(scale_by_qgalore(rank=2), optax.scale_by_learning_rate(1e-2))
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.arange(32.0).reshape(8, 4)}
    >>> updates, state = tx.update(grads, state, params)
    >>> updates["w"].shape
    (8, 4)

  References:
    Zhang et al., `Q-GaLore: Quantized GaLore with INT4 Projection and Layer-Adaptive
    Low-Rank Gradients <https://arxiv.org/abs/2407.08296>`_, 2024.
    Zhao et al., `GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection
    <https://arxiv.org/abs/2403.03507>`_, 2024.
  """
  check_int(rank, "rank")
  check_int(update_proj_gap, "update_proj_gap")
  check_number(scale, "scale")
  if proj_bits is not None:
    check_bits(proj_bits, "proj_bits")
  check_int(proj_group_size, "proj_group_size")
  check_number(cos_threshold, "cos_threshold", -1.0, 1.0)
  check_number(gamma_proj, "gamma_proj", 1.0)
  if isinstance(gamma_proj, bool) or not isinstance(gamma_proj, (int, float)):
    raise TypeError(
      f"`gamma_proj` must be a Python number, got {type(gamma_proj).__name__}"
      f"{static_hint(gamma_proj, 'gamma_proj')}"
    )
  check_int(queue_size, "queue_size")
  check_number(b1, "b1", 0.0, 1.0, high_open=True)
  check_number(b2, "b2", 0.0, 1.0, high_open=True)
  check_number(eps, "eps", 0.0)
  moments.check_moment_bits(moment_bits, mu_dtype)
  check_int(min_8bit_size, "min_8bit_size")
  check_choice(svd_method, "svd_method", proj.SVD_METHODS)
  check_int(oversample, "oversample", minimum=0)
  check_int(power_iters, "power_iters", minimum=0)
  check_int(subspace_iters, "subspace_iters", minimum=1)
  check_int(seed, "seed", minimum=0)
  if projector_fn is not None and svd_method != "full":
    raise ValueError(
      f"`projector_fn` replaces the full SVD, so it needs svd_method='full', got"
      f" svd_method={svd_method!r}; give one or the other"
    )
  if projector_fn is None:
    projector_fn = proj.compute_projector
  elif not callable(projector_fn):
    raise TypeError(
      f"`projector_fn` must be a callable (grad_MxN, rank) -> basis or None, got"
      f" {type(projector_fn).__name__} {projector_fn!r}"
    )
  mu_dtype = jnp.float32 if mu_dtype is None else jnp.dtype(mu_dtype)

  def leaf_layout(lay: layout.StackLayout):
    shape = lay.matrix_shape
    side = proj.projector_side(shape)
    return proj.basis_shape(shape, rank), side, proj.low_rank_shape(shape, rank)

  def init_leaf(lay):
    basis_shape, _, low_rank_shape = leaf_layout(lay)
    one_slice = (
      moments.init_moment(low_rank_shape, True, moment_bits, mu_dtype, min_8bit_size),
      moments.init_moment(low_rank_shape, False, moment_bits, min_size=min_8bit_size),
      proj.store_projector(jnp.zeros(basis_shape, jnp.float32), proj_bits, proj_group_size),
      schedule.init_subspace(basis_shape[1], update_proj_gap, queue_size),
    )
    # Every slice of a stack starts from the same state, held with the batch shape in front.
    return jax.tree.map(lambda a: jnp.broadcast_to(a, lay.batch_shape + a.shape), one_slice)

  def leaf_specs(lay, state, param, mesh):
    """Partition specs of a leaf's ``(mu, nu, projector, subspace)`` (docs/spec.md section 9).

    Batch axes as the param's. Per matrix, the mesh axes of the param's matrix axes shard
    the side of full length: the moments' ``m`` ("right") or ``n`` ("left"), their tile
    grid along it, the projector's bytes (or basis rows) and the top vector; where that side
    does not split evenly, and on the rank side, the array is replicated.
    """
    entries = sharding.spec_entries(param)
    batch = tuple(entries[a] for a in lay.batch)
    matrix = sharding.param_axes(entries, lay.output + lay.reduction)

    def spec(x, full_axis):
      rest = [None] * (x.ndim - len(batch))
      if full_axis is not None and matrix is not None:
        size = x.shape[len(batch) + full_axis]
        rest[full_axis] = sharding.entry_if_divisible(size, matrix, mesh)
      return jax.sharding.PartitionSpec(*batch, *rest)

    full = 0 if leaf_layout(lay)[1] == proj.RIGHT else 1
    mu, nu, stored, subspace = state
    moment = lambda m: moments.moment_spec(m, spec(getattr(m, "codes", m), full), mesh)
    projector = jax.tree.map(lambda a: spec(a, a.ndim - len(batch) - 1), stored)
    fields = {f: spec(a, 0 if f == "top_vector" else None) for f, a in subspace._asdict().items()}
    return moment(mu), moment(nu), projector, schedule.SubspaceState(**fields)

  def new_basis(g_MxN, carry, key):
    """The refresh's basis by ``svd_method`` (docs/spec.md sections 2.1 and 2.6).

    ``key`` is ``(step, tensor id, slice index)`` of the matrix's sketch.
    """
    if svd_method == "full":
      return projector_fn(g_MxN, rank)
    sketch_KxL = generator.sketch(seed, *key, proj.sketch_shape(g_MxN.shape, rank, oversample))
    randomized = lambda: proj.randomized_projector(g_MxN, rank, sketch_KxL, power_iters)
    if svd_method == "randomized":
      return randomized()
    basis_shape = proj.basis_shape(g_MxN.shape, rank)
    previous_RxK = proj.load_projector(carry[0], basis_shape, proj_bits, proj_group_size)
    start_KxL = proj.warm_start(sketch_KxL, previous_RxK)
    warm = lambda: proj.randomized_projector(g_MxN, rank, start_KxL, subspace_iters)
    return jax.lax.cond(carry[1].svd_count == 0, randomized, warm)

  def refresh_slice(g_MxN, carry, key, hp):
    """A slice's (stored projector, schedule) after its refresh (docs/spec.md section 4)."""
    basis_shape = proj.basis_shape(g_MxN.shape, rank)
    old_subspace = carry[1]
    finite = jnp.all(jnp.isfinite(g_MxN))
    basis_RxK = new_basis(jnp.where(finite, g_MxN, 0.0), carry, key)
    if basis_RxK.shape != basis_shape:
      raise ValueError(
        f"`projector_fn` returned a basis of shape {basis_RxK.shape} for a gradient of"
        f" shape {g_MxN.shape} at rank {rank}; expected {basis_shape}"
      )
    ok = finite & jnp.all(jnp.isfinite(basis_RxK))
    new = (
      proj.store_projector(basis_RxK, proj_bits, proj_group_size),
      schedule.record_refresh(old_subspace, basis_RxK[0], hp["cos_threshold"], gamma_proj),
    )
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, carry)

  def refresh_in_turn(g_slices, canonical, due, carry, count, hp, keys):
    """Refreshes the slices of ``g_slices`` flagged in ``due``, one SVD each, in a loop.

    ``canonical`` reads a slice as its float32 (m, n) matrix; ``keys`` are two int32 arrays
    (S,), each slice's tensor id and index in its stack, which key its sketch.
    """
    order = jnp.nonzero(due, size=due.shape[0], fill_value=0)[0]

    def body(j, carry):
      i = order[j]
      one = jax.tree.map(lambda a: a[i], carry)
      new = refresh_slice(canonical(g_slices[i]), one, (count, keys[0][i], keys[1][i]), hp)
      return jax.tree.map(lambda a, v: a.at[i].set(v), carry, new)

    return jax.lax.fori_loop(jnp.int32(0), jnp.sum(due, dtype=jnp.int32), body, carry)

  def refresh_split(mesh, g_slices, canonical, due, carry, count, hp, keys):
    """:func:`refresh_in_turn` with the slices split over every device of ``mesh`` (their
    number a multiple of its size) inside ``shard_map``: each device refreshes its own due
    slices, so each SVD runs once on the mesh, not once per device (docs/spec.md 9.2)."""
    arrays = {k: v for k, v in hp.items() if isinstance(v, jax.Array)}

    def local(g_slices, due, carry, keys, count, arrays):
      return refresh_in_turn(g_slices, canonical, due, carry, count, {**hp, **arrays}, keys)

    split = jax.sharding.PartitionSpec(mesh.axis_names)
    whole = jax.sharding.PartitionSpec()
    in_specs = (split, split, split, split, whole, jax.tree.map(lambda _: whole, arrays))
    run = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=split)
    return run(g_slices, due, carry, keys, count, arrays)

  def slice_keys(lay, tensor_id):
    """Each slice's (tensor id, index in the whole stack), as two int32 arrays (S,)."""
    # A stack updated one block at a time (layer-wise training) keys its sketches by the
    # slice's index in the whole stack.
    block = BLOCK_INDEX.get()
    first = 0 if block is None else block * lay.num_slices
    ids = jnp.full((lay.num_slices,), tensor_id, jnp.int32)
    return ids, first + jnp.arange(lay.num_slices, dtype=jnp.int32)

  def refresh_due_slices(g, lay, due, carry, *, count, tensor_id, hp, mesh):
    """Refreshes the slices flagged in ``due``, one SVD each, none for the others; split
    over the devices of ``mesh`` (None: not split), whose size divides the slices (others
    are refreshed by :func:`refresh_together`).

    Each canonical matrix is formed inside this branch: a transposed operand of the cond
    would be materialised on every step, refresh or not.
    """
    g_slices = lay.to_slices(g)
    canonical = lambda x: lay.slice_layout.to_stack(x)[0].astype(jnp.float32)
    keys = slice_keys(lay, tensor_id)
    if lay.num_slices == 1:
      one = jax.tree.map(lambda a: a[0], carry)
      new = refresh_slice(canonical(g_slices[0]), one, (count, tensor_id, keys[1][0]), hp)
      return jax.tree.map(lambda a: a[None], new)
    if mesh is None:
      return refresh_in_turn(g_slices, canonical, due, carry, count, hp, keys)
    # The stack is resharded along its slices (an all-to-all of the gradient).
    return refresh_split(mesh, g_slices, canonical, due, carry, count, hp, keys)

  def refresh_together(members, count, hp, mesh):
    """The (stored projector, schedule) of each of ``members``, ``(g, lay, due, carry,
    tensor_id)`` of leaves whose matrices have one shape, refreshed as one stack split over
    the devices of ``mesh``: the due slices of 2-D leaves, and of stacks that do not split
    evenly, run their SVDs once on the mesh, each on one device (docs/spec.md 9.2).

    In the refresh branch the leaves' canonical matrices are stacked (padded with slices
    that are never due to a multiple of the mesh's size) and resharded along the stack.
    """
    due = jnp.concatenate([m[2] for m in members])
    concat = lambda *xs: jnp.concatenate(xs)

    def refresh(carries):
      g = concat(*(lay.to_stack(g).astype(jnp.float32) for g, lay, *_ in members))
      keys = jax.tree.map(concat, *(slice_keys(m[1], m[4]) for m in members))
      carry = jax.tree.map(concat, *carries)
      total = g.shape[0]
      pad = lambda a: jnp.pad(a, [(0, -total % mesh.size)] + [(0, 0)] * (a.ndim - 1))
      g, padded_due, carry, keys = jax.tree.map(pad, (g, due, carry, keys))
      carry = refresh_split(mesh, g, lambda x: x, padded_due, carry, count, hp, keys)
      bounds = itertools.accumulate((m[1].num_slices for m in members), initial=0)
      part = lambda start, stop: jax.tree.map(lambda a: a[start:stop], carry)
      return [part(start, stop) for start, stop in itertools.pairwise(bounds)]

    return jax.lax.cond(jnp.any(due), refresh, lambda c: c, [m[3] for m in members])

  def update_slice(g, mu, nu, stored, lay, count_inc, hp, specs=None):
    """Projected Adam on one matrix ``g`` (a slice, laid out as ``lay``; no batch axes).

    ``specs`` (:class:`sharding.ProjectionSpecs`, or None) pins where the projection's
    operands and results live on a mesh (docs/spec.md section 9.5); values do not change.
    """
    pin = lambda x, field: (
      x if specs is None else jax.lax.with_sharding_constraint(x, getattr(specs, field))
    )
    basis_shape, side, _ = leaf_layout(lay)
    if proj_bits is not None:
      # Each device dequantizes the whole stored projector (its codes are a fraction of the
      # float basis' bytes), then keeps the columns it needs.
      stored = jax.tree.map(lambda a: pin(a, "stored"), stored)
    basis_RxK = proj.load_projector(stored, basis_shape, proj_bits, proj_group_size)
    if proj_bits is not None:
      basis_RxK = pin(basis_RxK, "stored")
    basis_RxK = pin(basis_RxK, "basis")
    g_MxN = pin(lay.to_stack(g)[0].astype(jnp.float32), "grad")
    r = pin(proj.project(g_MxN, basis_RxK), "low_rank")
    u, mu, nu = moments.adam_step(
      r,
      moments.load_moment(mu, True, moment_bits),
      moments.load_moment(nu, False, moment_bits),
      count_inc,
      hp["b1"],
      hp["b2"],
      hp["eps"],
    )
    u = pin(u, "back")
    # A leaf that stores its input axes first (a Flax kernel) gets its update written in
    # that layout by the matmul itself; transposing the (out, in) result would cost two
    # passes over the matrix.
    if lay.reduction_first:
      direction = proj.project_back_transposed(u, basis_RxK, side)
    else:
      direction = proj.project_back(u, basis_RxK, side)
    direction = lay.from_stack((hp["scale"] * direction)[None], transposed=lay.reduction_first)
    direction = pin(direction, "update")
    mu = moments.store_moment(mu, True, moment_bits, mu_dtype, min_8bit_size)
    nu = moments.store_moment(nu, False, moment_bits, min_size=min_8bit_size)
    return direction.astype(g.dtype), mu, nu

  def update_leaf(g, mu, nu, stored, lay, count_inc, hp, entries):
    """Projected Adam on each slice of a leaf (state as (S, ...) stacks, refreshed)."""
    specs = None
    mesh = jax.sharding.get_abstract_mesh()
    if entries is not None and not mesh.empty and not mesh.manual_axes:
      _, side, low_rank_shape = leaf_layout(lay)
      specs = sharding.projection_specs(entries, lay, side == proj.RIGHT, low_rank_shape, mesh)

    def one(g, mu, nu, stored):
      return update_slice(g, mu, nu, stored, lay.slice_layout, count_inc, hp, specs)

    direction, mu, nu = layout.map_slices(one, (lay.to_slices(g), mu, nu, stored))
    return lay.from_slices(direction), mu, nu

  def refresh_leaves(grads, layouts, carries, count, hp):
    """Each leaf's (stored projector, schedule), as (S, ...) stacks, after the refreshes due
    at ``count``. On a mesh (the context's, of more than one device, outside a caller's
    ``shard_map``) each SVD runs on one device: a stack that splits evenly over the devices
    alone, the other leaves together with those whose matrices have their shape."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or mesh.manual_axes:
      mesh = None
    dues = [schedule.refresh_due(carry[1], count) for carry in carries]
    carries = list(carries)
    together = collections.defaultdict(list)
    for i, (g, (lay, tensor_id), due, carry) in enumerate(zip(grads, layouts, dues, carries)):
      if mesh is not None and lay.num_slices % mesh.size:
        together[lay.matrix_shape].append(i)
        continue
      refresh = functools.partial(
        refresh_due_slices, g, lay, due, count=count, tensor_id=tensor_id, hp=hp, mesh=mesh
      )
      carries[i] = jax.lax.cond(jnp.any(due), refresh, lambda c: c, carry)
    for group in together.values():
      members = [(grads[i], layouts[i][0], dues[i], carries[i], layouts[i][1]) for i in group]
      for i, carry in zip(group, refresh_together(members, count, hp, mesh), strict=True):
        carries[i] = carry
    return carries

  projector_cls = None if proj_bits is None else QuantizedArray
  moment_cls = moments.moment_cls(moment_bits)

  def leaf_layouts(params):
    specs = layout.resolve_specs(params, dimension_numbers, input_axis, "scale_by_qgalore")
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=layout.is_masked)[0]
    masked = [layout.is_masked(p) for _, p in flat]
    for (path, p), s, m in zip(flat, specs, masked, strict=True):
      if s is None and not m:
        how = "dimension numbers" if dimension_numbers is not None else "a 2-D shape"
        raise ValueError(
          f"scale_by_qgalore projects every leaf it is given, but parameter"
          f" {layout.path_str(path)} of shape {jnp.shape(p)} has no {how}; route it elsewhere"
          " (qgalore_adamw does: its `mask`, or None in `dimension_numbers`)"
        )
    layouts = layout.resolve_layouts(params, specs)
    # A leaf's tensor id, which keys its sketches, is its index among all the params' leaves,
    # those routed elsewhere counted: as the INT8 weights' default ids (section 6.4).
    return [(lay, i) for i, (lay, m) in enumerate(zip(layouts, masked, strict=True)) if not m]

  def init_fn(params):
    layouts = leaf_layouts(params)
    treedef = jax.tree.structure(params)
    per_leaf = [init_leaf(lay) for lay, _ in layouts]
    mesh = sharding.explicit_mesh(params)
    if mesh is not None:
      per_leaf = [
        sharding.place(state, leaf_specs(lay, state, p, mesh), mesh)
        for state, (lay, _), p in zip(per_leaf, layouts, jax.tree.leaves(params), strict=True)
      ]
    mu, nu, stored, subspace = ([leaf[i] for leaf in per_leaf] for i in range(4))
    return ScaleByQGaLoreState(
      count=jnp.zeros([], jnp.int32),
      mu=trees.pack(treedef, mu, moment_cls),
      nu=trees.pack(treedef, nu, moment_cls),
      projector=trees.pack(treedef, stored, projector_cls),
      subspace=trees.struct_of_trees(schedule.SubspaceState, treedef, subspace),
    )

  def update_fn(updates, state, params, hp):
    del params
    layouts = leaf_layouts(updates)
    leaves, treedef = jax.tree.flatten(updates)
    count_inc = optax.safe_increment(state.count)
    # Under an Explicit mesh, the gradients' specs (sharding.explicit_update records them).
    entries = sharding.update_entries() or [None] * len(leaves)
    # State arrays hold the batch shape in front; the update works on (S, ...) stacks.
    per_leaf_state = zip(
      trees.unpack(treedef, state.mu, moment_cls),
      trees.unpack(treedef, state.nu, moment_cls),
      trees.unpack(treedef, state.projector, projector_cls),
      trees.structs_per_leaf(schedule.SubspaceState, treedef, state.subspace),
      strict=True,
    )
    states = [
      jax.tree.map(lay.batch_to_slices, leaf)
      for leaf, (lay, _) in zip(per_leaf_state, layouts, strict=True)
    ]
    carries = refresh_leaves(leaves, layouts, [s[2:] for s in states], state.count, hp)
    per_leaf = []
    for g, (mu, nu, _, _), (stored, subspace), (lay, _), spec in zip(
      leaves, states, carries, layouts, entries, strict=True
    ):
      direction, mu, nu = update_leaf(g, mu, nu, stored, lay, count_inc, hp, spec)
      to_batch = lambda t, lay=lay: jax.tree.map(lay.slices_to_batch, t)
      per_leaf.append((direction, *to_batch((mu, nu, stored, subspace))))
    new_updates, mu, nu, stored, subspace = ([leaf[i] for leaf in per_leaf] for i in range(5))
    return treedef.unflatten(new_updates), ScaleByQGaLoreState(
      count=count_inc,
      mu=trees.pack(treedef, mu, moment_cls),
      nu=trees.pack(treedef, nu, moment_cls),
      projector=trees.pack(treedef, stored, projector_cls),
      subspace=trees.struct_of_trees(schedule.SubspaceState, treedef, subspace),
    )

  # Hyperparameters that are arrays (optax.inject_hyperparams) enter the update as arguments:
  # under Explicit mesh axes it runs with the axes made Auto, where a closed-over array of
  # the Explicit mesh cannot be used.
  hyperparams = dict(scale=scale, cos_threshold=cos_threshold, b1=b1, b2=b2, eps=eps)
  return optax.GradientTransformation(init_fn, sharding.explicit_update(update_fn, hyperparams))


def _unwrap(x):
  """The value inside a Flax NNX variable (``nnx.Optimizer`` wraps state per param), or x."""
  return x.get_value() if hasattr(x, "get_value") else x


def projection_stats(opt_state) -> Any:
  """Per-matrix refresh statistics, for logging.

  Args:
    opt_state: the state of an optimizer that contains one :func:`scale_by_qgalore`
      (e.g. from :func:`qgalore_adamw`, possibly inside ``optax.chain``,
      ``optax.inject_hyperparams`` or ``flax.nnx.Optimizer``).

  Returns:
    A pytree shaped like the params: for each projected leaf a dict with int32 ``gap``
    (current refresh interval), ``svd_count`` (SVDs so far) and ``num_cosines``, and float32
    ``mean_cosine`` (mean of the filled cosine buffer, 0 while empty); ``None`` elsewhere.
    For a stack of matrices each is an array of the leaf's batch shape, one entry per
    slice (docs/spec.md section 1.3).

  Example:
    >>> import jax.numpy as jnp
    >>> from qgalore_jax import qgalore_adamw, projection_stats
    >>> params = {"w": jnp.ones((8, 4)), "b": jnp.zeros(4)}
    >>> state = qgalore_adamw(1e-3, rank=2).init(params)
    >>> stats = projection_stats(state)
    >>> stats["b"] is None, int(stats["w"]["gap"]), int(stats["w"]["svd_count"])
    (True, 200, 0)
  """
  found = [
    s
    for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, ScaleByQGaLoreState))
    if isinstance(s, ScaleByQGaLoreState)
  ]
  if len(found) != 1:
    raise ValueError(f"expected one Q-GaLore state in `opt_state`, found {len(found)}")
  subspace = found[0].subspace
  is_unit = lambda x: isinstance(_unwrap(x), (jax.Array, optax.MaskedNode))
  gaps, treedef = jax.tree.flatten(subspace.gap, is_leaf=is_unit)
  fields = {f: treedef.flatten_up_to(getattr(subspace, f)) for f in schedule.SubspaceState._fields}

  def stats(i):
    sub = schedule.SubspaceState(**{f: _unwrap(values[i]) for f, values in fields.items()})
    if isinstance(sub.gap, optax.MaskedNode):
      return None
    queue_size = sub.cosines.shape[-1]
    filled = jnp.arange(queue_size) >= queue_size - sub.num_cosines[..., None]
    total = jnp.sum(jnp.where(filled, sub.cosines, 0.0), axis=-1)
    return {
      "gap": sub.gap,
      "svd_count": sub.svd_count,
      "num_cosines": sub.num_cosines,
      "mean_cosine": total / jnp.maximum(sub.num_cosines, 1),
    }

  return treedef.unflatten([stats(i) for i in range(len(gaps))])

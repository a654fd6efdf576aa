"""Optimizer state on a device mesh (docs/spec.md section 9).

Three pieces:

* the placement rule: which mesh axes each state array is sharded along, from its param's
  (:func:`entry_if_divisible`, :func:`param_axes`, used by each transform's ``init``);
* :func:`explicit_update`: a transform's ``update`` under a mesh with Explicit axes, run
  with those axes made Auto (the compiler partitions the SVD, the projections and the
  moment codes as under an Auto mesh) and its outputs placed as its inputs were; while it
  traces, :func:`update_entries` gives the gradients' specs, with which the projections
  pin their operands (:func:`projection_specs`); INT8 weights (``int8.py``) run under Auto
  axes too, with :func:`int8_weight_specs` and :func:`dequantized_spec` placing what they
  create;
* :func:`state_shardings`: the ``NamedSharding`` of every leaf of ``tx.init(params)``, for
  ``jax.jit(tx.init, out_shardings=...)`` and orbax restore targets.
"""

import contextvars
import functools
import math
from typing import Any
from typing import NamedTuple

import jax
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from qgalore_jax._src import trees

# The spec entries of each leaf of the gradients (``spec_entries``, in leaf order) while
# ``explicit_update`` traces an update under Auto axes, where the arrays no longer carry them.
_UPDATE_ENTRIES: contextvars.ContextVar = contextvars.ContextVar(
  "qgalore_update_entries", default=None
)


def explicit_mesh(tree) -> jax.sharding.AbstractMesh | None:
  """The abstract mesh of the first array of ``tree`` typed on Explicit mesh axes, or None."""
  if not hasattr(jax, "typeof"):  # a JAX before sharding in types has no Explicit axes
    return None
  for x in jax.tree.leaves(tree):
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is not None and not mesh.empty and mesh.explicit_axes:
      return mesh
  return None


def spec_entries(x) -> tuple:
  """One entry per axis of ``x``'s typed sharding: a mesh axis name, a tuple of them, or None."""
  spec = tuple(jax.typeof(x).sharding.spec)
  return spec + (None,) * (x.ndim - len(spec))


def _axis_names(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def param_axes(entries: tuple, axes) -> Any:
  """The mesh axes of the param's ``axes`` together, as one spec entry (None if none)."""
  names = [n for a in axes for n in _axis_names(entries[a])]
  if not names:
    return None
  return names[0] if len(names) == 1 else tuple(names)


def entry_if_divisible(size: int, entry, mesh) -> Any:
  """``entry`` where ``size`` splits evenly over its mesh axes, else None (replicated)."""
  ways = math.prod(mesh.shape[n] for n in _axis_names(entry))
  return entry if size % ways == 0 else None


def tile_spec(spec: PartitionSpec, tiles_shape: tuple[int, ...], mesh) -> PartitionSpec:
  """The spec of an 8-bit moment's tile maxima, from its codes' ``spec``: each axis of the
  tile grid keeps the codes' mesh axes where it splits evenly over them."""
  entries = tuple(spec) + (None,) * (len(tiles_shape) - len(spec))
  return PartitionSpec(*(entry_if_divisible(n, e, mesh) for n, e in zip(tiles_shape, entries)))


def in_auto_axes(fn, out_specs, mesh, *args):
  """``fn(*args)`` with the Explicit axes of ``mesh`` made Auto, its outputs placed at
  ``out_specs`` (a tree of ``PartitionSpec`` over them): ``jax.sharding.auto_axes``, also
  where the arrays were placed without ``jax.set_mesh`` (no abstract mesh in context).

  ``args`` are passed to ``fn`` as arguments: an array closed over from the Explicit mesh
  cannot be used where its axes are Auto.
  """
  run = jax.sharding.auto_axes(fn, out_sharding=out_specs)
  if jax.sharding.get_abstract_mesh().empty:
    with jax.sharding.use_abstract_mesh(mesh):
      return run(*args)
  return run(*args)


def int8_weight_specs(x, lay, mesh, sizes) -> tuple[PartitionSpec, ...]:
  """Specs of an INT8 weight's arrays (codes, scale, zero: ``batch + (size,)`` for each
  of ``sizes``) from the leaf ``x`` they quantise, read through ``lay``: batch axes as the
  leaf's, the last axis along the mesh axes of the leaf's matrix axes where it splits
  evenly over them (as a stored projector's, docs/spec.md section 9.2)."""
  entries = spec_entries(x)
  batch = tuple(entries[a] for a in lay.batch)
  matrix = param_axes(entries, lay.output + lay.reduction)
  return tuple(PartitionSpec(*batch, entry_if_divisible(n, matrix, mesh)) for n in sizes)


def dequantized_spec(codes, lay, mesh) -> PartitionSpec:
  """Spec of the weight dequantised from ``codes`` (``batch + (bytes,)``), in the leaf's
  shape of ``lay``: batch axes as the codes'; the mesh axes of the codes' last axis on the
  first of the leaf's output axes, then reduction axes, whose length splits evenly over
  them (replicated if none does)."""
  entries = spec_entries(codes)
  out = [None] * len(lay.shape)
  for axis, entry in zip(lay.batch, entries[:-1]):
    out[axis] = entry
  if entries[-1] is not None:
    for axis in lay.output + lay.reduction:
      if entry_if_divisible(lay.shape[axis], entries[-1], mesh) is not None:
        out[axis] = entries[-1]
        break
  return PartitionSpec(*out)


def place(state, specs, mesh):
  """``state`` resharded to ``specs`` (a tree of ``PartitionSpec`` over it) on ``mesh``."""
  is_spec = lambda s: isinstance(s, PartitionSpec)
  reshard = lambda s, x: jax.sharding.reshard(x, NamedSharding(mesh, s))
  return jax.tree.map(reshard, specs, state, is_leaf=is_spec)


def explicit_update(update_fn, hyperparams: dict):
  """An optax update function that also runs where its arrays have Explicit mesh axes.

  Under such a mesh every JAX operation type-checks the shardings of its operands, and an
  SVD, a matmul over a sharded contracting axis or a tile reshape of a sharded moment does
  not. The update instead runs with the mesh's axes made Auto (``jax.sharding.auto_axes``),
  where the compiler partitions it as under an Auto mesh, and returns the updates sharded
  as the gradients and the state as it came in: a jitted step keeps its types, hence one
  trace. Without Explicit axes ``update_fn`` runs as it is.

  Args:
    update_fn: ``update_fn(updates, state, params, hyperparams)``.
    hyperparams: the numbers ``update_fn`` reads, by name: Python numbers, or arrays (as
      ``optax.inject_hyperparams`` gives them), which are passed in as arguments, since an
      array closed over from the Explicit mesh cannot be used where its axes are Auto.

  Returns:
    ``update(updates, state, params=None)``.
  """

  @functools.wraps(update_fn)
  def wrapped(updates, state, params=None):
    arrays = {k: v for k, v in hyperparams.items() if isinstance(v, jax.Array)}
    mesh = explicit_mesh((updates, state, arrays))
    if mesh is None:
      return update_fn(updates, state, params, hyperparams)
    out = jax.tree.map(lambda x: PartitionSpec(*spec_entries(x)), (updates, state))
    entries = [spec_entries(x) for x in jax.tree.leaves(updates)]

    def body(u, s, p, a):
      token = _UPDATE_ENTRIES.set(entries)
      try:
        return update_fn(u, s, p, {**hyperparams, **a})
      finally:
        _UPDATE_ENTRIES.reset(token)

    return in_auto_axes(body, out, mesh, updates, state, params, arrays)

  return wrapped


def update_entries() -> list[tuple] | None:
  """The gradients' spec entries, one tuple per leaf, while :func:`explicit_update` traces
  an update; None otherwise (no Explicit mesh: the compiler alone places the arrays)."""
  return _UPDATE_ENTRIES.get()


class ProjectionSpecs(NamedTuple):
  """Where the arrays of one matrix's projected update live (docs/spec.md section 9.5):
  partition specs of the canonical gradient (m, n), the stored projector's arrays (whole on
  every device), its dequantized basis (r, k), the projected gradient and moments, the
  low-rank update before back-projection, and the slice's update in the leaf's layout."""

  grad: PartitionSpec
  stored: PartitionSpec
  basis: PartitionSpec
  low_rank: PartitionSpec
  back: PartitionSpec
  update: PartitionSpec


def projection_specs(entries, lay, right: bool, low_rank_shape, mesh) -> ProjectionSpecs | None:
  """The :class:`ProjectionSpecs` of a slice of a leaf whose spec entries are ``entries``.

  The gradient stays as its param is split, so the projection contracts it where it lies:
  over a split contracted side each device projects its own block and the partial low-rank
  results are summed into the moments' placement (section 9.2), and the low-rank update is
  gathered along its rank side before back-projection, so that each device writes its own
  block of the update; over a split kept side nothing moves. The basis is split along
  ``k`` as the gradient's side of that length. None (the compiler chooses) where the
  gradient's matrix axes are not split, or where the output or reduction side of the leaf
  spans several axes.
  """
  if len(lay.output) != 1 or len(lay.reduction) != 1:
    return None
  m_entry, n_entry = entries[lay.output[0]], entries[lay.reduction[0]]
  if m_entry is None and n_entry is None:
    return None
  matrix = param_axes(entries, lay.output + lay.reduction)
  full = low_rank_shape[0] if right else low_rank_shape[1]
  full_entry = entry_if_divisible(full, matrix, mesh)
  rest = [a for a in range(len(lay.shape)) if a not in lay.batch]
  return ProjectionSpecs(
    grad=PartitionSpec(m_entry, n_entry),
    stored=PartitionSpec(),
    basis=PartitionSpec(None, n_entry if right else m_entry),
    low_rank=PartitionSpec(full_entry, None) if right else PartitionSpec(None, full_entry),
    back=PartitionSpec(m_entry, None) if right else PartitionSpec(None, n_entry),
    update=PartitionSpec(*(entries[a] for a in rest)),
  )


def _mesh_of(params) -> jax.sharding.Mesh:
  meshes = {
    s.mesh
    for s in (getattr(p, "sharding", None) for p in jax.tree.leaves(params))
    if isinstance(s, NamedSharding)
  }
  if len(meshes) != 1:
    raise ValueError(
      "state_shardings needs params placed on one mesh: each leaf a jax.Array or a"
      " jax.ShapeDtypeStruct whose `.sharding` is a NamedSharding of that mesh; found"
      f" {len(meshes)} meshes"
    )
  mesh = meshes.pop()
  if not isinstance(mesh, jax.sharding.Mesh):
    raise ValueError("state_shardings needs params on a concrete jax.sharding.Mesh")
  return mesh


def state_shardings(tx: optax.GradientTransformation, params) -> Any:
  """The ``NamedSharding`` of every array of ``tx.init(params)`` (docs/spec.md section 9).

  Each state array is sharded after its param: Adam moments of a leaf that is not projected
  as the leaf; a projected matrix's low-rank moments along their full-size side (the side
  of length ``m`` or ``n``) over the mesh axes that shard the param's matrix axes, and
  replicated along the rank; its stored projector along its bytes, its schedule replicated;
  8-bit codes as their moment, tile maxima along the tile grid where it splits evenly; batch
  axes of a stack (a scanned model's layer axis) as the param's. A side that does not split
  evenly over its mesh axes is replicated. Step counts and other scalars are replicated.

  The placement is the one ``tx.init`` itself gives under a mesh with Explicit axes; this
  function traces ``tx.init`` abstractly (nothing is allocated) with the params' mesh made
  Explicit, so it serves meshes of either axis type. State arrays of other transforms that
  do not follow their param's sharding (``jnp.zeros(p.shape)``) get the param's when they
  have its shape.

  Args:
    tx: the optimizer, e.g. :func:`~qgalore_jax.qgalore_adamw`.
    params: the params as placed for training: arrays, or ``jax.ShapeDtypeStruct`` with a
      ``sharding``, every one a ``NamedSharding`` of the same mesh.

  Returns:
    A pytree shaped like ``tx.init(params)`` holding one ``NamedSharding`` of the params'
    mesh per array (``optax.MaskedNode`` stays in place): the ``out_shardings`` of
    ``jax.jit(tx.init)``, or the shardings of a checkpoint's restore target.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> from qgalore_jax import qgalore_adamw, state_shardings
    >>> mesh = jax.make_mesh((1,), ("fsdp",))
    >>> params = {"w": jnp.ones((32, 64)), "b": jnp.zeros(64)}  # a Flax kernel, (in, out)
    >>> params = jax.device_put(params, {"w": NamedSharding(mesh, P("fsdp", None)),
    ...                                  "b": NamedSharding(mesh, P())})
    >>> tx = qgalore_adamw(1e-3, rank=8)
    >>> shardings = state_shardings(tx, params)
    >>> state = jax.jit(tx.init, out_shardings=shardings)(params)
    >>> galore = state[0].inner_states["qgalore"].inner_state
    >>> galore.mu["w"].shape, galore.mu["w"].sharding.spec  # [m, r]: sharded along m = out
    ((64, 8), P('fsdp', None))
  """
  if not hasattr(jax.sharding, "AxisType"):
    raise RuntimeError(f"state_shardings needs JAX with Explicit mesh axes, got {jax.__version__}")
  mesh = _mesh_of(params)
  explicit_axes = (jax.sharding.AxisType.Explicit,) * len(mesh.axis_names)
  explicit = jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=explicit_axes)

  def typed(p):
    sharding = getattr(p, "sharding", None)
    spec = sharding.spec if isinstance(sharding, NamedSharding) else PartitionSpec()
    return jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=NamedSharding(explicit, spec))

  abstract = jax.tree.map(typed, params)
  with jax.set_mesh(explicit):
    state = jax.eval_shape(tx.init, abstract)
  specs = jax.tree.map(lambda s: _spec(s.sharding), state)
  param_leaves, treedef = jax.tree.flatten(abstract)

  def follow_param(i, spec, leaf):
    p = param_leaves[i]
    if isinstance(spec, PartitionSpec) and leaf.shape == p.shape and not any(spec):
      return p.sharding.spec
    return spec

  specs = trees.map_param_trees(follow_param, treedef, specs, state)
  is_spec = lambda s: isinstance(s, PartitionSpec)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=is_spec)


def _spec(sharding) -> PartitionSpec:
  return sharding.spec if isinstance(sharding, NamedSharding) else PartitionSpec()

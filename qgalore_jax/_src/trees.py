"""Transposing between one NamedTuple per leaf and one NamedTuple of param-shaped trees.

Optimizer states hold e.g. a ``QuantizedArray`` whose fields are trees shaped like the params
(as optax's own states do), so that containers which wrap state per param
(``flax.nnx.Optimizer``) see plain arrays; the update works one leaf at a time.
"""

import jax


def struct_of_trees(cls, treedef, per_leaf):
  """``cls`` whose fields are trees, from one ``cls`` per leaf (a pytree transpose)."""
  return cls(*(treedef.unflatten([getattr(x, f) for x in per_leaf]) for f in cls._fields))


def structs_per_leaf(cls, treedef, struct):
  """Inverse of :func:`struct_of_trees`: one ``cls`` per leaf of ``treedef``."""
  fields = [treedef.flatten_up_to(getattr(struct, f)) for f in cls._fields]
  return [cls(*values) for values in zip(*fields, strict=True)]


def pack(treedef, per_leaf, cls=None):
  """A tree of the per-leaf values, or with ``cls`` a ``cls`` of trees (:func:`struct_of_trees`)."""
  return treedef.unflatten(per_leaf) if cls is None else struct_of_trees(cls, treedef, per_leaf)


def unpack(treedef, packed, cls=None):
  """Inverse of :func:`pack`: one value per leaf of ``treedef``."""
  if cls is None:
    return treedef.flatten_up_to(packed)
  return structs_per_leaf(cls, treedef, packed)


def _children(node):
  """``(children, treedef)`` of one level of ``node`` (its immediate subtrees)."""
  return jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)


def _param_shaped(params_treedef, node):
  """``node``'s subtrees at the params' leaf positions, or ``None`` if it is not shaped so."""
  if params_treedef.num_nodes == 1:  # params that are one array: no subtree is told apart
    raise ValueError("the params must be a pytree of arrays, not a single array")
  try:
    return params_treedef.flatten_up_to(node)
  except (ValueError, TypeError):
    return None


def map_param_trees(f, params_treedef, state, *rest, non_params=None):
  """Maps ``f`` over every subtree of an optimizer state shaped like the params.

  An optimizer state holds trees shaped like the params (moments, projectors, schedules;
  ``optax.MaskedNode`` where a leaf is routed elsewhere) beside other leaves (step counts).
  Unlike ``optax.tree_map_params`` this finds them from the state itself, without calling
  ``init`` on placeholders (which :func:`~qgalore_jax.qgalore_adamw` cannot take: it reads
  shapes and dimension numbers from the params).

  Args:
    f: ``f(index, value, *rest_values)`` for each params leaf position of each params-shaped
      subtree: ``index`` is the leaf's index among the params' leaves, ``value`` what the
      state holds there (an array, or ``optax.MaskedNode``), ``rest_values`` the same place
      in each of ``rest``.
    params_treedef: the params' tree structure.
    state: the optimizer state.
    *rest: trees with the structure of ``state`` down to its params-shaped subtrees.
    non_params: ``non_params(leaf, *rest_leaves)`` for every other leaf (default: ``leaf``).

  Returns:
    ``state`` with every params-shaped subtree mapped by ``f`` and the other leaves by
    ``non_params``.
  """

  def walk(node, *others):
    values = _param_shaped(params_treedef, node)
    if values is not None:
      other_values = [params_treedef.flatten_up_to(o) for o in others]
      mapped = [f(i, v, *(o[i] for o in other_values)) for i, v in enumerate(values)]
      return params_treedef.unflatten(mapped)
    children, treedef = _children(node)
    if treedef.num_nodes == 1 and treedef.num_leaves == 1:  # a leaf
      return node if non_params is None else non_params(node, *others)
    other_children = [treedef.flatten_up_to(o) for o in others]
    return treedef.unflatten(
      [walk(c, *(o[k] for o in other_children)) for k, c in enumerate(children)]
    )

  return walk(state, *rest)

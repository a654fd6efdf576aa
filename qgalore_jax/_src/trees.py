"""Transposing between one NamedTuple per leaf and one NamedTuple of param-shaped trees.

Optimizer states hold e.g. a ``QuantizedArray`` whose fields are trees shaped like the params
(as optax's own states do), so that containers which wrap state per param
(``flax.nnx.Optimizer``) see plain arrays; the update works one leaf at a time.
"""


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

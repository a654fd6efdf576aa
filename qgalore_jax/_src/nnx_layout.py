"""Dimension numbers read off a Flax NNX model (docs/spec.md section 1.3, docs/stacked.md).

Each ``nnx.Param`` of a model gets a :class:`DimensionNumbers` (projected, one matrix per
slice) or ``None`` (plain AdamW) from the kind of module that holds it: the kernels of
``nnx.Linear``, ``nnx.LinearGeneral`` and ``nnx.Einsum`` are projected, everything else is
not. A module built under ``nnx.vmap`` or ``nnx.scan`` stores its variables with the stack
on leading axes; those axes become batch axes, so each layer of the stack is its own slice.
"""

import warnings
from collections.abc import Collection

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from qgalore_jax._src.layout import DimensionNumbers
from qgalore_jax._src.layout import path_str

Path = tuple[str, ...]


def _name(path: Path) -> str:
  return "/".join(path) or "<root>"


def _key_name(key) -> str:
  """One component of a pytree key path as a plain name; ints and ``'0'`` read the same."""
  for field in ("key", "name", "idx"):
    if hasattr(key, field):
      return str(getattr(key, field))
  return str(key)


def _param_path(key_path) -> Path:
  """A params leaf's key path as the name path of its ``nnx.Param``.

  ``nnx.state(model, nnx.Param)`` holds Variables, whose array sits under the attribute
  ``value``; the raw-array ``nnx.State`` and ``nnx.to_pure_dict`` hold the array itself.
  """
  if key_path and isinstance(key_path[-1], jax.tree_util.GetAttrKey):
    if key_path[-1].name == "value":
      key_path = key_path[:-1]
  return tuple(_key_name(k) for k in key_path)


def _numbers(reduction, output, batch) -> DimensionNumbers:
  """A DimensionNumbers from sequences of axes, with a lone reduction or output axis as an int."""
  one = lambda axes: axes[0] if len(axes) == 1 else tuple(axes)
  return DimensionNumbers(
    reduction_axis=one(reduction), output_axis=one(output), batch_axis=tuple(batch)
  )


def _stack_depth(kernel_shape: tuple[int, ...], own_shape: tuple[int, ...], where: str) -> int:
  """The number of leading stack axes in front of a kernel whose own shape is ``own_shape``."""
  k = len(kernel_shape) - len(own_shape)
  if k < 0 or tuple(kernel_shape[k:]) != tuple(own_shape):
    raise ValueError(
      f"{where} has a kernel of shape {tuple(kernel_shape)}, which is not its own shape"
      f" {tuple(own_shape)} after leading stack axes (nnx.vmap or nnx.scan with out_axes=0);"
      " pass its name in `exclude` or write its DimensionNumbers by hand"
    )
  return k


def _linear(module: nnx.Linear, shape: tuple[int, ...], where: str) -> DimensionNumbers:
  k = _stack_depth(shape, (module.in_features, module.out_features), where)
  return _numbers(range(k, k + 1), range(k + 1, k + 2), range(k))


def _linear_general(
  module: nnx.LinearGeneral, shape: tuple[int, ...], where: str
) -> DimensionNumbers:
  """Kernel (stack, batch, in..., out...): ``nnx.LinearGeneral`` stores it in that order."""
  batch = tuple(module.batch_axis.values())
  n_in, n_out = len(module.in_features), len(module.out_features)
  k = _stack_depth(shape, (*batch, *module.in_features, *module.out_features), where)
  first_in = k + len(batch)
  return _numbers(
    range(first_in, first_in + n_in),
    range(first_in + n_in, first_in + n_in + n_out),
    range(first_in),
  )


def _einsum(module: nnx.Einsum, shape: tuple[int, ...], where: str) -> DimensionNumbers:
  """Reduction, output and batch axes of an ``nnx.Einsum`` kernel, read off ``einsum_str``."""
  spec = module.einsum_str
  inputs, rest = spec.split(",")
  kernel, output = rest.split("->")
  k = _stack_depth(shape, tuple(module.kernel_shape), where)
  # A repeated letter, an ellipsis or a letter in neither operand has no matrix reading.
  clear = len(set(kernel)) == len(kernel) and all(
    letter.isalpha() and (letter in inputs or letter in output) for letter in kernel
  )
  axes = lambda keep: [k + i for i, letter in enumerate(kernel) if keep(letter)]
  reduction = axes(lambda letter: letter in inputs and letter not in output)
  out = axes(lambda letter: letter in output and letter not in inputs)
  batch = [*range(k), *axes(lambda letter: letter in inputs and letter in output)]
  if not (clear and reduction and out):
    raise ValueError(
      f"{where} has einsum_str {spec!r}, whose kernel {kernel!r} has no clear reduction"
      " (in the input, not the output) and output (in the output, not the input) axes;"
      " pass its name in `exclude` or write its DimensionNumbers by hand"
    )
  return _numbers(reduction, out, batch)


def _is_flax_layer(module) -> bool:
  """Whether ``module`` is (a subclass of) one of Flax's own layers, whose parameters we know."""
  return any(cls.__module__.startswith("flax.nnx.nn.") for cls in type(module).__mro__)


def _kernel_numbers(owner, path: Path, shape: tuple[int, ...]) -> DimensionNumbers | None:
  """The DimensionNumbers of a projected kernel, or None for any other parameter."""
  if path[-1] != "kernel":
    return None
  where = f"{type(owner).__name__} {_name(path[:-1])!r}"
  # isinstance, so that subclasses (nnx.LoRALinear's kernel is a Linear's) are covered too.
  if isinstance(owner, nnx.LinearGeneral):
    return _linear_general(owner, shape, where)
  if isinstance(owner, nnx.Einsum):
    return _einsum(owner, shape, where)
  if isinstance(owner, nnx.Linear):
    return _linear(owner, shape, where)
  return None


class NnxDimensionNumbers:
  """The dimension numbers of a Flax NNX model's parameters, as a callable on its params.

  Made by :func:`nnx_dimension_numbers`. Called on a params pytree (``nnx.state(model,
  nnx.Param)``, the raw-array ``nnx.State`` that ``nnx.Optimizer`` passes to an optax
  transform, or ``nnx.to_pure_dict`` of either), it returns a pytree of the same structure
  with a :class:`DimensionNumbers` or ``None`` for each leaf, matched by key-path names.
  """

  def __init__(self, specs: dict[Path, DimensionNumbers | None], ndims: dict[Path, int]):
    self._specs = specs
    self._ndims = ndims

  @property
  def table(self) -> dict[str, DimensionNumbers | None]:
    """Parameter path (``'blocks/mlp/up/kernel'``) to its dimension numbers, in model order."""
    return {_name(path): spec for path, spec in self._specs.items()}

  def __repr__(self) -> str:
    rows = "".join(f"  {name!r}: {spec},\n" for name, spec in self.table.items())
    return f"{type(self).__name__}(\n{rows})"

  def __call__(self, params):
    """A pytree shaped like ``params`` with each leaf's DimensionNumbers or None.

    Args:
      params: the model's parameters in one of the forms above; ``optax.MaskedNode``
        leaves (from ``optax.partition``) are kept as they are.

    Returns:
      The pytree of specs.

    Raises:
      ValueError: if a leaf is not a parameter of the model, or its number of axes is not
        the model's.
    """

    def spec(key_path, leaf):
      if isinstance(leaf, optax.MaskedNode):
        return leaf
      path = _param_path(key_path)
      if path not in self._specs:
        raise ValueError(
          f"parameter {path_str(key_path)} (path {_name(path)!r}) is not an nnx.Param of the"
          " model given to nnx_dimension_numbers (its `table` lists them)"
        )
      ndim = getattr(leaf, "ndim", None)
      if self._specs[path] is not None and ndim is not None and ndim != self._ndims[path]:
        raise ValueError(
          f"parameter {path_str(key_path)} has {ndim} axes, but the model's {_name(path)!r}"
          f" has {self._ndims[path]}"
        )
      return self._specs[path]

    return jax.tree_util.tree_map_with_path(
      spec, params, is_leaf=lambda x: isinstance(x, optax.MaskedNode)
    )


def nnx_dimension_numbers(
  model: nnx.Module, *, exclude: Collection[str] = ()
) -> NnxDimensionNumbers:
  """Dimension numbers for every parameter of a Flax NNX model (docs/stacked.md).

  The rule, per ``nnx.Param``, with ``k`` leading stack axes (``k = 0`` unless the module
  was built under ``nnx.vmap`` or ``nnx.scan`` with ``out_axes=0``), which are batch axes:

  - ``nnx.Linear`` kernel ``(stack..., in, out)``: reduction ``k``, output ``k + 1``.
  - ``nnx.LinearGeneral`` kernel ``(stack..., batch..., in..., out...)``: the in dims are
    reduction axes, the out dims output axes, its ``batch_axis`` dims batch axes.
  - ``nnx.Einsum`` kernel, from ``einsum_str``: a kernel letter in the input only is a
    reduction axis, in the output only an output axis, in both a batch axis.
  - every other parameter (biases, ``nnx.Embed``, norm scales, ``nnx.Conv``, LoRA factors,
    a custom module's own Params): ``None``, plain AdamW, as Q-GaLore projects only the
    attention and MLP matrices. A floating Param of two or more axes held by a module that
    is not one of Flax's layers is named in a warning.

  Args:
    model: the model, built (stacks included) as it is trained.
    exclude: names of path components (e.g. ``"lm_head"``, ``"blocks"``); every parameter
      whose path has one of them as a component gets ``None``.

  Returns:
    A callable on the params that returns a pytree of ``DimensionNumbers`` and ``None``
    shaped like them, for the ``dimension_numbers`` argument of ``scale_by_qgalore``,
    ``qgalore_adamw`` and ``quantize_params``. Its ``table`` maps each parameter's path to
    its spec.

  Raises:
    TypeError: if ``exclude`` is a string or holds a non-string.
    ValueError: if a name in ``exclude`` matches no parameter, an ``nnx.Einsum`` kernel has
      no clear reduction and output axes, or a kernel's shape is not its module's shape
      after leading stack axes.

  Example:
    >>> import jax
    >>> from flax import nnx
    >>> from qgalore_jax import nnx_dimension_numbers
    >>> class Model(nnx.Module):
    ...   def __init__(self, rngs):
    ...     make = nnx.vmap(lambda key: nnx.Linear(8, 16, rngs=nnx.Rngs(key)))
    ...     self.layers = make(jax.random.split(rngs.params(), 4))  # kernel (4, 8, 16)
    ...     self.head = nnx.Linear(8, 2, use_bias=False, rngs=rngs)
    >>> model = Model(nnx.Rngs(0))
    >>> nnx_dimension_numbers(model)
    NnxDimensionNumbers(
      'head/kernel': DimensionNumbers(reduction_axis=0, output_axis=1, batch_axis=()),
      'layers/bias': None,
      'layers/kernel': DimensionNumbers(reduction_axis=1, output_axis=2, batch_axis=(0,)),
    )
    >>> params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    >>> specs = nnx_dimension_numbers(model, exclude=("head",))(params)
    >>> specs["head"]["kernel"] is None
    True
    >>> specs["layers"]["kernel"].resolve(params["layers"]["kernel"].shape).matrix_shape
    (16, 8)
  """
  if isinstance(exclude, str) or not all(isinstance(name, str) for name in exclude):
    raise TypeError(
      f"`exclude` must be a collection of strings, e.g. ('lm_head',), got {exclude!r}"
    )
  exclude = frozenset(exclude)
  nodes = list(nnx.iter_graph(model))
  modules = {tuple(map(str, path)): node for path, node in nodes if isinstance(node, nnx.Module)}
  specs, ndims, uncovered, used = {}, {}, [], set()
  for raw_path, variable in nodes:
    if not isinstance(variable, nnx.Param):
      continue
    path = tuple(map(str, raw_path))
    owner = modules.get(path[:-1])
    ndims[path] = len(variable.shape)
    if exclude.intersection(path):
      used.update(exclude.intersection(path))
      specs[path] = None
      continue
    specs[path] = _kernel_numbers(owner, path, tuple(variable.shape))
    floating = jnp.issubdtype(variable.dtype, jnp.floating)
    if specs[path] is None and floating and ndims[path] >= 2 and not _is_flax_layer(owner):
      uncovered.append(_name(path))
  if exclude - used:
    raise ValueError(
      f"`exclude` names {sorted(exclude - used)}, which are not components of any parameter"
      " path of the model (nnx_dimension_numbers(model).table lists the paths)"
    )
  if uncovered:
    warnings.warn(
      f"parameters {', '.join(uncovered)} of custom modules have two or more axes but no"
      " known layout, so they get plain AdamW unless dimension numbers are given for them"
      " by hand; name them in `exclude` to keep plain AdamW without this warning",
      stacklevel=2,
    )
  return NnxDimensionNumbers(specs, ndims)

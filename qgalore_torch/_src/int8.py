"""INT8 weights updated by stochastic rounding (docs/spec.md section 6).

The twin of ``qgalore_jax._src.int8``: the same update, bit for bit::

  w_new = s * ((q - z) + update / s)     # = s * (q - z) + update, see add_update
  s, z = groupwise(w_new)                # quantization.quantize's scale and zero
  q = clamp(floor(w_new / s + u) + z, 0, 255)

with ``u`` from the counter-based generator of ``generator.py``, keyed by (seed, step, tensor
id, element index of the (out, in) weight in row-major order).

Design of the INT8 layer. :class:`Int8Weight` is a tensor subclass that looks like a float32
(out, in) tensor but stores only the codes (1 byte per weight) and per-group float32 scale and
zero, in the manner of torchao's quantised-training weights. It is the ``weight`` Parameter of
:class:`Int8Linear`, so autograd gives it an ordinary float32 gradient of shape (out, in) and
:class:`~qgalore_torch.QGaLoreAdamW` finds it like any other parameter; the optimizer writes
the new codes back with :func:`apply_int8_update`. No float copy of the weight persists: the
forward and backward dequantise on the fly, and any other operation on the weight (``w @ x``,
``w.sum()``) sees the dequantised values. In-place operations are refused, since they could
not be expressed on the codes.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from qgalore_torch._src.checks import check_int
from qgalore_torch._src.generator import uniforms
from qgalore_torch._src.layout import canonical_shape
from qgalore_torch._src.quantization import QuantizedTensor
from qgalore_torch._src.quantization import dequantize
from qgalore_torch._src.quantization import grouped
from qgalore_torch._src.quantization import quantize

BITS = 8
_ATEN = torch.ops.aten


def stochastic_round(w, *, seed, step, tensor_id, bits=BITS, group_size=256) -> QuantizedTensor:
  """Quantises ``w`` group-wise with stochastic rounding (docs/spec.md sections 3 and 6).

  :func:`~qgalore_torch.quantize` with ``noise`` from :func:`~qgalore_torch.uniforms`: the
  scale and zero of round-to-nearest, and the codes ``clamp(floor(w / s + u) + z, 0,
  2**bits - 1)``.

  Args:
    w: the canonical (out, in) matrix (any float dtype; computed in float32).
    seed: integer (Python int or 0-dim integer tensor).
    step: integer (Python int or 0-dim integer tensor).
    tensor_id: integer (Python int or 0-dim integer tensor).
    bits: code width, 1..8 (4 or fewer: packed two per byte).
    group_size: elements per group.

  Returns:
    A :class:`~qgalore_torch.QuantizedTensor` on the device of ``w``.

  Example:
    >>> import torch
    >>> from qgalore_torch import stochastic_round
    >>> q = stochastic_round(torch.tensor([[0.0, 0.3, 1.0]]), seed=0, step=0, tensor_id=0)
    >>> q.codes.tolist()  # the codes of qgalore_jax.stochastic_round on the same input
    [0, 76, 255]

  References:
    Zhang et al., `Q-GaLore <https://arxiv.org/abs/2407.08296>`_, 2024.
  """
  noise = uniforms(seed, step, tensor_id, tuple(w.shape), device=w.device)
  return quantize(w, bits, group_size, noise=noise)


class Int8Weight(torch.Tensor):
  """A float32 (out, in) weight stored as 8-bit codes plus per-group scale and zero.

  A tensor subclass: its shape and dtype are those of the float weight, its storage is
  ``codes`` (uint8 [out * in], row-major), ``scale`` and ``zero`` (float32 [num_groups])
  (docs/spec.md sections 3 and 6). Operations other than the ones below see the dequantised float
  tensor, so the weight can be used (and differentiated) like a float one; in-place
  operations raise ``TypeError``. ``.to(device)`` moves the codes; ``.to(dtype)`` keeps them.

  Example:
    >>> import torch
    >>> from qgalore_torch import Int8Weight
    >>> w = Int8Weight.from_float(torch.tensor([[0.0, 1.0], [2.0, 3.0]]))
    >>> w.codes.tolist(), w.dequantize().tolist()
    ([0, 85, 170, 255], [[0.0, 1.0], [2.0, 3.0]])

  References:
    Zhang et al., `Q-GaLore <https://arxiv.org/abs/2407.08296>`_, 2024.
  """

  codes: torch.Tensor
  scale: torch.Tensor
  zero: torch.Tensor
  group_size: int

  @staticmethod
  def __new__(cls, codes, scale, zero, shape, group_size, requires_grad=False):
    return torch.Tensor._make_wrapper_subclass(
      cls, shape, dtype=torch.float32, device=codes.device, requires_grad=requires_grad
    )

  def __init__(self, codes, scale, zero, shape, group_size, requires_grad=False):
    self.codes = codes
    self.scale = scale
    self.zero = zero
    self.group_size = group_size

  @classmethod
  def from_float(cls, weight: torch.Tensor, group_size: int = 256) -> "Int8Weight":
    """Quantises a float (out, in) ``weight`` with round-to-nearest (docs/spec.md section 3)."""
    check_int(group_size, "group_size")
    if weight.dim() != 2 or not weight.is_floating_point():
      raise ValueError(
        f"an INT8 weight is a 2-D float (out, in) matrix, got {weight.dtype} {tuple(weight.shape)}"
      )
    q = quantize(weight, BITS, group_size)
    return cls(q.codes, q.scale, q.zero, canonical_shape(weight.shape), group_size)

  def quantized(self) -> QuantizedTensor:
    """The stored codes, scale and zero."""
    return QuantizedTensor(self.codes, self.scale, self.zero)

  def dequantize(self) -> torch.Tensor:
    """The float32 (out, in) weight ``s * (q - z)``."""
    return dequantize(self.quantized(), tuple(self.shape), BITS, self.group_size)

  def assign_(self, q: QuantizedTensor) -> None:
    """Overwrites the stored codes, scale and zero in place (no autograd record)."""
    with torch.no_grad():
      self.codes.copy_(q.codes)
      self.scale.copy_(q.scale)
      self.zero.copy_(q.zero)

  def __repr__(self):
    return (
      f"Int8Weight(shape={tuple(self.shape)}, group_size={self.group_size}, device={self.device})"
    )

  def __tensor_flatten__(self):
    return ["codes", "scale", "zero"], (tuple(self.shape), self.group_size)

  @staticmethod
  def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
    shape, group_size = meta
    return Int8Weight(inner["codes"], inner["scale"], inner["zero"], shape, group_size)

  __torch_function__ = torch._C._disabled_torch_function_impl

  @classmethod
  def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
    kwargs = kwargs or {}
    if func in (_ATEN.detach.default, _ATEN.alias.default):
      w = args[0]
      return cls(w.codes, w.scale, w.zero, tuple(w.shape), w.group_size)
    if func is _ATEN.clone.default:
      w = args[0]
      inner = (t.clone() for t in w.quantized())
      return cls(*inner, tuple(w.shape), w.group_size)
    if func is _ATEN._to_copy.default:
      w = args[0]
      device = kwargs.get("device") or w.device
      inner = (t.to(device=device, copy=True) for t in w.quantized())
      return cls(*inner, tuple(w.shape), w.group_size)
    if func._schema.is_mutable:
      raise TypeError(
        f"{func} would modify an INT8 weight in place; its codes are written by"
        " QGaLoreAdamW or qgalore_torch.apply_int8_update (DistributedDataParallel's initial"
        " broadcast of the parameters does this: build it with init_sync=False after"
        " qgalore_torch.broadcast_int8_weights(model))"
      )
    unwrap = lambda a: a.dequantize() if isinstance(a, Int8Weight) else a
    return func(*[unwrap(a) for a in args], **{k: unwrap(v) for k, v in kwargs.items()})


def add_update(weight: Int8Weight, update: torch.Tensor) -> torch.Tensor:
  """``w + update`` as ``s * ((q - z) + update / s)`` in float32 (the JAX twin's formula).

  Written without a multiply feeding an add, which XLA would fuse into one FMA; each
  operation here is a single IEEE-rounded one on both backends, so they agree bit for bit.
  """
  size = weight.codes.numel()
  codes = grouped(weight.codes.to(torch.float32), weight.group_size)
  update = grouped(update.detach().to(torch.float32).reshape(-1), weight.group_size)
  scale = weight.scale[:, None]
  w_new = scale * ((codes - weight.zero[:, None]) + update / scale)
  return w_new.reshape(-1)[:size].reshape(weight.shape)


def apply_int8_update(weight: Int8Weight, update: torch.Tensor, *, seed, step, tensor_id) -> None:
  r"""Adds ``update`` to an INT8 weight in place, requantising by stochastic rounding.

  In float32 (docs/spec.md section 6):

  .. math::

    w' = s (q - z) + \Delta, \quad (s', z') = \text{groupwise}(w'), \quad
    q' = \text{clamp}(\lfloor w' / s' + u \rfloor + z', 0, 255)

  with ``u`` from :func:`uniforms`, so :math:`\mathbb{E}[s'(q' - z')] = w'`. A group whose
  update is all zero keeps its codes, scale and zero bit for bit. The same inputs give the
  same codes as ``qgalore_jax.apply_updates``.

  Args:
    weight: the :class:`Int8Weight` to update.
    update: float tensor of the weight's (out, in) shape.
    seed: integer (Python int or 0-dim integer tensor).
    step: integer: the 0-based update count.
    tensor_id: integer: the weight's id (its position across the optimizer's param groups).

  Example:
    >>> import torch
    >>> from qgalore_torch import Int8Linear, apply_int8_update
    >>> layer = Int8Linear.from_linear(torch.nn.Linear(8, 4))
    >>> apply_int8_update(layer.weight, torch.full((4, 8), 1e-3), seed=0, step=0, tensor_id=0)
    >>> layer.weight.codes.dtype
    torch.uint8

  References:
    Zhang et al., `Q-GaLore <https://arxiv.org/abs/2407.08296>`_, 2024.
  """
  if tuple(update.shape) != tuple(weight.shape):
    raise ValueError(
      f"update has shape {tuple(update.shape)}, but the weight has shape {tuple(weight.shape)}"
    )
  w_new = add_update(weight, update)
  new = stochastic_round(
    w_new, seed=seed, step=step, tensor_id=tensor_id, bits=BITS, group_size=weight.group_size
  )
  weight.assign_(_keep_unchanged_groups(weight.quantized(), new, update, weight.group_size))


def _keep_unchanged_groups(old, new, update, group_size):
  """``new``, except that groups whose update is all zero keep ``old``'s codes, scale, zero.

  Re-quantising an unchanged group would move its codes: the group's dequantised range can be
  narrower than the one it was quantised from, so its scale shrinks. docs/spec.md section 6.2.
  No host synchronisation: the choice is a ``torch.where``.
  """
  size = old.codes.numel()
  still = (grouped(update.detach().reshape(-1), group_size) == 0).all(dim=1)
  per_code = still.repeat_interleave(group_size)[:size]
  return QuantizedTensor(
    codes=torch.where(per_code, old.codes, new.codes),
    scale=torch.where(still, old.scale, new.scale),
    zero=torch.where(still, old.zero, new.zero),
  )


class _Int8LinearFunction(torch.autograd.Function):
  """``x W^T + b`` with W dequantised in forward and again in backward (none kept alive)."""

  @staticmethod
  def forward(ctx, x, weight, bias):
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None
    w = weight.dequantize()
    if torch.is_autocast_enabled(x.device.type):
      # Autocast casts the float32 weight itself, as it does nn.Linear's: casting it to
      # x's dtype first would round it twice (bf16 input, fp16 autocast).
      return F.linear(x, w, bias)
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))

  @staticmethod
  def backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
      grad_x = grad_out @ weight.dequantize().to(grad_out.dtype)
    grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
    if ctx.needs_input_grad[1]:
      # Under autocast the forward ran in the autocast dtype, so grad_out has it while the
      # saved x may be float32: the product runs in grad_out's dtype, as nn.Linear's does
      # (autograd casts the result to the weight's float32).
      grad_w = grad_2d.T @ x.reshape(-1, x.shape[-1]).to(grad_2d.dtype)
    if ctx.has_bias and ctx.needs_input_grad[2]:
      grad_b = grad_2d.sum(0)
    return grad_x, grad_w, grad_b


class Int8Linear(nn.Module):
  r"""``nn.Linear`` with its weight stored in INT8 and trained by stochastic rounding.

  The weight is an :class:`Int8Weight` Parameter: 1 byte per weight plus a float32 scale
  and zero per ``group_size`` weights (``1 + 8 / group_size`` bytes per weight), with no
  float copy between steps. The forward computes :math:`y = x \hat W^\top + b` with
  :math:`\hat W = s (q - z)` cast to ``x.dtype``; the weight's gradient is an ordinary
  float32 (out, in) tensor, and :class:`~qgalore_torch.QGaLoreAdamW` writes the updated
  weight back with stochastic rounding (docs/spec.md section 6). The bias stays a float Parameter.

  ``state_dict`` stores ``weight_codes``, ``weight_scale``, ``weight_zero`` (and ``bias``),
  plain tensors that load with ``torch.load(weights_only=True)``.

  Args:
    in_features: size of each input sample.
    out_features: size of each output sample.
    bias: whether to learn an additive bias.
    group_size: weights per quantisation group of the row-major (out, in) matrix.
    device: device of the parameters.

  Example:
    >>> import torch
    >>> from qgalore_torch import Int8Linear
    >>> layer = Int8Linear.from_linear(torch.nn.Linear(512, 64))
    >>> layer.weight.codes.numel() + 4 * (layer.weight.scale.numel() + layer.weight.zero.numel())
    33792
    >>> layer(torch.ones(2, 512)).shape
    torch.Size([2, 64])

  References:
    Zhang et al., `Q-GaLore <https://arxiv.org/abs/2407.08296>`_, 2024.
  """

  def __init__(self, in_features, out_features, bias=True, *, group_size=256, device=None):
    super().__init__()
    check_int(in_features, "in_features")
    check_int(out_features, "out_features")
    self.in_features = in_features
    self.out_features = out_features
    self.group_size = check_int(group_size, "group_size")
    init = nn.Linear(in_features, out_features, bias=bias, device=device)
    self.weight = nn.Parameter(Int8Weight.from_float(init.weight.detach(), group_size))
    self.bias = init.bias

  @classmethod
  def from_linear(cls, linear: nn.Linear, group_size: int = 256) -> "Int8Linear":
    """An :class:`Int8Linear` holding ``linear``'s weight (quantised) and bias (shared).

    Args:
      linear: the layer to convert; its float weight is not kept.
      group_size: weights per quantisation group.

    Returns:
      A new :class:`Int8Linear` on ``linear``'s device.
    """
    layer = cls(
      linear.in_features,
      linear.out_features,
      bias=False,
      group_size=group_size,
      device="meta",
    )
    weight = Int8Weight.from_float(linear.weight.detach(), group_size)
    layer.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    layer.bias = linear.bias
    return layer

  def dequantize(self) -> torch.Tensor:
    """The float32 (out, in) weight ``s * (q - z)``."""
    return self.weight.dequantize()

  def forward(self, x):
    """``x W^T + b`` in ``x.dtype``.

    Raises:
      TypeError: if ``weight`` is no longer an :class:`Int8Weight`. FSDP2's ``fully_shard``
        does that: it shards every parameter as a float tensor (dequantising the codes), and
        the layer would silently train a float32 weight.
    """
    if not isinstance(self.weight, Int8Weight):
      raise TypeError(
        f"Int8Linear's weight is a {type(self.weight).__name__}, not an Int8Weight: it was"
        " replaced, e.g. by FSDP2's fully_shard, which shards parameters as float tensors."
        " INT8 weights are not supported under FSDP2: train them under"
        " DistributedDataParallel, or turn the layers into float nn.Linear with"
        " qgalore_torch.dequantize_linears before fully_shard"
      )
    return _Int8LinearFunction.apply(x, self.weight, self.bias)

  def extra_repr(self):
    return (
      f"in_features={self.in_features}, out_features={self.out_features},"
      f" bias={self.bias is not None}, group_size={self.group_size}"
    )

  def _save_to_state_dict(self, destination, prefix, keep_vars):
    for name, tensor in zip(("codes", "scale", "zero"), self.weight.quantized(), strict=True):
      destination[f"{prefix}weight_{name}"] = tensor if keep_vars else tensor.detach()
    if self.bias is not None:
      destination[f"{prefix}bias"] = self.bias if keep_vars else self.bias.detach()

  def _load_from_state_dict(
    self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
  ):
    expected = {f"{prefix}weight_{name}" for name in ("codes", "scale", "zero")}
    if self.bias is not None:
      expected.add(f"{prefix}bias")
    for key in sorted(expected):
      if key not in state_dict:
        missing_keys.append(key)
        continue
      name = key[len(prefix) :]
      own = self.bias if name == "bias" else getattr(self.weight, name[len("weight_") :])
      value = state_dict[key]
      if value.shape != own.shape:
        error_msgs.append(
          f"size mismatch for {key}: copying a param with shape {tuple(value.shape)},"
          f" the shape in current model is {tuple(own.shape)}"
        )
        continue
      with torch.no_grad():
        own.copy_(value)
    if strict:
      for key in state_dict:
        local = key[len(prefix) :]
        if key.startswith(prefix) and "." not in local and key not in expected:
          unexpected_keys.append(key)


def quantize_linears(
  model: nn.Module, predicate: Callable[[str], bool] | None = None, *, group_size: int = 256
) -> list[str]:
  """Replaces chosen ``nn.Linear`` modules of ``model`` by :class:`Int8Linear`, in place.

  Build the optimizer after this call: the old float weights are gone.

  Args:
    model: the model to convert.
    predicate: called with each ``nn.Linear``'s qualified name; the layer is replaced when
      it returns True. Default: every ``nn.Linear``. The paper quantises the 7 projections
      of each LLaMA block (``q_proj`` ... ``down_proj``); embeddings, norms and the head
      stay float.
    group_size: weights per quantisation group.

  Returns:
    The qualified names of the replaced modules, in ``named_modules`` order.

  Example:
    >>> import torch
    >>> from qgalore_torch import quantize_linears
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> quantize_linears(model, lambda name: name == "0")
    ['0']
    >>> type(model[0]).__name__, type(model[2]).__name__
    ('Int8Linear', 'Linear')

  References:
    Zhang et al., `Q-GaLore <https://arxiv.org/abs/2407.08296>`_, 2024.
  """
  check_int(group_size, "group_size")
  if isinstance(model, nn.Linear):
    raise TypeError("`model` is itself an nn.Linear: use Int8Linear.from_linear(model)")
  chosen = [
    (name, module)
    for name, module in model.named_modules()
    if isinstance(module, nn.Linear) and (predicate is None or predicate(name))
  ]
  for name, module in chosen:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    setattr(parent, child, Int8Linear.from_linear(module, group_size))
  return [name for name, _ in chosen]


def dequantize_linears(
  model: nn.Module, predicate: Callable[[str], bool] | None = None, *, dtype=torch.float32
) -> list[str]:
  """Replaces the :class:`Int8Linear` modules of ``model`` by plain ``nn.Linear``, in place.

  The inverse of :func:`quantize_linears`, for export: afterwards ``model.state_dict()``
  holds ordinary ``weight`` tensors, so a model trained with INT8 layers saves and loads
  like any other (``torch.save``, ``save_pretrained`` / ``from_pretrained``). Each weight is
  the layer's dequantised ``s * (q - z)`` (docs/spec.md section 6.1) cast to ``dtype``; the
  bias is the layer's own tensor. Build a new optimizer after this call if training goes on.

  Args:
    model: the model to convert.
    predicate: called with each ``Int8Linear``'s qualified name; the layer is replaced when
      it returns True. Default: every ``Int8Linear``.
    dtype: the floating dtype of the new weights.

  Returns:
    The qualified names of the replaced modules, in ``named_modules`` order.

  Example:
    >>> import torch
    >>> from qgalore_torch import dequantize_linears, quantize_linears
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> quantize_linears(model)
    ['0', '2']
    >>> dequantize_linears(model)
    ['0', '2']
    >>> sorted(model.state_dict())
    ['0.bias', '0.weight', '2.bias', '2.weight']
  """
  if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
    raise TypeError(f"`dtype` must be a floating torch.dtype, got {dtype!r}")
  if isinstance(model, Int8Linear):
    raise TypeError("`model` is itself an Int8Linear: use nn.Linear with model.dequantize()")
  chosen = [
    (name, module)
    for name, module in model.named_modules()
    if isinstance(module, Int8Linear) and (predicate is None or predicate(name))
  ]
  for name, module in chosen:
    weight = module.dequantize().to(dtype)
    linear = nn.Linear(
      module.in_features, module.out_features, bias=False, device="meta", dtype=dtype
    )
    linear.weight = nn.Parameter(weight, requires_grad=module.weight.requires_grad)
    linear.bias = module.bias
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, linear)
  return [name for name, _ in chosen]

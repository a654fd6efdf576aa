"""The arithmetic of one Q-GaLore AdamW step, as pure functions (docs/spec.md sections 1-6).

The functional core of :class:`~qgalore_torch.QGaLoreAdamW`, in the shape of torch's own
``torch/optim/adamw.py`` and ``_muon.py``: functions over tensors, no ``Optimizer`` and no
``self.state``. Each kind of leaf has one numeric path, written once in float32:

* a plain leaf (AdamW): :func:`adamw_step_`, that is :func:`adam_direction` then
  :func:`apply_update`;
* a projected matrix: :func:`refresh_projector` on its refresh steps, then
  :func:`projected_step_`, that is projection, :func:`adam_direction` of the low-rank
  gradient, back-projection and :func:`apply_update`.

Two variants of the float32 write-back save memory traffic, each kept because it pays:
``python -m benchmarks.torch_step_variants`` times each against the plain path it replaces,
on the same tensors (LLaMA-60M shapes, a 2-core x86-64 CPU, one thread). A float32
parameter on the CPU is updated in slices that stay in the cache (:func:`adamw_in_slices_`):
the same operations, so the same bits; the embedding and the head update about 3x faster
than with whole-tensor operations (2.96-3.12x in four runs), while on the 512-element norm
scales the slicing costs more than it saves (0.3-0.4x), so a leaf of one slice or less
takes the plain path. A float32 projected matrix gets its back-projected update and weight
decay added by the matmul call that back-projects it (:func:`apply_in_matmul_`), ``W``
rounded once, as XLA does; the projected matrices update 1.05-1.10x faster than with
``project_back`` then ``apply_update``. The latest figures are in
``benchmarks/results/torch_step_variants_cpu_60M.md``.
"""

import functools

import torch

from qgalore_torch._src import projector as proj
from qgalore_torch._src import schedule
from qgalore_torch._src.int8 import Int8Weight
from qgalore_torch._src.int8 import apply_int8_update

# Elements per slice of the in-place CPU update (a multiple of every SIMD width). The slices
# of the parameter, gradient and moments and two scratch slices (1 MiB each) stay in the
# cache through the update's eleven or twelve passes, so each tensor crosses the memory bus
# about once; and the scratch is allocated once per parameter at slice size, not full size
# (first writes into a freshly mapped buffer cost ~10x writes into a reused one). Measured on
# a 32000 x 512 embedding, one thread: 33-35 ms at 2**18, 45-48 ms at 2**16 (per-slice
# Python overhead), 118 ms with whole-tensor operations and full-size temporaries.
CPU_SLICE = 1 << 18


def _bias_corrections(step, b1, b2):
  """Float32 reciprocals ``1 / (1 - b1^t)`` and ``1 / (1 - b2^t)`` of a 0-dim CPU ``step``.

  Multiplying by them is how XLA computes a division by a broadcast scalar (and torch's CUDA
  kernel a division by a CPU scalar): written out, the same expression runs on JAX, torch
  CPU and torch CUDA. Returned as Python floats holding the float32 values (no device read:
  ``step`` is on the CPU), which ATen applies in float32 again.
  """
  return _bias_corrections_at(float(step), b1, b2)


@functools.lru_cache(maxsize=256)
def _bias_corrections_at(t, b1, b2):
  """:func:`_bias_corrections` of step ``t``, computed once per step for all parameters."""
  step = torch.tensor(t, dtype=torch.float32)
  return float(1 / (1 - b1**step)), float(1 / (1 - b2**step))


def _update_moments(grad, exp_avg, exp_avg_sq, b1, b2, scratch):
  """``m = b1 m + (1 - b1) g`` and ``v = b2 v + (1 - b2) g^2`` in place; ``scratch`` gets g^2.

  ``add_(x, alpha=a)`` rounds ``y + a x`` as one fused multiply-add, as XLA's CPU fusion of
  the same expressions does: the new moments equal ``qgalore_jax``'s bit for bit on CPU.
  """
  exp_avg.mul_(b1).add_(grad, alpha=1 - b1)
  torch.mul(grad, grad, out=scratch)
  exp_avg_sq.mul_(b2).add_(scratch, alpha=1 - b2)


def _direction(exp_avg, exp_avg_sq, c1, c2, eps, out, scratch):
  """``u = (m c1) / (sqrt(v c2) + eps)`` into ``out`` (``scratch`` is overwritten)."""
  denom = torch.mul(exp_avg_sq, c2, out=scratch).sqrt_().add_(eps)
  return torch.mul(exp_avg, c1, out=out).div_(denom)


def adam_direction(grad, exp_avg, exp_avg_sq, step, b1, b2, eps, *, scratch=None):
  r"""One Adam step on float32 tensors (docs/spec.md section 5; optax's ``scale_by_adam``).

  .. math::

    m_t = (1 - \beta_1) g + \beta_1 m_{t-1}, \quad
    v_t = (1 - \beta_2) g^2 + \beta_2 v_{t-1}, \quad
    u_t = \frac{m_t / (1 - \beta_1^t)}{\sqrt{v_t / (1 - \beta_2^t)} + \epsilon}

  Both divisions by a bias correction are computed as multiplies by its float32
  reciprocal, as XLA computes them.

  Args:
    grad: float32 gradient (the low-rank ``R`` for a projected matrix).
    exp_avg: float32 first moment ``m_{t-1}``, same shape.
    exp_avg_sq: float32 second moment ``v_{t-1}``, same shape.
    step: float32 0-dim CPU tensor, the 1-based step ``t`` of the new moments.
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to the root of the second moment.
    scratch: optional float32 tensor of ``grad``'s shape for the temporaries; it may be
      ``grad`` itself, which is then overwritten.

  Returns:
    The float32 Adam direction ``u``. ``exp_avg`` and ``exp_avg_sq`` are updated in place
    (like torch's functional Adam). ``add_(x, alpha=a)`` rounds ``m + a x`` as one fused
    multiply-add, and so does XLA's CPU fusion of ``(1 - b1) g + b1 m``: the new moments
    equal ``qgalore_jax``'s bit for bit on CPU (tested). The direction agrees to rounding
    only: torch 2.13's CPU float32 ``sqrt`` is not correctly rounded (about one result in
    five is 1 ulp off; XLA's and NumPy's are exact).
  """
  c1, c2 = _bias_corrections(step, b1, b2)
  if scratch is None:
    scratch = torch.empty_like(exp_avg_sq)
  _update_moments(grad, exp_avg, exp_avg_sq, b1, b2, scratch)
  return _direction(exp_avg, exp_avg_sq, c1, c2, eps, torch.empty_like(exp_avg), scratch)


def _apply_float32(param, direction, lr, weight_decay):
  """``W + (-lr) (direction + weight_decay W)`` into the float32 ``param``, two fused
  multiply-adds: bit for bit what XLA computes for optax's ``adamw`` tail on CPU."""
  if weight_decay:
    direction.add_(param, alpha=weight_decay)
  param.add_(direction, alpha=-lr)


def apply_update(param, direction, lr, weight_decay, *, seed=0, count=None, tensor_id=0):
  """``W <- W - lr * (direction + weight_decay * W)`` on the old ``W`` (docs/spec.md sections 5, 6).

  Computed in float32 and written back once, rounded to the parameter's dtype. An
  :class:`~qgalore_torch.Int8Weight` is dequantised, gets the update
  ``-lr * (direction + weight_decay * W)`` (the arithmetic of ``optax.adamw``) and is
  written back by stochastic rounding keyed by ``(seed, count - 1, tensor_id)``.

  Args:
    param: the parameter to update in place.
    direction: float32 update direction, the parameter's shape (overwritten: a temporary).
    lr: learning rate.
    weight_decay: decoupled weight decay.
    seed: seed of the stochastic rounding (INT8 weights only).
    count: float32 0-dim CPU tensor, the parameter's 1-based update count (INT8 weights
      only; the rounding uses the 0-based ``count - 1``).
    tensor_id: the parameter's position across the param groups (INT8 weights only).
  """
  if isinstance(param, Int8Weight):
    if weight_decay:
      direction.add_(param.dequantize(), alpha=weight_decay)
    step = count.to(torch.int64) - 1
    apply_int8_update(param, direction.mul_(-lr), seed=seed, step=step, tensor_id=tensor_id)
    return
  if param.dtype == torch.float32:
    _apply_float32(param, direction, lr, weight_decay)
    return
  w = param.to(torch.float32)
  _apply_float32(w, direction, lr, weight_decay)
  param.copy_(w)


def _is_float32(param):
  """True for a plain float32 parameter, which can be updated in place (not INT8)."""
  return param.dtype == torch.float32 and not isinstance(param, Int8Weight)


def adamw_step_(
  param,
  grad,
  exp_avg,
  exp_avg_sq,
  step,
  b1,
  b2,
  eps,
  lr,
  weight_decay,
  *,
  seed=0,
  tensor_id=0,
  scratch=None,
  slice_size=CPU_SLICE,
):
  """One AdamW step of a plain leaf, in place (docs/spec.md section 5; section 6 for INT8 weights).

  :func:`adam_direction` on the float32 moments, then :func:`apply_update` of the direction.
  A float32 parameter on the CPU of more than ``CPU_SLICE`` elements whose four tensors are
  contiguous is updated slice by slice (no full-size temporary): the same elementwise
  operations, so the same bits.

  Args:
    param: the parameter (any float dtype, or an :class:`~qgalore_torch.Int8Weight`).
    grad: its float32 gradient.
    exp_avg: float32 first moment, updated in place.
    exp_avg_sq: float32 second moment, updated in place.
    step: float32 0-dim CPU tensor, the 1-based step of the new moments.
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to the root of the second moment.
    lr: learning rate.
    weight_decay: decoupled weight decay.
    seed: see :func:`apply_update`.
    tensor_id: see :func:`apply_update`.
    scratch: see :func:`adam_direction` (``grad`` itself when the caller owns it).
    slice_size: elements per slice of the in-place CPU update.
  """
  tensors = (param, grad, exp_avg, exp_avg_sq)
  if (
    _is_float32(param)
    and param.device.type == "cpu"
    and param.numel() > slice_size  # one slice or less: slicing only adds overhead
    and all(t.is_contiguous() for t in tensors)
  ):
    adamw_in_slices_(*tensors, step, b1, b2, eps, lr, weight_decay, slice_size=slice_size)
    return
  direction = adam_direction(grad, exp_avg, exp_avg_sq, step, b1, b2, eps, scratch=scratch)
  apply_update(param, direction, lr, weight_decay, seed=seed, count=step, tensor_id=tensor_id)


def adamw_in_slices_(
  param, grad, exp_avg, exp_avg_sq, step, b1, b2, eps, lr, weight_decay, slice_size=CPU_SLICE
):
  """:func:`adamw_step_` of contiguous float32 CPU tensors, ``slice_size`` elements at a time."""
  c1, c2 = _bias_corrections(step, b1, b2)
  tensors = (param, grad, exp_avg, exp_avg_sq)
  scratch, out = torch.empty(2, min(param.numel(), slice_size), dtype=torch.float32)
  for p, g, m, v in zip(*(t.view(-1).split(slice_size) for t in tensors), strict=True):
    n = p.numel()
    _update_moments(g, m, v, b1, b2, scratch[:n])
    direction = _direction(m, v, c1, c2, eps, out[:n], scratch[:n])
    _apply_float32(p, direction, lr, weight_decay)


def projected_step_(
  param,
  grad_MxN,
  basis_RxK,
  exp_avg,
  exp_avg_sq,
  step,
  b1,
  b2,
  eps,
  lr,
  weight_decay,
  scale,
  *,
  seed=0,
  tensor_id=0,
  side=None,
  reduce=None,
):
  r"""One Q-GaLore step of a projected (out, in) matrix, in place (docs/spec.md sections 1, 5, 6).

  .. math::

    R = G P^\top \;(m \ge n) \text{ or } P^\top G \;(m < n), \quad
    u = \text{Adam}(R), \quad
    W \leftarrow W - \eta \, (\text{scale} \cdot (u P \text{ or } P u) + \lambda W)

  Args:
    param: the (m, n) parameter (any float dtype, or an :class:`~qgalore_torch.Int8Weight`).
    grad_MxN: its float32 gradient.
    basis_RxK: the float32 projector (dequantised), see
      :func:`~qgalore_torch._src.projector.basis_shape`.
    exp_avg: float32 first moment of the low-rank gradient, updated in place.
    exp_avg_sq: float32 second moment, updated in place.
    step: float32 0-dim CPU tensor, the 1-based step of the new moments.
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to the root of the second moment.
    lr: learning rate.
    weight_decay: decoupled weight decay.
    scale: GaLore's ``alpha``, multiplies the back-projected update.
    seed: see :func:`apply_update`.
    tensor_id: see :func:`apply_update`.
    side: the projector side; defaults to that of ``param``'s shape. A row shard of a
      matrix (FSDP2) passes the whole matrix's side, with ``basis_RxK`` the basis of its rows
      for side ``"left"``.
    reduce: optional in-place sum of the low-rank gradient over the shards (side
      ``"left"``, where each row shard projects to a partial ``P^T G``).
  """
  side = proj.projector_side(tuple(param.shape)) if side is None else side
  low_rank = proj.project(grad_MxN, basis_RxK, side)
  if reduce is not None:
    reduce(low_rank)
  u = adam_direction(low_rank, exp_avg, exp_avg_sq, step, b1, b2, eps, scratch=low_rank)
  if _is_float32(param):
    apply_in_matmul_(param, u, basis_RxK, side, lr, weight_decay, scale)
    return
  direction = proj.project_back(u, basis_RxK, side).mul_(scale)
  apply_update(param, direction, lr, weight_decay, seed=seed, count=step, tensor_id=tensor_id)


def apply_in_matmul_(param, u, basis_RxK, side, lr, weight_decay, scale):
  """``W + (-lr) (scale back-project(u) + wd W)`` into a float32 ``param``, the additions
  done by the back-projecting matmul call (``addmm``), ``W`` rounded once, as XLA does.

  Without decay one ``addmm_`` adds the update into ``W`` and there is no (m, n) temporary;
  with it one ``addmm`` forms the parenthesis. (Not ``addmm_``'s ``beta = 1 - lr wd``: its
  float32 rounding is the same every step, a bias of up to ``2**-25 / (lr wd)`` in the
  decay rate.)
  """
  if not weight_decay:
    proj.project_back_add(param, u, basis_RxK, side, alpha=-lr * scale, out=param)
    return
  direction = proj.project_back_add(param, u, basis_RxK, side, alpha=scale, beta=weight_decay)
  param.add_(direction, alpha=-lr)


def refresh_projector(
  grad_MxN,
  stored,
  subspace,
  rank,
  bits,
  group_size,
  cos_threshold,
  gamma_proj,
  *,
  projector_fn=proj.compute_projector,
):
  """New stored projector and schedule after an SVD of ``grad_MxN`` (docs/spec.md sections 2-4).

  A refresh whose gradient or SVD is not finite is skipped: the old projector and schedule
  come back unchanged, so the matrix tries again at its next refresh step (every step while
  it has no projector yet).

  Args:
    grad_MxN: float32 canonical (out, in) gradient.
    stored: the current stored projector (a :class:`QuantizedTensor`, or float32 [r, k]).
    subspace: the current :class:`~qgalore_torch._src.schedule.SubspaceState`.
    rank: requested rank; clamped to ``min(m, n)``.
    bits: projector bits, or ``None`` for a float32 projector.
    group_size: projector quantisation group size.
    cos_threshold: see :func:`~qgalore_torch._src.schedule.record_refresh`.
    gamma_proj: see :func:`~qgalore_torch._src.schedule.record_refresh`.
    projector_fn: ``(grad_MxN, rank) -> basis_RxK``, the sign-canonical float32 basis
      (the contract of :func:`~qgalore_torch.compute_projector`, the default).

  Returns:
    ``(stored, subspace)``, each on the device the old one was on.
  """
  finite = torch.isfinite(grad_MxN).all()
  # Row-major whatever projector_fn returns (LAPACK's rows are strided): a projection then
  # rounds the same wherever the basis is kept, in a matrix's state or a slice of a stack's.
  basis_RxK = projector_fn(torch.where(finite, grad_MxN, 0.0), rank).contiguous()
  ok = finite & torch.isfinite(basis_RxK).all()
  new_stored = proj.store_projector(basis_RxK, bits, group_size)
  stored = _where(ok, new_stored, stored)
  host = subspace.gap.device
  new_subspace = schedule.record_refresh(subspace, basis_RxK[0].to(host), cos_threshold, gamma_proj)
  subspace = _where(ok.to(host), new_subspace, subspace)
  return stored, subspace


def _where(ok, new, old):
  """``new`` where ``ok`` else ``old``; field by field for a NamedTuple of tensors."""
  if isinstance(new, tuple):
    return type(new)(*(torch.where(ok, a, b) for a, b in zip(new, old, strict=True)))
  return torch.where(ok, new, old)

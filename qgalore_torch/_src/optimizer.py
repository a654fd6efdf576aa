"""Q-GaLore AdamW as a ``torch.optim.Optimizer`` (SPEC sections 1, 2 and 4-7).

The twin of ``qgalore_jax.qgalore_adamw``: the same arithmetic, written once in float32 as
pure functions (:func:`adam_direction`, :func:`refresh_projector`, :func:`apply_update`);
:class:`QGaLoreAdamW` only validates, groups and holds tensor state.

What a step costs. A float32 weight with float32 moments is updated in place, with the
roundings of those functions: a plain one by :func:`adamw_step_` (on a single-threaded CPU
slice by slice, without a full-size temporary), a projected one by one ``addmm_`` that adds
the back-projected update into the weight (with weight decay, one (m, n) temporary). Other
weights (bf16, INT8, 8-bit moments) go through :func:`adam_direction` and
:func:`apply_update`.

Where the state lives. ``step`` and the refresh schedule (``gap``, ``cosines``,
``num_cosines``, ``top_vector``, ``svd_count``) are small CPU tensors, like ``state["step"]``
of torch's own optimizers with ``capturable=False``; moments and projector live on the
parameter's device. Deciding whether a matrix refreshes therefore reads CPU memory only, so
a step without a refresh never waits for the accelerator. A refresh step copies the new top
singular vector and a finiteness flag back to the CPU; on CUDA that step already
synchronises, since ``torch.linalg.svd`` does.

With ``moment_bits=8`` each step of a parameter whose moments are stored in 8 bits
dequantises them to float32, runs the same :func:`adam_direction`, takes the direction from
those float32 moments and requantises them (docs/numerics.md, "8-bit moments"); the float
path is untouched.
"""

import functools

import torch

from qgalore_torch._src import moments
from qgalore_torch._src import projector as proj
from qgalore_torch._src import schedule
from qgalore_torch._src.checks import check_bits
from qgalore_torch._src.checks import check_int
from qgalore_torch._src.checks import check_number
from qgalore_torch._src.int8 import Int8Weight
from qgalore_torch._src.int8 import apply_int8_update
from qgalore_torch._src.quantization import QuantizedTensor

_HOST = torch.device("cpu")
_SCHEDULE_KEYS = schedule.SubspaceState._fields
_HOST_KEYS = ("step", *_SCHEDULE_KEYS)
_MOMENT_KEYS = (("exp_avg", True), ("exp_avg_sq", False))  # (state key, signed map)


# Elements per slice of a single-threaded CPU elementwise update (a multiple of every SIMD
# width). The slices of the parameter, gradient and moments and two scratch slices (1 MiB
# each) stay in the cache through the update's eleven or twelve passes, so each tensor
# crosses the memory bus about once; and the scratch is allocated once per parameter at
# slice size, not full size (first writes into a freshly mapped buffer cost ~10x writes into
# a reused one). Measured on a 32000 x 512 embedding, one thread: 33-35 ms at 2**18, 45-48
# ms at 2**16 (per-slice Python overhead), 118 ms with whole-tensor operations and full-size
# temporaries. With several intra-op threads every operation is a parallel region, and on a
# CPU shared with other jobs each region can wait for a descheduled thread: 64 slices of
# eleven regions then took from 34 ms to 3 s on 2 busy cores. Several threads therefore get
# whole-tensor operations, as accelerators do.
_CPU_SLICE = 1 << 18


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
  r"""One Adam step on float32 tensors (SPEC section 5; optax ``scale_by_adam``, eps_root 0).

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


def adamw_step_(param, grad, exp_avg, exp_avg_sq, step, b1, b2, eps, lr, weight_decay):
  """:func:`adam_direction` and :func:`apply_update` of a float32 parameter, in place.

  The same roundings as the two functions. On a CPU with one intra-op thread the tensors
  are updated slice by slice (``_CPU_SLICE`` elements, no full-size temporary), which gives
  the same elementwise results as the whole-tensor operations used otherwise.

  Args:
    param: float32 parameter (not an :class:`~qgalore_torch.Int8Weight`).
    grad: its float32 gradient.
    exp_avg: float32 first moment, updated in place.
    exp_avg_sq: float32 second moment, updated in place.
    step: float32 0-dim CPU tensor, the 1-based step of the new moments.
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to the root of the second moment.
    lr: learning rate.
    weight_decay: decoupled weight decay.
  """
  c1, c2 = _bias_corrections(step, b1, b2)
  tensors = (param, grad, exp_avg, exp_avg_sq)
  size = param.numel()
  sliced = param.device.type == "cpu" and torch.get_num_threads() == 1
  if not sliced or not all(t.is_contiguous() for t in tensors):
    scratch, out = torch.empty_like(exp_avg_sq), torch.empty_like(exp_avg)
    _adamw_slice(*tensors, c1, c2, b1, b2, eps, lr, weight_decay, scratch, out)
    return
  scratch, out = torch.empty(2, min(size, _CPU_SLICE), dtype=torch.float32)
  for p, g, m, v in zip(*(t.view(-1).split(_CPU_SLICE) for t in tensors), strict=True):
    n = p.numel()
    _adamw_slice(p, g, m, v, c1, c2, b1, b2, eps, lr, weight_decay, scratch[:n], out[:n])


def _adamw_slice(
  param, grad, exp_avg, exp_avg_sq, c1, c2, b1, b2, eps, lr, weight_decay, scratch, out
):
  """One AdamW step on matching slices; ``scratch`` and ``out`` are float32 temporaries."""
  _update_moments(grad, exp_avg, exp_avg_sq, b1, b2, scratch)
  direction = _direction(exp_avg, exp_avg_sq, c1, c2, eps, out, scratch)
  _apply_float32(param, direction, lr, weight_decay)


def _apply_float32(param, direction, lr, weight_decay):
  """``W + (-lr) (direction + weight_decay W)`` into the float32 ``param``, two fused
  multiply-adds: bit for bit what XLA computes for optax's ``adamw`` tail on CPU."""
  if weight_decay:
    direction.add_(param, alpha=weight_decay)
  param.add_(direction, alpha=-lr)


def refresh_projector(
  grad_MxN, stored, subspace, rank, bits, group_size, cos_threshold, gamma_proj
):
  """New stored projector and schedule after an SVD of ``grad_MxN`` (SPEC sections 2-4).

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

  Returns:
    ``(stored, subspace)``, each on the device the old one was on.
  """
  finite = torch.isfinite(grad_MxN).all()
  basis_RxK = proj.compute_projector(torch.where(finite, grad_MxN, 0.0), rank)
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


def apply_update(param, direction, lr, weight_decay, *, seed=0, count=None, tensor_id=0):
  """``W <- W - lr * (direction + weight_decay * W)`` on the old ``W`` (SPEC sections 5, 6).

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


def _stored_from_state(state, bits):
  if bits is None:
    return state["proj_basis"]
  return QuantizedTensor(state["proj_codes"], state["proj_scale"], state["proj_zero"])


def _stored_to_state(stored):
  if isinstance(stored, QuantizedTensor):
    return {"proj_codes": stored.codes, "proj_scale": stored.scale, "proj_zero": stored.zero}
  return {"proj_basis": stored}


def _init_moments(state, shape, device, moment_bits, like=None):
  """Zero moments of ``shape`` into ``state``: 8-bit codes and tile maxima or float32.

  With ``moment_bits=8`` and a 2-D shape of at least 4096 elements, ``exp_avg`` and
  ``exp_avg_sq`` hold the zero codes (uint8) and ``exp_avg_absmax``, ``exp_avg_sq_absmax``
  zero tile maxima; otherwise the two moments are float32 (shaped and strided like ``like``
  when given) and there are no absmax entries.
  """
  if moment_bits is not None and moments.is_quantized_shape(shape):
    for key, signed in _MOMENT_KEYS:
      state[key], state[f"{key}_absmax"] = moments.zero_moment(shape, signed, device)
    return
  if like is None:
    state["exp_avg"] = torch.zeros(shape, dtype=torch.float32, device=device)
  else:
    state["exp_avg"] = torch.zeros_like(
      like, dtype=torch.float32, memory_format=torch.preserve_format
    )
  state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])


def _adam_step(state, grad, group, scratch=None):
  """:func:`adam_direction` on the moments of ``state``, stored back as the group asks.

  Float32 moments of a float group are updated in place, as always. Otherwise each moment
  is loaded (dequantised if its state holds uint8 codes), updated in float32, and stored in
  8 bits where the group's ``moment_bits`` is 8 and its shape qualifies, else as float32:
  the stored form follows the group, so a state saved with other settings loads and carries
  on. ``scratch`` is passed on to :func:`adam_direction` (``grad`` itself when the caller
  owns it).
  """
  b1, b2 = (_number(b) for b in group["betas"])
  bits = group.get("moment_bits")
  state["step"] += 1
  args = (state["step"], b1, b2, _number(group["eps"]))
  kwargs = {"scratch": scratch}
  if bits is None and state["exp_avg"].dtype != torch.uint8:
    return adam_direction(grad, state["exp_avg"], state["exp_avg_sq"], *args, **kwargs)
  exp_avg, exp_avg_sq = (_load_moment(state, key, signed) for key, signed in _MOMENT_KEYS)
  u = adam_direction(grad, exp_avg, exp_avg_sq, *args, **kwargs)
  for (key, signed), value in zip(_MOMENT_KEYS, (exp_avg, exp_avg_sq), strict=True):
    _store_moment(state, key, value, signed, bits)
  return u


def _load_moment(state, key, signed):
  """The float32 moment ``state[key]``: dequantised when the state holds uint8 codes."""
  stored = state[key]
  if stored.dtype != torch.uint8:
    return stored
  return moments.dequantize_moment(moments.QuantizedMoment(stored, state[f"{key}_absmax"]), signed)


def _store_moment(state, key, value, signed, moment_bits):
  """Stores the float32 moment ``value`` as ``state[key]`` (and its tile maxima)."""
  if moment_bits is not None and moments.is_quantized_shape(value.shape):
    state[key], state[f"{key}_absmax"] = moments.quantize_moment(value, signed)
    return
  state[key] = value
  state.pop(f"{key}_absmax", None)


def _number(value):
  """A hyperparameter as a Python number, which the fused in-place operations take.

  A tensor (torch's optimizers accept e.g. a tensor ``lr``, which a schedule may update in
  place) is read at every step with ``item()``: free for a CPU tensor; on an accelerator
  it synchronises, as torch's own optimizers do without ``capturable``.
  """
  return value.item() if isinstance(value, torch.Tensor) else value


def _float32_in_place(param, state, moment_bits):
  """True when :func:`adamw_step_` can update ``param`` and its moments in place.

  That is a float32 parameter (not INT8) whose moments are float32 and stay float32: no
  8-bit storage is asked for their shape, and none is held from a state saved with it.
  """
  return (
    param.dtype == torch.float32
    and not isinstance(param, Int8Weight)
    and state["exp_avg"].dtype == torch.float32
    and state["exp_avg_sq"].dtype == torch.float32
    and (moment_bits is None or not moments.is_quantized_shape(tuple(param.shape)))
  )


def _check_group(group, index):
  """Validates one param group (defaults already merged in); raises naming the argument."""
  check_number(group["lr"], "lr", 0.0)
  betas = group["betas"]
  if not isinstance(betas, (tuple, list)) or len(betas) != 2:
    raise TypeError(f"`betas` must be a pair (beta1, beta2), got {betas!r}")
  check_number(betas[0], "betas[0]", 0.0, 1.0, high_open=True)
  check_number(betas[1], "betas[1]", 0.0, 1.0, high_open=True)
  check_number(group["eps"], "eps", 0.0)
  check_number(group["weight_decay"], "weight_decay", 0.0)
  moments.check_moment_bits(group.get("moment_bits"))
  for i, p in enumerate(group["params"]):
    if not isinstance(p, torch.Tensor) or not p.is_floating_point():
      raise TypeError(
        f"param group {index}: params[{i}] must be a floating-point tensor, got"
        f" {getattr(p, 'dtype', type(p).__name__)}"
      )
  if "rank" not in group:
    return
  check_int(group["rank"], "rank")
  check_int(group["update_proj_gap"], "update_proj_gap")
  check_number(group["scale"], "scale")
  if group["proj_bits"] is not None:
    check_bits(group["proj_bits"], "proj_bits")
  check_int(group["proj_group_size"], "proj_group_size")
  check_number(group["cos_threshold"], "cos_threshold", -1.0, 1.0)
  gamma_proj = group["gamma_proj"]
  if isinstance(gamma_proj, bool) or not isinstance(gamma_proj, (int, float)):
    raise TypeError(f"`gamma_proj` must be a Python number, got {type(gamma_proj).__name__}")
  check_number(gamma_proj, "gamma_proj", 1.0)
  check_int(group["queue_size"], "queue_size")
  for i, p in enumerate(group["params"]):
    if p.dim() != 2:
      raise ValueError(
        f"param group {index} has `rank`, so its params must be 2-D (out, in) matrices,"
        f" but params[{i}] has shape {tuple(p.shape)}; put it in a group without `rank`"
      )


class QGaLoreAdamW(torch.optim.Optimizer):
  r"""AdamW with Q-GaLore projection on the param groups that carry ``rank``.

  For a group with ``rank``, every parameter is a canonical (out, in) matrix
  :math:`W \in \mathbb{R}^{m \times n}` (as ``nn.Linear`` stores it). With
  :math:`r = \min(\text{rank}, m, n)` and the projector :math:`P` found by SVD of the
  gradient :math:`G` on refresh steps (stored group-wise quantised, always used
  dequantised, also on the step that ran the SVD):

  .. math::

    R_t &= G_t P^\top \;(m \ge n) \quad\text{or}\quad P^\top G_t \;(m < n) \\
    u_t &= \text{Adam}(R_t) \quad\text{(float32 moments of shape } R_t\text{)} \\
    W &\leftarrow W - \eta \, (\text{scale} \cdot (u_t P \;\text{or}\; P u_t) + \lambda W)

  Each matrix refreshes on its own schedule (SPEC section 4): on its 0-based step ``t`` when
  ``t % gap == 0``, where ``gap`` starts at ``update_proj_gap`` and is multiplied by
  ``gamma_proj`` whenever the mean signed cosine of the last ``queue_size`` successive top
  singular vectors is at least ``cos_threshold``. A refresh whose gradient or SVD is not
  finite is skipped (old projector and schedule kept); the moments are not protected.
  Parameters of groups without ``rank`` get plain AdamW with the same formulas.

  INT8 weights (:class:`~qgalore_torch.Int8Weight`, e.g. of :class:`~qgalore_torch.Int8Linear`)
  are updated with the same arithmetic on their dequantised values and written back by
  stochastic rounding (SPEC section 6), keyed by ``seed``, the parameter's 0-based step and
  its tensor id: its position across all param groups, in order.

  Group keys (defaults from the constructor): ``rank`` (selects projection; no default),
  ``update_proj_gap``, ``scale``, ``proj_bits`` (``None``: float32 projector),
  ``proj_group_size``, ``cos_threshold``, ``gamma_proj``, ``queue_size``, ``moment_bits``,
  and torch's ``lr``, ``betas``, ``eps``, ``weight_decay``.

  8-bit moments (``moment_bits=8``; docs/numerics.md): a moment that is 2-D with at least
  4096 elements (a projected matrix's low-rank (m, r) or (r, n) moment, or the parameter's
  own shape for plain AdamW) is stored as uint8 codes plus one float32 absmax per 16 x 16
  tile, 1.016 bytes per element instead of 4; smaller and non-2-D moments stay float32.
  Each step dequantises, runs the float32 Adam arithmetic above, takes the direction from
  those float32 moments and requantises, so the first step equals the float32 one. The
  quantiser is ``qgalore_jax``'s bit for bit (:func:`~qgalore_torch.quantize_moment`).

  State (tensors only, so ``torch.save``/``torch.load(weights_only=True)`` round-trips it
  and training resumes bit-identically): ``step`` (float32 [] on CPU: updates so far),
  ``exp_avg`` and ``exp_avg_sq`` (float32; with 8-bit moments uint8 codes, the signed map
  for ``exp_avg`` and the unsigned one for ``exp_avg_sq``, plus their tile maxima
  ``exp_avg_absmax`` and ``exp_avg_sq_absmax``, float32 [ceil(a / 16), ceil(b / 16)]; a
  moment kept in float32 has no absmax entry), and for projected matrices ``proj_codes``,
  ``proj_scale``, ``proj_zero`` (or ``proj_basis`` when ``proj_bits`` is ``None``) on the
  parameter's device plus the schedule ``gap``, ``cosines``, ``num_cosines``,
  ``top_vector``, ``svd_count`` on CPU (see the module docstring for why).

  Args:
    params: parameters or param groups; groups with a ``rank`` key are projected.
    lr: learning rate.
    betas: ``(beta1, beta2)``, decays of the two moments.
    eps: added to the root of the second moment.
    weight_decay: decoupled weight decay ``lambda``, applied to the old weights.
    seed: seed of the stochastic rounding of INT8 weights (SPEC section 6).
    update_proj_gap: initial refresh interval in steps.
    scale: GaLore's ``alpha``, multiplies the back-projected update.
    proj_bits: bits of the stored projector (1..8; 4 or fewer packed two per byte), or
      ``None`` for a float32 projector.
    proj_group_size: elements per projector quantisation group.
    cos_threshold: mean cosine in [-1, 1] at or above which the gap grows.
    gamma_proj: growth factor of the gap (>= 1); 1 gives plain GaLore's fixed gap.
    queue_size: number of recent cosines averaged (>= 1).
    moment_bits: ``None`` for float32 moments, or 8 for 8-bit block-wise moments (see
      above; Dettmers et al.'s 8-bit Adam, which the paper's memory figures assume).

  Example:
    >>> import torch
    >>> from qgalore_torch import QGaLoreAdamW
    >>> model = torch.nn.Linear(8, 16)
    >>> opt = QGaLoreAdamW(
    ...     [{"params": [model.weight], "rank": 4}, {"params": [model.bias]}], lr=1e-3
    ... )
    >>> model(torch.ones(2, 8)).sum().backward()
    >>> opt.step()
    >>> opt.projection_stats()[0]["svd_count"], opt.projection_stats()[1]
    (1, None)

  References:
    Zhang et al., `Q-GaLore: Quantized GaLore with INT4 Projection and Layer-Adaptive
    Low-Rank Gradients <https://arxiv.org/abs/2407.08296>`_, 2024.
    Zhao et al., `GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection
    <https://arxiv.org/abs/2403.03507>`_, 2024.
    Loshchilov and Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, 2019.
    Dettmers et al., `8-bit Optimizers via Block-wise Quantization
    <https://arxiv.org/abs/2110.02861>`_, 2022.
  """

  def __init__(
    self,
    params,
    lr=1e-3,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=0.0,
    seed=0,
    *,
    update_proj_gap=200,
    scale=0.25,
    proj_bits=4,
    proj_group_size=256,
    cos_threshold=0.4,
    gamma_proj=2,
    queue_size=5,
    moment_bits=None,
  ):
    check_int(seed, "seed", minimum=0)
    defaults = dict(
      lr=lr,
      betas=betas,
      eps=eps,
      weight_decay=weight_decay,
      seed=seed,
      update_proj_gap=update_proj_gap,
      scale=scale,
      proj_bits=proj_bits,
      proj_group_size=proj_group_size,
      cos_threshold=cos_threshold,
      gamma_proj=gamma_proj,
      queue_size=queue_size,
      moment_bits=moment_bits,
    )
    super().__init__(params, defaults)

  def add_param_group(self, param_group):
    """Adds a param group after validating it (see the class docstring for its keys)."""
    params = param_group["params"]
    if isinstance(params, torch.Tensor):
      params = [params]
    elif isinstance(params, set):
      raise TypeError("`params` must be an ordered collection of tensors, not a set")
    else:
      params = list(params)
    param_group = {**param_group, "params": params}
    _check_group({**self.defaults, **param_group}, len(self.param_groups))
    super().add_param_group(param_group)

  @torch.no_grad()
  def step(self, closure=None):
    """Updates every parameter that has a gradient.

    Args:
      closure: optional callable that re-evaluates the model and returns the loss.

    Returns:
      The loss returned by ``closure``, or ``None``.
    """
    loss = None
    if closure is not None:
      with torch.enable_grad():
        loss = closure()
    for tensor_id, group, p in self._indexed_params():
      if p.grad is not None:
        self._update(p, group, tensor_id)
    return loss

  def _indexed_params(self):
    """``(tensor_id, group, param)`` for every parameter, ids counted across the groups.

    The id keys the stochastic rounding of INT8 weights (SPEC section 6): it is stable as
    long as the param groups are built in the same order.
    """
    params = ((group, p) for group in self.param_groups for p in group["params"])
    return [(i, group, p) for i, (group, p) in enumerate(params)]

  def register_layerwise_hooks(self, accumulation_steps=1):
    """Runs each parameter's update inside ``backward()``, once its gradient is complete.

    Layer-wise mode (GaLore section 4.2): a parameter is updated as soon as autograd has
    accumulated its gradient and the gradient is freed right away, so at most one
    layer's full gradient is alive at a time. The arithmetic is that of :meth:`step`,
    so the weights are the same as in normal mode. Every parameter that requires a
    gradient is updated, projected or not.

    With gradient accumulation, a parameter is updated on every ``accumulation_steps``-th
    gradient it receives (the last micro-batch of each batch) and its gradient keeps
    accumulating in between. The micro-batch count lives in the hooks, not in the state:
    register the hooks on a resumed optimizer at a batch boundary, and give every
    trainable parameter a gradient in every micro-batch. Do not call :meth:`step` or
    ``zero_grad`` in this mode; learning-rate schedulers work as usual.

    Args:
      accumulation_steps: micro-batches per optimizer step (>= 1).

    Returns:
      The hook handles; ``handle.remove()`` on each goes back to normal mode.

    References:
      Zhao et al., `GaLore <https://arxiv.org/abs/2403.03507>`_, section 4.2, 2024.
    """
    check_int(accumulation_steps, "accumulation_steps")
    return [
      p.register_post_accumulate_grad_hook(
        self._layerwise_hook(group, accumulation_steps, tensor_id)
      )
      for tensor_id, group, p in self._indexed_params()
      if p.requires_grad
    ]

  def _layerwise_hook(self, group, accumulation_steps, tensor_id):
    received = 0

    def hook(p):
      nonlocal received
      received += 1
      if received % accumulation_steps == 0:
        with torch.no_grad():
          self._update(p, group, tensor_id)
        p.grad = None

    return hook

  def _update(self, p, group, tensor_id):
    if p.grad.is_sparse:
      raise RuntimeError("QGaLoreAdamW does not support sparse gradients")
    if "rank" in group:
      self._update_projected(p, group, tensor_id)
      return
    state = self.state[p]
    if not state:
      state["step"] = torch.zeros([], dtype=torch.float32, device=_HOST)
      _init_moments(state, tuple(p.shape), p.device, group.get("moment_bits"), like=p)
    grad = p.grad.to(torch.float32)
    if _float32_in_place(p, state, group.get("moment_bits")):
      b1, b2 = (_number(b) for b in group["betas"])
      state["step"] += 1
      exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
      hyper = (_number(group[key]) for key in ("eps", "lr", "weight_decay"))
      args = (state["step"], b1, b2, *hyper)
      adamw_step_(p, grad, exp_avg, exp_avg_sq, *args)
      return
    scratch = None if grad is p.grad else grad  # a float32 copy of the gradient is ours
    self._write(p, _adam_step(state, grad, group, scratch), group, tensor_id)

  def _update_projected(self, p, group, tensor_id):
    shape = tuple(p.shape)
    rank, bits, group_size = group["rank"], group["proj_bits"], group["proj_group_size"]
    basis_shape = proj.basis_shape(shape, rank)
    side = proj.projector_side(shape)
    state = self.state[p]
    if not state:
      r, k = basis_shape
      low_rank_shape = (shape[0], r) if side == proj.RIGHT else (r, shape[1])
      empty = torch.zeros(basis_shape, dtype=torch.float32, device=p.device)
      subspace = schedule.init_subspace(k, group["update_proj_gap"], group["queue_size"], _HOST)
      state["step"] = torch.zeros([], dtype=torch.float32, device=_HOST)
      _init_moments(state, low_rank_shape, p.device, group.get("moment_bits"))
      state.update(_stored_to_state(proj.store_projector(empty, bits, group_size)))
      state.update(subspace._asdict())
    grad_MxN = p.grad.to(torch.float32)
    stored = _stored_from_state(state, bits)
    subspace = schedule.SubspaceState(*(state[key] for key in _SCHEDULE_KEYS))
    # CPU tensors only: deciding costs no device synchronisation.
    if bool(schedule.refresh_due(subspace, state["step"])):
      stored, subspace = refresh_projector(
        grad_MxN,
        stored,
        subspace,
        rank,
        bits,
        group_size,
        group["cos_threshold"],
        group["gamma_proj"],
      )
      state.update(_stored_to_state(stored))
      state.update(subspace._asdict())
    basis_RxK = proj.load_projector(stored, basis_shape, bits, group_size)
    low_rank = proj.project(grad_MxN, basis_RxK)
    u = _adam_step(state, low_rank, group, scratch=low_rank)
    lr, scale, wd = (_number(group[key]) for key in ("lr", "scale", "weight_decay"))
    if p.dtype == torch.float32 and not isinstance(p, Int8Weight):
      # W + (-lr) (scale back-project(u) + wd W), with W rounded once, as XLA does. Without
      # decay one matmul call adds the update into W and there is no (m, n) temporary; with
      # it one matmul call forms the parenthesis. (Not addmm_'s beta = 1 - lr wd: its float32
      # rounding is the same every step, a bias of up to 2**-25 / (lr wd) in the decay rate.)
      if not wd:
        proj.project_back_add(p, u, basis_RxK, side, alpha=-lr * scale, out=p)
      else:
        direction = proj.project_back_add(p, u, basis_RxK, side, alpha=scale, beta=wd)
        p.add_(direction, alpha=-lr)
      return
    direction = proj.project_back(u, basis_RxK, side).mul_(scale)
    self._write(p, direction, group, tensor_id)

  def _write(self, p, direction, group, tensor_id):
    state = self.state[p]
    apply_update(
      p,
      direction,
      _number(group["lr"]),
      _number(group["weight_decay"]),
      seed=group["seed"],
      count=state["step"],
      tensor_id=tensor_id,
    )

  def load_state_dict(self, state_dict):
    """Loads a state from :meth:`state_dict`, keeping each state tensor's saved dtype.

    ``torch.optim.Optimizer.load_state_dict`` casts floating state to the parameter's dtype
    (which would turn bf16 params' float32 moments and the uint8 projector codes into
    bf16); here every tensor keeps its saved dtype, the schedule and ``step`` stay on the
    CPU and the rest moves to the parameter's device.
    """
    super().load_state_dict(state_dict)
    saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    params = [p for g in self.param_groups for p in g["params"]]
    for i, p in zip(saved_ids, params, strict=True):
      if i in state_dict["state"]:
        self.state[p] = {
          key: value.to(device=_HOST if key in _HOST_KEYS else p.device, copy=True)
          for key, value in state_dict["state"][i].items()
        }

  def projection_stats(self):
    """Per-matrix refresh statistics, for logging (reads tensors: call outside the step).

    Returns:
      A list with one entry per parameter, in param-group order: for a projected matrix a
      dict with int ``gap`` (current refresh interval), ``svd_count`` (SVDs so far),
      ``num_cosines`` and float ``mean_cosine`` (mean of the filled cosine buffer, 0 while
      empty); ``None`` for parameters of groups without ``rank``.
    """
    stats = []
    for group in self.param_groups:
      for p in group["params"]:
        if "rank" not in group:
          stats.append(None)
          continue
        state = self.state.get(p)
        if not state:
          stats.append(
            {"gap": group["update_proj_gap"], "svd_count": 0, "num_cosines": 0, "mean_cosine": 0.0}
          )
          continue
        num = int(state["num_cosines"])
        filled = state["cosines"][state["cosines"].shape[0] - num :]
        stats.append(
          {
            "gap": int(state["gap"]),
            "svd_count": int(state["svd_count"]),
            "num_cosines": num,
            "mean_cosine": float(filled.sum()) / max(num, 1),
          }
        )
    return stats

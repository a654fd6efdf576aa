"""Q-GaLore AdamW as a ``torch.optim.Optimizer`` (docs/spec.md sections 1, 2 and 4-7).

The twin of ``qgalore_jax.qgalore_adamw``. The arithmetic lives in
:mod:`qgalore_torch._src.functional`; :class:`QGaLoreAdamW`, shaped like torch's own
optimizers, validates the groups, holds each parameter's tensor state, (de)quantises 8-bit
moments around the step (docs/spec.md section 8) and calls the functional step, once per
matrix: a parameter with batch axes is a stack of matrices, updated slice by slice
(docs/spec.md section 1.3).

Where the state lives. ``step`` and the refresh schedule (``gap``, ``cosines``,
``num_cosines``, ``top_vector``, ``svd_count``) are small CPU tensors, like ``state["step"]``
of torch's own optimizers with ``capturable=False``; moments and projector live on the
parameter's device. Deciding whether a matrix refreshes therefore reads CPU memory only, so
a step without a refresh never waits for the accelerator. A refresh step copies the new top
singular vector and a finiteness flag back to the CPU; on CUDA that step already
synchronises, since ``torch.linalg.svd`` does.
"""

import torch

from qgalore_torch._src import distributed
from qgalore_torch._src import functional
from qgalore_torch._src import generator
from qgalore_torch._src import moments
from qgalore_torch._src import projector as proj
from qgalore_torch._src import schedule
from qgalore_torch._src.checks import check_choice
from qgalore_torch._src.checks import check_group
from qgalore_torch._src.checks import check_int
from qgalore_torch._src.int8 import Int8Weight
from qgalore_torch._src.layout import as_separate
from qgalore_torch._src.layout import path_str
from qgalore_torch._src.layout import stack_layout
from qgalore_torch._src.quantization import QuantizedTensor

_HOST = torch.device("cpu")
_SCHEDULE_KEYS = schedule.SubspaceState._fields
_SKIPPED = "skipped_steps"  # steps skipped for a non-finite gradient (``skip_nonfinite``)
_PER_TENSOR_KEYS = ("step", _SKIPPED)  # one value per parameter, also for a stack
_HOST_KEYS = (*_PER_TENSOR_KEYS, *_SCHEDULE_KEYS)
_SIGNED = (True, False)  # the map of each moment: signed for exp_avg, unsigned for exp_avg_sq
_STATS_KEYS = ("gap", "svd_count", "num_cosines", "mean_cosine")


def _stack_layout(p, group):
  """``p`` as a stack of matrices along its group's ``batch_axes`` (docs/spec.md section 1.3)."""
  return stack_layout(tuple(p.shape), group.get("batch_axes", ()))


def _matrix_zero_state(shape, group, device):
  """The zero state of one projected (out, in) matrix of ``shape``, without ``step``.

  Moments (8-bit or not as their low-rank shape decides) and projector on ``device``, the
  schedule on the CPU.
  """
  rank, moment_bits, min_size = group["rank"], group["moment_bits"], group["min_8bit_size"]
  state = {}
  low_rank_shape = proj.low_rank_shape(shape, rank)
  zeros = [moments.init_moment(low_rank_shape, s, moment_bits, device, min_size) for s in _SIGNED]
  moments.to_state(state, zeros)
  basis_shape = proj.basis_shape(shape, rank)
  empty = torch.zeros(basis_shape, dtype=torch.float32, device=device)
  stored = proj.store_projector(empty, group["proj_bits"], group["proj_group_size"])
  state.update(proj.stored_to_state(stored))
  k = basis_shape[1]
  subspace = schedule.init_subspace(k, group["update_proj_gap"], group["queue_size"], _HOST)
  state.update(subspace._asdict())
  return state


def _load_moments(state):
  """The two float32 moments of a matrix's ``state`` (dequantised if stored in 8 bits)."""
  return tuple(map(moments.load_moment, moments.from_state(state), _SIGNED))


def _store_moments(state, floats, group):
  """Puts the float32 moments ``floats`` into ``state`` in the form the group asks for."""
  bits, min_size = group["moment_bits"], group["min_8bit_size"]
  stored = (moments.store_moment(x, s, bits, min_size) for x, s in zip(floats, _SIGNED))
  moments.to_state(state, stored)


def _number(value):
  """A hyperparameter as a Python number, which the fused in-place operations take.

  A tensor (torch's optimizers accept e.g. a tensor ``lr``, which a schedule may update in
  place) is read at every step with ``item()``: free for a CPU tensor; on an accelerator
  it synchronises, as torch's own optimizers do without ``capturable``.
  """
  return value.item() if isinstance(value, torch.Tensor) else value


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

  Each matrix refreshes on its own schedule (docs/spec.md section 4): on its 0-based step ``t`` when
  ``t % gap == 0``, where ``gap`` starts at ``update_proj_gap`` and is multiplied by
  ``gamma_proj`` whenever the mean signed cosine of the last ``queue_size`` successive top
  singular vectors is at least ``cos_threshold``. A refresh whose gradient or SVD is not
  finite is skipped (old projector and schedule kept); the moments are not protected.
  Parameters of groups without ``rank`` get plain AdamW with the same formulas.

  Stacks of matrices (docs/spec.md section 1.3): a group with ``rank`` may set
  ``batch_axes``, a tuple of ints (negative ones count from the end), for parameters such
  as stacked experts ``(E, out, in)`` (``batch_axes=(0,)``) or a fused ``(out, 3, in)`` QKV
  weight (``batch_axes=(1,)``). The two axes left over are ``(out, in)``, in that order.
  Each index along the batch axes is a slice with its own projector, moments and refresh
  schedule: the slices are updated one after another, row-major, each exactly as the same
  matrix held as a separate 2-D parameter (bit for bit on CPU), and only the slices whose
  refresh is due run an SVD. Every parameter of the group has ``len(batch_axes) + 2`` dims.

  INT8 weights (:class:`~qgalore_torch.Int8Weight`, e.g. of :class:`~qgalore_torch.Int8Linear`)
  are updated with the same arithmetic on their dequantised values and written back by
  stochastic rounding (docs/spec.md section 6), keyed by ``seed``, the parameter's 0-based step and
  its tensor id: its position across all param groups, in order. They are single 2-D
  matrices, refused in a group with ``batch_axes``.

  Group keys (defaults from the constructor): ``rank`` (selects projection; no default),
  ``update_proj_gap``, ``scale``, ``proj_bits`` (``None``: float32 projector),
  ``proj_group_size``, ``cos_threshold``, ``gamma_proj``, ``queue_size``, ``svd_method``,
  ``oversample``, ``power_iters``, ``subspace_iters``, ``moment_bits``,
  ``min_8bit_size``, ``seed``, and torch's ``lr``, ``betas``, ``eps``, ``weight_decay``; and
  ``batch_axes`` (default ``()``, a single matrix; not a constructor argument).

  8-bit moments (``moment_bits=8``; docs/spec.md section 8): a moment that is 2-D with at least
  ``min_8bit_size`` elements (a projected matrix's low-rank (m, r) or (r, n) moment, a
  slice's for a stack, or the parameter's own shape for plain AdamW) is stored as uint8
  codes plus one float32 absmax per 16 x 16 tile, 1.016 bytes per element instead of 4;
  smaller and non-2-D moments stay float32.
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
  ``top_vector``, ``svd_count`` on CPU (see the module docstring for why). For a stack,
  each of these but ``step`` holds one matrix's tensor per slice, with the batch shape in
  front: e.g. ``exp_avg`` ``[*batch_shape, m, r]``, ``gap`` ``[*batch_shape]``.

  Args:
    params: parameters or param groups; groups with a ``rank`` key are projected.
    lr: learning rate.
    betas: ``(beta1, beta2)``, decays of the two moments.
    eps: added to the root of the second moment.
    weight_decay: decoupled weight decay ``lambda``, applied to the old weights.
    seed: seed of the stochastic rounding of INT8 weights (docs/spec.md section 6) and of
      the refreshes' sketches (section 2.6); an int >= 0.
    update_proj_gap: initial refresh interval in steps.
    scale: GaLore's ``alpha``, multiplies the back-projected update.
    proj_bits: bits of the stored projector (1..8; 4 or fewer packed two per byte), or
      ``None`` for a float32 projector.
    proj_group_size: elements per projector quantisation group.
    cos_threshold: mean cosine in [-1, 1] at or above which the gap grows.
    gamma_proj: growth factor of the gap (>= 1); 1 gives plain GaLore's fixed gap.
    queue_size: number of recent cosines averaged (>= 1).
    svd_method: how a refresh finds the basis (docs/spec.md section 2.6): ``"full"`` (the
      default), a thin SVD of the gradient; ``"randomized"``, a range finder from a
      Rademacher sketch with ``oversample`` extra columns and ``power_iters`` power
      iterations, then an SVD of the small ``(r + oversample) x k`` matrix; ``"subspace"``,
      ``subspace_iters`` iterations warm-started from the stored projector (a matrix's
      first refresh runs ``"randomized"``). The sketch is keyed by ``seed``, the matrix's
      step, its tensor id and its slice index (row-major, 0 for a 2-D parameter): runs
      repeat and resume exactly, and ``qgalore_jax`` draws the same sketch.
    oversample: extra sketch columns of ``"randomized"`` and ``"subspace"`` (>= 0).
    power_iters: power iterations of ``"randomized"`` (>= 0).
    subspace_iters: iterations of ``"subspace"`` (>= 1).
    moment_bits: ``None`` for float32 moments, or 8 for 8-bit block-wise moments (see
      above; Dettmers et al.'s 8-bit Adam, which the paper's memory figures assume).
    min_8bit_size: with ``moment_bits=8``, moments with fewer elements stay float32
      (bitsandbytes' name for the same rule; >= 1).
    skip_nonfinite: if ``True``, a step in which any gradient holds a NaN or an infinity is
      skipped whole: weights (INT8 codes included), moments, projectors, schedules and
      ``step`` stay as they were, and the skip is counted in each updated parameter's state
      (``skipped_steps``, read with :attr:`skipped_steps`). See :meth:`step` for how this
      avoids a device synchronisation. Not available in layer-wise mode.
    projector_fn: ``projector_fn(grad_MxN, rank) -> basis_RxK``, called on refresh steps
      with the float32 (m, n) gradient; returns the float32 (r, k) sign-canonical basis, the
      contract of :func:`~qgalore_torch.compute_projector` (the default, ``None``). The hook
      for a reference SVD in parity tests or an alternative projector in research. Kept as
      the attribute ``projector_fn``, not in the param groups, so ``state_dict`` stays
      tensors and plain values. It replaces the full SVD, so a group with another
      ``svd_method`` is refused.
    refresh_mode: who computes a refresh's SVD when several processes train one model
      (DDP; docs/distributed_torch.md): ``"redundant"`` (the default), every process
      computes every SVD on its own copy of the all-reduced gradient; ``"owner"``, the
      SVDs due on a step are dealt out to the processes of ``process_group`` (largest
      first, each to the least loaded process), each computed by its owner alone and its
      stored projector and schedule broadcast to the others. The weights are bit for bit
      those of ``"redundant"``: the owner computes the same SVD of the same gradient. Needs
      an initialised process group and the same param groups on every process.
    process_group: the group of ``refresh_mode="owner"`` (``None``: the default group).
      Kept as an attribute, not in the param groups.

  FSDP2 (``torch.distributed.fsdp.fully_shard``): a parameter may be a DTensor on a 1-D
  mesh, sharded along dim 0 (the default) or replicated. A refresh gathers the matrix's full
  gradient (``full_tensor()``) for its SVD; every other step is local to the shard for
  ``m >= n`` (the low-rank gradient ``G P^T`` and its moments are split by rows like the
  weight) and all-reduces the ``r x n`` low-rank gradient ``P^T G`` for ``m < n`` (its
  moments are replicated). Full-size moments (plain AdamW) are DTensors sharded like their
  parameter. Refused on DTensors: INT8 weights, ``batch_axes``, 8-bit moments and
  ``skip_nonfinite``.

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
    svd_method="full",
    oversample=16,
    power_iters=2,
    subspace_iters=1,
    moment_bits=None,
    min_8bit_size=moments.MIN_QUANTIZED_SIZE,
    skip_nonfinite=False,
    projector_fn=None,
    refresh_mode="redundant",
    process_group=None,
  ):
    check_int(seed, "seed", minimum=0)
    check_choice(refresh_mode, "refresh_mode", distributed.REFRESH_MODES)
    if refresh_mode == "owner" and not distributed.available():
      raise ValueError("refresh_mode='owner' needs torch.distributed, which this build lacks")
    self.refresh_mode = refresh_mode
    self.process_group = process_group
    self._refreshed = frozenset()  # (tensor id, slice) refreshed this step by the owner pass
    if not isinstance(skip_nonfinite, bool):
      raise TypeError(
        f"`skip_nonfinite` must be a bool, got {type(skip_nonfinite).__name__} {skip_nonfinite!r}"
      )
    self.skip_nonfinite = skip_nonfinite
    self._pending = None  # a masked step whose finiteness the CPU has not read yet
    if projector_fn is not None and not callable(projector_fn):
      raise TypeError(
        f"`projector_fn` must be a callable or None, got {type(projector_fn).__name__}"
      )
    self.projector_fn = proj.compute_projector if projector_fn is None else projector_fn
    self._projector_fn_given = projector_fn is not None
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
      svd_method=svd_method,
      oversample=oversample,
      power_iters=power_iters,
      subspace_iters=subspace_iters,
      moment_bits=moment_bits,
      min_8bit_size=min_8bit_size,
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
    index = len(self.param_groups)
    merged = {**self.defaults, **param_group}
    check_group(merged, index)
    check_choice(merged["svd_method"], "svd_method", proj.SVD_METHODS)
    if self._projector_fn_given and merged["svd_method"] != "full":
      raise ValueError(
        f"param group {index}: `projector_fn` replaces the full SVD, so it needs"
        f" svd_method='full', got svd_method={merged['svd_method']!r}; give one or the other"
      )
    if param_group.get("batch_axes"):
      for i, p in enumerate(params):
        if isinstance(p, Int8Weight):
          raise TypeError(
            f"{path_str(index, i)} is an INT8 weight, a single 2-D (out, in) matrix, but"
            f" param group {index} has `batch_axes`; put it in a group without them"
          )
    super().add_param_group(param_group)

  @torch.no_grad()
  @torch.compiler.disable
  def step(self, closure=None):
    """Updates every parameter that has a gradient.

    Under ``torch.compile`` (of ``step`` itself or of a train step that calls it) the step
    runs eagerly, as one graph break that never recompiles: it computes the same bits as
    without compilation, which inductor's re-fused arithmetic would not (docs/spec.md
    section 5.6), and its per-matrix refresh decisions are CPU reads, not graph code.

    With ``skip_nonfinite``, the step first checks that every gradient is finite, one flag
    per device. Where the CPU can read the flag without waiting for an accelerator (every
    gradient on the CPU), or must wait anyway (a refresh is due: its SVD synchronises), a
    non-finite step touches nothing but the skip count. Otherwise each parameter is updated
    and then put back where the flag is false (``torch.where``, one copy of the parameter
    and its state alive at a time), and the CPU reads the flag at the start of the next
    step, ``state_dict``, :meth:`projection_stats` or :attr:`skipped_steps`, when the
    accelerator is long past it (on CUDA through pinned memory and an event: no stall), to
    undo the ``step`` count of a skipped step.

    Args:
      closure: optional callable that re-evaluates the model and returns the loss.

    Returns:
      The loss returned by ``closure``, or ``None``.
    """
    loss = None
    if closure is not None:
      with torch.enable_grad():
        loss = closure()
    todo = [(i, group, p) for i, group, p in self._indexed_params() if p.grad is not None]
    if not self.skip_nonfinite:
      self._update_all(todo)
      return loss
    self._resolve_pending()
    if not todo:
      return loss
    ok = _finite_flags([p.grad for _, _, p in todo])
    if _reads_freely(ok) or any(self._refresh_due(p, g) for _, g, p in todo):
      if all(bool(flag) for flag in ok.values()):
        self._update_all(todo)
      else:
        for _, group, p in todo:
          self._count_skip(p, group)
      return loss
    for tensor_id, group, p in todo:
      self._masked_update(p, group, tensor_id, ok[p.device])
    self._pending = (_PendingFlag(next(iter(ok.values()))), [(p, g) for _, g, p in todo])
    return loss

  def _update_all(self, todo):
    """:meth:`_update` of each ``(tensor_id, group, p)``, after the owner pass if enabled."""
    if self.refresh_mode == "owner":
      self._refreshed = self._owner_refresh(todo)
    try:
      for tensor_id, group, p in todo:
        self._update(p, group, tensor_id)
    finally:
      self._refreshed = frozenset()

  def _owner_refresh(self, todo):
    """Computes each refresh due on this step on one process and broadcasts it.

    Every process finds the same due matrices from its (identical) schedules and deals them
    out with :func:`~qgalore_torch._src.distributed.assign_owners`. Each owner runs
    :meth:`_refresh` of its matrices; then the stored projector and the schedule of every
    due matrix are broadcast from its owner, in the same order on every process.

    Returns:
      The set of ``(tensor_id, slice_index)`` refreshed, which :meth:`_projector` skips.
    """
    if not distributed.dist.is_initialized():
      raise RuntimeError(
        "refresh_mode='owner' needs an initialised process group:"
        " call torch.distributed.init_process_group before the first step"
      )
    pg = self.process_group
    world, me = distributed.dist.get_world_size(pg), distributed.dist.get_rank(pg)
    due = []  # (tensor_id, slice_index, index, p, group, matrix shape)
    for tensor_id, group, p in todo:
      if "rank" not in group:
        continue
      if not self.state[p]:
        self._init_state(p, group)
      state = self.state[p]
      layout = _stack_layout(p, group)
      for slice_index, index in enumerate(layout.indices()):
        subspace = schedule.SubspaceState(*(state[key][index] for key in _SCHEDULE_KEYS))
        if bool(schedule.refresh_due(subspace, state["step"])):
          due.append((tensor_id, slice_index, index, p, group, layout.matrix_shape))
    owners = distributed.assign_owners([distributed.refresh_cost(d[5]) for d in due], world)
    keys = lambda state: [k for k in state if k.startswith("proj_") or k in _SCHEDULE_KEYS]
    for (tensor_id, slice_index, index, p, group, _), owner in zip(due, owners, strict=True):
      if distributed.is_dtensor(p):  # every process takes part in the gather
        grad_MxN = p.grad.full_tensor().to(torch.float32)
      elif owner == me:
        grad_MxN = as_separate(_stack_layout(p, group).to_stack(p.grad)[index])
        grad_MxN = grad_MxN.to(torch.float32)
      if owner != me:
        continue
      state = self.state[p]
      views = {key: state[key][index] for key in keys(state)}
      matrix_state = dict(views)
      self._refresh(matrix_state, grad_MxN, group, state["step"], (tensor_id, slice_index))
      for key, view in views.items():
        view.copy_(matrix_state[key])
    works = []
    for (_, _, index, p, _, _), owner in zip(due, owners, strict=True):
      src = owner if pg is None else distributed.dist.get_global_rank(pg, owner)
      state = self.state[p]
      for key in keys(state):
        works.append(_broadcast(state[key][index], src, pg, p.device))
    for wait in works:
      wait()
    return frozenset((d[0], d[1]) for d in due)

  def _refresh_due(self, p, group):
    """Whether any matrix of ``p`` refreshes at its next step (reads CPU tensors only)."""
    if "rank" not in group:
      return False
    state = self.state.get(p)
    if not state:
      return True
    subspace = schedule.SubspaceState(*(state[key] for key in _SCHEDULE_KEYS))
    return bool(schedule.refresh_due(subspace, state["step"]).any())

  def _count_skip(self, p, group):
    """Counts a skipped step in ``p``'s state (created first: a skip is state too)."""
    if not self.state[p]:
      self._init_state(p, group)
    state = self.state[p]
    state[_SKIPPED] = state.get(_SKIPPED, torch.zeros([], dtype=torch.float32)) + 1

  def _masked_update(self, p, group, tensor_id, ok):
    """:meth:`_update`, then the old parameter and state back wherever ``ok`` is false."""
    if not self.state[p]:
      self._init_state(p, group)
    state = self.state[p]
    old_state = {k: v.clone() for k, v in state.items() if k not in _HOST_KEYS}
    int8 = isinstance(p, Int8Weight)
    old_p = QuantizedTensor(*(t.clone() for t in p.quantized())) if int8 else p.clone()
    self._update(p, group, tensor_id)
    if int8:
      p.assign_(functional._where(ok, p.quantized(), old_p))
    else:
      p.copy_(torch.where(ok, p, old_p))
    form_changed = old_state.keys() != {k for k in state if k not in _HOST_KEYS} or any(
      state[k].shape != v.shape or state[k].dtype != v.dtype for k, v in old_state.items()
    )
    # The step count and the skip are settled when the pending flag is read (see ``step``).
    if form_changed and not bool(ok):  # moments loaded in another form: read the flag now
      state.update(old_state)
      for key in list(state):
        if key not in old_state and key not in _HOST_KEYS:
          del state[key]
    elif not form_changed:
      for key, old in old_state.items():
        state[key] = torch.where(ok, state[key], old)

  def _resolve_pending(self):
    """Reads the flag of the last masked step; if it was skipped, undoes its ``step`` counts."""
    if self._pending is None:
      return
    flag, updated = self._pending
    self._pending = None
    if not flag.read():
      for p, group in updated:
        self.state[p]["step"] = self.state[p]["step"] - 1
        self._count_skip(p, group)

  @property
  def skipped_steps(self):
    """Steps skipped for a non-finite gradient (``skip_nonfinite``), as an int.

    The count of the parameter that counted most (every parameter counts the same when
    all of them have gradients at every step); 0 before any skip.
    """
    self._resolve_pending()
    counts = [int(s[_SKIPPED]) for s in self.state.values() if _SKIPPED in s]
    return max(counts, default=0)

  def state_dict(self):
    """torch's ``state_dict``, once a pending ``skip_nonfinite`` flag is read (see :meth:`step`)."""
    self._resolve_pending()
    return super().state_dict()

  def _indexed_params(self):
    """``(tensor_id, group, param)`` for every parameter, ids counted across the groups.

    The id keys the stochastic rounding of INT8 weights (docs/spec.md section 6): it is stable as
    long as the param groups are built in the same order.
    """
    params = ((group, p) for group in self.param_groups for p in group["params"])
    return [(i, group, p) for i, (group, p) in enumerate(params)]

  def register_layerwise_hooks(self, accumulation_steps=1, *, local_gradients=False):
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

    Distributed training: refused (``ValueError``) on FSDP2 (DTensor) parameters, and
    whenever ``torch.distributed`` is initialised with more than one process, since a hook
    would update before DDP's all-reduce. DDP leaves no mark on the parameters it reduces,
    so the check is on the process group, here and again at each hook's first call (for a
    group initialised after the hooks); ``local_gradients=True`` states that no process
    reduces these gradients (e.g. independent runs that share a process group).

    Args:
      accumulation_steps: micro-batches per optimizer step (>= 1).
      local_gradients: see above.

    Returns:
      The hook handles; ``handle.remove()`` on each goes back to normal mode.

    References:
      Zhao et al., `GaLore <https://arxiv.org/abs/2403.03507>`_, section 4.2, 2024.
    """
    check_int(accumulation_steps, "accumulation_steps")
    if self.skip_nonfinite:
      raise ValueError(
        "`skip_nonfinite` needs every gradient of a step before the first update, which"
        " layer-wise mode updates as they arrive: build the optimizer with"
        " skip_nonfinite=False to use layer-wise hooks"
      )
    params = [p for _, _, p in self._indexed_params() if p.requires_grad]
    refusal = distributed.layerwise_refusal(params, local_gradients)
    if refusal is not None:
      raise ValueError(f"layer-wise hooks refused: {refusal}")
    return [
      p.register_post_accumulate_grad_hook(
        self._layerwise_hook(group, accumulation_steps, tensor_id, local_gradients)
      )
      for tensor_id, group, p in self._indexed_params()
      if p.requires_grad
    ]

  def _layerwise_hook(self, group, accumulation_steps, tensor_id, local_gradients):
    received = 0

    def hook(p):
      nonlocal received
      if received == 0:  # a process group initialised after the hooks were registered
        refusal = distributed.layerwise_refusal([p], local_gradients)
        if refusal is not None:
          raise ValueError(f"layer-wise hooks refused: {refusal}")
      received += 1
      if received % accumulation_steps == 0:
        with torch.no_grad():
          self._update(p, group, tensor_id)
        p.grad = None

    return hook

  def _init_state(self, p, group):
    """Puts :meth:`_zero_state` into ``self.state[p]``, once a DTensor ``p`` is checked."""
    if distributed.is_dtensor(p):
      where = path_str(
        next(i for i, g in enumerate(self.param_groups) if g is group),
        next(i for i, q in enumerate(group["params"]) if q is p),
      )
      distributed.check_dtensor_param(p, where, group, self.skip_nonfinite)
    self.state[p].update(self._zero_state(p, group))

  @staticmethod
  @torch.no_grad()
  def _zero_state(p, group):
    """Zero state for ``p``: step, moments and, for projected matrices, projector and schedule.

    A plain parameter's float32 moments are shaped and strided like it. A projected
    matrix's are the low-rank (m, r) or (r, n) and its projector is all zeros until the
    first refresh (its step 0) replaces it. A stack of matrices (``batch_axes``) holds one
    matrix's state per slice: each tensor with the batch shape in front (docs/spec.md
    section 1.3).
    """
    state = {"step": torch.zeros([], dtype=torch.float32, device=_HOST)}
    if distributed.is_dtensor(p):
      return {**state, **_dtensor_zero_state(p, group)}
    if "rank" not in group:
      moment_bits, min_size = group["moment_bits"], group["min_8bit_size"]
      zeros = [
        moments.init_moment(tuple(p.shape), s, moment_bits, p.device, min_size, like=p)
        for s in _SIGNED
      ]
      moments.to_state(state, zeros)
      return state
    layout = _stack_layout(p, group)
    matrix = _matrix_zero_state(layout.matrix_shape, group, p.device)
    batch_shape = layout.batch_shape
    if batch_shape:
      matrix = {k: v.expand(*batch_shape, *v.shape).clone() for k, v in matrix.items()}
    state.update(matrix)
    return state

  def _update(self, p, group, tensor_id):
    if p.grad.is_sparse:
      raise RuntimeError("QGaLoreAdamW does not support sparse gradients")
    if distributed.is_dtensor(p):
      self._update_dtensor(p, group, tensor_id)
      return
    if not self.state[p]:
      self._init_state(p, group)
    state = self.state[p]
    grad = p.grad.to(torch.float32)
    # `step`, 0-based, decides the refreshes; `count`, 1-based, is the step of the moments.
    step = state["step"]
    count = step + 1
    b1, b2 = (_number(b) for b in group["betas"])
    hyper = (b1, b2, *(_number(group[key]) for key in ("eps", "lr", "weight_decay")))
    rounding = {"seed": group["seed"], "tensor_id": tensor_id}
    if "rank" not in group:
      exp_avg, exp_avg_sq = _load_moments(state)
      scratch = None if grad is p.grad else grad  # a float32 copy of the gradient is ours
      functional.adamw_step_(
        p, grad, exp_avg, exp_avg_sq, count, *hyper, scratch=scratch, **rounding
      )
      _store_moments(state, (exp_avg, exp_avg_sq), group)
    else:
      layout = _stack_layout(p, group)
      args = (group, step, count, hyper, rounding)
      if layout.batch:
        self._update_slices(state, layout, p, grad, *args)
      else:
        self._update_matrix(state, p, grad, *args)
    state["step"] = count

  def _update_matrix(
    self, state, p_MxN, grad_MxN, group, step, count, hyper, rounding, slice_index=0
  ):
    """One projected (out, in) matrix: refresh if due, then the projected step, in place.

    ``slice_index`` is the matrix's row-major index in its stack (0 for a 2-D parameter).
    """
    matrix_id = (rounding["tensor_id"], slice_index)
    basis_RxK = self._projector(
      state, tuple(grad_MxN.shape), lambda: grad_MxN, group, step, matrix_id
    )
    exp_avg, exp_avg_sq = _load_moments(state)
    scale = _number(group["scale"])
    functional.projected_step_(
      p_MxN, grad_MxN, basis_RxK, exp_avg, exp_avg_sq, count, *hyper, scale, **rounding
    )
    _store_moments(state, (exp_avg, exp_avg_sq), group)

  def _update_slices(self, state, layout, p, grad, *args):
    """:meth:`_update_matrix` of each slice of a stack, row-major (docs/spec.md section 1.3).

    Each slice is updated as a separate matrix would be: its state, parameter and gradient
    are views into the stacked tensors, or copies laid out as a separate tensor is where
    a view is not (see :func:`as_separate`); what the update replaced or wrote into a copy
    is copied into the view. A stored moment whose form changes (a state saved with another
    ``moment_bits``) is restacked after the last slice.
    """
    p_stack, grad_stack = layout.to_stack(p), layout.to_stack(grad)
    restacked, dropped = {}, set()
    for slice_index, index in enumerate(layout.indices()):
      views = {key: value[index] for key, value in state.items() if key not in _PER_TENSOR_KEYS}
      matrix_state = {key: as_separate(view) for key, view in views.items()}
      p_view = p_stack[index]
      p_MxN = as_separate(p_view)
      grad_MxN = as_separate(grad_stack[index])
      self._update_matrix(matrix_state, p_MxN, grad_MxN, *args, slice_index=slice_index)
      if p_MxN is not p_view:
        p_view.copy_(p_MxN)
      dropped |= views.keys() - matrix_state.keys()
      for key, value in matrix_state.items():
        view = views.get(key)
        if view is None or view.dtype != value.dtype:
          restacked.setdefault(key, []).append(value)
        elif value is not view:
          view.copy_(value)
    for key in dropped:
      del state[key]
    for key, values in restacked.items():
      state[key] = torch.stack(values).reshape(*layout.batch_shape, *values[0].shape)

  def _projector(self, state, shape, grad_fn, group, step, matrix_id):
    """The float32 ``basis_RxK`` of this step, refreshed first if due (docs/spec.md section 4).

    ``state`` is one matrix's, of canonical ``shape``; ``grad_fn()`` gives its float32 full
    gradient, called on a refresh only (a DTensor's is gathered then); ``step`` is its
    0-based step, which the schedule reads; ``matrix_id`` is ``(tensor id, slice index)``,
    which with ``step`` keys its sketch. A matrix in ``self._refreshed`` was refreshed by
    :meth:`_owner_refresh` on this step already.
    """
    subspace = schedule.SubspaceState(*(state[key] for key in _SCHEDULE_KEYS))
    # CPU tensors only: deciding costs no device synchronisation.
    if matrix_id not in self._refreshed and bool(schedule.refresh_due(subspace, step)):
      self._refresh(state, grad_fn(), group, step, matrix_id)
    bits, group_size = group["proj_bits"], group["proj_group_size"]
    stored = proj.stored_from_state(state, bits)
    return proj.load_projector(stored, proj.basis_shape(shape, group["rank"]), bits, group_size)

  def _refresh(self, state, grad_MxN, group, step, matrix_id):
    """Refreshes one matrix's stored projector and schedule in ``state`` from ``grad_MxN``."""
    rank, bits, group_size = group["rank"], group["proj_bits"], group["proj_group_size"]
    stored = proj.stored_from_state(state, bits)
    subspace = schedule.SubspaceState(*(state[key] for key in _SCHEDULE_KEYS))
    basis_shape = proj.basis_shape(tuple(grad_MxN.shape), rank)
    key = (step.to(torch.int64), *matrix_id)
    previous = lambda: proj.load_projector(stored, basis_shape, bits, group_size)
    first = int(subspace.svd_count) == 0
    stored, subspace = functional.refresh_projector(
      grad_MxN,
      stored,
      subspace,
      rank,
      bits,
      group_size,
      group["cos_threshold"],
      group["gamma_proj"],
      projector_fn=self._basis_fn(group, key, previous, first, grad_MxN.device),
    )
    state.update(proj.stored_to_state(stored))
    state.update(subspace._asdict())

  def _update_dtensor(self, p, group, tensor_id):
    """:meth:`_update` of an FSDP2 parameter: a DTensor sharded along dim 0, or replicated.

    The arithmetic is that of a plain tensor, on this process's shard: elementwise for
    plain AdamW; for a projected matrix the refresh gathers the full gradient, and the
    projection, Adam and back-projection run on the shard's rows (``m >= n``), or on the
    all-reduced ``P^T G`` (``m < n``).
    """
    if not self.state[p]:
      self._init_state(p, group)
    state = self.state[p]
    local = {k: v.to_local() if distributed.is_dtensor(v) else v for k, v in state.items()}
    p_local, grad = p.to_local(), p.grad.to_local().to(torch.float32)
    step = state["step"]
    count = step + 1
    b1, b2 = (_number(b) for b in group["betas"])
    hyper = (b1, b2, *(_number(group[key]) for key in ("eps", "lr", "weight_decay")))
    exp_avg, exp_avg_sq = local["exp_avg"], local["exp_avg_sq"]
    if "rank" not in group:
      functional.adamw_step_(
        p_local, grad, exp_avg, exp_avg_sq, count, *hyper, seed=group["seed"], tensor_id=tensor_id
      )
    else:
      shape = tuple(p.shape)
      full_grad = lambda: p.grad.full_tensor().to(torch.float32)
      basis_RxK = self._projector(local, shape, full_grad, group, step, (tensor_id, 0))
      side, reduce = proj.projector_side(shape), None
      if side == proj.LEFT and p.placements[0] != distributed.Replicate():
        start, stop = distributed.local_rows(p)
        basis_RxK = basis_RxK[:, start:stop]
        pg = p.device_mesh.get_group()
        reduce = lambda low_rank: distributed.dist.all_reduce(low_rank, group=pg)
      functional.projected_step_(
        p_local,
        grad,
        basis_RxK,
        exp_avg,
        exp_avg_sq,
        count,
        *hyper,
        _number(group["scale"]),
        side=side,
        reduce=reduce,
      )
      for key in local:
        if not distributed.is_dtensor(state[key]):
          state[key] = local[key]  # the projector and schedule a refresh replaced
    state["step"] = count

  def _basis_fn(self, group, key, previous, first, device):
    """``(grad_MxN, rank) -> basis_RxK`` of the group's ``svd_method`` (docs/spec.md 2.6).

    ``previous`` gives the stored basis, dequantised; ``first`` is whether the matrix has
    had no accepted refresh yet (a CPU tensor read: no device sync).
    """
    method = group["svd_method"]
    if method == "full":
      return self.projector_fn

    def basis_fn(grad_MxN, rank):
      shape = proj.sketch_shape(tuple(grad_MxN.shape), rank, group["oversample"])
      sketch_KxL = generator.sketch(group["seed"], *key, shape, device=device)
      if method == "randomized" or first:
        return proj.randomized_projector(grad_MxN, rank, sketch_KxL, group["power_iters"])
      start_KxL = proj.warm_start(sketch_KxL, previous())
      return proj.randomized_projector(grad_MxN, rank, start_KxL, group["subspace_iters"])

    return basis_fn

  def load_state_dict(self, state_dict):
    """Loads a state from :meth:`state_dict`, keeping each state tensor's saved dtype.

    ``torch.optim.Optimizer.load_state_dict`` casts floating state to the parameter's dtype
    (which would turn bf16 params' float32 moments and the uint8 projector codes into
    bf16); here every tensor keeps its saved dtype, the schedule and ``step`` stay on the
    CPU and the rest moves to the parameter's device. A key that a saved param group lacks
    takes the constructor's value.

    The state must fit this optimizer (docs/spec.md section 7.4): a group saved with other
    structural settings (``rank`` or none, ``batch_axes``, ``proj_bits``,
    ``proj_group_size``, ``queue_size``), or a state tensor whose key, shape or dtype
    differs from what this optimizer creates for the parameter, raises ``ValueError``
    naming the group, the parameter and the setting, and leaves the optimizer as it was.
    Other hyperparameters (``lr``, ``betas``, ...) are restored from the saved groups, as
    torch's optimizers do. The moments may have been saved in either form (float32 or
    8-bit): they take the group's form at the next step.
    """
    _check_saved_groups(self.param_groups, state_dict["param_groups"])
    self._pending = None  # a flag of the state being replaced
    before = self.state, self.param_groups
    super().load_state_dict(state_dict)
    for group in self.param_groups:  # keys a group saved by an older version lacks
      for key, value in self.defaults.items():
        group.setdefault(key, value)
    saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    params = [p for g in self.param_groups for p in g["params"]]
    for i, p in zip(saved_ids, params, strict=True):
      if i in state_dict["state"]:
        self.state[p] = {
          key: value.to(device=_HOST if key in _HOST_KEYS else p.device, copy=True)
          for key, value in state_dict["state"][i].items()
        }
    try:
      self._check_loaded_state()
    except ValueError:
      self.state, self.param_groups = before
      raise

  def _check_loaded_state(self):
    """Every loaded state tensor has the key, shape and dtype that :meth:`_zero_state` makes.

    The expected state is built on the meta device: shapes and dtypes, no memory.
    """
    keys = lambda state: sorted(k for k in state if not k.endswith("_absmax") and k != _SKIPPED)
    for index, group in enumerate(self.param_groups):
      for i, p in enumerate(group["params"]):
        if not self.state.get(p):
          continue
        got = self.state[p]
        want = self._zero_state(torch.empty_like(p, device="meta"), group)
        where = f"{path_str(index, i)} (shape {tuple(p.shape)})"
        if keys(got) != keys(want):
          raise ValueError(
            f"the saved state of {where} has keys {keys(got)}, but this optimizer keeps"
            f" {keys(want)}: the state_dict comes from another configuration"
          )
        for key in keys(want):
          value = want[key]
          dtype_differs = key not in _MOMENT_KEYS and got[key].dtype != value.dtype
          if got[key].shape != value.shape or dtype_differs:
            raise ValueError(
              f"the saved state of {where} has {key!r} of shape {tuple(got[key].shape)} and"
              f" dtype {got[key].dtype}, but this optimizer makes {tuple(value.shape)} and"
              f" {value.dtype}: the state_dict comes from another model or configuration"
            )

  def projection_stats(self):
    """Per-matrix refresh statistics, for logging (reads tensors: call outside the step).

    Returns:
      A list with one entry per parameter, in param-group order: for a projected matrix a
      dict with int ``gap`` (current refresh interval), ``svd_count`` (SVDs so far),
      ``num_cosines`` and float ``mean_cosine`` (mean of the filled cosine buffer, 0 while
      empty); for a stack of matrices (``batch_axes``) the same dict whose values are lists,
      one value per slice in row-major order; ``None`` for parameters of groups without
      ``rank``.
    """
    stats = []
    for group in self.param_groups:
      for p in group["params"]:
        if "rank" not in group:
          stats.append(None)
          continue
        layout = _stack_layout(p, group)
        state = self.state.get(p)
        if state:
          per_slice = [_matrix_stats(state, index) for index in layout.indices()]
        else:
          initial = {"gap": group["update_proj_gap"], "svd_count": 0, "num_cosines": 0}
          per_slice = [{**initial, "mean_cosine": 0.0}] * layout.num_slices
        if layout.batch:
          stats.append({key: [s[key] for s in per_slice] for key in _STATS_KEYS})
        else:
          stats.append(per_slice[0])
    return stats


# Settings that shape the state: a state_dict saved with other values cannot be loaded.
# (``moment_bits`` and ``min_8bit_size`` are not among them: the moments take the form the
# group asks for at the next step, whichever form they were saved in.)
_STRUCTURAL_KEYS = ("rank", "batch_axes", "proj_bits", "proj_group_size", "queue_size")
# The moments' stored form (float32, or 8-bit codes with absmax) may differ from a fresh
# state's; only their shape must match.
_MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
_ABSENT = object()


def _check_saved_groups(groups, saved_groups):
  """Raises ``ValueError`` where a saved group's structural setting differs from this one's."""
  if len(groups) != len(saved_groups):
    raise ValueError(
      f"the state_dict has {len(saved_groups)} param groups, this optimizer {len(groups)}"
    )
  show = lambda v: "none" if v is _ABSENT else repr(v)
  for index, (group, saved) in enumerate(zip(groups, saved_groups, strict=True)):
    for key in _STRUCTURAL_KEYS:
      mine, theirs = group.get(key, _ABSENT), saved.get(key, _ABSENT)
      if key == "batch_axes":
        mine, theirs = tuple(group.get(key, ())), tuple(saved.get(key, ()))
      elif key != "rank" and theirs is _ABSENT:
        continue  # saved by an older version: the constructor's value applies
      if mine != theirs:
        raise ValueError(
          f"param group {index} of the state_dict was saved with {key}={show(theirs)}, but"
          f" this optimizer's has {key}={show(mine)}: build the optimizer with the saved"
          f" settings, or leave its state fresh"
        )


def _dtensor_zero_state(p, group):
  """The zero state of a DTensor parameter, without ``step`` (float32 moments only).

  Full-size moments are DTensors sharded like ``p``; a projected matrix's low-rank moments
  are DTensors split by rows like ``p`` for side ``"right"`` (``m x r``) and replicated for
  side ``"left"`` (``r x n``), its projector and schedule plain replicated tensors.
  """
  if "rank" not in group:
    local = p.to_local()
    zeros = lambda: torch.zeros_like(local, dtype=torch.float32)
    return {key: distributed.wrap_like(zeros(), p, tuple(p.shape), True) for key in _MOMENT_KEYS}
  shape = tuple(p.shape)
  state = _matrix_zero_state(shape, group, p.device)
  low_rank_shape = proj.low_rank_shape(shape, group["rank"])
  sharded = proj.projector_side(shape) == proj.RIGHT and p.placements[0] != distributed.Replicate()
  if sharded:
    start, stop = distributed.local_rows(p)
    local_shape = (stop - start, low_rank_shape[1])
  else:
    local_shape = low_rank_shape
  for key in _MOMENT_KEYS:
    local = torch.zeros(local_shape, dtype=torch.float32, device=p.to_local().device)
    state[key] = distributed.wrap_like(local, p, low_rank_shape, sharded)
  return state


def _broadcast(tensor, src, group, device):
  """Starts broadcasting ``tensor`` in place from ``src``; returns a function that waits.

  A tensor off ``device`` (the schedule, kept on the CPU) travels through a copy on it, so a
  backend that only moves device tensors (NCCL) can carry it.
  """
  buffer = tensor if tensor.device == device and tensor.is_contiguous() else tensor.to(device)
  buffer = buffer.contiguous()
  work = distributed.dist.broadcast(buffer, src, group=group, async_op=True)

  def wait():
    work.wait()
    if buffer is not tensor:
      tensor.copy_(buffer)

  return wait


def _reads_freely(flags):
  """Whether the CPU can read the ``{device: flag}`` of :func:`_finite_flags` without waiting."""
  return all(device.type == "cpu" for device in flags)


def _finite_flags(grads):
  """``{device: 0-d bool}``: whether every gradient is finite, on each gradients' device."""
  by_device = {}
  for g in grads:
    by_device.setdefault(g.device, []).append(torch.isfinite(g).all())
  local = {d: torch.stack(flags).all() for d, flags in by_device.items()}
  if len(local) == 1:
    return local
  return {d: torch.stack([f.to(d) for f in local.values()]).all() for d in local}


class _PendingFlag:
  """A device flag the CPU reads later; on CUDA copied to pinned memory behind an event."""

  def __init__(self, flag):
    self._flag, self._event = flag, None
    if flag.device.type == "cuda":
      self._flag = torch.empty([], dtype=torch.bool, pin_memory=True)
      self._flag.copy_(flag, non_blocking=True)
      self._event = torch.cuda.Event()
      self._event.record()

  def read(self):
    if self._event is not None:
      self._event.synchronize()
    return bool(self._flag)


def _matrix_stats(state, index):
  """The :meth:`QGaLoreAdamW.projection_stats` of the slice at ``index`` (``()``: 2-D)."""
  cosines = state["cosines"][index]
  num = int(state["num_cosines"][index])
  filled = cosines[cosines.shape[0] - num :]
  return {
    "gap": int(state["gap"][index]),
    "svd_count": int(state["svd_count"][index]),
    "num_cosines": num,
    "mean_cosine": float(filled.sum()) / max(num, 1),
  }

"""Tests of QGaLoreAdamW on stacks of matrices, ``batch_axes`` (docs/spec.md section 1.3).

The oracle is the optimizer itself on 2-D parameters, which optimizer_test.py checks against
a naive NumPy Q-GaLore: every slice of a stack must follow, bit for bit, the same matrix held
as a separate 2-D parameter.
"""

import numpy as np
import pytest
import torch

from qgalore_torch._src.int8 import Int8Weight
from qgalore_torch._src.layout import stack_layout
from qgalore_torch._src.optimizer import QGaLoreAdamW
from qgalore_torch._src.optimizer_test import HYPER
from qgalore_torch._src.optimizer_test import _resume_midway
from qgalore_torch._src.optimizer_test import _save_and_load
from qgalore_torch._src.optimizer_test import _train_normal_and_layerwise
from qgalore_torch._src.projector import compute_projector
from qgalore_torch._src.quantization import quantize

# (shape, batch_axes): batch axis leading; not leading (a fused (out, 3, in) QKV weight);
# two batch axes, one negative, around a wide (16, 24) matrix (the "left" side).
LAYOUTS = [((3, 24, 16), (0,)), ((24, 3, 16), (1,)), ((2, 16, 3, 24), (0, -2))]
SCHEDULE = {"rank": 4, "update_proj_gap": 2, "queue_size": 2, "cos_threshold": 0.4}
# The low-rank moments of the (24, 16) and (16, 24) slices have 96 elements: 8-bit with
# min_8bit_size 64; float32 with 97, although a whole stack's moments hold 288 or more.
VARIANTS = {
  "int4": {},
  "float_projector": {"proj_bits": None},
  "int2_8bit": {"proj_bits": 2, "proj_group_size": 7, "moment_bits": 8, "min_8bit_size": 64},
  "8bit_too_small": {"moment_bits": 8, "min_8bit_size": 97},
}
STEPS = 30


def _slice_gradients(num_slices, shape, steps, seed):
  """(steps, S, m, n) float32 gradients; slice ``s`` is of kind ``s % 3``.

  0: one fixed rank-1 direction with a changing magnitude (its subspace stays, so its gap
  grows); 1: fresh noise (its top vector jumps, so its gap stays); 2: a fixed rank-1
  direction plus noise.
  """
  rng = np.random.default_rng(seed)
  grads = np.empty((steps, num_slices, *shape), np.float32)
  for s in range(num_slices):
    direction = np.outer(rng.standard_normal(shape[0]), rng.standard_normal(shape[1]))
    for t in range(steps):
      noise = rng.standard_normal(shape)
      kind = s % 3
      if kind == 0:
        grads[t, s] = (1 + rng.uniform()) * direction + 0.01 * noise
      elif kind == 1:
        grads[t, s] = noise
      else:
        grads[t, s] = 3 * direction + 0.5 * noise
  return grads


def _in_layout(layout, stack_SxMxN, dtype=torch.float32):
  """A (S, m, n) array as a new contiguous tensor of the stacked parameter's shape."""
  x = torch.tensor(stack_SxMxN, dtype=dtype).reshape(*layout.batch_shape, *layout.matrix_shape)
  return layout.from_stack(x).contiguous()


def _stack_and_slices(shape, batch_axes, group, dtype=torch.float32, projector_fn=None):
  """A stacked parameter and its slices as 2-D parameters, each in its own group of one
  optimizer with the same keys; returns ``(layout, stacked, slices, optimizer)``."""
  layout = stack_layout(shape, batch_axes)
  rng = np.random.default_rng(0)
  w0 = rng.standard_normal((layout.num_slices, *layout.matrix_shape)).astype(np.float32)
  stacked = torch.nn.Parameter(_in_layout(layout, w0, dtype))
  slices = [torch.nn.Parameter(torch.tensor(w, dtype=dtype)) for w in w0]
  groups = [{"params": [stacked], "batch_axes": batch_axes, **group}, {"params": slices, **group}]
  return layout, stacked, slices, QGaLoreAdamW(groups, **HYPER, projector_fn=projector_fn)


def _step(layout, stacked, slices, opt, grads_SxMxN):
  stacked.grad = _in_layout(layout, grads_SxMxN, stacked.dtype)
  for p, g in zip(slices, grads_SxMxN, strict=True):
    p.grad = torch.tensor(g, dtype=p.dtype)  # not a view into the array: see layout.as_separate
  opt.step()


def _assert_stack_equals_slices(layout, stacked, slices, opt):
  """Weights, state and stats of each slice are those of its 2-D twin, bit for bit."""
  state, stats = opt.state[stacked], opt.projection_stats()
  for index, p in zip(layout.indices(), slices, strict=True):
    assert torch.equal(layout.to_stack(stacked)[index], p)
    twin = opt.state[p]
    assert state.keys() == twin.keys()
    assert torch.equal(state["step"], twin["step"])
    for key in state.keys() - {"step"}:
      assert state[key].shape == (*layout.batch_shape, *twin[key].shape), key
      assert state[key].dtype == twin[key].dtype, key
      assert torch.equal(state[key][index], twin[key]), key
  twins = stats[1 : 1 + len(slices)]
  assert stats[0] == {key: [s[key] for s in twins] for key in stats[0]}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape, batch_axes", LAYOUTS)
def test_stack_equals_its_slices_as_separate_matrices(shape, batch_axes, variant):
  group = {**SCHEDULE, **VARIANTS[variant]}
  layout, stacked, slices, opt = _stack_and_slices(shape, batch_axes, group)
  grads = _slice_gradients(layout.num_slices, layout.matrix_shape, STEPS, seed=1)
  for g in grads:
    _step(layout, stacked, slices, opt, g)
  _assert_stack_equals_slices(layout, stacked, slices, opt)

  stats = opt.projection_stats()[0]
  assert stats["gap"][0] >= 16 and stats["gap"][1] == 2  # the schedules diverged
  assert stats["svd_count"][0] < stats["svd_count"][1] == STEPS // 2
  eight_bit = group.get("min_8bit_size") == 64
  assert opt.state[stacked]["exp_avg"].dtype == (torch.uint8 if eight_bit else torch.float32)
  assert opt.state[stacked]["step"].shape == ()


@pytest.mark.parametrize("variant", ["int4", "float_projector", "int2_8bit"])
def test_stack_of_odd_sizes_equals_its_slices(variant):
  """(7, 5) slices: the slices of the stacked state start at addresses that are not multiples
  of 64 bytes, and the matrix products must round as they do on separate tensors."""
  group = {**SCHEDULE, **VARIANTS[variant], "min_8bit_size": 16}
  layout, stacked, slices, opt = _stack_and_slices((7, 3, 5), (1,), group)
  for g in _slice_gradients(layout.num_slices, layout.matrix_shape, 12, seed=9):
    _step(layout, stacked, slices, opt, g)
  _assert_stack_equals_slices(layout, stacked, slices, opt)


def test_bf16_stack_equals_its_slices():
  layout, stacked, slices, opt = _stack_and_slices((24, 3, 16), (1,), SCHEDULE, torch.bfloat16)
  for g in _slice_gradients(layout.num_slices, layout.matrix_shape, 12, seed=2):
    _step(layout, stacked, slices, opt, g)
  _assert_stack_equals_slices(layout, stacked, slices, opt)
  assert stacked.dtype == torch.bfloat16


def test_state_layout_of_a_stack():
  """Every per-matrix tensor carries the batch shape in front (docs/spec.md section 7.2)."""
  group = {**SCHEDULE, "moment_bits": 8, "min_8bit_size": 64, "queue_size": 3}
  layout, stacked, slices, opt = _stack_and_slices((2, 16, 3, 24), (0, 2), group)
  _step(layout, stacked, slices, opt, _slice_gradients(6, (16, 24), 1, seed=3)[0])
  state = opt.state[stacked]
  shapes = {key: tuple(value.shape) for key, value in state.items()}
  assert shapes == {
    "step": (),
    "exp_avg": (2, 3, 4, 24),  # the "left" side: (r, n) moments
    "exp_avg_sq": (2, 3, 4, 24),
    "exp_avg_absmax": (2, 3, 1, 2),
    "exp_avg_sq_absmax": (2, 3, 1, 2),
    "proj_codes": (2, 3, 32),  # 4 x 16 codes, two per byte
    "proj_scale": (2, 3, 1),
    "proj_zero": (2, 3, 1),
    "gap": (2, 3),
    "cosines": (2, 3, 3),
    "num_cosines": (2, 3),
    "top_vector": (2, 3, 16),
    "svd_count": (2, 3),
  }


def test_svd_count_is_per_slice():
  """One ``projector_fn`` call per due slice: as many as the slices' SVD counts add up to,
  none on a step where no slice is due."""
  calls = []

  def counting_projector(grad_MxN, rank):
    calls.append(tuple(grad_MxN.shape))
    return compute_projector(grad_MxN, rank)

  layout = stack_layout((3, 24, 16), (0,))
  w = torch.nn.Parameter(torch.zeros(3, 24, 16))
  group = {"params": [w], "batch_axes": (0,), **SCHEDULE}
  opt = QGaLoreAdamW([group], **HYPER, projector_fn=counting_projector)
  per_step = []
  for g in _slice_gradients(3, (24, 16), STEPS, seed=4):
    before = len(calls)
    w.grad = _in_layout(layout, g)
    opt.step()
    per_step.append(len(calls) - before)
    assert len(calls) == sum(opt.projection_stats()[0]["svd_count"])
  assert per_step[:2] == [3, 0]  # all three refresh at step 0, none at step 1
  assert any(0 < n < 3 for n in per_step)  # only some slices due
  assert set(calls) == {(24, 16)}


@pytest.mark.parametrize("variant", ["int4", "int2_8bit"])
def test_state_dict_round_trip_of_stacks_resumes_bit_identically(variant):
  layouts = [stack_layout((24, 3, 16), (1,)), stack_layout((2, 16, 3, 24), (0, -2))]
  group = {**SCHEDULE, **VARIANTS[variant]}

  def make_optimizer(params):
    groups = [
      {"params": [p], "batch_axes": layout.batch, **group}
      for p, layout in zip(params, layouts, strict=True)
    ]
    return QGaLoreAdamW(groups, **HYPER)

  generator = torch.Generator().manual_seed(5)
  params = [torch.nn.Parameter(torch.randn(x.shape, generator=generator)) for x in layouts]
  grads = [
    [
      _in_layout(layout, g).numpy()
      for g in _slice_gradients(layout.num_slices, layout.matrix_shape, 12, seed=5 + i)
    ]
    for i, layout in enumerate(layouts)
  ]
  resumed, resumed_params = _resume_midway(make_optimizer, params, grads, 5, 7)
  assert all(len(stats["gap"]) in (3, 6) for stats in resumed.projection_stats())
  eight_bit = variant == "int2_8bit"
  assert resumed.state[resumed_params[0]]["exp_avg"].dtype == (
    torch.uint8 if eight_bit else torch.float32
  )


@pytest.mark.parametrize("saved_bits, loaded_bits", [(None, 8), (8, None)])
def test_stack_saved_with_other_moment_bits_carries_on_like_its_slices(saved_bits, loaded_bits):
  """A stack whose moments change form on resume is restacked as its slices' states are."""
  group = {**SCHEDULE, "moment_bits": saved_bits, "min_8bit_size": 64}
  layout, stacked, slices, opt = _stack_and_slices((24, 3, 16), (1,), group)
  grads = _slice_gradients(layout.num_slices, layout.matrix_shape, 6, seed=6)
  for g in grads[:3]:
    _step(layout, stacked, slices, opt, g)

  def make_optimizer(params):
    groups = [{"params": params[:1], "batch_axes": (1,), **group}, {"params": params[1:], **group}]
    return QGaLoreAdamW(groups, **HYPER)

  resumed, (stacked, *slices) = _save_and_load(opt, make_optimizer, [stacked, *slices])
  for g in resumed.param_groups:
    g["moment_bits"] = loaded_bits
  for g in grads[3:]:
    _step(layout, stacked, slices, resumed, g)
  _assert_stack_equals_slices(layout, stacked, slices, resumed)
  state = resumed.state[stacked]
  assert state["exp_avg"].dtype == (torch.uint8 if loaded_bits else torch.float32)
  assert ("exp_avg_sq_absmax" in state) == (loaded_bits is not None)


class _Stacks(torch.nn.Module):
  """Three experts (3, out, in) and a fused QKV weight (out, 3, in)."""

  def __init__(self, seed=0):
    super().__init__()
    torch.manual_seed(seed)
    self.experts = torch.nn.Parameter(0.3 * torch.randn(3, 12, 6))
    self.qkv = torch.nn.Parameter(0.3 * torch.randn(8, 3, 12))
    self.bias = torch.nn.Parameter(torch.zeros(8))

  def forward(self, x):
    h = torch.einsum("...i,eoi->...eo", x, self.experts).tanh()
    return torch.einsum("...ei,oei->...o", h, self.qkv) + self.bias


def _stacks_optimizer(model):
  return QGaLoreAdamW(
    [
      {"params": [model.experts], "rank": 2, "update_proj_gap": 2, "batch_axes": (0,)},
      {"params": [model.qkv], "rank": 3, "update_proj_gap": 3, "batch_axes": (-2,)},
      {"params": [model.bias]},
    ],
    **HYPER,
  )


@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_layerwise_mode_matches_step_for_stacks(accumulation_steps):
  batches = 4
  data = torch.randn(batches * accumulation_steps, 5, 6, generator=torch.Generator().manual_seed(7))
  normal, layerwise = _Stacks(), _Stacks()
  normal_opt, layerwise_opt = _stacks_optimizer(normal), _stacks_optimizer(layerwise)
  initial = [p.detach().clone() for p in layerwise.parameters()]
  _train_normal_and_layerwise(
    normal, normal_opt, layerwise, layerwise_opt, data, accumulation_steps
  )
  for p, q, p0 in zip(normal.parameters(), layerwise.parameters(), initial, strict=True):
    assert torch.equal(p, q)
    assert not torch.equal(q, p0)
    assert q.grad is None
  for p, q in zip(normal.parameters(), layerwise.parameters(), strict=True):
    for key, value in normal_opt.state[p].items():
      assert torch.equal(value, layerwise_opt.state[q][key]), key
  assert layerwise_opt.projection_stats() == normal_opt.projection_stats()
  assert layerwise_opt.projection_stats()[0]["svd_count"] == [2, 2, 2]  # steps 0 and 2


def test_stats_before_any_step_have_one_value_per_slice():
  w = torch.nn.Parameter(torch.zeros(2, 5, 3, 4))
  opt = QGaLoreAdamW([{"params": [w], "rank": 2, "batch_axes": (0, 2), "update_proj_gap": 7}])
  assert opt.projection_stats() == [
    {"gap": [7] * 6, "svd_count": [0] * 6, "num_cosines": [0] * 6, "mean_cosine": [0.0] * 6}
  ]


@pytest.mark.parametrize(
  "shape, group, error, match",
  [
    ((3, 4, 5), {"rank": 2, "batch_axes": 0}, TypeError, "`batch_axes` must be a tuple of ints"),
    ((3, 4, 5), {"rank": 2, "batch_axes": (0.0,)}, TypeError, "tuple of ints, got tuple"),
    ((3, 4, 5), {"rank": 2, "batch_axes": (True,)}, TypeError, "tuple of ints"),
    ((3, 4, 5), {"rank": 2, "batch_axes": (3,)}, ValueError, r"distinct axes of its 3-dim"),
    ((3, 4, 5), {"rank": 2, "batch_axes": (-4,)}, ValueError, "distinct axes"),
    ((2, 3, 4, 5), {"rank": 2, "batch_axes": (0, -4)}, ValueError, r"got \(0, -4\)"),
    ((4, 5), {"rank": 2, "batch_axes": (0,)}, ValueError, r"3 dims .* shape \(4, 5\)"),
    ((2, 3, 4, 5), {"rank": 2, "batch_axes": (0,)}, ValueError, r"must have 3 dims"),
    ((3, 4, 5), {"rank": 2}, ValueError, r"2-D .* shape \(3, 4, 5\).*`batch_axes`"),
    ((3, 4, 5), {"batch_axes": (0,)}, ValueError, "no `rank`.* plain AdamW group"),
  ],
)
def test_bad_batch_axes_raise_naming_the_group(shape, group, error, match):
  first = {"params": [torch.nn.Parameter(torch.ones(2))]}
  with pytest.raises(error, match=match):
    QGaLoreAdamW([first, {"params": [torch.nn.Parameter(torch.ones(shape))], **group}])
  opt = QGaLoreAdamW([first])
  with pytest.raises(error, match="param group 1"):
    opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(shape))], **group})
  assert len(opt.param_groups) == 1


def test_empty_batch_axes_are_a_plain_group_key():
  w, b = torch.nn.Parameter(torch.ones(4, 3)), torch.nn.Parameter(torch.ones(3))
  opt = QGaLoreAdamW(
    [{"params": [w], "rank": 2, "batch_axes": []}, {"params": [b], "batch_axes": ()}]
  )
  w.grad, b.grad = torch.ones(4, 3), torch.ones(3)
  opt.step()
  assert opt.state[w]["gap"].shape == () and opt.projection_stats()[0]["gap"] == 200


def test_stacked_int8_weight_is_refused():
  q = quantize(torch.randn(60), 8, 256)
  stacked = Int8Weight(q.codes, q.scale, q.zero, (3, 4, 5), 256)
  with pytest.raises(TypeError, match=r"params\[0\] is an INT8 weight.*param group 0"):
    QGaLoreAdamW([{"params": [stacked], "rank": 2, "batch_axes": (0,)}])
  matrix = Int8Weight.from_float(torch.randn(4, 5))
  with pytest.raises(ValueError, match=r"3 dims"):
    QGaLoreAdamW([{"params": [matrix], "rank": 2, "batch_axes": (0,)}])

"""Tests of QGaLoreAdamW against a naive NumPy Q-GaLore (docs/spec.md sections 1-5, 7)."""

import io
import re

import numpy as np
import pytest
import torch

import qgalore_torch
from qgalore_torch._src import functional
from qgalore_torch._src import generator
from qgalore_torch._src import moments_test
from qgalore_torch._src import projector as proj
from qgalore_torch._src.int8 import Int8Linear
from qgalore_torch._src.optimizer import QGaLoreAdamW
from qgalore_torch._src.projector_test import naive_sign_rule
from qgalore_torch._src.quantization_test import brute_force_quantize

HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


def naive_dequantised(rows, bits, group_size):
  codes, scales, zeros = brute_force_quantize(rows, bits, group_size)
  group_of = np.arange(rows.size) // group_size
  return (scales[group_of] * (codes.astype(np.float32) - zeros[group_of])).reshape(rows.shape)


def naive_qgalore(
  w0, grads, rank, bits, group_size, scale, gap, cos_threshold, gamma, queue, weight_decay=None
):
  """Q-GaLore on one canonical matrix as docs/spec.md sections 2-5 state it, in float64.

  The SVD is torch's float32 LAPACK call, the one the optimizer makes, so that a
  rounding-level SVD difference cannot flip a 4-bit code; everything after it (sign rule,
  side, quantiser, schedule, Adam, decay) is re-derived here. Returns the final weights and
  the 0-based steps that refreshed. ``weight_decay`` defaults to ``HYPER``'s.
  """
  lr, (b1, b2), eps, wd = HYPER["lr"], HYPER["betas"], HYPER["eps"], HYPER["weight_decay"]
  wd = wd if weight_decay is None else weight_decay
  w = w0.astype(np.float64)
  m_dim, n_dim = w.shape
  right = m_dim >= n_dim
  r = min(rank, m_dim, n_dim)
  basis, previous, cosines, refreshes = None, None, [], []
  m = v = 0.0
  for t, g in enumerate(grads):
    if basis is None or t % gap == 0:
      u_mat, _, vt = (a.numpy() for a in torch.linalg.svd(torch.from_numpy(g), False))
      rows = naive_sign_rule(vt[:r] if right else u_mat[:, :r].T)
      if previous is not None:
        c = previous @ rows[0] / max(np.linalg.norm(previous) * np.linalg.norm(rows[0]), 1e-8)
        cosines = [*cosines, float(c)][-queue:]
        if len(cosines) == queue and np.mean(cosines) >= cos_threshold:
          gap = int(gap * gamma)
      previous = rows[0].astype(np.float64)
      basis = rows if bits is None else naive_dequantised(rows, bits, group_size)
      refreshes.append(t)
    p = basis.astype(np.float64)
    low_rank = g @ p.T if right else p @ g
    m = b1 * m + (1 - b1) * low_rank
    v = b2 * v + (1 - b2) * low_rank**2
    u = (m / (1 - b1 ** (t + 1))) / (np.sqrt(v / (1 - b2 ** (t + 1))) + eps)
    w = w - lr * (scale * (u @ p if right else p.T @ u) + wd * w)
  return w, refreshes


def naive_adamw(w0, grads, weight_decay=None):
  lr, (b1, b2), eps, wd = HYPER["lr"], HYPER["betas"], HYPER["eps"], HYPER["weight_decay"]
  wd = wd if weight_decay is None else weight_decay
  w, m, v = w0.astype(np.float64), 0.0, 0.0
  for t, g in enumerate(grads, start=1):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    w = w - lr * ((m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps) + wd * w)
  return w


def _gradients(shape, steps, seed):
  """A dominant rank-1 direction plus noise: the top vector drifts a little each step."""
  rng = np.random.default_rng(seed)
  if len(shape) == 1:
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(steps)]
  a, b = rng.standard_normal(shape[0]), rng.standard_normal(shape[1])
  return [
    (3 * np.outer(a, b) + 0.5 * rng.standard_normal(shape)).astype(np.float32) for _ in range(steps)
  ]


def _run(params, grads_per_param, optimizer, steps):
  for t in range(steps):
    for p, grads in zip(params, grads_per_param, strict=True):
      p.grad = torch.from_numpy(grads[t]).to(p.dtype)
    optimizer.step()


# (shape, rank, proj_bits, proj_group_size): square, tall, wide, rank clamped, partial groups.
CASES = [
  ((6, 6), 2, 4, 4),
  ((10, 4), 3, 4, 5),
  ((4, 9), 3, 4, 8),
  ((5, 3), 8, 2, 7),
  ((7, 5), 2, None, 256),
  ((3, 8), 2, 8, 3),
]


@pytest.mark.parametrize("shape, rank, bits, group_size", CASES)
def test_matches_naive_reference(shape, rank, bits, group_size):
  steps = 12
  rng = np.random.default_rng(1)
  w0, b0 = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(4)
  w = torch.nn.Parameter(torch.from_numpy(w0.copy()))
  bias = torch.nn.Parameter(torch.from_numpy(b0.astype(np.float32)))
  schedule = dict(update_proj_gap=2, cos_threshold=0.4, gamma_proj=2, queue_size=2)
  group = dict(params=[w], rank=rank, scale=0.5, proj_bits=bits, proj_group_size=group_size)
  opt = QGaLoreAdamW([{**group, **schedule}, {"params": [bias]}], **HYPER)
  grads_w, grads_b = _gradients(shape, steps, seed=2), _gradients((4,), steps, seed=3)
  _run([w, bias], [grads_w, grads_b], opt, steps)

  expected_w, refreshes = naive_qgalore(w0, grads_w, rank, bits, group_size, 0.5, 2, 0.4, 2, 2)
  assert refreshes == [0, 2, 4, 8]  # the gap doubled at step 4 and at step 8
  np.testing.assert_allclose(w.detach().numpy(), expected_w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(bias.detach().numpy(), naive_adamw(b0, grads_b), rtol=1e-5)
  stats = opt.projection_stats()
  assert stats[0]["svd_count"] == 4 and stats[0]["gap"] == 8 and stats[1] is None
  assert stats[0]["num_cosines"] == 2 and stats[0]["mean_cosine"] > 0.4


def test_two_d_param_without_rank_gets_full_rank_adamw():
  w0 = np.random.default_rng(4).standard_normal((5, 3)).astype(np.float32)
  w = torch.nn.Parameter(torch.from_numpy(w0.copy()))
  opt = QGaLoreAdamW([w], **HYPER)
  grads = _gradients((5, 3), 5, seed=5)
  _run([w], [grads], opt, 5)
  np.testing.assert_allclose(w.detach().numpy(), naive_adamw(w0, grads), rtol=1e-5)
  assert set(opt.state[w]) == {"step", "exp_avg", "exp_avg_sq"}


def test_stable_gradient_refreshes_ten_times_in_10k_steps():
  w = torch.nn.Parameter(torch.zeros(3, 2))
  opt = QGaLoreAdamW([{"params": [w], "rank": 1}], lr=1e-6)
  g = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.0]])
  for _ in range(10_000):
    w.grad = g
    opt.step()
  assert opt.projection_stats()[0] == {
    "gap": 6400,
    "svd_count": 10,
    "num_cosines": 5,
    "mean_cosine": pytest.approx(1.0),
  }


def _model(dtype, seed=0):
  torch.manual_seed(seed)
  tall, wide, bias = torch.randn(10, 4), torch.randn(4, 9), torch.randn(9)
  return [torch.nn.Parameter(t.to(dtype)) for t in (tall, wide, bias)]


def _optimizer(params):
  tall, wide, bias = params
  return QGaLoreAdamW(
    [
      {"params": [tall], "rank": 2, "update_proj_gap": 2, "proj_group_size": 5},
      {"params": [wide], "rank": 3, "update_proj_gap": 3, "proj_bits": None},
      {"params": [bias]},
    ],
    **HYPER,
  )


def _save_and_load(opt, make_optimizer, params):
  buffer = io.BytesIO()
  torch.save(opt.state_dict(), buffer)
  buffer.seek(0)
  resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
  resumed = make_optimizer(resumed_params)
  resumed.load_state_dict(torch.load(buffer, weights_only=True))
  return resumed, resumed_params


def _assert_same_weights_and_state(opt, params, resumed, resumed_params):
  for p, q in zip(params, resumed_params, strict=True):
    assert torch.equal(p, q)
    assert opt.state[p].keys() == resumed.state[q].keys()
    for key, value in opt.state[p].items():
      assert value.dtype == resumed.state[q][key].dtype, key
      assert torch.equal(value, resumed.state[q][key]), key


def _resume_midway(make_optimizer, params, grads, before, after):
  """Trains ``before`` steps, saves and loads into a fresh optimizer, trains both ``after``
  more steps and checks they agree; returns the resumed optimizer and its params."""
  opt = make_optimizer(params)
  _run(params, [g[:before] for g in grads], opt, before)
  resumed, resumed_params = _save_and_load(opt, make_optimizer, params)
  _run(params, [g[before:] for g in grads], opt, after)
  _run(resumed_params, [g[before:] for g in grads], resumed, after)
  _assert_same_weights_and_state(opt, params, resumed, resumed_params)
  return resumed, resumed_params


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_resumes_bit_identically(dtype):
  grads = [_gradients(tuple(p.shape), 12, seed=i) for i, p in enumerate(_model(dtype))]
  resumed, resumed_params = _resume_midway(_optimizer, _model(dtype), grads, 5, 7)
  tall_state = resumed.state[resumed_params[0]]
  assert tall_state["proj_codes"].dtype == torch.uint8
  assert tall_state["exp_avg"].dtype == torch.float32
  assert tall_state["gap"].dtype == torch.int32
  assert "proj_basis" in resumed.state[resumed_params[1]]


def test_bf16_params_follow_reference_rounded_each_step():
  steps = 6
  w0 = np.random.default_rng(6).standard_normal((10, 4)).astype(np.float32)
  w0 = torch.from_numpy(w0).to(torch.bfloat16)
  w = torch.nn.Parameter(w0.clone())
  opt = QGaLoreAdamW([{"params": [w], "rank": 2, "proj_group_size": 4}], **HYPER)
  grads = [torch.from_numpy(g).to(torch.bfloat16) for g in _gradients((10, 4), steps, seed=7)]
  for g in grads:
    w.grad = g
    opt.step()
  assert w.dtype == torch.bfloat16
  assert opt.state[w]["exp_avg"].dtype == torch.float32
  # The reference in float32 on the bf16 gradients; bf16 rounding of the weights aside,
  # it is the same trajectory (one rounding per step, so within a few bf16 ulps).
  expected, _ = naive_qgalore(
    w0.float().numpy(), [g.float().numpy() for g in grads], 2, 4, 4, 0.25, 200, 0.4, 2, 5
  )
  torch.testing.assert_close(
    w.detach().float(), torch.from_numpy(expected).float(), rtol=3e-2, atol=3e-2
  )


def test_non_finite_gradient_keeps_projector_and_schedule():
  w = torch.nn.Parameter(torch.randn(10, 4))
  opt = QGaLoreAdamW([{"params": [w], "rank": 2, "update_proj_gap": 2}])
  grads = [torch.from_numpy(g) for g in _gradients((10, 4), 6, seed=8)]
  grads[2] = grads[2].clone()
  grads[2][3, 1] = float("nan")  # step 2 is a refresh step
  keys = [
    "proj_codes",
    "proj_scale",
    "proj_zero",
    "gap",
    "cosines",
    "num_cosines",
    "top_vector",
    "svd_count",
  ]
  for t, g in enumerate(grads):
    if t == 2:
      before = {k: opt.state[w][k].clone() for k in keys}
    w.grad = g
    opt.step()
    if t == 2:
      for k in keys:
        assert torch.equal(opt.state[w][k], before[k]), k
  assert opt.projection_stats()[0]["svd_count"] == 2  # steps 0 and 4
  assert torch.isfinite(opt.state[w]["proj_scale"]).all()


def test_non_finite_first_gradient_retries_next_step():
  w = torch.nn.Parameter(torch.randn(6, 4))
  opt = QGaLoreAdamW([{"params": [w], "rank": 2}])
  w.grad = torch.full((6, 4), float("inf"))
  opt.step()
  assert opt.projection_stats()[0]["svd_count"] == 0
  w.grad = torch.randn(6, 4)
  opt.step()
  assert opt.projection_stats()[0]["svd_count"] == 1


def test_closure_and_stats_before_any_step():
  w, b = torch.nn.Parameter(torch.ones(4, 3)), torch.nn.Parameter(torch.zeros(3))
  opt = QGaLoreAdamW([{"params": [w], "rank": 2}, {"params": [b]}], seed=7)
  assert opt.defaults["seed"] == 7
  assert opt.projection_stats() == [
    {"gap": 200, "svd_count": 0, "num_cosines": 0, "mean_cosine": 0.0},
    None,
  ]

  def closure():
    loss = (w.sum(0) * b).sum() + w.square().sum()
    loss.backward()
    return loss

  assert float(opt.step(closure).detach()) == pytest.approx(12.0)
  assert opt.projection_stats()[0]["svd_count"] == 1


def test_matches_qgalore_jax():
  """The JAX twin on the same (out, in) matrices gives the same weights, to rounding.

  A float32 projector keeps the comparison free of 4-bit code flips that a last-ulp SVD
  difference between the two LAPACK builds could cause.
  """
  jax = pytest.importorskip("jax")
  pytest.importorskip("optax")
  import qgalore_jax

  params = _model(torch.float32)
  names = ["tall", "wide", "bias"]
  steps = 6
  grads = [_gradients(tuple(p.shape), steps, seed=10 + i) for i, p in enumerate(params)]
  opt = QGaLoreAdamW(
    [
      {"params": params[:2], "rank": 3, "update_proj_gap": 2, "proj_bits": None},
      {"params": params[2:]},
    ],
    **HYPER,
  )
  jax_params = {n: jax.numpy.asarray(p.detach().numpy()) for n, p in zip(names, params)}
  tx = qgalore_jax.qgalore_adamw(
    HYPER["lr"],
    *HYPER["betas"],
    eps=HYPER["eps"],
    weight_decay=HYPER["weight_decay"],
    rank=3,
    update_proj_gap=2,
    proj_bits=None,
    mask={"tall": True, "wide": True, "bias": False},
    input_axis=1,
  )
  state = tx.init(jax_params)
  update = jax.jit(tx.update)
  for t in range(steps):
    jax_grads = {n: jax.numpy.asarray(g[t]) for n, g in zip(names, grads)}
    updates, state = update(jax_grads, state, jax_params)
    jax_params = jax.tree.map(lambda p, u: p + u, jax_params, updates)
  _run(params, grads, opt, steps)
  for n, p in zip(names, params):
    np.testing.assert_allclose(
      p.detach().numpy(), np.asarray(jax_params[n]), rtol=1e-5, atol=1e-6, err_msg=n
    )


@pytest.mark.parametrize(
  "group, kwargs, error, match",
  [
    ({"rank": 0}, {}, ValueError, "`rank`"),
    ({"rank": 2.0}, {}, TypeError, "`rank`"),
    ({"rank": True}, {}, TypeError, "`rank`"),
    ({"rank": 2, "proj_bits": 0}, {}, ValueError, "`proj_bits`"),
    ({"rank": 2, "proj_bits": 9}, {}, ValueError, "`proj_bits`"),
    ({"rank": 2, "proj_group_size": 0}, {}, ValueError, "`proj_group_size`"),
    ({"rank": 2, "update_proj_gap": 0}, {}, ValueError, "`update_proj_gap`"),
    ({"rank": 2, "gamma_proj": 0.5}, {}, ValueError, "`gamma_proj`"),
    ({"rank": 2, "gamma_proj": "2"}, {}, TypeError, "`gamma_proj`"),
    ({"rank": 2, "queue_size": 0}, {}, ValueError, "`queue_size`"),
    ({"rank": 2, "cos_threshold": 1.5}, {}, ValueError, "`cos_threshold`"),
    ({"rank": 2}, {"cos_threshold": -2.0}, ValueError, "`cos_threshold`"),
    ({}, {"lr": -1.0}, ValueError, "`lr`"),
    ({}, {"lr": float("nan")}, ValueError, "`lr`"),
    ({}, {"betas": (1.0, 0.9)}, ValueError, r"`betas\[0\]`"),
    ({}, {"betas": (0.9, -0.1)}, ValueError, r"`betas\[1\]`"),
    ({}, {"betas": (0.9,)}, TypeError, "`betas`"),
    ({}, {"eps": -1e-8}, ValueError, "`eps`"),
    ({}, {"weight_decay": -0.1}, ValueError, "`weight_decay`"),
    ({}, {"seed": -1}, ValueError, "`seed`"),
    ({"rank": 2, "svd_method": "qr"}, {}, ValueError, "`svd_method`.*'full', 'randomized'"),
    ({}, {"svd_method": None}, ValueError, "`svd_method`"),
    ({"rank": 2, "oversample": -1}, {}, ValueError, "`oversample`"),
    ({"rank": 2, "power_iters": 1.0}, {}, TypeError, "`power_iters`"),
    ({"rank": 2, "subspace_iters": 0}, {}, ValueError, "`subspace_iters`"),
  ],
)
def test_bad_hyperparameters_raise_naming_them(group, kwargs, error, match):
  with pytest.raises(error, match=match):
    QGaLoreAdamW([{"params": [torch.nn.Parameter(torch.ones(4, 3))], **group}], **kwargs)


def test_non_matrix_in_rank_group_names_index_and_shape():
  params = [torch.nn.Parameter(torch.ones(4, 3)), torch.nn.Parameter(torch.ones(4))]
  with pytest.raises(ValueError, match=r"params\[1\] has shape \(4,\)"):
    QGaLoreAdamW([{"params": params, "rank": 2}])
  opt = QGaLoreAdamW([params[0]])
  with pytest.raises(ValueError, match=r"param group 1 .* params\[0\] has shape \(4,\)"):
    opt.add_param_group({"params": [params[1]], "rank": 2})
  assert len(opt.param_groups) == 1
  with pytest.raises(TypeError, match=r"params\[0\]"):
    QGaLoreAdamW([torch.ones(3, dtype=torch.int64)])


def _mlp(seed=0):
  torch.manual_seed(seed)
  return torch.nn.Sequential(
    torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 4), torch.nn.LayerNorm(4)
  )


def _mlp_optimizer(model):
  matrices = [model[0].weight, model[2].weight]
  others = [p for p in model.parameters() if all(p is not m for m in matrices)]
  return QGaLoreAdamW(
    [{"params": matrices, "rank": 3, "update_proj_gap": 2}, {"params": others}], **HYPER
  )


def _train_normal_and_layerwise(normal, normal_opt, layerwise, layerwise_opt, data, accumulation):
  """Trains two copies on ``data``: one with ``step()`` every ``accumulation`` micro-batches,
  the other with layer-wise hooks (which step inside ``backward``)."""
  layerwise_opt.register_layerwise_hooks(accumulation)
  for i, x in enumerate(data):
    normal(x).square().mean().backward()
    if (i + 1) % accumulation == 0:
      normal_opt.step()
      normal_opt.zero_grad()
    layerwise(x).square().mean().backward()


@pytest.mark.parametrize("accumulation_steps", [1, 3])
def test_layerwise_mode_matches_step(accumulation_steps):
  batches = 4
  data = torch.randn(batches * accumulation_steps, 5, 6, generator=torch.Generator().manual_seed(9))
  normal, layerwise = _mlp(), _mlp()
  normal_opt, layerwise_opt = _mlp_optimizer(normal), _mlp_optimizer(layerwise)
  initial = [p.detach().clone() for p in layerwise.parameters()]
  _train_normal_and_layerwise(
    normal, normal_opt, layerwise, layerwise_opt, data, accumulation_steps
  )
  for p, q, p0 in zip(normal.parameters(), layerwise.parameters(), initial, strict=True):
    assert torch.equal(p, q)
    assert not torch.equal(q, p0)  # every parameter, norms and biases included, moved
    assert q.grad is None
    assert float(layerwise_opt.state[q]["step"]) == batches
  assert layerwise_opt.projection_stats() == normal_opt.projection_stats()


def test_layerwise_hooks_can_be_removed():
  model = _mlp()
  opt = _mlp_optimizer(model)
  handles = opt.register_layerwise_hooks()
  for handle in handles:
    handle.remove()
  model(torch.ones(2, 6)).sum().backward()
  assert all(p.grad is not None for p in model.parameters())
  assert not opt.state
  with pytest.raises(ValueError, match="`accumulation_steps`"):
    opt.register_layerwise_hooks(0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_and_steps_without_refresh_do_not_synchronise():
  cpu_params, cuda_params = _model(torch.float32), _model(torch.float32)
  cuda_params = [torch.nn.Parameter(p.detach().cuda()) for p in cuda_params]
  cpu_opt, cuda_opt = _optimizer(cpu_params), _optimizer(cuda_params)
  grads = [_gradients(tuple(p.shape), 8, seed=20 + i) for i, p in enumerate(cpu_params)]
  for t in range(8):
    for p, q, g in zip(cpu_params, cuda_params, grads, strict=True):
      p.grad, q.grad = torch.from_numpy(g[t]), torch.from_numpy(g[t]).cuda()
    cpu_opt.step()
    refreshes = t % 2 == 0 or t % 3 == 0  # update_proj_gap 2 and 3 in _optimizer
    torch.cuda.set_sync_debug_mode("default" if refreshes else "error")
    try:
      cuda_opt.step()
    finally:
      torch.cuda.set_sync_debug_mode("default")
  # cuSOLVER and LAPACK agree to rounding, which can flip a 4-bit code of the quantised
  # projector of `tall`: its tolerance allows that; the float32 projector's does not.
  tall, wide, bias = (q.detach().cpu() for q in cuda_params)
  torch.testing.assert_close(tall, cpu_params[0].detach(), rtol=0, atol=2e-3)
  torch.testing.assert_close(wide, cpu_params[1].detach(), rtol=1e-4, atol=1e-5)
  torch.testing.assert_close(bias, cpu_params[2].detach(), rtol=1e-5, atol=1e-6)
  state = cuda_opt.state[cuda_params[0]]
  assert state["exp_avg"].is_cuda and state["proj_codes"].is_cuda
  assert not state["step"].is_cuda and not state["gap"].is_cuda


# --- 8-bit moments (docs/spec.md section 8) -------------------------------------


def fused_multiply_add(a, b, c):
  """float32 ``a * b + c`` rounded once, as a fused multiply-add rounds it.

  The float64 product of two float32 values is exact; the float64 sum is then rounded twice
  (to float64, then to float32), which differs from one rounding only in the rare case that
  the first rounding lands exactly on a float32 rounding tie.
  """
  a, b, c = (np.asarray(x, np.float32).astype(np.float64) for x in (a, b, c))
  return (a * b + c).astype(np.float32)


def naive_adam_8bit(grads, steps_of):
  """Adam with 8-bit moments as docs/spec.md section 8 states it: dequantise, float32 Adam,
  direction from the float32 moments, requantise (the brute-force quantiser of
  ``moments_test``). ``grads`` are float32 (the low-rank ``R`` of a projected matrix).

  Returns, per step, the float64 direction ``u`` and the stored ``(codes, absmax)`` of both
  moments. The moment updates are written in float32 with the optimizer's roundings (``b m``
  rounded, then one fused multiply-add), so the codes can be compared bit for bit.
  """
  (b1, b2), eps = HYPER["betas"], HYPER["eps"]
  m = v = np.zeros(grads[0].shape, np.float32)
  out = []
  for t, g in zip(steps_of, grads, strict=True):
    m = fused_multiply_add(np.float32(1 - b1), g, np.float32(b1) * m)
    v = fused_multiply_add(np.float32(1 - b2), g * g, np.float32(b2) * v)
    m64, v64 = m.astype(np.float64), v.astype(np.float64)
    u = (m64 / (1 - b1**t)) / (np.sqrt(v64 / (1 - b2**t)) + eps)
    stored_m = moments_test.brute_force_quantize(m, signed=True)
    stored_v = moments_test.brute_force_quantize(v, signed=False)
    out.append((u, stored_m, stored_v))
    m = moments_test.brute_force_dequantize(*stored_m, signed=True)
    v = moments_test.brute_force_dequantize(*stored_v, signed=False)
  return out


def _state_moments(state):
  return (
    (state["exp_avg"].numpy(), state["exp_avg_absmax"].numpy()),
    (state["exp_avg_sq"].numpy(), state["exp_avg_sq_absmax"].numpy()),
  )


def test_8bit_moments_of_plain_leaf_match_naive_reference():
  steps, shape = 6, (72, 100)  # 7200 elements; partial tiles on both edges
  lr, wd = HYPER["lr"], HYPER["weight_decay"]
  w0 = np.random.default_rng(30).standard_normal(shape).astype(np.float32)
  w = torch.nn.Parameter(torch.from_numpy(w0.copy()))
  opt = QGaLoreAdamW([w], moment_bits=8, **HYPER)
  grads = _gradients(shape, steps, seed=31)
  expected = naive_adam_8bit(grads, range(1, steps + 1))
  w_ref = w0.astype(np.float64)
  for g, (u, stored_m, stored_v) in zip(grads, expected, strict=True):
    w.grad = torch.from_numpy(g)
    opt.step()
    got_m, got_v = _state_moments(opt.state[w])
    for got, want in ((got_m, stored_m), (got_v, stored_v)):
      np.testing.assert_array_equal(got[0], want[0])
      np.testing.assert_array_equal(got[1], want[1])
    w_ref = w_ref - lr * (u + wd * w_ref)
    np.testing.assert_allclose(w.detach().numpy(), w_ref, rtol=1e-5, atol=1e-6)
  assert opt.state[w]["exp_avg"].dtype == torch.uint8
  assert opt.state[w]["exp_avg_absmax"].shape == (5, 7)


@pytest.mark.parametrize("shape", [(260, 40), (40, 270)], ids=["right", "left"])
def test_8bit_moments_of_projected_leaf_match_naive_reference(shape):
  """Low-rank moments (260, 16) and (16, 270). The reference reads the optimizer's float32
  basis each step (the projector is tested above) and projects with the same torch matmul,
  so that R is bit-identical; the moments, codes, direction and update are re-derived."""
  steps, rank, scale = 6, 16, 0.5
  lr, wd = HYPER["lr"], HYPER["weight_decay"]
  w0 = np.random.default_rng(32).standard_normal(shape).astype(np.float32)
  w = torch.nn.Parameter(torch.from_numpy(w0.copy()))
  group = dict(params=[w], rank=rank, scale=scale, proj_bits=None, update_proj_gap=3)
  opt = QGaLoreAdamW([group], moment_bits=8, **HYPER)
  grads = _gradients(shape, steps, seed=33)
  right = shape[0] >= shape[1]
  (b1, b2), eps = HYPER["betas"], HYPER["eps"]
  m = v = None
  w_ref = w0.astype(np.float64)
  for t, g in enumerate(grads, start=1):
    w.grad = torch.from_numpy(g)
    opt.step()
    basis = opt.state[w]["proj_basis"]
    low_rank = (w.grad @ basis.T if right else basis @ w.grad).numpy()
    if m is None:
      m = v = np.zeros(low_rank.shape, np.float32)
    m = fused_multiply_add(np.float32(1 - b1), low_rank, np.float32(b1) * m)
    v = fused_multiply_add(np.float32(1 - b2), low_rank * low_rank, np.float32(b2) * v)
    m64, v64 = m.astype(np.float64), v.astype(np.float64)
    u = (m64 / (1 - b1**t)) / (np.sqrt(v64 / (1 - b2**t)) + eps)
    stored_m = moments_test.brute_force_quantize(m, signed=True)
    stored_v = moments_test.brute_force_quantize(v, signed=False)
    got_m, got_v = _state_moments(opt.state[w])
    for got, want in ((got_m, stored_m), (got_v, stored_v)):
      np.testing.assert_array_equal(got[0], want[0])
      np.testing.assert_array_equal(got[1], want[1])
    m = moments_test.brute_force_dequantize(*stored_m, signed=True)
    v = moments_test.brute_force_dequantize(*stored_v, signed=False)
    p = basis.numpy().astype(np.float64)
    w_ref = w_ref - lr * (scale * (u @ p if right else p.T @ u) + wd * w_ref)
    np.testing.assert_allclose(w.detach().numpy(), w_ref, rtol=1e-5, atol=1e-6)
  assert opt.projection_stats()[0]["svd_count"] == 2  # steps 0 and 3: moments persist
  assert opt.state[w]["exp_avg"].shape == ((shape[0], rank) if right else (rank, shape[1]))


def _big_model(dtype=torch.float32, seed=0):
  """A projected (128, 64) matrix (low-rank moment (128, 32)), a plain (64, 128) matrix, a
  small (8, 8) matrix and a bias: 8-bit, 8-bit, float32 and float32 moments."""
  torch.manual_seed(seed)
  shapes = [(128, 64), (64, 128), (8, 8), (64,)]
  return [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in shapes]


def _big_optimizer(params, **kwargs):
  projected, plain, small, bias = params
  return QGaLoreAdamW(
    [
      {"params": [projected], "rank": 32, "update_proj_gap": 3, "proj_group_size": 64},
      {"params": [plain, small, bias]},
    ],
    **HYPER,
    **kwargs,
  )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_first_8bit_step_equals_float_step_exactly(dtype):
  floats, eights = _big_model(dtype), _big_model(dtype)
  float_opt, eight_opt = _big_optimizer(floats), _big_optimizer(eights, moment_bits=8)
  grads = [_gradients(tuple(p.shape), 1, seed=40 + i)[0] for i, p in enumerate(floats)]
  _run(floats, [[g] for g in grads], float_opt, 1)
  _run(eights, [[g] for g in grads], eight_opt, 1)
  for p, q in zip(floats, eights, strict=True):
    assert torch.equal(p, q)
  assert eight_opt.state[eights[0]]["exp_avg"].dtype == torch.uint8
  assert eight_opt.state[eights[1]]["exp_avg_sq"].dtype == torch.uint8


def test_small_and_non_matrix_moments_stay_float32_without_absmax():
  params = _big_model()
  opt = _big_optimizer(params, moment_bits=8)
  grads = [_gradients(tuple(p.shape), 2, seed=50 + i) for i, p in enumerate(params)]
  _run(params, grads, opt, 2)
  projected, plain, small, bias = (opt.state[p] for p in params)
  for state, tiles in ((projected, (8, 2)), (plain, (4, 8))):
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.uint8
    assert state["exp_avg_absmax"].shape == state["exp_avg_sq_absmax"].shape == tiles
    assert state["exp_avg_absmax"].dtype == torch.float32
  assert projected["exp_avg"].shape == (128, 32)
  for state in (small, bias):
    assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
    assert state["exp_avg"].dtype == torch.float32


def test_8bit_state_bytes_per_element():
  params = _big_model()
  opt = _big_optimizer(params, moment_bits=8)
  _run(params, [_gradients(tuple(p.shape), 1, seed=i) for i, p in enumerate(params)], opt, 1)
  for p in params[:2]:
    state = opt.state[p]
    for key in ("exp_avg", "exp_avg_sq"):
      stored = (state[key], state[f"{key}_absmax"])
      nbytes = sum(t.numel() * t.element_size() for t in stored)
      assert nbytes / state[key].numel() == 1 + 4 / 256


def _mlp_loss(model, x, y):
  return (model(x) - y).square().mean()


def _regression(moment_bits, projected, steps=100):
  """A 2-layer MLP (64 -> 128 -> 64) fitting a random teacher of the same form."""
  torch.manual_seed(0)
  teacher = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 64))
  x = torch.randn(256, 64)
  with torch.no_grad():
    y = teacher(x)
  torch.manual_seed(1)
  model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 64))
  matrices = [model[0].weight, model[2].weight]
  biases = [model[0].bias, model[2].bias]
  if projected:  # low-rank moments (128, 32) and (32, 128): 4096 elements each
    groups = [{"params": matrices, "rank": 32, "update_proj_gap": 50, "scale": 1.0}]
  else:
    groups = [{"params": matrices}]
  opt = QGaLoreAdamW([*groups, {"params": biases}], lr=3e-3, moment_bits=moment_bits)
  with torch.no_grad():
    initial = float(_mlp_loss(model, x, y))
  for _ in range(steps):
    opt.zero_grad()
    _mlp_loss(model, x, y).backward()
    opt.step()
  assert opt.state[matrices[0]]["exp_avg"].dtype == (torch.uint8 if moment_bits else torch.float32)
  with torch.no_grad():
    return initial, float(_mlp_loss(model, x, y))


@pytest.mark.parametrize("projected", [False, True], ids=["adamw", "projected"])
def test_8bit_moments_converge_like_float_moments(projected):
  initial, float_loss = _regression(None, projected)
  _, eight_loss = _regression(8, projected)
  assert float_loss < 0.2 * initial
  assert eight_loss == pytest.approx(float_loss, rel=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_8bit_state_dict_round_trip_resumes_bit_identically(dtype):
  grads = [_gradients(tuple(p.shape), 10, seed=60 + i) for i, p in enumerate(_big_model(dtype))]
  make = lambda ps: _big_optimizer(ps, moment_bits=8)
  resumed, resumed_params = _resume_midway(make, _big_model(dtype), grads, 4, 6)
  state = resumed.state[resumed_params[1]]
  assert state["exp_avg"].dtype == torch.uint8 and state["exp_avg_absmax"].dtype == torch.float32
  assert resumed.param_groups[0]["moment_bits"] == 8


@pytest.mark.parametrize("saved_bits, loaded_bits", [(None, 8), (8, None)])
def test_state_saved_with_other_moment_bits_carries_on(saved_bits, loaded_bits):
  """The stored form follows the group: float moments are quantised on the next step, 8-bit
  ones dequantised (and their absmax entries dropped)."""
  grads = [_gradients(tuple(p.shape), 5, seed=70 + i) for i, p in enumerate(_big_model())]
  params = _big_model()
  opt = _big_optimizer(params, moment_bits=saved_bits)
  _run(params, [g[:3] for g in grads], opt, 3)
  resumed, resumed_params = _save_and_load(opt, _big_optimizer, params)
  for group in resumed.param_groups:
    group["moment_bits"] = loaded_bits
  _run(resumed_params, [g[3:] for g in grads], resumed, 2)
  state = resumed.state[resumed_params[1]]
  assert state["exp_avg"].dtype == (torch.uint8 if loaded_bits else torch.float32)
  assert ("exp_avg_sq_absmax" in state) == (loaded_bits is not None)
  assert all(torch.isfinite(p).all() for p in resumed_params)


def _big_mlp(seed=0):
  torch.manual_seed(seed)
  return torch.nn.Sequential(
    torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 64), torch.nn.LayerNorm(64)
  )


def _big_mlp_optimizer(model):
  """First layer projected (moment (128, 32)), second plain AdamW (64, 128): both 8-bit."""
  others = [p for p in model.parameters() if p is not model[0].weight]
  return QGaLoreAdamW(
    [{"params": [model[0].weight], "rank": 32, "update_proj_gap": 2}, {"params": others}],
    moment_bits=8,
    **HYPER,
  )


@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_layerwise_mode_matches_step_with_8bit_moments(accumulation_steps):
  batches = 3
  generator = torch.Generator().manual_seed(9)
  data = torch.randn(batches * accumulation_steps, 8, 64, generator=generator)
  normal, layerwise = _big_mlp(), _big_mlp()
  normal_opt, layerwise_opt = _big_mlp_optimizer(normal), _big_mlp_optimizer(layerwise)
  _train_normal_and_layerwise(
    normal, normal_opt, layerwise, layerwise_opt, data, accumulation_steps
  )
  for p, q in zip(normal.parameters(), layerwise.parameters(), strict=True):
    assert torch.equal(p, q)
    assert q.grad is None
    for key, value in normal_opt.state[p].items():
      assert torch.equal(value, layerwise_opt.state[q][key]), key
  assert layerwise_opt.state[layerwise[0].weight]["exp_avg"].dtype == torch.uint8
  assert layerwise_opt.state[layerwise[2].weight]["exp_avg"].dtype == torch.uint8


@pytest.mark.parametrize(
  "group, kwargs",
  [
    ({}, {"moment_bits": 4}),
    ({}, {"moment_bits": 16}),
    ({}, {"moment_bits": 8.0}),
    ({}, {"moment_bits": True}),
    ({"moment_bits": "8"}, {}),
    ({"rank": 2, "moment_bits": 0}, {}),
  ],
)
def test_bad_moment_bits_raise_naming_them(group, kwargs):
  with pytest.raises(ValueError, match="`moment_bits` must be None"):
    QGaLoreAdamW([{"params": [torch.nn.Parameter(torch.ones(4, 3))], **group}], **kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_8bit_moments_match_cpu_and_do_not_synchronise():
  cpu_params = _big_model()
  cuda_params = [torch.nn.Parameter(p.detach().cuda()) for p in _big_model()]
  cpu_opt = _big_optimizer(cpu_params, moment_bits=8)
  cuda_opt = _big_optimizer(cuda_params, moment_bits=8)
  grads = [_gradients(tuple(p.shape), 5, seed=80 + i) for i, p in enumerate(cpu_params)]
  for t in range(5):
    for p, q, g in zip(cpu_params, cuda_params, grads, strict=True):
      p.grad, q.grad = torch.from_numpy(g[t]), torch.from_numpy(g[t]).cuda()
    cpu_opt.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("default" if t % 3 == 0 else "error")  # refresh steps sync
    try:
      cuda_opt.step()
    finally:
      torch.cuda.set_sync_debug_mode("default")
  # The plain (64, 128) matrix gets the same gradients and only elementwise IEEE operations
  # on both devices, so equal codes are expected; this has not run on a GPU yet, so one code
  # step is allowed. (The projected matrix goes through cuSOLVER and cuBLAS: not compared.)
  state_cpu, state_gpu = cpu_opt.state[cpu_params[1]], cuda_opt.state[cuda_params[1]]
  assert state_gpu["exp_avg"].is_cuda and state_gpu["exp_avg_absmax"].is_cuda
  for key in ("exp_avg", "exp_avg_sq"):
    differ = (state_gpu[key].cpu().int() - state_cpu[key].int()).abs()
    assert int(differ.max()) <= 1, key
  torch.testing.assert_close(
    cuda_params[1].detach().cpu(), cpu_params[1].detach(), rtol=1e-4, atol=1e-5
  )


# --- The in-place float32 step (functional.adamw_step_, project_back_add) --------------------


def fused_moments(grads):
  """float32 moments as the optimizer rounds them: ``b m`` rounded, then one fused
  multiply-add (and the same for ``v`` with ``g * g`` rounded first)."""
  b1, b2 = HYPER["betas"]
  m = v = np.zeros(grads[0].shape, np.float32)
  for g in grads:
    m = fused_multiply_add(np.float32(1 - b1), g, np.float32(b1) * m)
    v = fused_multiply_add(np.float32(1 - b2), g * g, np.float32(b2) * v)
  return m, v


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.usefixtures("one_thread")
def test_plain_adamw_in_slices_matches_reference(weight_decay):
  """A (40, 25) matrix updated in slices of 64 elements (the last one partial): the moments
  equal the fused-multiply-add reference bit for bit, the weights the float64 reference to
  rounding; and slicing changes no bit (one slice, two threads and a transposed parameter,
  which takes the whole-tensor path, give the same weights and moments)."""
  steps, shape = 5, (40, 25)
  hyper = {**HYPER, "weight_decay": weight_decay}
  w0 = np.random.default_rng(50).standard_normal(shape).astype(np.float32)
  grads = _gradients(shape, steps, seed=51)
  runs = []
  cases = ((64, False, 1), (1 << 20, False, 1), (64, True, 1), (64, False, 2))
  b1, b2 = hyper["betas"]
  numbers = (b1, b2, hyper["eps"], hyper["lr"], hyper["weight_decay"])
  for slice_size, transposed, threads in cases:
    torch.set_num_threads(threads)
    if transposed:  # (25, 40) storage seen as (40, 25): not contiguous
      w = torch.from_numpy(w0.T.copy()).T
      assert not w.is_contiguous()
    else:
      w = torch.from_numpy(w0.copy())
    m, v, step = torch.zeros(shape), torch.zeros(shape), torch.zeros([])
    for g in grads:
      grad = torch.from_numpy(g.T.copy()).T if transposed else torch.from_numpy(g)
      step += 1
      functional.adamw_step_(w, grad, m, v, step, *numbers, slice_size=slice_size)
    runs.append((w.numpy(), m, v))
  want_m, want_v = fused_moments(grads)
  np.testing.assert_array_equal(runs[0][1].numpy(), want_m)
  np.testing.assert_array_equal(runs[0][2].numpy(), want_v)
  w_ref = naive_adamw(w0, grads, weight_decay)
  np.testing.assert_allclose(runs[0][0], w_ref, rtol=1e-5, atol=1e-6)
  for other in runs[1:]:
    for got, want in zip(other, runs[0], strict=True):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("shape", [(10, 4), (4, 9)], ids=["right", "left"])
@pytest.mark.parametrize("bits", [4, None])
def test_projected_without_weight_decay_matches_naive_reference(shape, bits):
  """Without decay the update goes into W by one in-place matmul call (``addmm_``)."""
  steps = 8
  w0 = np.random.default_rng(52).standard_normal(shape).astype(np.float32)
  w = torch.nn.Parameter(torch.from_numpy(w0.copy()))
  group = dict(params=[w], rank=2, scale=0.5, proj_bits=bits, proj_group_size=4)
  opt = QGaLoreAdamW([{**group, "update_proj_gap": 3}], **{**HYPER, "weight_decay": 0.0})
  grads = _gradients(shape, steps, seed=53)
  _run([w], [grads], opt, steps)
  expected, refreshes = naive_qgalore(w0, grads, 2, bits, 4, 0.5, 3, 0.4, 2, 5, weight_decay=0.0)
  assert refreshes == [0, 3, 6]
  np.testing.assert_allclose(w.detach().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_moments_equal_qgalore_jax_bit_for_bit():
  """``m.mul_(b1).add_(g, alpha=1 - b1)`` rounds as XLA's CPU fusion of
  ``(1 - b1) * g + b1 * m`` does (and likewise ``v``): float32 moments of the plain and the
  projected path equal ``qgalore_jax``'s ``adam_step`` under ``jax.jit`` bit for bit, on
  gradients spanning six decades and shapes with partial SIMD vectors."""
  jax = pytest.importorskip("jax")
  from qgalore_jax._src import moments as jax_moments

  (b1, b2), eps = HYPER["betas"], HYPER["eps"]
  jax_step = jax.jit(jax_moments.adam_step, static_argnums=(4, 5, 6))
  rng = np.random.default_rng(54)
  for shape in ((7, 13), (300, 37)):
    mu = nu = np.zeros(shape, np.float32)
    exp_avg, exp_avg_sq = torch.zeros(shape), torch.zeros(shape)
    for t in range(1, 6):
      g = (rng.standard_normal(shape) * 10.0 ** rng.uniform(-6, 0, shape)).astype(np.float32)
      _, mu, nu = (np.asarray(x) for x in jax_step(g, mu, nu, np.int32(t), b1, b2, eps))
      functional.adam_direction(
        torch.from_numpy(g), exp_avg, exp_avg_sq, torch.tensor(float(t)), b1, b2, eps
      )
      np.testing.assert_array_equal(exp_avg.numpy(), mu)
      np.testing.assert_array_equal(exp_avg_sq.numpy(), nu)


def test_tensor_hyperparameters_step_like_numbers():
  """0-dim CPU tensors (e.g. an ``lr`` a schedule updates in place) give the weights that
  Python numbers of the same (float32) values give, bit for bit, on the projected and the
  plain path."""
  results = []
  for as_tensor in (False, True):
    value = torch.tensor if as_tensor else lambda x: float(np.float32(x))
    params = _model(torch.float32)
    tall, wide, bias = params
    hyper = dict(
      lr=value(HYPER["lr"]),
      betas=tuple(value(b) for b in HYPER["betas"]),
      eps=value(HYPER["eps"]),
      weight_decay=value(HYPER["weight_decay"]),
    )
    opt = QGaLoreAdamW(
      [{"params": [tall, wide], "rank": 2, "proj_group_size": 4}, {"params": [bias]}], **hyper
    )
    grads = [_gradients(tuple(p.shape), 4, seed=60 + i) for i, p in enumerate(params)]
    _run(params, grads, opt, 2)
    for group in opt.param_groups:
      if as_tensor:
        group["lr"].fill_(HYPER["lr"] / 2)  # in place, as a scheduler does
      else:
        group["lr"] = value(HYPER["lr"] / 2)
    _run(params, [g[2:] for g in grads], opt, 2)
    results.append([p.detach().clone() for p in params])
  for a, b in zip(*results, strict=True):
    assert torch.equal(a, b)


# --- The two seams: projector_fn and min_8bit_size ------------------------------------------


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_projector_fn_supplies_the_basis(weight_decay):
  """A ``projector_fn`` returning a fixed basis (unit rows selecting columns 1 and 3 of a
  (6, 4) matrix) is called with the float32 gradient and the rank on refresh steps only, and
  the weights follow the NumPy computation with that basis: columns 0 and 2 only decay."""
  shape, rank, steps, gap, scale = (6, 4), 2, 4, 3, 0.5
  basis = np.zeros((rank, shape[1]), np.float32)
  basis[0, 1] = basis[1, 3] = 1.0  # sign-canonical: the largest entry of each row is positive
  calls = []

  def fixed_projector(grad_MxN, r):
    calls.append((grad_MxN.dtype, tuple(grad_MxN.shape), r))
    return torch.from_numpy(basis)

  w0 = np.random.default_rng(70).standard_normal(shape).astype(np.float32)
  w = torch.nn.Parameter(torch.from_numpy(w0.copy()))
  group = {"params": [w], "rank": rank, "scale": scale, "update_proj_gap": gap, "proj_bits": None}
  hyper = {**HYPER, "weight_decay": weight_decay}
  opt = QGaLoreAdamW([group], **hyper, projector_fn=fixed_projector)
  grads = _gradients(shape, steps, seed=71)
  _run([w], [grads], opt, steps)

  assert calls == [(torch.float32, shape, rank)] * 2  # steps 0 and 3
  lr, (b1, b2), eps = HYPER["lr"], HYPER["betas"], HYPER["eps"]
  p = basis.astype(np.float64)
  want, m, v = w0.astype(np.float64), 0.0, 0.0
  for t, g in enumerate(grads, start=1):
    low_rank = g @ p.T
    m = b1 * m + (1 - b1) * low_rank
    v = b2 * v + (1 - b2) * low_rank**2
    u = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    want = want - lr * (scale * (u @ p) + weight_decay * want)
  np.testing.assert_allclose(w.detach().numpy(), want, rtol=1e-6, atol=1e-7)
  decay = (1 - lr * weight_decay) ** steps
  np.testing.assert_allclose(w.detach().numpy()[:, [0, 2]], w0[:, [0, 2]] * decay, rtol=1e-6)


def test_projector_fn_stays_out_of_the_state_dict():
  w = torch.nn.Parameter(torch.ones(6, 4))
  opt = QGaLoreAdamW([{"params": [w], "rank": 2}], projector_fn=lambda g, r: g[:r])
  assert callable(opt.projector_fn)
  assert "projector_fn" not in opt.defaults
  assert all("projector_fn" not in group for group in opt.state_dict()["param_groups"])
  default = QGaLoreAdamW([{"params": [w], "rank": 2}])
  assert default.projector_fn is qgalore_torch.compute_projector


@pytest.mark.parametrize("projected", [False, True], ids=["adamw", "projected"])
def test_min_8bit_size_decides_which_moments_are_8bit(projected):
  """A moment of 256 elements (a plain 16 x 16 matrix's, or the (64, 4) low-rank moment of a
  (64, 16) matrix at rank 4) is uint8 codes with ``min_8bit_size=256`` and float32 with the
  default 4096."""
  shape, moment_shape = ((64, 16), (64, 4)) if projected else ((16, 16), (16, 16))
  dtypes = {}
  for min_size in (None, 256):
    w = torch.nn.Parameter(torch.ones(shape))
    group = {"params": [w], "rank": 4} if projected else {"params": [w]}
    kwargs = {} if min_size is None else {"min_8bit_size": min_size}
    opt = QGaLoreAdamW([group], moment_bits=8, **kwargs)
    w.grad = torch.from_numpy(_gradients(shape, 1, seed=72)[0])
    opt.step()
    state = opt.state[w]
    assert tuple(state["exp_avg"].shape) == moment_shape
    dtypes[min_size] = (state["exp_avg"].dtype, state["exp_avg_sq"].dtype)
    assert ("exp_avg_absmax" in state) is (min_size == 256)
  assert dtypes == {None: (torch.float32,) * 2, 256: (torch.uint8,) * 2}


def test_min_8bit_size_is_a_param_group_key():
  small, large = (torch.nn.Parameter(torch.ones(16, 16)) for _ in range(2))
  opt = QGaLoreAdamW(
    [{"params": [small]}, {"params": [large], "min_8bit_size": 256}], moment_bits=8
  )
  for p in (small, large):
    p.grad = torch.ones_like(p)
  opt.step()
  assert opt.state[small]["exp_avg"].dtype == torch.float32
  assert opt.state[large]["exp_avg"].dtype == torch.uint8
  assert [g["min_8bit_size"] for g in opt.state_dict()["param_groups"]] == [4096, 256]


def test_group_saved_without_min_8bit_size_takes_the_constructors():
  w = torch.nn.Parameter(torch.ones(16, 16))
  saved = QGaLoreAdamW([w], moment_bits=8).state_dict()
  del saved["param_groups"][0]["min_8bit_size"]
  opt = QGaLoreAdamW([w], moment_bits=8, min_8bit_size=256)
  opt.load_state_dict(saved)
  w.grad = torch.ones_like(w)
  opt.step()
  assert opt.state[w]["exp_avg"].dtype == torch.uint8


@pytest.mark.parametrize(
  "group, kwargs, error",
  [
    ({}, {"min_8bit_size": 0}, ValueError),
    ({}, {"min_8bit_size": 256.0}, TypeError),
    ({}, {"min_8bit_size": True}, TypeError),
    ({"rank": 2, "min_8bit_size": "256"}, {}, TypeError),
  ],
)
def test_bad_min_8bit_size_raises_naming_it(group, kwargs, error):
  with pytest.raises(error, match="`min_8bit_size`"):
    QGaLoreAdamW([{"params": [torch.nn.Parameter(torch.ones(4, 3))], **group}], **kwargs)


@pytest.mark.parametrize("projector_fn", [3, "svd", torch.ones(2)])
def test_bad_projector_fn_raises_naming_it(projector_fn):
  with pytest.raises(TypeError, match="`projector_fn`"):
    QGaLoreAdamW([torch.nn.Parameter(torch.ones(4, 3))], projector_fn=projector_fn)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize(
  ("key", "where"),
  [("lr", "kwargs"), ("eps", "kwargs"), ("weight_decay", "kwargs"), ("scale", "group"),
   ("cos_threshold", "group"), ("gamma_proj", "group")],
)  # fmt: skip
def test_numeric_hyperparameters_must_be_finite(key, where, value):
  group = {"params": [torch.nn.Parameter(torch.ones(4, 3))], "rank": 2}
  kwargs = {}
  (group if where == "group" else kwargs)[key] = value
  with pytest.raises(ValueError, match=rf"`{key}` must be a finite number, got {value}"):
    QGaLoreAdamW([group], **kwargs)


def test_betas_must_be_finite():
  params = [torch.nn.Parameter(torch.ones(4, 3))]
  with pytest.raises(ValueError, match=r"`betas\[1\]` must be a finite number, got nan"):
    QGaLoreAdamW(params, betas=(0.9, float("nan")))


def _saved_state(shape=(16, 12), **group):
  w = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(0)))
  opt = QGaLoreAdamW([{"params": [w], "rank": 4, **group}], lr=1e-2)
  w.grad = torch.ones(shape)
  opt.step()
  return opt.state_dict()


@pytest.mark.parametrize(
  "saved, built, message",
  [
    ({}, {"rank": 8}, "rank=4, but this optimizer's has rank=8"),
    ({}, {"proj_bits": None}, "proj_bits=4, but this optimizer's has proj_bits=None"),
    ({"proj_group_size": 32}, {}, "proj_group_size=32, but this optimizer's has"),
    ({"queue_size": 3}, {}, "queue_size=3"),
  ],
)
def test_state_dict_of_another_configuration_is_refused(saved, built, message):
  """A clear error, and the optimizer keeps its own state (no silent reshape)."""
  state_dict = _saved_state(**saved)
  w = torch.nn.Parameter(torch.zeros(16, 12))
  opt = QGaLoreAdamW([{"params": [w], "rank": 4, **built}], lr=1e-2)
  w.grad = torch.ones(16, 12)
  opt.step()
  before = {k: v.clone() for k, v in opt.state[w].items()}
  with pytest.raises(ValueError, match=re.escape(message)):
    opt.load_state_dict(state_dict)
  assert all(torch.equal(opt.state[w][k], v) for k, v in before.items())


def test_state_dict_of_a_plain_group_into_a_projected_one_is_refused():
  state_dict = _saved_state()
  state_dict["param_groups"][0].pop("rank")
  w = torch.nn.Parameter(torch.zeros(16, 12))
  opt = QGaLoreAdamW([{"params": [w], "rank": 4}], lr=1e-2)
  with pytest.raises(ValueError, match="saved with rank=none, but this optimizer's has rank=4"):
    opt.load_state_dict(state_dict)


def test_state_dict_of_another_model_is_refused_naming_the_parameter():
  """Same settings, other shapes: the state tensors cannot fit; the old state stays."""
  state_dict = _saved_state(shape=(16, 12))
  w = torch.nn.Parameter(torch.zeros(20, 12))
  opt = QGaLoreAdamW([{"params": [w], "rank": 4}], lr=1e-2)
  lr_before = opt.param_groups[0]["lr"]
  with pytest.raises(ValueError, match=re.escape("param group 0: params[0] (shape (20, 12))")):
    opt.load_state_dict(state_dict)
  assert not opt.state and opt.param_groups[0]["lr"] == lr_before


def test_state_dict_with_other_moment_bits_still_loads():
  """Moments convert to the group's form at the next step (see the test above)."""
  state_dict = _saved_state(moment_bits=8, min_8bit_size=1)
  w = torch.nn.Parameter(torch.zeros(16, 12))
  opt = QGaLoreAdamW([{"params": [w], "rank": 4}], lr=1e-2)
  opt.load_state_dict(state_dict)
  assert opt.state[w]["exp_avg"].dtype == torch.uint8


def test_projector_fn_needs_the_full_method():
  w = torch.nn.Parameter(torch.ones(8, 4))
  with pytest.raises(ValueError, match=r"param group 0.*projector_fn.*svd_method='full'"):
    QGaLoreAdamW(
      [{"params": [w], "rank": 2}],
      svd_method="subspace",
      projector_fn=qgalore_torch.compute_projector,
    )


def _refresh_grads(seed):
  """Gradients of a (12, 20) matrix and a (3, 12, 20) stack with a clear spectral gap."""
  rng = np.random.default_rng(seed)
  low = lambda *s: rng.normal(size=(*s[:-1], 3)) @ rng.normal(size=(3, s[-1]))
  noisy = lambda *s: torch.tensor(low(*s) + 1e-3 * rng.normal(size=s), dtype=torch.float32)
  return [noisy(12, 20), torch.zeros(5), noisy(3, 12, 20)]


def _refresh_optimizer(params, **kwargs):
  groups = [
    {"params": [params[0]], "rank": 2},
    {"params": [params[1]]},
    {"params": [params[2]], "rank": 2, "batch_axes": (0,)},
  ]
  return QGaLoreAdamW(groups, lr=1e-2, seed=9, oversample=3, power_iters=1, **kwargs)


def test_refresh_methods_key_each_slice_and_match_a_naive_refresh():
  """A first refresh is the range finder of the matrix's own sketch, keyed by (seed, step 0,
  tensor id, slice index); "subspace" runs "randomized" then (docs/spec.md section 2.6)."""
  params = [torch.nn.Parameter(torch.zeros_like(g)) for g in _refresh_grads(0)]
  opt = _refresh_optimizer(params, svd_method="subspace", proj_bits=None)
  for p, g in zip(params, _refresh_grads(1), strict=True):
    p.grad = g
  opt.step()
  cases = [(0, 0, params[0].grad, opt.state[params[0]]["proj_basis"])]
  cases += [(2, s, params[2].grad[s], opt.state[params[2]]["proj_basis"][s]) for s in range(3)]
  for tensor_id, slice_index, g_MxN, got in cases:
    start = generator.sketch(9, 0, tensor_id, slice_index, (12, 5))
    want = proj.randomized_projector(g_MxN, 2, start, 1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_subspace_refresh_resumes_exactly():
  params = [torch.nn.Parameter(torch.zeros_like(g)) for g in _refresh_grads(0)]
  opt = _refresh_optimizer(params, svd_method="subspace", update_proj_gap=2)

  def run(opt, steps):
    for t in steps:
      for p, g in zip(params, _refresh_grads(t), strict=True):
        p.grad = g
      opt.step()

  run(opt, range(3))
  saved = io.BytesIO()
  torch.save((opt.state_dict(), [p.detach().clone() for p in params]), saved)
  run(opt, range(3, 6))
  after = [p.detach().clone() for p in params], opt.state_dict()["state"]
  saved.seek(0)
  state_dict, weights = torch.load(saved, weights_only=True)
  with torch.no_grad():
    for p, w in zip(params, weights, strict=True):
      p.copy_(w)
  resumed = _refresh_optimizer(params, svd_method="subspace", update_proj_gap=2)
  resumed.load_state_dict(state_dict)
  run(resumed, range(3, 6))
  for p, w in zip(params, after[0], strict=True):
    torch.testing.assert_close(p.detach(), w, atol=0, rtol=0)
  for i, state in after[1].items():
    for key, value in state.items():
      torch.testing.assert_close(resumed.state_dict()["state"][i][key], value, atol=0, rtol=0)


def _compile_case(int8):
  """Two linear layers (float or ``Int8Linear``) under ``QGaLoreAdamW``, refreshing every 2."""
  torch.manual_seed(0)
  layers = [torch.nn.Linear(32, 32) for _ in range(2)]
  if int8:
    layers = [Int8Linear.from_linear(layer, group_size=64) for layer in layers]
  model = torch.nn.Sequential(*layers)
  groups = [
    {"params": [layer.weight for layer in layers], "rank": 4, "update_proj_gap": 2},
    {"params": [layer.bias for layer in layers]},
  ]
  return model, QGaLoreAdamW(groups, lr=1e-2, seed=3, skip_nonfinite=True)


def _model_bits(model):
  """Every stored tensor of ``model`` (INT8 codes, scales and zeros included), cloned."""
  return [t.clone() for t in model.state_dict().values()]


@pytest.mark.parametrize("int8", [False, True], ids=["float", "int8"])
def test_compiled_step_runs_the_eager_step(int8):
  """``torch.compile(opt.step)`` and a compiled train step: no error, no recompilation, the
  bits of the eager step (refreshes, INT8 rounding and the non-finite guard included).

  The reference is the same model and optimizer stepped without compilation. The train
  step compiles with ``aot_eager`` (Dynamo and AOT autograd, without inductor's code
  generation, so that the model's own arithmetic stays that of eager).
  """
  x = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
  eager_model, eager_opt = _compile_case(int8)
  step_model, step_opt = _compile_case(int8)
  train_model, train_opt = _compile_case(int8)

  def train_step(model, opt):
    opt.zero_grad()
    loss = model(x).square().mean()
    loss.backward()
    opt.step()
    return loss.detach()

  compiled_step = torch.compile(step_opt.step)
  compiled_train_step = torch.compile(train_step, backend="aot_eager")
  # One compilation of torch's step wrapper per optimizer (two), never one more per step.
  torch._dynamo.reset()
  with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
    for _ in range(5):
      want = train_step(eager_model, eager_opt)
      step_opt.zero_grad()
      step_model(x).square().mean().backward()
      compiled_step()
      got = compiled_train_step(train_model, train_opt)
      assert torch.equal(got, want)
  for model in (step_model, train_model):
    for a, b in zip(_model_bits(model), _model_bits(eager_model), strict=True):
      assert torch.equal(a, b)
  assert step_opt.projection_stats() == eager_opt.projection_stats()

"""Tests of QGaLoreAdamW against a naive NumPy Q-GaLore written here (SPEC sections 1-5, 7)."""

import io

import numpy as np
import pytest
import torch

from qgalore_torch._src.optimizer import QGaLoreAdamW
from qgalore_torch._src.projector_test import naive_sign_rule
from qgalore_torch._src.quantization_test import brute_force_quantize

HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


def naive_dequantised(rows, bits, group_size):
  codes, scales, zeros = brute_force_quantize(rows, bits, group_size)
  group_of = np.arange(rows.size) // group_size
  return (scales[group_of] * (codes.astype(np.float32) - zeros[group_of])).reshape(rows.shape)


def naive_qgalore(w0, grads, rank, bits, group_size, scale, gap, cos_threshold, gamma, queue):
  """Q-GaLore on one canonical matrix as SPEC sections 2-5 state it, in float64.

  The SVD is torch's float32 LAPACK call, the one the optimizer makes, so that a
  rounding-level SVD difference cannot flip a 4-bit code; everything after it (sign rule,
  side, quantiser, schedule, Adam, decay) is re-derived here. Returns the final weights and
  the 0-based steps that refreshed.
  """
  lr, (b1, b2), eps, wd = HYPER["lr"], HYPER["betas"], HYPER["eps"], HYPER["weight_decay"]
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


def naive_adamw(w0, grads):
  lr, (b1, b2), eps, wd = HYPER["lr"], HYPER["betas"], HYPER["eps"], HYPER["weight_decay"]
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_resumes_bit_identically(dtype):
  grads = [_gradients(tuple(p.shape), 12, seed=i) for i, p in enumerate(_model(dtype))]
  params = _model(dtype)
  opt = _optimizer(params)
  _run(params, [g[:5] for g in grads], opt, 5)
  buffer = io.BytesIO()
  torch.save(opt.state_dict(), buffer)
  buffer.seek(0)
  resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
  resumed = _optimizer(resumed_params)
  resumed.load_state_dict(torch.load(buffer, weights_only=True))
  _run(params, [g[5:] for g in grads], opt, 7)
  _run(resumed_params, [g[5:] for g in grads], resumed, 7)
  for p, q in zip(params, resumed_params, strict=True):
    assert torch.equal(p, q)
    assert opt.state[p].keys() == resumed.state[q].keys()
    for key, value in opt.state[p].items():
      assert value.dtype == resumed.state[q][key].dtype, key
      assert torch.equal(value, resumed.state[q][key]), key
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


@pytest.mark.parametrize("accumulation_steps", [1, 3])
def test_layerwise_mode_matches_step(accumulation_steps):
  batches = 4
  data = torch.randn(batches * accumulation_steps, 5, 6, generator=torch.Generator().manual_seed(9))
  normal, layerwise = _mlp(), _mlp()
  normal_opt, layerwise_opt = _mlp_optimizer(normal), _mlp_optimizer(layerwise)
  initial = [p.detach().clone() for p in layerwise.parameters()]
  layerwise_opt.register_layerwise_hooks(accumulation_steps)
  for i, x in enumerate(data):
    normal(x).square().mean().backward()
    if (i + 1) % accumulation_steps == 0:
      normal_opt.step()
      normal_opt.zero_grad()
    layerwise(x).square().mean().backward()
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

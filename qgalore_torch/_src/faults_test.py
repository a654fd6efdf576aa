"""Faults and awkward inputs (docs/reliability.md): what a user gets, checked.

The twin of ``qgalore_jax/_src/faults_test.py``. References: NumPy least squares for "it
still trains", the spec's clamped rank ``min(rank, m, n)`` (docs/spec.md section 1.1) for the
state's shapes, and section 4.3 for a refresh whose basis is not finite.
"""

import numpy as np
import pytest
import torch

from qgalore_torch import Int8Linear
from qgalore_torch import Int8Weight
from qgalore_torch import QGaLoreAdamW
from qgalore_torch import compute_projector
from qgalore_torch._src import optimizer as optimizer_module


def _least_squares(shape, dtype, seed=0):
  """``|x W^T - y|^2`` for an (out, in) ``W``; returns (loss_fn, W, best) with NumPy's optimum."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(64, shape[1]))
  y = x @ rng.normal(size=(shape[1], shape[0]))
  best = float(np.mean((x @ np.linalg.lstsq(x, y, rcond=None)[0] - y) ** 2))
  xt, yt = torch.from_numpy(x).to(dtype), torch.from_numpy(y).to(dtype)
  w = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
  return lambda: ((xt @ w.T - yt).float() ** 2).mean(), w, best


def _train(opt, loss_fn, steps):
  losses = []
  for _ in range(steps):
    loss = loss_fn()
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
  return losses


@pytest.mark.parametrize(
  "shape, rank",
  [((6, 8), 10), ((6, 8), 6), ((1, 40), 4), ((40, 1), 4), ((1, 1), 3)],
  ids=["rank over both sides", "rank equal to a side", "1 x n", "n x 1", "1 x 1"],
)
def test_awkward_shapes_clamp_the_rank_and_train(shape, rank):
  loss_fn, w, best = _least_squares(shape, torch.float32)
  opt = QGaLoreAdamW([{"params": [w], "rank": rank, "update_proj_gap": 5}], lr=5e-2)
  losses = _train(opt, loss_fn, 150)
  r = min(rank, *shape)
  mu = opt.state[w]["exp_avg"]  # the low-rank first moment, docs/spec.md section 1.1
  assert r in mu.shape and mu.numel() == r * max(shape)
  assert opt.projection_stats()[0]["svd_count"] >= 1
  assert losses[-1] < 0.2 * losses[0] and np.isfinite(losses[-1])
  assert losses[-1] >= best - 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_float_dtypes_keep_their_dtype_and_train(dtype):
  loss_fn, w, _ = _least_squares((12, 16), dtype)
  opt = QGaLoreAdamW([{"params": [w], "rank": 4, "update_proj_gap": 10}], lr=1e-1)
  losses = _train(opt, loss_fn, 150)
  assert w.dtype == dtype and opt.state[w]["exp_avg"].dtype == torch.float32
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0]


def test_all_zero_gradients_leave_the_weights_and_refresh():
  """A zero gradient is a valid SVD input: the weight stays and the projector is finite."""
  w = torch.nn.Parameter(torch.full((6, 8), 0.5))
  opt = QGaLoreAdamW([{"params": [w], "rank": 2, "update_proj_gap": 1}], lr=1e-2)
  for _ in range(3):
    w.grad = torch.zeros(6, 8)
    opt.step()
  assert torch.equal(w.detach(), torch.full((6, 8), 0.5))
  assert opt.projection_stats()[0]["svd_count"] == 3
  assert all(torch.isfinite(v).all() for v in opt.state[w].values() if v.is_floating_point())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["NaN basis", "inf basis"])
def test_a_non_finite_basis_from_the_svd_is_rejected(bad):
  """An SVD that returns garbage (the projector_fn seam): the refresh is skipped and retried.

  docs/spec.md section 4.3: the stored projector and schedule stay as they were.
  """
  poisoned = [False]

  def projector_fn(grad, rank):
    basis = compute_projector(grad, rank)
    return torch.full_like(basis, bad) if poisoned[0] else basis

  w = torch.nn.Parameter(torch.ones(6, 8))
  opt = QGaLoreAdamW(
    [{"params": [w], "rank": 2, "update_proj_gap": 2}], lr=1e-2, projector_fn=projector_fn
  )
  grad = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
  w.grad = grad.clone()
  opt.step()  # step 0: a good refresh
  w.grad = grad.clone()
  opt.step()  # step 1: no refresh
  before = {k: v.clone() for k, v in opt.state[w].items() if k != "step"}
  before = {k: v for k, v in before.items() if k not in ("exp_avg", "exp_avg_sq")}
  poisoned[0] = True
  w.grad = grad.clone()
  opt.step()  # step 2: a refresh, rejected
  for key, value in before.items():
    assert torch.equal(opt.state[w][key], value), key
  assert torch.isfinite(w).all()
  assert opt.projection_stats()[0]["svd_count"] == 1


def test_an_svd_that_raises_surfaces_its_error():
  """A projector_fn that fails (e.g. a solver that does not converge) is not swallowed."""

  def fails(grad, rank):
    raise torch.linalg.LinAlgError("SVD did not converge")

  w = torch.nn.Parameter(torch.ones(6, 8))
  opt = QGaLoreAdamW([{"params": [w], "rank": 2}], projector_fn=fails)
  w.grad = torch.ones(6, 8)
  with pytest.raises(torch.linalg.LinAlgError, match="did not converge"):
    opt.step()


# --- skip_nonfinite: a non-finite step skipped whole ---------------------------------------


def _skip_model(int8, moment_bits):
  """A projected matrix (float or INT8), a stack of two (batch_axes) and a plain bias."""
  torch.manual_seed(0)
  layer = torch.nn.Linear(24, 40)
  if int8:
    layer = Int8Linear.from_linear(layer, group_size=64)
  stack = torch.nn.Parameter(torch.randn(2, 16, 12))
  groups = [
    {"params": [layer.weight], "rank": 4},
    {"params": [stack], "rank": 3, "batch_axes": (0,)},
    {"params": [layer.bias]},
  ]
  opt = QGaLoreAdamW(
    groups,
    lr=1e-2,
    update_proj_gap=3,
    moment_bits=moment_bits,
    min_8bit_size=16,
    skip_nonfinite=True,
  )
  return opt, [layer.weight, stack, layer.bias]


def _snapshot(opt, params):
  """Every tensor of the parameters and their state, cloned, in a fixed order."""
  tensors = []
  for p in params:
    tensors += [t.clone() for t in (p.quantized() if isinstance(p, Int8Weight) else [p.detach()])]
    tensors += [v.clone() for k, v in sorted(opt.state[p].items()) if k != "skipped_steps"]
  return tensors


def _run(opt, params, grads):
  for grad in grads:
    for p, g in zip(params, grad, strict=True):
      p.grad = g.clone()
    opt.step()


def _gradients(params, steps, seed=1):
  gen = torch.Generator().manual_seed(seed)
  return [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(steps)]


@pytest.mark.parametrize("deferred", [False, True], ids=["read at once", "read next step"])
@pytest.mark.parametrize("int8, moment_bits", [(False, None), (True, None), (True, 8)])
@pytest.mark.parametrize("bad_step", [0, 3, 4], ids=["first refresh", "refresh", "normal"])
def test_skip_nonfinite_skips_a_step_whole(monkeypatch, deferred, int8, moment_bits, bad_step):
  """A NaN or inf anywhere skips the whole step: the run equals one that never saw it.

  The reference is the same optimizer fed the same gradients without the bad step, bit for
  bit: weights (INT8 codes), moments (8-bit codes), projectors, schedules and ``step``.
  ``deferred`` forces the path of accelerator gradients: masked updates, with the flag read
  at the start of the next step.
  """
  if deferred:
    monkeypatch.setattr(optimizer_module, "_reads_freely", lambda flags: False)
  opt, params = _skip_model(int8, moment_bits)
  ref_opt, ref_params = _skip_model(int8, moment_bits)
  grads = _gradients(params, 7)
  bad = [g.clone() for g in grads[bad_step]]
  bad[bad_step % 3].view(-1)[5] = float("nan") if bad_step % 2 else float("inf")
  _run(opt, params, [*grads[:bad_step], bad, *grads[bad_step:]])
  _run(ref_opt, ref_params, grads)
  assert opt.skipped_steps == 1 and ref_opt.skipped_steps == 0
  for got, want in zip(_snapshot(opt, params), _snapshot(ref_opt, ref_params), strict=True):
    assert torch.equal(got, want)
  assert opt.projection_stats() == ref_opt.projection_stats()


def test_skip_nonfinite_counts_consecutive_skips_and_survives_a_state_dict(monkeypatch):
  monkeypatch.setattr(optimizer_module, "_reads_freely", lambda flags: False)
  opt, params = _skip_model(False, None)
  _run(opt, params, _gradients(params, 1))
  nan = [torch.full(p.shape, float("nan")) for p in params]
  _run(opt, params, [nan, nan, nan])
  saved = opt.state_dict()  # reads the last step's pending flag first
  assert [float(saved["state"][i]["step"]) for i in range(3)] == [1.0, 1.0, 1.0]
  assert [float(saved["state"][i]["skipped_steps"]) for i in range(3)] == [3.0, 3.0, 3.0]
  fresh, fresh_params = _skip_model(False, None)
  fresh.load_state_dict(saved)
  assert fresh.skipped_steps == 3
  plain = QGaLoreAdamW(  # a state with skip counts loads into an optimizer without the option
    [
      {"params": [fresh_params[0]], "rank": 4},
      {"params": [fresh_params[1]], "rank": 3, "batch_axes": (0,)},
      {"params": [fresh_params[2]]},
    ],
    update_proj_gap=3,
  )
  plain.load_state_dict(saved)


def test_skip_nonfinite_counts_once_when_the_moments_change_form(monkeypatch):
  """A masked step that also converts loaded float32 moments to 8-bit, then is skipped.

  The state was saved with float32 moments; after loading it, the groups switch to 8-bit
  moments (``load_state_dict`` restores the saved ``moment_bits``), so the first step
  changes the moments' form; that step's gradient is NaN. The reference is the same
  optimizer, loaded and switched the same way, never given the bad step.
  """
  monkeypatch.setattr(optimizer_module, "_reads_freely", lambda flags: False)
  source, source_params = _skip_model(False, None)
  grads = _gradients(source_params, 4)
  _run(source, source_params, grads[:1])
  saved = source.state_dict()
  runs = []
  for bad_first in (True, False):
    opt, params = _skip_model(False, 8)
    with torch.no_grad():
      for p, w in zip(params, source_params, strict=True):
        p.copy_(w)
    opt.load_state_dict(saved)
    for group in opt.param_groups:
      group["moment_bits"] = 8
    nan = [torch.full(p.shape, float("nan")) for p in params]
    _run(opt, params, [nan, *grads[1:]] if bad_first else grads[1:])
    runs.append((opt, params))
  (opt, params), (ref_opt, ref_params) = runs
  assert opt.state[params[0]]["exp_avg"].dtype == torch.uint8  # the form did change
  assert opt.skipped_steps == 1
  for got, want in zip(_snapshot(opt, params), _snapshot(ref_opt, ref_params), strict=True):
    assert torch.equal(got, want)


def test_without_skip_nonfinite_a_nan_reaches_the_moments():
  """The default follows torch's optimizers: nothing is checked, the NaN propagates."""
  w = torch.nn.Parameter(torch.ones(8, 6))
  opt = QGaLoreAdamW([{"params": [w], "rank": 2}], lr=1e-2)
  w.grad = torch.full((8, 6), float("nan"))
  opt.step()
  assert torch.isnan(opt.state[w]["exp_avg"]).all() and opt.skipped_steps == 0


def test_skip_nonfinite_is_validated_and_refused_in_layerwise_mode():
  w = torch.nn.Parameter(torch.ones(8, 6))
  with pytest.raises(TypeError, match="skip_nonfinite"):
    QGaLoreAdamW([w], skip_nonfinite=1)
  opt = QGaLoreAdamW([w], skip_nonfinite=True)
  with pytest.raises(ValueError, match=r"skip_nonfinite.*layer-wise"):
    opt.register_layerwise_hooks()

"""The CUDA paths of INT8 weights, ``Int8Linear`` and layer-wise updates (docs/spec.md section 6).

Each test runs the same inputs on the CPU and on the GPU, or the same training in two modes
on the GPU. References: the CPU path (already held to the naive references of ``int8_test``)
and the ordinary ``step()``. ``Int8Linear`` under CUDA autocast is the CUDA case of
``int8_test.test_int8_linear_under_autocast_matches_nn_linear``. Every test skips without
CUDA.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qgalore_torch import Int8Linear
from qgalore_torch import Int8Weight
from qgalore_torch import QGaLoreAdamW
from qgalore_torch import apply_int8_update
from qgalore_torch import quantize_linears

pytestmark = [
  pytest.mark.gpu,
  pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True)
def _full_float32_matmuls():
  """TF32 off, so the GPU's float32 matmuls round like the CPU's (to summation order)."""
  saved = torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.set_float32_matmul_precision("highest")
  yield
  torch.backends.cuda.matmul.allow_tf32 = saved[0]
  torch.set_float32_matmul_precision(saved[1])


def _codes(weight: Int8Weight):
  return [t.cpu() for t in weight.quantized()]


def test_sr_update_is_bit_identical_on_cpu_and_cuda():
  """Stochastic rounding keyed by (seed, step, tensor id): the same codes on both devices."""
  g = torch.Generator().manual_seed(0)
  w = torch.randn(96, 600, generator=g) * 0.05  # groups straddle rows (600 % 256 != 0)
  update = torch.randn(96, 600, generator=g) * 3e-3
  on = {}
  for device in ("cpu", "cuda"):
    weight = Int8Weight.from_float(w.to(device))
    for step in range(3):
      apply_int8_update(weight, update.to(device), seed=7, step=step, tensor_id=2)
    on[device] = _codes(weight)
  for got, want in zip(on["cuda"], on["cpu"], strict=True):
    assert torch.equal(got, want)


def test_int8_linear_forward_backward_match_cpu():
  torch.manual_seed(1)
  linear = nn.Linear(300, 40)
  x = torch.randn(3, 7, 300)
  results = {}
  for device in ("cpu", "cuda"):
    layer = Int8Linear.from_linear(copy.deepcopy(linear).to(device))
    xd = x.to(device, copy=True).requires_grad_(True)  # a leaf on each device
    y = layer(xd)
    y.square().sum().backward()
    results[device] = [t.detach().cpu() for t in (y, xd.grad, layer.weight.grad, layer.bias.grad)]
  for got, want in zip(results["cuda"], results["cpu"], strict=True):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _cuda_model():
  torch.manual_seed(2)
  model = nn.Sequential(
    nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4)
  ).cuda()
  quantize_linears(model, lambda name: name in ("0", "2"))
  return model


def _optimizer(model, moment_bits=None):
  matrices = [model[0].weight, model[2].weight]
  others = [model[0].bias, model[2].bias, model[4].weight, model[4].bias]
  groups = [{"params": matrices, "rank": 4, "update_proj_gap": 2}, {"params": others}]
  return QGaLoreAdamW(groups, lr=1e-2, seed=5, moment_bits=moment_bits)


def _batch():
  g = torch.Generator().manual_seed(3)
  x = torch.randn(128, 16, generator=g)
  return x.cuda(), torch.sin(x @ torch.randn(16, 4, generator=g)).cuda()


@pytest.mark.parametrize("moment_bits", [None, 8])
def test_cuda_layerwise_hooks_match_step_with_int8_weights(moment_bits):
  """Layer-wise updates in backward equal ``step()`` bit for bit, refreshes included."""
  x, y = _batch()
  model_a, model_b = _cuda_model(), _cuda_model()
  opt_a = _optimizer(model_a, moment_bits)
  losses = []
  for _ in range(6):
    loss = F.mse_loss(model_a(x), y)
    opt_a.zero_grad()
    loss.backward()
    opt_a.step()
    losses.append(loss.item())
  assert losses[-1] < losses[0]
  opt_b = _optimizer(model_b, moment_bits)
  opt_b.register_layerwise_hooks()
  for _ in range(6):
    F.mse_loss(model_b(x), y).backward()
  assert all(s["svd_count"] >= 2 for s in opt_a.projection_stats() if s is not None)
  for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
    assert a.is_cuda and b.is_cuda
    if isinstance(a, Int8Weight):
      for got, want in zip(_codes(b), _codes(a), strict=True):
        assert torch.equal(got, want)
    else:
      torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_skip_nonfinite_on_cuda_skips_like_the_cpu_and_normal_steps_do_not_synchronise():
  """``skip_nonfinite`` with CUDA gradients: masked updates, the flag read one step later.

  The reference is the CPU run, where the flag is read at once and a bad step touches
  nothing. Normal steps on CUDA run under ``set_sync_debug_mode("error")``: reading the
  previous step's flag waits on an event behind a copy to pinned memory, not on the stream.
  """
  gen = torch.Generator().manual_seed(4)
  init = [torch.randn(40, 24, generator=gen), torch.randn(40, generator=gen)]
  grads = [[torch.randn(p.shape, generator=gen) for p in init] for _ in range(6)]
  grads[3][0][2, 5] = float("nan")  # a normal step (gap 4): the masked path on CUDA
  runs = {}
  for device in ("cpu", "cuda"):
    params = [nn.Parameter(p.to(device)) for p in init]
    opt = QGaLoreAdamW(
      [{"params": params[:1], "rank": 4}, {"params": params[1:]}],
      lr=1e-2,
      update_proj_gap=4,
      skip_nonfinite=True,
    )
    for t, step_grads in enumerate(grads):
      for p, g in zip(params, step_grads, strict=True):
        p.grad = g.to(device)
      refreshes = (t if t <= 3 else t - 1) % 4 == 0  # the skipped call 3 does not count
      torch.cuda.set_sync_debug_mode("default" if device == "cpu" or refreshes else "error")
      try:
        opt.step()
      finally:
        torch.cuda.set_sync_debug_mode("default")
    runs[device] = [p.detach().cpu() for p in params], opt.skipped_steps, opt.state[params[0]]
  (cpu_params, cpu_skips, cpu_state), (cuda_params, cuda_skips, cuda_state) = runs.values()
  assert cpu_skips == cuda_skips == 1
  assert float(cpu_state["step"]) == float(cuda_state["step"]) == 5.0
  for got, want in zip(cuda_params, cpu_params, strict=True):
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-3)

"""Tests of INT8 weights and Int8Linear (docs/spec.md section 6).

References: the pure-Python generator of ``generator_test``, ``qgalore_jax.apply_updates``
itself (skipped without jax), and ``F.linear``.
"""

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qgalore_torch import Int8Linear
from qgalore_torch import Int8Weight
from qgalore_torch import QGaLoreAdamW
from qgalore_torch import apply_int8_update
from qgalore_torch import dequantize
from qgalore_torch import dequantize_linears
from qgalore_torch import quantize
from qgalore_torch import quantize_linears
from qgalore_torch import stochastic_round
from qgalore_torch import uniforms
from qgalore_torch._src.functional import adam_direction
from qgalore_torch._src.generator_test import py_hash


def test_bit_identical_to_jax():
  jax = pytest.importorskip("jax")
  jnp = pytest.importorskip("jax.numpy")
  qgalore_jax = pytest.importorskip("qgalore_jax")
  for key in [(0, 0, 0), (3, 17, 2), (2**32 - 1, 123456, 9)]:
    expected = np.asarray(qgalore_jax.uniforms(*key, (4099,)))
    np.testing.assert_array_equal(uniforms(*key, (4099,)).numpy(), expected)

  rng = np.random.default_rng(1)
  w0 = rng.normal(size=(48, 40)).astype(np.float32)  # 1920 weights: a partial last group
  update = (rng.normal(size=w0.shape) * 0.004).astype(np.float32)
  layer = Int8Linear.from_linear(nn.Linear(40, 48, bias=False))
  layer.weight.assign_(quantize(torch.from_numpy(w0), 8, 256))
  qparams = qgalore_jax.quantize_params({"a": jnp.zeros(2), "w": jnp.asarray(w0)}, input_axis=1)
  np.testing.assert_array_equal(np.asarray(qparams["w"].codes), layer.weight.codes.numpy())
  step = jax.jit(lambda q, u, t: qgalore_jax.apply_updates(q, u, seed=11, step=t))
  for t in range(3):
    qparams = step(qparams, {"a": jnp.zeros(2), "w": jnp.asarray(update)}, jnp.int32(t))
    apply_int8_update(layer.weight, torch.from_numpy(update), seed=11, step=t, tensor_id=1)
    np.testing.assert_array_equal(np.asarray(qparams["w"].codes), layer.weight.codes.numpy())
    np.testing.assert_array_equal(np.asarray(qparams["w"].scale), layer.weight.scale.numpy())
    np.testing.assert_array_equal(np.asarray(qparams["w"].zero), layer.weight.zero.numpy())


def test_zero_updates_leave_codes_bit_identical():
  """50 all-zero updates change nothing (docs/spec.md section 6.2); without the rule codes move."""
  torch.manual_seed(4)
  weight = Int8Weight.from_float(torch.randn(70, 30), group_size=64)
  before = [t.clone() for t in weight.quantized()]
  for t in range(50):
    apply_int8_update(weight, torch.zeros(70, 30), seed=5, step=t, tensor_id=0)
  for got, want in zip(weight.quantized(), before, strict=True):
    assert torch.equal(got, want)


def test_partly_zero_update_is_bit_identical_to_jax():
  """Groups with a zero update keep their codes, the others re-round: as in qgalore_jax."""
  jnp = pytest.importorskip("jax.numpy")
  qgalore_jax = pytest.importorskip("qgalore_jax")
  rng = np.random.default_rng(6)
  w0 = rng.normal(size=(70, 30)).astype(np.float32)  # (out, in); 2100 weights, group 64
  update = (rng.normal(size=w0.shape) * 0.01).astype(np.float32).reshape(-1)
  update = np.where(np.arange(update.size) // 64 % 3 == 0, update, np.float32(0)).reshape(70, 30)
  weight = Int8Weight.from_float(torch.from_numpy(w0), group_size=64)
  qparams = qgalore_jax.quantize_params({"w": jnp.asarray(w0)}, input_axis=1, group_size=64)
  before = weight.codes.clone()
  for t in range(3):
    apply_int8_update(weight, torch.from_numpy(update), seed=5, step=t, tensor_id=0)
    qparams = qgalore_jax.apply_updates(qparams, {"w": jnp.asarray(update)}, seed=5, step=t)
    for field in ("codes", "scale", "zero"):
      got = getattr(weight, field).numpy()
      np.testing.assert_array_equal(got, np.asarray(getattr(qparams["w"], field)))
  still = torch.from_numpy(np.arange(w0.size) // 64 % 3 != 0)
  assert torch.equal(weight.codes[still], before[still])
  assert not torch.equal(weight.codes[~still], before[~still])


def test_stochastic_rounding_is_unbiased():
  """100 updates of 0.05 of a quantisation step keep ~all of their sum."""
  torch.manual_seed(0)
  weight = Int8Weight.from_float(torch.randn(64, 256))
  delta = 0.05 * weight.scale.repeat_interleave(256).reshape(64, 256)
  start = weight.dequantize()
  for t in range(100):
    apply_int8_update(weight, delta, seed=3, step=t, tensor_id=0)
  kept = ((weight.dequantize() - start).sum() / (100 * delta).sum()).item()
  assert 0.9 <= kept <= 1.1, kept
  w = start
  for _ in range(100):
    w = dequantize(quantize(w + delta, 8, 256), (64, 256), 8, 256)
  assert abs(((w - start).sum() / (100 * delta).sum()).item()) < 0.05


def test_stochastic_round_matches_definition():
  w = torch.randn(5, 77) * 3
  q = stochastic_round(w, seed=1, step=2, tensor_id=3, group_size=64)
  rtn = quantize(w, 8, 64)
  torch.testing.assert_close(q.scale, rtn.scale, rtol=0, atol=0)
  torch.testing.assert_close(q.zero, rtn.zero, rtol=0, atol=0)
  u = torch.tensor([(py_hash(1, 2, 3, i) >> 8) / 2**24 for i in range(w.numel())])
  group = torch.arange(w.numel()) // 64
  s, z = rtn.scale[group], rtn.zero[group]
  expected = torch.clamp(torch.floor(w.reshape(-1) / s + u) + z, 0, 255).to(torch.uint8)
  assert torch.equal(q.codes, expected)
  packed = stochastic_round(w, seed=1, step=2, tensor_id=3, bits=4, group_size=64)
  assert packed.codes.numel() == (w.numel() + 1) // 2


def test_int8_linear_forward_backward_match_float_linear():
  torch.manual_seed(1)
  linear = nn.Linear(300, 20)
  layer = Int8Linear.from_linear(linear)
  assert layer.bias is linear.bias
  w = layer.dequantize()
  assert w.shape == (20, 300) and w.dtype == torch.float32
  assert (w - linear.weight).abs().max() <= layer.weight.scale.max() / 2 + 1e-6
  x = torch.randn(3, 7, 300, requires_grad=True)
  y = layer(x)
  torch.testing.assert_close(y, F.linear(x, w, linear.bias), rtol=0, atol=0)
  y.square().sum().backward()
  w_ref = w.clone().requires_grad_(True)
  x_ref = x.detach().clone().requires_grad_(True)
  bias_ref = linear.bias.detach().clone().requires_grad_(True)
  F.linear(x_ref, w_ref, bias_ref).square().sum().backward()
  assert type(layer.weight.grad) is torch.Tensor
  torch.testing.assert_close(layer.weight.grad, w_ref.grad)
  torch.testing.assert_close(x.grad, x_ref.grad)
  torch.testing.assert_close(layer.bias.grad, bias_ref.grad)
  y16 = layer(torch.randn(2, 300, dtype=torch.bfloat16))
  assert y16.dtype == torch.bfloat16


CUDA = pytest.param(
  "cuda",
  marks=[
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
  ],
)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_under_autocast_matches_nn_linear(dtype, input_dtype, device):
  """``Trainer(bf16=True)``: autocast around float32 (or bf16) activations, CPU and CUDA."""
  torch.manual_seed(2)
  linear = nn.Linear(64, 16, device=device)
  layer = Int8Linear.from_linear(linear)
  reference = nn.Linear(64, 16, device=device)
  with torch.no_grad():
    reference.weight.copy_(layer.dequantize())
    reference.bias.copy_(linear.bias)
  x = torch.randn(4, 64, device=device).to(input_dtype)
  x_ref = x.clone().requires_grad_(True)
  x = x.requires_grad_(True)
  with torch.autocast(device, dtype=dtype):
    y, y_ref = layer(x), reference(x_ref)
  assert y.dtype == y_ref.dtype == dtype
  torch.testing.assert_close(y, y_ref)
  y.float().square().sum().backward()
  y_ref.float().square().sum().backward()
  assert layer.weight.grad.dtype == torch.float32 and x.grad.dtype == input_dtype
  torch.testing.assert_close(layer.weight.grad, reference.weight.grad)
  torch.testing.assert_close(x.grad, x_ref.grad)
  torch.testing.assert_close(layer.bias.grad, reference.bias.grad)


def test_memory_and_weight_behaviour():
  layer = Int8Linear.from_linear(nn.Linear(512, 1376))  # LLaMA-60M down projection
  stored = sum(t.numel() * t.element_size() for t in layer.weight.quantized())
  assert stored / layer.weight.numel() == pytest.approx(1 + 8 / 256)
  assert layer.weight.codes.dtype == torch.uint8
  # A Parameter (found by .parameters() and the optimizer) that stores no float copy.
  assert isinstance(layer.weight, nn.Parameter) and isinstance(layer.weight, Int8Weight)
  assert [name for name, _ in layer.named_parameters()] == ["weight", "bias"]
  with pytest.raises(TypeError, match="in place"):
    with torch.no_grad():
      layer.weight.add_(1.0)
  with pytest.raises(ValueError, match="shape"):
    apply_int8_update(layer.weight, torch.zeros(3, 3), seed=0, step=0, tensor_id=0)
  with pytest.raises(ValueError, match="2-D"):
    Int8Weight.from_float(torch.zeros(4))
  # Other operations see the dequantised weight; dtype casts keep the INT8 storage.
  torch.testing.assert_close(layer.weight.sum(), layer.dequantize().sum())
  layer.to(torch.float64)
  assert isinstance(layer.weight, Int8Weight) and layer.weight.codes.dtype == torch.uint8
  assert "Int8Weight(shape=(1376, 512)" in repr(layer.weight)


def test_quantize_linears_llama_projections():
  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      self.self_attn = nn.ModuleDict({n: nn.Linear(8, 8, bias=False) for n in ("q_proj", "o_proj")})
      self.mlp = nn.ModuleDict({n: nn.Linear(8, 8, bias=False) for n in ("up_proj", "down_proj")})
      self.norm = nn.LayerNorm(8)

  model = nn.ModuleDict(
    {"embed": nn.Embedding(10, 8), "layer": Block(), "lm_head": nn.Linear(8, 10)}
  )
  is_projection = lambda name: name.rsplit(".", 1)[-1].endswith("_proj")
  names = quantize_linears(model, is_projection, group_size=16)
  assert names == [
    "layer.self_attn.q_proj",
    "layer.self_attn.o_proj",
    "layer.mlp.up_proj",
    "layer.mlp.down_proj",
  ]
  assert isinstance(model["layer"].mlp["down_proj"], Int8Linear)
  assert type(model["lm_head"]) is nn.Linear
  assert model["layer"].self_attn["q_proj"].weight.group_size == 16


def _model():
  torch.manual_seed(2)
  model = nn.Sequential(
    nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4)
  )
  quantize_linears(model, lambda name: name in ("0", "2"))
  return model


def _optimizer(model):
  matrices = [model[0].weight, model[2].weight]
  others = [model[0].bias, model[2].bias, model[4].weight, model[4].bias]
  groups = [{"params": matrices[:1], "rank": 4, "update_proj_gap": 10}, {"params": matrices[1:]}]
  return QGaLoreAdamW([*groups, {"params": others}], lr=1e-2, seed=5)


def _data():
  g = torch.Generator().manual_seed(3)
  x = torch.randn(128, 16, generator=g)
  return x, torch.sin(x @ torch.randn(16, 4, generator=g))


def _train(model, opt, steps):
  x, y = _data()
  losses = []
  for _ in range(steps):
    loss = F.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
  return losses


def test_training_with_int8_layers_reduces_loss():
  model = _model()
  losses = _train(model, _optimizer(model), 80)
  assert losses[-1] < 0.5 * losses[0]


def test_optimizer_writes_int8_weight_with_its_key():
  """One step equals apply_int8_update of the AdamW update, keyed (seed, 0, tensor id)."""
  model = _model()
  opt = _optimizer(model)
  x, y = _data()
  F.mse_loss(model(x), y).backward()
  weight = model[2].weight  # group 1, the second parameter overall: tensor id 1
  grad = weight.grad.clone()
  expected = Int8Weight(*(t.clone() for t in weight.quantized()), (64, 64), 256)
  opt.step()
  zeros = torch.zeros_like(grad)
  u = adam_direction(grad, zeros, zeros.clone(), torch.tensor(1.0), 0.9, 0.999, 1e-8)
  apply_int8_update(expected, u * -1e-2, seed=5, step=0, tensor_id=1)
  assert torch.equal(weight.codes, expected.codes)
  assert torch.equal(weight.scale, expected.scale)


def test_layerwise_hooks_match_step():
  model_a, model_b = _model(), _model()
  _train(model_a, _optimizer(model_a), 3)
  opt_b = _optimizer(model_b)
  opt_b.register_layerwise_hooks()
  x, y = _data()
  for _ in range(3):
    F.mse_loss(model_b(x), y).backward()
  for a, b in zip(model_a.parameters(), model_b.parameters()):
    if isinstance(a, Int8Weight):
      assert torch.equal(a.codes, b.codes)
    else:
      torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_state_dict_round_trip_resumes_identically():
  model = _model()
  opt = _optimizer(model)
  _train(model, opt, 12)
  buffer = io.BytesIO()
  torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
  assert "0.weight_codes" in model.state_dict() and "0.weight" not in model.state_dict()
  buffer.seek(0)
  saved = torch.load(buffer, weights_only=True)
  resumed = _model()
  resumed.load_state_dict(saved["model"])
  resumed_opt = _optimizer(resumed)
  resumed_opt.load_state_dict(saved["opt"])
  assert _train(model, opt, 5) == _train(resumed, resumed_opt, 5)
  assert torch.equal(model[2].weight.codes, resumed[2].weight.codes)
  with pytest.raises(RuntimeError, match="weight_scale"):
    resumed.load_state_dict({k: v for k, v in saved["model"].items() if k != "2.weight_scale"})


def test_dequantize_linears_exports_plain_linear_weights(tmp_path):
  """After training with INT8 layers, the exported float model computes the same outputs."""
  model = _model()
  _train(model, _optimizer(model), 5)
  x, _ = _data()
  want = model(x)
  shapes = {0: (64, 16), 2: (64, 64)}
  expected = {i: dequantize(model[i].weight.quantized(), shape, 8) for i, shape in shapes.items()}
  bias = model[0].bias
  assert dequantize_linears(model) == ["0", "2"]
  assert all(type(model[i]) is nn.Linear for i in (0, 2, 4)) and model[0].bias is bias
  for i, weight in expected.items():
    assert type(model[i].weight) is nn.Parameter and torch.equal(model[i].weight, weight)
  torch.testing.assert_close(model(x), want, rtol=0, atol=0)
  torch.save(model.state_dict(), tmp_path / "model.pt")
  fresh = nn.Sequential(
    nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4)
  )
  fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True), strict=True)
  torch.testing.assert_close(fresh(x), want, rtol=0, atol=0)


def test_dequantize_linears_dtype_predicate_and_bad_input():
  model = _model()
  assert dequantize_linears(model, lambda name: name == "2", dtype=torch.bfloat16) == ["2"]
  assert isinstance(model[0], Int8Linear) and model[2].weight.dtype == torch.bfloat16
  with pytest.raises(TypeError, match="dtype"):
    dequantize_linears(model, dtype=torch.int8)
  with pytest.raises(TypeError, match="Int8Linear"):
    dequantize_linears(model[0])


def test_hugging_face_round_trip_after_int8_training(tmp_path):
  """A LLaMA trained with INT8 projections saves and loads with save/from_pretrained.

  Without the export, ``from_pretrained`` re-initialises the 7 projections of every layer
  (their keys are ``weight_codes``, ``weight_scale``, ``weight_zero``).
  """
  transformers = pytest.importorskip("transformers")
  config = transformers.LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=32,
  )
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config)
  names = quantize_linears(model, lambda name: name.endswith("_proj"))
  assert len(names) == 7 * 2
  projections = [p for n, p in model.named_parameters() if "_proj" in n]
  others = [p for n, p in model.named_parameters() if "_proj" not in n]
  opt = QGaLoreAdamW([{"params": projections, "rank": 4}, {"params": others}], lr=1e-3)
  tokens = torch.randint(64, (2, 16), generator=torch.Generator().manual_seed(1))
  for _ in range(3):
    model(tokens, labels=tokens).loss.backward()
    opt.step()
    opt.zero_grad()
  model.eval()
  with torch.no_grad():
    want = model(tokens).logits
  assert dequantize_linears(model) == names
  model.save_pretrained(tmp_path)
  loaded, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  with torch.no_grad():
    torch.testing.assert_close(loaded.eval()(tokens).logits, want)

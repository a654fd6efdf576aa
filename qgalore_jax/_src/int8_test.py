"""Tests of INT8 weights against NumPy references (the generator has its own tests)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qgalore_jax import QuantizedWeight
from qgalore_jax import apply_updates
from qgalore_jax import dequantize
from qgalore_jax import dequantize_params
from qgalore_jax import int8_train_step
from qgalore_jax import is_quantized
from qgalore_jax import qgalore_adamw
from qgalore_jax import quantize
from qgalore_jax import quantize_params
from qgalore_jax import skipped_steps
from qgalore_jax._src.generator_test import py_uniforms


def naive_sr(w, u, bits, group_size):
  """docs/spec.md section 6 in float32 NumPy, one group at a time."""
  levels = np.float32(2**bits - 1)
  flat = np.asarray(w, np.float32).reshape(-1)
  codes, scales, zeros = [], [], []
  for start in range(0, flat.size, group_size):
    g = flat[start : start + group_size]
    s = np.float32(max(np.float32(g.max() - g.min()), np.float32(1e-5))) / levels
    z = np.round(-g.min() / s)
    q = np.clip(np.floor(g / s + u[start : start + group_size]) + z, 0, levels)
    codes.append(q.astype(np.uint8))
    scales.append(s)
    zeros.append(z)
  return np.concatenate(codes), np.array(scales, np.float32), np.array(zeros, np.float32)


def naive_dequantize(codes, scales, zeros, group_size):
  g = np.arange(codes.size) // group_size
  return (scales[g] * (codes.astype(np.float32) - zeros[g])).astype(np.float32)


@pytest.mark.parametrize("input_axis", [0, 1])
def test_apply_updates_matches_naive_reference(input_axis):
  rng = np.random.default_rng(0)
  leaf = rng.normal(size=(40, 24)).astype(np.float32)  # 960 elements: a partial last group
  update = (rng.normal(size=leaf.shape) * 0.01).astype(np.float32)
  qparams = quantize_params({"w": jnp.asarray(leaf), "b": jnp.ones(3)}, input_axis=input_axis)
  step = jax.jit(functools.partial(apply_updates, seed=7, step=3))
  new = step(qparams, {"w": jnp.asarray(update), "b": jnp.ones(3)})
  to_mxn = (lambda x: x.T) if input_axis == 0 else (lambda x: x)
  q = qparams["w"]
  g = np.arange(leaf.size) // 256
  scale, zero = np.asarray(q.scale)[g], np.asarray(q.zero)[g]
  update_mxn = to_mxn(update).reshape(-1)
  # w + update, written as s * ((q - z) + update / s) (see int8._add_update).
  w_new = scale * ((np.asarray(q.codes, np.float32) - zero) + update_mxn / scale)
  w = naive_dequantize(np.asarray(q.codes), np.asarray(q.scale), np.asarray(q.zero), 256)
  np.testing.assert_allclose(w_new, w + update_mxn, atol=1e-6)
  tensor_id = 1  # leaves in order: "b" (0), "w" (1)
  codes, scales, zeros = naive_sr(w_new, py_uniforms(7, 3, tensor_id, leaf.size), 8, 256)
  np.testing.assert_array_equal(np.asarray(new["w"].codes), codes)
  np.testing.assert_array_equal(np.asarray(new["w"].scale), scales)
  np.testing.assert_array_equal(np.asarray(new["w"].zero), zeros)
  np.testing.assert_array_equal(np.asarray(new["b"]), np.full(3, 2.0, np.float32))
  assert new["w"].shape == leaf.shape and new["w"].input_axis == input_axis


@pytest.mark.parametrize("bits", [8, 4])
def test_zero_updates_leave_codes_bit_identical(bits):
  """50 all-zero updates change nothing; a partly zero update re-rounds only its other groups.

  Without the rule, re-quantising an unchanged group moved codes (about 9 of 131,072 after
  50 zero updates under optax.MultiSteps), because its dequantised range can be narrower than
  the range it was quantised from. docs/spec.md section 6.2.
  """
  rng = np.random.default_rng(3)
  leaf = rng.normal(size=(70, 30)).astype(np.float32)  # 2100 elements: a partial last group
  qparams = quantize_params({"w": jnp.asarray(leaf)}, bits=bits, group_size=64)
  step = jax.jit(lambda q, u, t: apply_updates(q, u, seed=5, step=t))
  zeros = {"w": jnp.zeros_like(leaf)}
  q = qparams
  for t in range(50):
    q = step(q, zeros, jnp.int32(t))
  for field in ("codes", "scale", "zero"):
    np.testing.assert_array_equal(np.asarray(getattr(q["w"], field)), getattr(qparams["w"], field))
  # Every third group (in the canonical (out, in) order of docs/spec.md) gets an update.
  update_mxn = (rng.normal(size=(30, 70)) * 0.01).astype(np.float32).reshape(-1)
  moving = np.arange(update_mxn.size) // 64 % 3 == 0  # every third group moves
  update_mxn = np.where(moving, update_mxn, np.float32(0))
  new = step(qparams, {"w": jnp.asarray(update_mxn.reshape(30, 70).T)}, jnp.int32(0))
  old = qparams["w"]
  codes_old = np.asarray(old.codes)
  if bits == 4:
    codes_old = np.stack([codes_old & 15, codes_old >> 4], axis=1).reshape(-1)[: leaf.size]
  g = np.arange(leaf.size) // 64
  scale, zero = np.asarray(old.scale)[g], np.asarray(old.zero)[g]
  w_new = scale * ((codes_old.astype(np.float32) - zero) + update_mxn / scale)
  codes, scales, zeros_ = naive_sr(w_new, py_uniforms(5, 0, 0, leaf.size), bits, 64)
  still = ~moving[::64]
  codes = np.where(~moving, codes_old, codes)
  scales = np.where(still, np.asarray(old.scale), scales)
  zeros_ = np.where(still, np.asarray(old.zero), zeros_)
  got = np.asarray(new["w"].codes)
  if bits == 4:
    got = np.stack([got & 15, got >> 4], axis=1).reshape(-1)[: leaf.size]
  np.testing.assert_array_equal(got, codes)
  np.testing.assert_array_equal(np.asarray(new["w"].scale), scales)
  np.testing.assert_array_equal(np.asarray(new["w"].zero), zeros_)
  assert np.any(np.asarray(new["w"].scale) != np.asarray(old.scale))  # the others did move


def test_quantize_params_layout_and_memory():
  kernel = jax.random.normal(jax.random.key(0), (512, 1376))  # LLaMA-60M up-projection
  params = {"kernel": kernel, "bias": jnp.zeros(1376), "scale3d": jnp.ones((2, 2, 2))}
  with pytest.raises(ValueError, match=r"3 or more dimensions.*\['scale3d'\] \(2, 2, 2\)"):
    quantize_params(params)  # a 3-D leaf is never silently left in float
  qparams = quantize_params(params, mask={"kernel": True, "bias": False, "scale3d": False})
  assert is_quantized(qparams["kernel"]) and not is_quantized(qparams["bias"])
  # Flax kernel (in, out) and torch weight (out, in) of one matrix give the same codes.
  torch_layout = quantize_params({"w": kernel.T}, input_axis=1)["w"]
  for a, b in zip(qparams["kernel"][:3], torch_layout[:3]):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  stored = quantize(kernel.T, bits=8, group_size=256)
  np.testing.assert_array_equal(np.asarray(qparams["kernel"].codes), np.asarray(stored.codes))
  arrays = jax.tree.leaves(qparams["kernel"])
  bytes_per_weight = sum(a.nbytes for a in arrays) / kernel.size
  assert bytes_per_weight == pytest.approx(1 + 8 / 256)
  deq = dequantize_params(qparams)
  assert deq["kernel"].shape == kernel.shape and deq["scale3d"].shape == (2, 2, 2)
  np.testing.assert_array_less(
    np.abs(np.asarray(deq["kernel"] - kernel)), np.repeat(stored.scale, 256).reshape(1376, 512).T
  )
  assert dequantize_params(qparams, jnp.bfloat16)["kernel"].dtype == jnp.bfloat16
  # Already quantised leaves pass through; masks may be callables or jnp bools.
  keep_3d = {"kernel": True, "bias": False, "scale3d": False}
  assert quantize_params(qparams, mask=keep_3d) == qparams
  nothing = jax.tree.map(lambda x: jnp.asarray(False), params)
  unchanged = quantize_params(params, mask=nothing)
  assert not any(is_quantized(x) for x in jax.tree.leaves(unchanged, is_leaf=is_quantized))
  assert is_quantized(quantize_params({"b": jnp.ones((2, 3))}, mask=lambda p: {"b": True})["b"])


def test_quantize_params_low_bits_packed():
  params = {"w": jax.random.normal(jax.random.key(1), (15, 33))}
  q4 = quantize_params(params, bits=4, group_size=64)
  assert q4["w"].codes.shape == (248,)  # 495 codes, two per byte
  new = jax.jit(functools.partial(apply_updates, seed=0, step=0))(q4, {"w": jnp.zeros((15, 33))})
  w = dequantize_params(new)["w"]
  np.testing.assert_allclose(w, params["w"], atol=float(q4["w"].scale.max()))


def test_stochastic_rounding_keeps_small_updates():
  """100 updates of 0.05 of a quantisation step: SR keeps ~all, round-to-nearest ~none."""
  w0 = jax.random.normal(jax.random.key(2), (64, 256))
  qparams = quantize_params({"w": w0}, input_axis=1)
  scale = jnp.repeat(qparams["w"].scale, 256).reshape(64, 256)
  delta = 0.05 * scale
  start = dequantize_params(qparams)["w"]

  @jax.jit
  def run(qparams):
    def body(t, q):
      return apply_updates(q, {"w": delta}, seed=1, step=t)

    return jax.lax.fori_loop(0, 100, body, qparams)

  @jax.jit
  def run_nearest(w):
    def body(t, w):
      q = quantize(w + delta, bits=8, group_size=256)
      return dequantize(q, w.shape, bits=8, group_size=256)

    return jax.lax.fori_loop(0, 100, body, w)

  expected = float(jnp.sum(100 * delta))
  kept_sr = float(jnp.sum(dequantize_params(run(qparams))["w"] - start)) / expected
  kept_nearest = float(jnp.sum(run_nearest(start) - start)) / expected
  assert 0.9 <= kept_sr <= 1.1, kept_sr
  assert abs(kept_nearest) < 0.05, kept_nearest


def test_jit_traced_seed_and_step_compile_once():
  qparams = quantize_params({"w": jnp.ones((8, 64)) * jnp.arange(64.0)})
  updates = {"w": jnp.full((8, 64), 0.3)}
  step = jax.jit(lambda q, u, s, t: apply_updates(q, u, seed=s, step=t))
  a = step(qparams, updates, jnp.int32(0), jnp.int32(0))
  b = step(qparams, updates, jnp.int32(0), jnp.int32(1))
  c = step(qparams, updates, jnp.int32(5), jnp.int32(1))
  assert step._cache_size() == 1
  assert not np.array_equal(np.asarray(a["w"].codes), np.asarray(b["w"].codes))
  assert not np.array_equal(np.asarray(b["w"].codes), np.asarray(c["w"].codes))
  again = step(qparams, updates, jnp.int32(5), jnp.int32(1))
  np.testing.assert_array_equal(np.asarray(c["w"].codes), np.asarray(again["w"].codes))


def test_bf16_updates_and_params():
  params = {"w": jax.random.normal(jax.random.key(3), (32, 16)), "b": jnp.zeros(16, jnp.bfloat16)}
  qparams = quantize_params(params)
  updates = {"w": jnp.full((32, 16), 0.01, jnp.bfloat16), "b": jnp.full(16, 0.5, jnp.bfloat16)}
  apply = jax.jit(functools.partial(apply_updates, seed=0, step=0))
  new = apply(qparams, updates)
  assert new["w"].codes.dtype == jnp.uint8 and new["w"].scale.dtype == jnp.float32
  assert new["b"].dtype == jnp.bfloat16
  reference = apply(qparams, jax.tree.map(lambda u: u.astype(jnp.float32), updates))
  np.testing.assert_array_equal(np.asarray(new["w"].codes), np.asarray(reference["w"].codes))


def test_orbax_round_trip(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  qparams = quantize_params(
    {"layer": {"kernel": jnp.arange(600.0).reshape(20, 30)}, "b": jnp.ones(2)}
  )
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "ckpt", qparams)
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, qparams)
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(tmp_path / "ckpt", target)
  assert jax.tree.structure(restored) == jax.tree.structure(qparams)
  assert isinstance(restored["layer"]["kernel"], QuantizedWeight)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(qparams)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.dtype == b.dtype


def test_errors_name_the_parameter():
  params = {"layers": [{"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)}]}
  with pytest.raises(ValueError, match=r"\['layers'\]\[0\]\['bias'\].*2-D"):
    quantize_params(params, mask={"layers": [{"kernel": True, "bias": True}]})
  with pytest.raises(ValueError, match="bits"):
    quantize_params(params, bits=9)
  with pytest.raises(ValueError, match="bits"):
    quantize_params(params, bits=0)
  with pytest.raises(TypeError, match="group_size"):
    quantize_params(params, group_size=2.5)
  with pytest.raises(ValueError, match=r"input_axis.*\['kernel'\]"):
    quantize_params(params, input_axis={"layers": [{"kernel": 2, "bias": 0}]})
  with pytest.raises(ValueError, match="mask"):
    quantize_params(params, mask={"kernel": True})
  with pytest.raises(ValueError, match=r"\['kernel'\].*int32"):
    quantize_params({"kernel": jnp.ones((4, 4), jnp.int32)}, mask={"kernel": True})
  qparams = quantize_params(params)
  bad = {"layers": [{"kernel": jnp.ones((4, 5)), "bias": jnp.ones(4)}]}
  with pytest.raises(ValueError, match=r"\['layers'\]\[0\]\['kernel'\].*\(4, 5\)"):
    apply_updates(qparams, bad, seed=0, step=0)
  with pytest.raises(ValueError, match="structure"):
    apply_updates(qparams, {"layers": []}, seed=0, step=0)


def _mlp_problem():
  k = jax.random.split(jax.random.key(4), 3)
  x = jax.random.normal(k[0], (128, 16))
  y = jnp.sin(x @ jax.random.normal(k[1], (16, 4)))
  return x, y


def _train(loss_fn, params, steps=60):
  qparams = quantize_params(params)
  tx = qgalore_adamw(3e-2, rank=4, update_proj_gap=20)
  opt_state = tx.init(dequantize_params(qparams))
  train_step = int8_train_step(loss_fn, tx, seed=0)
  losses = []
  for t in range(steps):
    qparams, opt_state, loss = train_step(qparams, opt_state, _mlp_problem(), jnp.int32(t))
    losses.append(float(loss))
  assert train_step._cache_size() == 1
  return qparams, losses


def test_int8_train_step_flax_nnx():
  from flax import nnx

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.up = nnx.Linear(16, 64, rngs=rngs)
      self.down = nnx.Linear(64, 4, rngs=rngs)

    def __call__(self, x):
      return self.down(nnx.relu(self.up(x)))

  model = MLP(nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(params, batch):
    x, y = batch
    return jnp.mean((nnx.merge(graphdef, params, rest)(x) - y) ** 2)

  qparams, losses = _train(loss_fn, params)
  assert losses[-1] < 0.5 * losses[0]
  assert is_quantized(qparams["up"]["kernel"].get_value())
  nnx.update(model, dequantize_params(qparams))
  x, y = _mlp_problem()
  assert float(jnp.mean((model(x) - y) ** 2)) < 0.5 * losses[0]


def test_int8_train_step_linen_and_plain_pytree():
  import flax.linen as nn

  model = nn.Sequential([nn.Dense(64), nn.relu, nn.Dense(4)])
  x, _ = _mlp_problem()
  params = model.init(jax.random.key(5), x)
  loss_fn = lambda p, batch: jnp.mean((model.apply(p, batch[0]) - batch[1]) ** 2)
  _, losses = _train(loss_fn, params)
  assert losses[-1] < 0.5 * losses[0]

  k = jax.random.split(jax.random.key(6), 2)
  plain = {"w1": jax.random.normal(k[0], (16, 64)) / 4, "w2": jax.random.normal(k[1], (64, 4)) / 8}
  loss_fn = lambda p, batch: jnp.mean((jnp.tanh(batch[0] @ p["w1"]) @ p["w2"] - batch[1]) ** 2)
  _, losses = _train(loss_fn, plain)
  assert losses[-1] < 0.5 * losses[0]


def test_int8_train_step_has_aux_and_optax_optimizer():
  params = {"w": jnp.zeros((16, 4))}
  loss_fn = lambda p, batch: (jnp.mean((batch[0] @ p["w"] - batch[1]) ** 2), jnp.float32(1))
  qparams = quantize_params(params)
  tx = optax.adam(1e-2)
  opt_state = tx.init(dequantize_params(qparams))
  train_step = int8_train_step(loss_fn, tx, has_aux=True)
  qparams, opt_state, _, aux = train_step(qparams, opt_state, _mlp_problem(), jnp.int32(0))
  assert float(aux) == 1.0 and is_quantized(qparams["w"])


def test_multisteps_micro_steps_leave_int8_codes_unchanged():
  """``optax.MultiSteps``: the non-final micro-steps return zero updates; codes stay put."""
  k = jax.random.split(jax.random.key(8), 2)
  params = {"w1": jax.random.normal(k[0], (16, 64)) / 4, "w2": jax.random.normal(k[1], (64, 4))}
  loss_fn = lambda p, batch: jnp.mean((jnp.tanh(batch[0] @ p["w1"]) @ p["w2"] - batch[1]) ** 2)
  qparams = quantize_params(params, group_size=64)
  tx = optax.MultiSteps(qgalore_adamw(1e-2, rank=4, update_proj_gap=20), every_k_schedule=4)
  opt_state = tx.init(dequantize_params(qparams))
  train_step = int8_train_step(loss_fn, tx, seed=0)
  snapshot = lambda q: [np.asarray(getattr(q[n], f)) for n in q for f in ("codes", "scale", "zero")]
  for t in range(8):
    before = snapshot(qparams)
    qparams, opt_state, _ = train_step(qparams, opt_state, _mlp_problem(), jnp.int32(t))
    same = all(np.array_equal(a, b) for a, b in zip(before, snapshot(qparams), strict=True))
    assert same == (t % 4 != 3), t  # only every fourth call applies an update


@pytest.mark.parametrize("guard", ["apply_if_finite", "skip_nonfinite"])
def test_apply_if_finite_skips_a_nan_step_whole_with_int8_weights(guard):
  """``optax.apply_if_finite`` around ``qgalore_adamw``: a NaN batch changes no code or state.

  The wrapper returns zero updates on a non-finite step and keeps the inner state; zero
  updates leave INT8 codes bit-identical (docs/spec.md section 6.2), so the step is skipped
  whole, and the wrapper counts it. The next finite step trains on. ``skip_nonfinite=True``
  is the same guard, built in, and skips however many steps in a row.
  """
  k = jax.random.split(jax.random.key(9), 2)
  params = {"w1": jax.random.normal(k[0], (16, 64)) / 4, "w2": jax.random.normal(k[1], (64, 4))}
  loss_fn = lambda p, batch: jnp.mean((jnp.tanh(batch[0] @ p["w1"]) @ p["w2"] - batch[1]) ** 2)
  qparams = quantize_params(params, group_size=64)
  if guard == "apply_if_finite":
    tx = optax.apply_if_finite(qgalore_adamw(1e-2, rank=4, update_proj_gap=2), 5)
  else:
    tx = qgalore_adamw(1e-2, rank=4, update_proj_gap=2, skip_nonfinite=True)
  opt_state = tx.init(dequantize_params(qparams))
  train_step = int8_train_step(loss_fn, tx, seed=0)
  x, y = _mlp_problem()
  for t in range(3):
    qparams, opt_state, _ = train_step(qparams, opt_state, (x, y), jnp.int32(t))
  leaves = lambda tree: [np.asarray(a) for a in jax.tree.leaves(tree)]
  before_q, before_state = leaves(qparams), leaves(opt_state.inner_state)
  nan_batch = (x.at[0, 0].set(jnp.nan), y)
  skips = 1 if guard == "apply_if_finite" else 7  # more than apply_if_finite's 5 above
  for t in range(3, 3 + skips):
    qparams, opt_state, loss = train_step(qparams, opt_state, nan_batch, jnp.int32(t))
  assert not np.isfinite(float(loss))
  for a, b in zip(leaves(qparams), before_q, strict=True):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(leaves(opt_state.inner_state), before_state, strict=True):
    np.testing.assert_array_equal(a, b)
  assert int(opt_state.notfinite_count) == skips and int(skipped_steps(opt_state)) == skips
  qparams, opt_state, loss = train_step(qparams, opt_state, (x, y), jnp.int32(4))
  assert np.isfinite(float(loss)) and int(opt_state.notfinite_count) == 0
  assert any(not np.array_equal(a, b) for a, b in zip(leaves(qparams), before_q, strict=True))

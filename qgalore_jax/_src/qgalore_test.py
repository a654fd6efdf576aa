"""The whole transform against a naive NumPy implementation of docs/spec.md, and its behaviour."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qgalore_jax import STATIC_ARGS
from qgalore_jax import DimensionNumbers
from qgalore_jax import QuantizedArray
from qgalore_jax import ScaleByQGaLoreState
from qgalore_jax import compute_projector
from qgalore_jax import dequantize
from qgalore_jax import projection_stats
from qgalore_jax import qgalore_adamw
from qgalore_jax import quantized_nbytes
from qgalore_jax import scale_by_qgalore
from qgalore_jax._src.generator_test import py_sketch
from qgalore_jax._src.projector_test import numpy_range_finder

# ---------------------------------------------------------------------------------------
# A deliberately naive reference: docs/spec.md sections 1-5 written out with NumPy, one matrix at a
# time, float32 like the contract, with its own SVD, quantiser and schedule.


class NaiveQGaLoreAdamW:
  def __init__(self, lr, b1, b2, eps, wd, rank, gap, scale, bits, group, cos_thr, gamma, queue):
    self.hp = dict(lr=lr, b1=b1, b2=b2, eps=eps, wd=wd, rank=rank, gap=gap, scale=scale)
    self.bits, self.group, self.cos_thr, self.gamma, self.queue = bits, group, cos_thr, gamma, queue
    self.t = 0
    self.state = {}

  def quantize_dequantize(self, rows):
    flat = rows.astype(np.float32).reshape(-1)
    out = np.empty_like(flat)
    levels = np.float32(2**self.bits - 1)
    for start in range(0, flat.size, self.group):
      g = flat[start : start + self.group]
      s = np.float32(max(np.float32(g.max() - g.min()), np.float32(1e-5))) / levels
      z = np.float32(np.clip(np.round(-g.min() / s), 0, levels))
      q = np.clip(np.round(g / s) + z, 0, levels).astype(np.float32)
      out[start : start + self.group] = s * (q - z)
    return out.reshape(rows.shape)

  def basis(self, g):
    m, n = g.shape
    r = min(self.hp["rank"], m, n)
    u, _, vt = np.linalg.svd(g.astype(np.float32), full_matrices=False)
    rows = vt[:r] if m >= n else u[:, :r].T
    for i in range(r):
      if rows[i, np.argmax(np.abs(rows[i]))] < 0:
        rows[i] = -rows[i]
    return rows

  def step_matrix(self, name, w, g):
    """One update of canonical matrix ``w`` (out, in) with gradient ``g``; returns new w."""
    hp = self.hp
    m, n = g.shape
    st = self.state.setdefault(name, dict(gap=hp["gap"], queue=[], top=None, svd=0, m=0, v=0))
    if self.t % st["gap"] == 0 or st["svd"] == 0:
      rows = self.basis(g)
      if st["top"] is not None:
        c = float(rows[0] @ st["top"] / (np.linalg.norm(rows[0]) * np.linalg.norm(st["top"])))
        st["queue"] = (st["queue"] + [c])[-self.queue :]
        if len(st["queue"]) == self.queue and np.mean(st["queue"]) >= self.cos_thr:
          st["gap"] = int(st["gap"] * self.gamma)
      st["top"], st["svd"] = rows[0].copy(), st["svd"] + 1
      st["p"] = rows if self.bits is None else self.quantize_dequantize(rows)
    p = st["p"]
    r = g @ p.T if m >= n else p @ g
    direction = self.adam(st, r)
    direction = hp["scale"] * (direction @ p if m >= n else p.T @ direction)
    return w - hp["lr"] * (direction + hp["wd"] * w)

  def adam(self, st, g):
    hp, t = self.hp, self.t + 1
    st["m"] = hp["b1"] * st["m"] + (1 - hp["b1"]) * g
    st["v"] = hp["b2"] * st["v"] + (1 - hp["b2"]) * g * g
    m_hat = st["m"] / (1 - hp["b1"] ** t)
    v_hat = st["v"] / (1 - hp["b2"] ** t)
    return m_hat / (np.sqrt(v_hat) + hp["eps"])

  def step_vector(self, name, w, g):
    st = self.state.setdefault(name, dict(m=0, v=0))
    return w - self.hp["lr"] * (self.adam(st, g) + self.hp["wd"] * w)


def well_conditioned(m, n, rng):
  u, _ = np.linalg.qr(rng.normal(size=(m, m)))
  v, _ = np.linalg.qr(rng.normal(size=(n, n)))
  k = min(m, n)
  return ((u[:, :k] * np.linspace(3.0, 0.5, k)) @ v[:, :k].T).astype(np.float32)


# name: (leaf shape, input axis); the canonical matrix is the leaf read through its axis.
LEAVES = {
  "tall_kernel": ((8, 24), 0),  # Flax kernel (in, out): canonical (24, 8), "right"
  "wide_kernel": ((24, 8), 0),  # canonical (8, 24), "left"
  "square_out_in": ((16, 16), 1),
  "clamped_out_in": ((2, 10), 1),  # rank 4 > 2: clamped
  "bias": ((10,), None),
}


@pytest.mark.parametrize("proj_bits", [4, None])
def test_matches_naive_numpy_reference(proj_bits):
  hp = dict(lr=0.05, b1=0.9, b2=0.99, eps=1e-8, wd=0.1)
  galore = dict(rank=4, gap=3, scale=0.25, bits=proj_bits, group=16, cos_thr=0.1, gamma=2, queue=2)
  rng = np.random.default_rng(0)
  params = {k: rng.normal(size=s).astype(np.float32) for k, (s, _) in LEAVES.items()}
  axes = {k: (a if a is not None else 0) for k, (_, a) in LEAVES.items()}
  tx = qgalore_adamw(
    hp["lr"], hp["b1"], hp["b2"], hp["eps"], hp["wd"], rank=4, update_proj_gap=3,
    scale=0.25, proj_bits=proj_bits, proj_group_size=16, cos_threshold=0.1, gamma_proj=2,
    queue_size=2, input_axis=axes,
  )  # fmt: skip
  naive = NaiveQGaLoreAdamW(**hp, **galore)
  ours = jax.tree.map(jnp.asarray, params)
  state = tx.init(ours)
  update = jax.jit(tx.update)
  ref = {k: (v.T if axes[k] == 0 and v.ndim == 2 else v).copy() for k, v in params.items()}
  # A slowly drifting subspace: refreshes at 0, 3, 6, ... with cosines that vary.
  base = {k: well_conditioned(*ref[k].shape, rng) for k in ref if ref[k].ndim == 2}
  for _ in range(16):
    grads_canonical = {
      k: base[k] + 0.3 * well_conditioned(*base[k].shape, rng) if k in base else
      rng.normal(size=ref[k].shape).astype(np.float32)
      for k in ref
    }  # fmt: skip
    for k, g in grads_canonical.items():
      ref[k] = naive.step_matrix(k, ref[k], g) if g.ndim == 2 else naive.step_vector(k, ref[k], g)
    naive.t += 1
    grads = {
      k: jnp.asarray(g.T if axes[k] == 0 and g.ndim == 2 else g) for k, g in grads_canonical.items()
    }
    updates, state = update(grads, state, ours)
    ours = optax.apply_updates(ours, updates)
  stats = projection_stats(state)
  for k in base:
    assert int(stats[k]["svd_count"]) == naive.state[k]["svd"], k
    assert int(stats[k]["gap"]) == naive.state[k]["gap"], k
  assert any(naive.state[k]["gap"] > 3 for k in base)  # adaptive growth was exercised
  for k, v in ref.items():
    got = np.asarray(ours[k])
    got = got.T if axes[k] == 0 and got.ndim == 2 else got
    np.testing.assert_allclose(got, v, rtol=0, atol=2e-5 * max(1.0, np.abs(v).max()), err_msg=k)


# ---------------------------------------------------------------------------------------
# Behaviour.


def small_params(dtype=jnp.float32):
  k = jax.random.split(jax.random.key(0), 3)
  return {
    "dense": {"kernel": jax.random.normal(k[0], (12, 20), dtype), "bias": jnp.zeros(20, dtype)},
    "out": {"kernel": jax.random.normal(k[1], (20, 6), dtype)},
  }


def random_grads(params, seed):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten(
    [jax.random.normal(k, p.shape, p.dtype) for k, p in zip(keys, leaves, strict=True)]
  )


def test_no_recompilation_and_stable_state():
  params = small_params()
  tx = qgalore_adamw(1e-2, rank=4, update_proj_gap=2)
  state = tx.init(params)
  update = jax.jit(tx.update)
  shapes = jax.tree.map(lambda x: (x.shape, x.dtype), state)
  for step in range(5):  # refresh and non-refresh steps
    _, state = update(random_grads(params, step), state, params)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == shapes
  assert update._cache_size() == 1


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtypes(dtype):
  cast = lambda tree, d: jax.tree.map(lambda x: x.astype(d), tree)
  params = cast(small_params(), dtype)
  grads = cast(random_grads(small_params(), 0), dtype)
  tx = qgalore_adamw(1e-2, rank=4)
  state = tx.init(params)
  updates, new_state = jax.jit(tx.update)(grads, state, params)
  assert all(u.dtype == dtype for u in jax.tree.leaves(updates))
  assert jax.tree.map(lambda x: x.dtype, new_state) == jax.tree.map(lambda x: x.dtype, state)
  # The same (bf16-representable) inputs in float32 give the same update to bf16 rounding.
  f32_params, f32_grads = cast(params, jnp.float32), cast(grads, jnp.float32)
  ref, _ = tx.update(f32_grads, tx.init(f32_params), f32_params)
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(ref), strict=True):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b), rtol=1e-2, atol=1e-5)


def test_projector_bytes_4096_rank_1024():
  """0.5 byte per element plus 8 bytes per group of 256, read from the real state."""
  params = {"w": jax.ShapeDtypeStruct((4096, 4096), jnp.float32)}
  state = jax.eval_shape(scale_by_qgalore(rank=1024).init, params)
  stored = QuantizedArray(*(tree["w"] for tree in state.projector))
  nbytes = quantized_nbytes(stored)
  assert stored.codes.dtype == jnp.uint8
  assert nbytes == 1024 * 4096 // 2 + 1024 * 4096 // 256 * 8 == 2_228_224
  float_state = jax.eval_shape(scale_by_qgalore(rank=1024, proj_bits=None).init, params)
  assert float_state.projector["w"].size * 4 == 16_777_216


def test_nan_gradient_keeps_projector():
  params = {"w": jnp.ones((8, 6))}
  tx = scale_by_qgalore(rank=2, update_proj_gap=2)
  update = jax.jit(tx.update)
  nan = {"w": jnp.full((8, 6), jnp.nan)}
  # No projector yet: a NaN refresh is skipped and retried on the next step.
  _, state = update(nan, tx.init(params), params)
  assert int(projection_stats(state)["w"]["svd_count"]) == 0
  _, state = update(random_grads(params, 1), state, params)
  assert int(projection_stats(state)["w"]["svd_count"]) == 1
  before = jax.tree.map(np.asarray, (state.projector, state.subspace))
  _, state = update(nan, state, params)  # step 2 is a refresh step
  after = jax.tree.map(np.asarray, (state.projector, state.subspace))
  jax.tree.map(np.testing.assert_array_equal, after, before)
  inf = {"w": jnp.full((8, 6), jnp.inf)}
  _, state = update(inf, state._replace(count=jnp.asarray(4)), params)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.projector), before[0])


def train_steps(tx, loss_fn, params, steps):
  """``steps`` jitted steps of ``tx`` on ``loss_fn(params)``: (params, state, losses)."""
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for _ in range(steps):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  return params, state, losses


def train(tx, loss_fn, params, steps):
  """The final loss after :func:`train_steps`."""
  return float(loss_fn(train_steps(tx, loss_fn, params, steps)[0]))


def test_converges_on_quadratic():
  target = jax.random.normal(jax.random.key(1), (16, 24))
  loss_fn = lambda p: jnp.mean((p["w"] - target) ** 2)
  params = {"w": jnp.zeros((16, 24))}
  start = float(loss_fn(params))
  ours = train(qgalore_adamw(0.05, rank=8, update_proj_gap=10, scale=1.0), loss_fn, params, 400)
  adamw = train(optax.adamw(0.05, weight_decay=0.0), loss_fn, params, 400)
  assert ours < 1e-4 * start  # a rank-16 target reached through rank-8 subspaces
  assert adamw < 1e-4 * start


def test_converges_on_mlp_like_adamw():
  kx, k1, k2 = jax.random.split(jax.random.key(2), 3)
  x = jax.random.normal(kx, (256, 16))
  y = jnp.sin(x @ jax.random.normal(k1, (16, 1)))
  params = {
    "w1": jax.random.normal(k2, (16, 64)) / 4,
    "b1": jnp.zeros(64),
    "w2": jnp.zeros((64, 1)),
  }

  def loss_fn(p):
    return jnp.mean((jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] - y) ** 2)

  start = float(loss_fn(params))
  ours = train(qgalore_adamw(1e-2, rank=8, update_proj_gap=20), loss_fn, params, 300)
  adamw = train(optax.adamw(1e-2, weight_decay=0.0), loss_fn, params, 300)
  assert ours < 0.2 * start
  assert ours < 3 * adamw


def test_inject_hyperparams_learning_rate():
  params = small_params()
  grads = random_grads(params, 0)
  inject = optax.inject_hyperparams(qgalore_adamw, static_args=STATIC_ARGS)
  tx = inject(learning_rate=0.1, rank=4)
  state = tx.init(params)
  update = jax.jit(tx.update)
  big, _ = update(grads, state, params)
  state.hyperparams["learning_rate"] = jnp.asarray(0.01)
  small, _ = update(grads, state, params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b / 10, rtol=1e-6), small, big)
  # inject_hyperparams holds b1, b2, eps as float32 arrays, hence a float32-rounding match.
  plain = qgalore_adamw(0.01, rank=4)
  ref, _ = plain.update(grads, plain.init(params), params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-8), small, ref)
  assert projection_stats(state)["out"]["kernel"] is not None
  with pytest.raises(TypeError, match=r"static_args=qgalore_jax\.STATIC_ARGS"):
    optax.inject_hyperparams(qgalore_adamw)(learning_rate=0.1).init(params)


def test_schedule_learning_rate():
  params = small_params()
  tx = qgalore_adamw(optax.linear_schedule(1.0, 0.0, 1), rank=4)
  state = tx.init(params)
  _, state = tx.update(random_grads(params, 0), state, params)
  updates, _ = tx.update(random_grads(params, 1), state, params)  # lr is 0 at step 1
  assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates))


def test_mask_and_stats_structure():
  params = small_params()
  mask = {"dense": {"kernel": False, "bias": False}, "out": {"kernel": True}}
  tx = qgalore_adamw(1e-2, rank=4, mask=mask)
  state = tx.init(params)
  _, state = tx.update(random_grads(params, 0), state, params)
  stats = projection_stats(state)
  assert stats["dense"] == {"kernel": None, "bias": None}
  assert int(stats["out"]["kernel"]["svd_count"]) == 1
  assert int(stats["out"]["kernel"]["gap"]) == 200
  callable_mask = qgalore_adamw(1e-2, rank=4, mask=lambda p: jax.tree.map(lambda _: False, p))
  stats = projection_stats(callable_mask.init(params))
  assert jax.tree.leaves(stats, is_leaf=lambda x: x is None) == [None, None, None]
  with pytest.raises(ValueError, match="found 0"):
    projection_stats(optax.adamw(1e-2).init(params))


def test_stored_forms_are_arrays_only():
  state = qgalore_adamw(1e-2, rank=4).init(small_params())
  leaves = jax.tree.leaves(state)
  assert leaves and all(isinstance(x, jax.Array) for x in leaves)
  found = [
    s
    for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, ScaleByQGaLoreState))
    if isinstance(s, ScaleByQGaLoreState)
  ]
  assert found[0].projector.codes["out"]["kernel"].dtype == jnp.uint8


@pytest.mark.parametrize(
  "kwargs,err,match",
  [
    ({"rank": 0}, ValueError, "rank"),
    ({"rank": 2.0}, TypeError, "rank"),
    ({"rank": True}, TypeError, "rank"),
    ({"proj_bits": 0}, ValueError, "proj_bits"),
    ({"proj_bits": 9}, ValueError, "proj_bits"),
    ({"proj_group_size": 0}, ValueError, "proj_group_size"),
    ({"gamma_proj": 0.5}, ValueError, "gamma_proj"),
    ({"queue_size": 0}, ValueError, "queue_size"),
    ({"cos_threshold": 1.5}, ValueError, "cos_threshold"),
    ({"cos_threshold": -1.01}, ValueError, "cos_threshold"),
    ({"update_proj_gap": 0}, ValueError, "update_proj_gap"),
    ({"b1": 1.0}, ValueError, "b1"),
    ({"eps": -1.0}, ValueError, "eps"),
    ({"weight_decay": -0.1}, ValueError, "weight_decay"),
    ({"svd_method": "lanczos"}, ValueError, "svd_method.*'full', 'randomized', 'subspace'"),
    ({"svd_method": None}, ValueError, "svd_method"),
    ({"oversample": -1}, ValueError, "oversample"),
    ({"oversample": 1.5}, TypeError, "oversample"),
    ({"power_iters": -1}, ValueError, "power_iters"),
    ({"subspace_iters": 0}, ValueError, "subspace_iters"),
    ({"seed": -1}, ValueError, "seed"),
  ],
)
def test_bad_hyperparameters(kwargs, err, match):
  with pytest.raises(err, match=match):
    qgalore_adamw(1e-3, **kwargs)


def test_bad_masks_and_axes_name_the_parameter():
  params = small_params()
  bad_leaf = {"dense": {"kernel": True, "bias": True}, "out": {"kernel": True}}
  with pytest.raises(ValueError, match=r"\['dense'\]\['bias'\].*2-D"):
    qgalore_adamw(1e-3, mask=bad_leaf).init(params)
  with pytest.raises(ValueError, match="structure"):
    qgalore_adamw(1e-3, mask={"dense": True}).init(params)
  with pytest.raises(ValueError, match=r"\['out'\]\['kernel'\]"):
    axes = {"dense": {"kernel": 0, "bias": 0}, "out": {"kernel": 2}}
    qgalore_adamw(1e-3, input_axis=axes).init(params)
  with pytest.raises(ValueError, match=r"\['dense'\]\['bias'\]"):
    scale_by_qgalore().init(params)


# ---------------------------------------------------------------------------------------
# Seams: an injected projector and the size of 8-bit moments.


def test_projector_fn_fixed_basis_gives_predicted_update():
  rng = np.random.default_rng(3)
  basis = np.linalg.qr(rng.normal(size=(4, 4)))[0][:2].astype(np.float32)  # (r, n) = (2, 4)
  calls = []

  def fixed_basis(grad_MxN, rank):
    calls.append((grad_MxN.shape, grad_MxN.dtype, rank))
    shape = jax.ShapeDtypeStruct(basis.shape, jnp.float32)
    return jax.pure_callback(lambda g: basis, shape, grad_MxN)

  b1, b2, eps, scale = 0.9, 0.999, 1e-8, 0.25
  tx = scale_by_qgalore(
    rank=2, update_proj_gap=100, scale=scale, proj_bits=None, input_axis=1,
    b1=b1, b2=b2, eps=eps, projector_fn=fixed_basis,
  )  # fmt: skip
  params = {"w": jnp.zeros((8, 4))}  # (out, in) = (8, 4): "right", R = G P^T
  state = tx.init(params)
  update = jax.jit(tx.update)
  mu = nu = np.zeros((8, 2), np.float64)
  for t in (1, 2):
    g = rng.normal(size=(8, 4)).astype(np.float32)
    got, state = update({"w": jnp.asarray(g)}, state)
    r = g.astype(np.float64) @ basis.T
    mu = b1 * mu + (1 - b1) * r
    nu = b2 * nu + (1 - b2) * r * r
    u = (mu / (1 - b1**t)) / (np.sqrt(nu / (1 - b2**t)) + eps)
    np.testing.assert_allclose(np.asarray(got["w"]), scale * u @ basis, rtol=1e-4, atol=1e-6)
  assert calls == [((8, 4), jnp.float32, 2)]  # traced once, in the refresh branch
  np.testing.assert_array_equal(np.asarray(state.projector["w"]), basis)


def test_projector_fn_is_validated():
  with pytest.raises(TypeError, match="projector_fn"):
    scale_by_qgalore(projector_fn="svd")
  with pytest.raises(TypeError, match="projector_fn"):
    qgalore_adamw(1e-3, projector_fn=np.eye(2))
  wrong = scale_by_qgalore(rank=2, projector_fn=lambda g, rank: jnp.ones((3, 3)))
  params = {"w": jnp.ones((8, 4))}
  with pytest.raises(ValueError, match=r"projector_fn.*\(3, 3\).*\(2, 4\)"):
    wrong.update(params, wrong.init(params))


def test_min_8bit_size_of_low_rank_moments():
  params = {"w": jnp.ones((16, 16))}  # rank 16: 16 x 16 low-rank moments, one tile
  grads = {"w": jnp.arange(256.0).reshape(16, 16)}
  small = scale_by_qgalore(rank=16, moment_bits=8, min_8bit_size=256)
  _, state = jax.jit(small.update)(grads, small.init(params))
  assert state.mu.codes["w"].dtype == jnp.uint8 and state.mu.absmax["w"].shape == (1, 1)
  assert state.nu.codes["w"].dtype == jnp.uint8
  default = scale_by_qgalore(rank=16, moment_bits=8)
  _, state = jax.jit(default.update)(grads, default.init(params))
  assert state.mu.codes["w"].dtype == jnp.float32
  assert isinstance(state.mu.absmax["w"], optax.MaskedNode)
  with pytest.raises(ValueError, match="min_8bit_size"):
    scale_by_qgalore(min_8bit_size=0)
  with pytest.raises(TypeError, match="min_8bit_size"):
    scale_by_qgalore(min_8bit_size=256.0)


NUMERIC_HYPERPARAMETERS = (
  "b1",
  "b2",
  "eps",
  "weight_decay",
  "scale",
  "cos_threshold",
  "gamma_proj",
)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", ["learning_rate", *NUMERIC_HYPERPARAMETERS])
def test_numeric_hyperparameters_must_be_finite(name, value):
  kwargs = {"learning_rate": 1e-3, name: value}
  with pytest.raises(ValueError, match=rf"`{name}` must be a finite number, got {value}"):
    qgalore_adamw(**kwargs)


def test_projector_fn_needs_the_full_method():
  with pytest.raises(ValueError, match=r"projector_fn.*svd_method='full'"):
    qgalore_adamw(1e-3, svd_method="randomized", projector_fn=compute_projector)


STACK_DN = {"a": DimensionNumbers(0, 1), "bias": None, "w": DimensionNumbers(1, 2, 0)}
LEAF_IDS = {"a": 0, "w": 2}  # each leaf's index in jax.tree.leaves order: a, bias, w


def _stack_grads(seed):
  """Full-rank gradients of a 2-D leaf, a bias and a (3, 12, 20) stack. Without a spectral
  gap, one iteration of a range finder leaves its start block visible in the result."""
  rng = np.random.default_rng(seed)
  shapes = {"a": (16, 10), "bias": (10,), "w": (3, 12, 20)}
  return {name: jnp.asarray(rng.normal(size=shape), jnp.float32) for name, shape in shapes.items()}


@functools.cache
def _subspace_update():
  """``qgalore_adamw(svd_method="subspace")`` with 8-bit projectors and its jitted update,
  compiled once for the tests below."""
  tx = qgalore_adamw(
    1e-2, rank=2, update_proj_gap=2, svd_method="subspace", oversample=3, power_iters=1,
    proj_bits=8, seed=9, dimension_numbers=STACK_DN,
  )  # fmt: skip
  return tx, jax.jit(tx.update)


def _stored_bases(state, grads):
  """Per matrix ("a", then the slices of "w"): its leaf, slice index, canonical gradient, the
  stored basis dequantised, and half its quantisation step."""
  stored = state[0].inner_states["qgalore"].inner_state.projector
  matrices = [("a", 0, grads["a"].T, lambda x: x["a"])]
  matrices += [("w", s, grads["w"][s].T, lambda x, s=s: x["w"][s]) for s in range(3)]
  rows = []
  for leaf, slice_index, g_MxN, pick in matrices:
    q = QuantizedArray(*(pick(field) for field in stored))
    basis = dequantize(q, (2, min(g_MxN.shape)), 8, 256)
    rows.append((leaf, slice_index, np.asarray(g_MxN), np.asarray(basis), float(q.scale.max()) / 2))
  return rows


def naive_refresh(g_MxN, key, previous_RxK=None):
  """docs/spec.md section 2.6 with the pure-Python sketch and the NumPy range finder, at the
  settings of :func:`_subspace_update`: rank 2, l = 2 + 3 columns, one iteration."""
  k = min(g_MxN.shape)
  start_KxL = py_sketch(*key, k * 5)[0].reshape(k, 5).astype(np.float64)
  if previous_RxK is not None:
    start_KxL[:, :2] = previous_RxK.T
  return numpy_range_finder(g_MxN.astype(np.float64), 2, start_KxL, 1)


def test_refresh_methods_key_each_slice_and_match_a_naive_refresh():
  """Each matrix's first refresh is the range finder of its own sketch: keyed by (seed, step 0,
  its leaf's index among the params' leaves, its slice index), docs/spec.md section 2.6.
  ("subspace" runs "randomized" on a first refresh, so this checks both.)"""
  tx, update = _subspace_update()
  grads = _stack_grads(1)
  params = jax.tree.map(jnp.zeros_like, grads)
  _, state = update(grads, tx.init(params), params)
  for leaf, slice_index, g_MxN, got, half_step in _stored_bases(state, grads):
    want = naive_refresh(g_MxN, (9, 0, LEAF_IDS[leaf], slice_index))
    np.testing.assert_allclose(got, want, atol=half_step + 1e-5)
    other_key = naive_refresh(g_MxN, (9, 0, LEAF_IDS[leaf], slice_index + 1))
    assert np.abs(got - other_key).max() > 0.05  # the key mattered


def test_subspace_refresh_warm_starts_from_the_stored_projector():
  tx, update = _subspace_update()
  grads = [_stack_grads(t) for t in range(3)]
  params = jax.tree.map(jnp.zeros_like, grads[0])
  state = tx.init(params)
  for g in grads[:2]:
    _, state = update(g, state, params)
  previous = _stored_bases(state, grads[2])
  _, state = update(grads[2], state, params)  # step 2: the second refresh (gap 2)
  assert int(projection_stats(state)["a"]["svd_count"]) == 2
  for (leaf, s, g_MxN, got, half_step), prev in zip(_stored_bases(state, grads[2]), previous):
    want = naive_refresh(g_MxN, (9, 2, LEAF_IDS[leaf], s), previous_RxK=prev[3])
    np.testing.assert_allclose(got, want, atol=half_step + 1e-5)
    cold = naive_refresh(g_MxN, (9, 2, LEAF_IDS[leaf], s))
    assert np.abs(got - cold).max() > 0.05  # the start mattered


def test_refresh_methods_resume_exactly_and_keep_the_projector_on_nan():
  tx, update = _subspace_update()
  params = jax.tree.map(jnp.zeros_like, _stack_grads(0))
  state = tx.init(params)
  for t in range(3):
    _, state = update(_stack_grads(t), state, params)
  saved = jax.tree.map(np.asarray, state)  # a checkpoint: plain arrays
  runs = []
  for resumed in (state, jax.tree.map(jnp.asarray, saved)):
    for t in range(3, 6):
      _, resumed = update(_stack_grads(t), resumed, params)
    runs.append(resumed)
  jax.tree.map(np.testing.assert_array_equal, *runs)
  before = runs[0][0].inner_states["qgalore"].inner_state
  nan = jax.tree.map(lambda g: jnp.full_like(g, jnp.nan), _stack_grads(0))
  _, after = update(nan, runs[0], params)  # step 6 refreshes
  after = after[0].inner_states["qgalore"].inner_state
  jax.tree.map(np.testing.assert_array_equal, after.projector, before.projector)
  jax.tree.map(np.testing.assert_array_equal, after.subspace, before.subspace)

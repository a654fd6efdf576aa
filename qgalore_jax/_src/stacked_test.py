"""Stacks of matrices and N-D kernels (docs/spec.md section 1.3).

The reference for a stack is the same matrices held as separate 2-D leaves, whose numerics
the other test files check against NumPy: a stack must compute exactly what they compute.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qgalore_jax import STATIC_ARGS
from qgalore_jax import DimensionNumbers
from qgalore_jax import apply_updates
from qgalore_jax import compute_projector
from qgalore_jax import dequantize_params
from qgalore_jax import projection_stats
from qgalore_jax import qgalore_adamw
from qgalore_jax import quantize_params
from qgalore_jax import scale_by_qgalore
from qgalore_jax._src.generator_test import py_uniforms
from qgalore_jax._src.int8_test import naive_sr

L, IN, OUT = 3, 10, 6  # a scanned (layers, in, out) kernel
EMBED, HEADS, HEAD_DIM = 12, 2, 4  # an attention kernel (embed, heads, head_dim)
STACKED_DIMS = {
  "scan": DimensionNumbers(reduction_axis=1, output_axis=2, batch_axis=0),
  "attn": DimensionNumbers(reduction_axis=0, output_axis=(1, 2)),
  "mid": DimensionNumbers(reduction_axis=2, output_axis=0, batch_axis=1),  # (out, L, in)
  "bias": None,  # (L, out): plain Adam
}


def stacked_to_separate(tree):
  """The same values as separate leaves: Flax (in, out) matrices, (out, in) ones, vectors."""
  out = {f"scan{i}": tree["scan"][i] for i in range(L)}
  out["attn"] = tree["attn"].reshape(EMBED, HEADS * HEAD_DIM)
  out |= {f"mid{i}": tree["mid"][:, i] for i in range(L)}
  out |= {f"bias{i}": tree["bias"][i] for i in range(L)}
  return out


BIASES = {"bias": np.zeros((L, 1))}


def unstack_state(tree):
  """A state field of the stacked problem (a NamedTuple of trees, or a tree), as the
  separate problem's."""
  if isinstance(tree, tuple):
    return type(tree)(*(unstack_state(field) for field in tree))
  take = lambda t, i: jax.tree.map(lambda a: a[i], t)
  out = {f"scan{i}": take(tree["scan"], i) for i in range(L)}
  out["attn"] = tree["attn"]
  out |= {f"mid{i}": take(tree["mid"], i) for i in range(L)}
  return out


SEPARATE_AXES = {k: (1 if k.startswith("mid") else 0) for k in stacked_to_separate(
  {"scan": np.zeros((L, 1)), "attn": np.zeros((EMBED, HEADS, HEAD_DIM)),
   "mid": np.zeros((1, L)), "bias": np.zeros((L, 1))}
)}  # fmt: skip


def gradients(rng, steps):
  """Per step, a gradient whose slices drift at different speeds, so their gaps diverge."""
  shapes = {"scan": (L, IN, OUT), "attn": (EMBED, HEADS, HEAD_DIM), "mid": (OUT, L, IN),
            "bias": (L, OUT)}  # fmt: skip
  base = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  drift = {"scan": np.array([0.0, 0.3, 3.0])[:, None, None], "mid": np.array([3.0, 0.0, 0.3])[
    None, :, None], "attn": 0.1, "bias": 1.0}  # fmt: skip
  for _ in range(steps):
    yield {
      k: jnp.asarray(base[k] + drift[k] * rng.normal(size=base[k].shape).astype(np.float32))
      for k in shapes
    }


@pytest.mark.parametrize(
  "kwargs",
  [dict(proj_bits=4), dict(proj_bits=None), dict(proj_bits=4, moment_bits=8, min_8bit_size=16)],
  ids=["int4", "float-projector", "8bit-moments"],
)
def test_stack_computes_what_separate_matrices_compute(kwargs):
  """Bit for bit: directions, moments, projector codes and schedules of every slice."""
  common = dict(rank=3, update_proj_gap=2, proj_group_size=8, cos_threshold=0.6, queue_size=2)
  projected = {k: v for k, v in STACKED_DIMS.items() if v is not None}
  stacked = scale_by_qgalore(dimension_numbers=projected, **common, **kwargs)
  separate_axes = {k: a for k, a in SEPARATE_AXES.items() if not k.startswith("bias")}
  separate = scale_by_qgalore(input_axis=separate_axes, **common, **kwargs)
  rng = np.random.default_rng(0)
  grads = [{k: g[k] for k in projected} for g in gradients(rng, 24)]
  unstack = lambda tree: {k: v for k, v in stacked_to_separate(tree | BIASES).items()
                          if not k.startswith("bias")}  # fmt: skip
  stacked_state, separate_state = stacked.init(grads[0]), separate.init(unstack(grads[0]))
  stacked_step, separate_step = jax.jit(stacked.update), jax.jit(separate.update)
  for g in grads:
    u, stacked_state = stacked_step(g, stacked_state)
    want, separate_state = separate_step(unstack(g), separate_state)
    jax.tree.map(np.testing.assert_array_equal, unstack(u), want)
  # Every state array of a slice equals that of the separate matrix.
  for got_tree, want_tree in zip(stacked_state[1:], separate_state[1:], strict=True):
    jax.tree.map(np.testing.assert_array_equal, unstack_state(got_tree), want_tree)
  got_stats = projection_stats(stacked_state)
  want_stats = projection_stats(separate_state)
  for field in ("gap", "svd_count", "num_cosines", "mean_cosine"):
    for name in ("scan", "mid"):
      per_slice = np.asarray(got_stats[name][field])
      assert per_slice.shape == (L,)
      want = [np.asarray(want_stats[f"{name}{i}"][field]) for i in range(L)]
      np.testing.assert_array_equal(per_slice, np.stack(want))
    np.testing.assert_array_equal(got_stats["attn"][field], want_stats["attn"][field])
  # The slices' schedules did diverge, so the equality above covers per-slice refreshes.
  assert len(set(np.asarray(got_stats["scan"]["svd_count"]).tolist())) > 1
  assert len(set(np.asarray(got_stats["mid"]["gap"]).tolist())) > 1


def test_qgalore_adamw_on_a_stack_equals_separate_matrices_to_rounding():
  """The whole optimizer, plain Adam on the stacked biases included.

  The chain's elementwise tail (weight decay, learning rate, Adam of unprojected leaves)
  is compiled per leaf shape, and XLA may contract its multiply-adds differently for a
  (L, ...) leaf than for its slices: float32 rounding, not bits, is promised there.
  """
  common = dict(rank=3, update_proj_gap=2, proj_group_size=8, cos_threshold=0.6, queue_size=2)
  stacked = qgalore_adamw(0.1, weight_decay=0.01, dimension_numbers=STACKED_DIMS, **common)
  separate = qgalore_adamw(0.1, weight_decay=0.01, input_axis=SEPARATE_AXES, **common)
  grads = list(gradients(np.random.default_rng(0), 12))
  params = jax.tree.map(lambda g: g * 0.5, grads[0])
  stacked_state, separate_state = stacked.init(params), separate.init(stacked_to_separate(params))
  for g in grads:
    u, stacked_state = jax.jit(stacked.update)(g, stacked_state, params)
    want, separate_state = jax.jit(separate.update)(
      stacked_to_separate(g), separate_state, stacked_to_separate(params)
    )
    jax.tree.map(
      functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-9),
      stacked_to_separate(u),
      want,
    )
  got = projection_stats(stacked_state)["scan"]["svd_count"]
  want = [projection_stats(separate_state)[f"scan{i}"]["svd_count"] for i in range(L)]
  np.testing.assert_array_equal(got, want)
  assert projection_stats(stacked_state)["bias"] is None


def counting_projector():
  """A ``projector_fn`` that counts the SVDs actually executed (a host callback per call)."""
  calls = []

  def projector_fn(grad_MxN, rank):
    jax.debug.callback(lambda: calls.append(1))
    return compute_projector(grad_MxN, rank)

  return projector_fn, calls


def count_svds(slices: int, steps: int) -> dict:
  """SVDs executed by a stack of ``slices`` matrices and by the same matrices as separate
  leaves over ``steps`` steps, whose subspaces wander at different speeds.

  ``python -c "from qgalore_jax._src.stacked_test import count_svds; print(count_svds(32, 2000))"``
  """
  rng = np.random.default_rng(1)
  base = rng.normal(size=(slices, 8, 6)).astype(np.float32)
  # Slice i gets noise of size 0.1 * (i % 8): some subspaces stay put, others wander.
  noise_scale = (0.1 * (np.arange(slices) % 8))[:, None, None].astype(np.float32)
  common = dict(rank=2, update_proj_gap=10, cos_threshold=0.8, queue_size=2)
  stacked_fn, stacked_calls = counting_projector()
  stacked = scale_by_qgalore(
    dimension_numbers=DimensionNumbers(1, 2, batch_axis=0), projector_fn=stacked_fn, **common
  )
  separate_fn, separate_calls = counting_projector()
  separate = scale_by_qgalore(projector_fn=separate_fn, **common)
  stacked_update, separate_update = jax.jit(stacked.update), jax.jit(separate.update)
  stacked_state = stacked.init(jnp.asarray(base))
  separate_state = separate.init(list(jnp.asarray(base)))
  noise = jax.jit(lambda t: jax.random.normal(jax.random.key(t), base.shape) * noise_scale)
  calls_per_step, due_per_step = [], []
  for t in range(steps):
    g = jnp.asarray(base) + noise(t)
    due_per_step.append(int(np.sum(t % np.asarray(stacked_state.subspace.gap) == 0)))
    before = len(stacked_calls)
    _, stacked_state = stacked_update(g, stacked_state)
    jax.effects_barrier()
    calls_per_step.append(len(stacked_calls) - before)
    _, separate_state = separate_update(list(g), separate_state)
  jax.effects_barrier()
  return {
    "stacked_svds": len(stacked_calls),
    "separate_svds": len(separate_calls),
    "stacked_svd_count": np.asarray(stacked_state.subspace.svd_count).tolist(),
    "separate_svd_count": [int(c) for c in separate_state.subspace.svd_count],
    "gaps": np.asarray(stacked_state.subspace.gap).tolist(),
    "calls_per_step": calls_per_step,
    "due_per_step": due_per_step,
    "compilations": stacked_update._cache_size(),
  }


@pytest.mark.slow
def test_svd_work_is_proportional_to_the_due_slices():
  slices, steps = 32, 400
  got = count_svds(slices, steps)
  assert got["calls_per_step"] == got["due_per_step"]  # every due slice, and no other
  assert got["stacked_svd_count"] == got["separate_svd_count"]
  assert got["stacked_svds"] == got["separate_svds"] == sum(got["stacked_svd_count"])
  assert len(set(got["gaps"])) > 1  # the schedules diverged
  assert got["calls_per_step"].count(0) > steps / 2  # most steps run no SVD at all
  assert any(0 < c < slices for c in got["calls_per_step"])  # some steps: only a few
  assert got["compilations"] == 1  # no recompilation between steps


def test_int8_stack_quantises_and_rounds_each_slice():
  rng = np.random.default_rng(2)
  kernel = rng.normal(size=(L, 40, 24)).astype(np.float32)  # 960 per slice: a partial group
  bias = rng.normal(size=(L, 24)).astype(np.float32)
  dims = {"kernel": DimensionNumbers(1, 2, batch_axis=0), "bias": None}
  qparams = quantize_params({"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)},
                            dimension_numbers=dims)  # fmt: skip
  q = qparams["kernel"]
  assert q.codes.shape == (L, 960) and q.scale.shape == (L, 4) and q.shape == kernel.shape
  assert isinstance(qparams["bias"], jax.Array)
  for i in range(L):  # each slice as its own 2-D leaf
    alone = quantize_params({"w": jnp.asarray(kernel[i])})["w"]
    for field in ("codes", "scale", "zero"):
      np.testing.assert_array_equal(getattr(q, field)[i], getattr(alone, field))
    np.testing.assert_array_equal(
      dequantize_params(qparams)["kernel"][i], dequantize_params({"w": alone})["w"]
    )
  update = (rng.normal(size=kernel.shape) * 0.01).astype(np.float32)
  step = jax.jit(functools.partial(apply_updates, seed=5, step=7))
  new = step(qparams, {"kernel": jnp.asarray(update), "bias": jnp.zeros_like(bias)})["kernel"]
  size = 40 * 24
  for i in range(L):  # leaves in order: "bias" (id 0), then one id per slice: 1, 2, 3
    g = np.arange(size) // 256
    scale, zero = np.asarray(q.scale[i])[g], np.asarray(q.zero[i])[g]
    w_new = scale * ((np.asarray(q.codes[i], np.float32) - zero) + update[i].T.reshape(-1) / scale)
    codes, scales, zeros = naive_sr(w_new, py_uniforms(5, 7, 1 + i, size), 8, 256)
    np.testing.assert_array_equal(np.asarray(new.codes[i]), codes)
    np.testing.assert_array_equal(np.asarray(new.scale[i]), scales)
    np.testing.assert_array_equal(np.asarray(new.zero[i]), zeros)
  # Given the ids of the separate leaves, a stack writes what they would write.
  separate = {f"w{i}": quantize_params({"w": jnp.asarray(kernel[i])})["w"] for i in range(L)}
  want = apply_updates(
    separate, {f"w{i}": jnp.asarray(update[i]) for i in range(L)}, seed=5, step=7,
    tensor_ids={f"w{i}": 10 * i for i in range(L)},
  )  # fmt: skip
  updates = {"kernel": jnp.asarray(update), "bias": jnp.zeros_like(bias)}
  ids = {"kernel": jnp.array([0, 10, 20]), "bias": 99}
  got = apply_updates(qparams, updates, seed=5, step=7, tensor_ids=ids)
  for i in range(L):
    np.testing.assert_array_equal(got["kernel"].codes[i], want[f"w{i}"].codes)
  with pytest.raises(ValueError, match=r"\['kernel'\] must be an int or 3 ints"):
    apply_updates(qparams, {"kernel": jnp.asarray(update), "bias": jnp.zeros_like(bias)},
                  seed=5, step=7, tensor_ids={"kernel": jnp.array([0, 1]), "bias": 9})  # fmt: skip


def test_state_and_int8_weights_resume_bit_exactly(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  rng = np.random.default_rng(3)
  grads = list(gradients(rng, 12))
  tx = qgalore_adamw(0.05, rank=3, update_proj_gap=2, dimension_numbers=STACKED_DIMS,
                     moment_bits=8, min_8bit_size=16)  # fmt: skip
  params = jax.tree.map(lambda g: g * 0.5, grads[0])
  qparams = quantize_params(params, dimension_numbers=STACKED_DIMS)

  @jax.jit
  def step(qparams, state, g, t):
    updates, state = tx.update(g, state, dequantize_params(qparams))
    return apply_updates(qparams, updates, seed=0, step=t), state

  def run(qparams, state, start, stop):
    for t in range(start, stop):
      qparams, state = step(qparams, state, grads[t], t)
    return qparams, state

  qparams, state = run(qparams, tx.init(params), 0, 5)
  want = run(qparams, state, 5, 12)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "ckpt", {"params": qparams, "opt_state": state})
    ckpt.wait_until_finished()
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": qparams, "opt_state": state})
    restored = ckpt.restore(tmp_path / "ckpt", target)
  got = run(restored["params"], restored["opt_state"], 5, 12)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_a_stack_without_dimension_numbers_is_an_error():
  params = {"layers": {"kernel": jnp.ones((4, 8, 8)), "bias": jnp.ones((4, 8))}}
  with pytest.raises(ValueError, match=r"\['layers'\]\['kernel'\] \(4, 8, 8\).*batch_axis=0"):
    qgalore_adamw(1e-3).init(params)
  with pytest.raises(ValueError, match=r"\['layers'\]\['kernel'\] \(4, 8, 8\).*leaves them in"):
    quantize_params(params)
  # Excluding it on purpose is fine, and so is saying how to read it.
  qgalore_adamw(1e-3, mask={"layers": {"kernel": False, "bias": False}}).init(params)
  dims = {"layers": {"kernel": DimensionNumbers(1, 2, 0), "bias": None}}
  state = qgalore_adamw(1e-3, rank=2, dimension_numbers=dims).init(params)
  assert projection_stats(state)["layers"]["kernel"]["gap"].shape == (4,)
  assert projection_stats(state)["layers"]["bias"] is None


def test_errors_name_the_parameter_and_the_rule():
  params = {"w": jnp.ones((4, 8, 8)), "b": jnp.ones(8)}
  dims = {"w": DimensionNumbers(1, 2, 0), "b": None}
  with pytest.raises(ValueError, match="not both"):
    qgalore_adamw(1e-3, dimension_numbers=dims, input_axis=0).init(params)
  with pytest.raises(ValueError, match=r"`mask` selects parameter \['b'\].*no dimension numbers"):
    qgalore_adamw(1e-3, dimension_numbers=dims, mask={"w": True, "b": True}).init(params)
  with pytest.raises(ValueError, match=r"every axis of parameter \['w'\]"):
    qgalore_adamw(1e-3, dimension_numbers={"w": DimensionNumbers(1, 2), "b": None}).init(params)
  with pytest.raises(ValueError, match=r"names axis 3 of parameter \['w'\]"):
    qgalore_adamw(1e-3, dimension_numbers={"w": DimensionNumbers(3, 2, 0), "b": None}).init(params)
  with pytest.raises(TypeError, match=r"\['b'\] must be a DimensionNumbers or None, got 0"):
    qgalore_adamw(1e-3, dimension_numbers={"w": DimensionNumbers(1, 2, 0), "b": 0}).init(params)
  with pytest.raises(ValueError, match=r"scale_by_qgalore projects every leaf.*\['b'\]"):
    scale_by_qgalore(dimension_numbers=dims).init(params)
  with pytest.raises(ValueError, match="structure of the params"):
    qgalore_adamw(1e-3, dimension_numbers={"w": DimensionNumbers(1, 2, 0)}).init(params)


def test_one_spec_for_every_leaf_and_a_callable():
  params = {"a": jnp.ones((2, 6, 4)), "b": jnp.ones((3, 6, 4))}
  one = DimensionNumbers(reduction_axis=1, output_axis=2, batch_axis=0)
  by_value = qgalore_adamw(1e-3, rank=2, dimension_numbers=one)
  by_callable = qgalore_adamw(1e-3, rank=2, dimension_numbers=lambda p: jax.tree.map(
    lambda _: one, p))  # fmt: skip
  grads = jax.tree.map(lambda p: p * jnp.arange(p.size).reshape(p.shape), params)
  got = by_value.update(grads, by_value.init(params), params)[0]
  want = by_callable.update(grads, by_callable.init(params), params)[0]
  jax.tree.map(np.testing.assert_array_equal, got, want)
  assert got["b"].shape == (3, 6, 4)
  # A callable must not be taken for a schedule under inject_hyperparams: it is static.
  under_inject = optax.inject_hyperparams(qgalore_adamw, static_args=STATIC_ARGS)
  state = under_inject(learning_rate=1e-3, rank=2, dimension_numbers=lambda p: one).init(params)
  assert projection_stats(state)["b"]["gap"].shape == (3,)

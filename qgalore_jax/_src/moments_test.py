"""8-bit block-wise moments against a NumPy reference of the format in docs/spec.md section 8."""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qgalore_jax import adamw_8bit
from qgalore_jax import dequantize_moment
from qgalore_jax import qgalore_adamw
from qgalore_jax import quantize_moment
from qgalore_jax import scale_by_adam_8bit
from qgalore_jax._src import moments
from qgalore_jax._src.integration_test import run_on_8_cpu_devices

# ---------------------------------------------------------------------------------------------
# An independent NumPy reference of the format, written from docs/spec.md section 8.


def ref_map(signed: bool) -> np.ndarray:
  values = {0.0, 1.0}
  for e in range(7):
    n = 2 ** (6 - e) if signed else 2 ** (7 - e)
    for j in range(n):
      d = 10.0**-e * (0.1 + 0.9 * (j + 0.5) / n)
      values |= {d, -d} if signed else {d}
  return np.sort(np.array(sorted(values), np.float32))


def ref_quantize(x: np.ndarray, signed: bool) -> tuple[np.ndarray, np.ndarray]:
  """Tile by tile, element by element: nearest map value by distance, ties to the smaller."""
  table = ref_map(signed).astype(np.float64)
  a, b = x.shape
  absmax = np.zeros((-(-a // 16), -(-b // 16)), np.float32)
  codes = np.zeros(x.shape, np.uint8)
  for ti in range(absmax.shape[0]):
    for tj in range(absmax.shape[1]):
      tile = x[ti * 16 : ti * 16 + 16, tj * 16 : tj * 16 + 16]
      absmax[ti, tj] = np.max(np.abs(tile))
  for i in range(a):
    for j in range(b):
      m = absmax[i // 16, j // 16]
      y = np.float32(x[i, j] / m) if m > 0 else np.float32(0)  # float32 IEEE division
      # Nearest by the float32 midpoints (the rule), found by scanning, not by search.
      mids = ((table[:-1] + table[1:]) / 2).astype(np.float32)
      code = int(np.sum(mids < y))
      if not signed and code == 0 and y > 0:
        code = 1
      codes[i, j] = code
  return codes, absmax


def ref_dequantize(codes, absmax, signed):
  table = ref_map(signed)
  per_element = np.repeat(np.repeat(absmax, 16, 0), 16, 1)[: codes.shape[0], : codes.shape[1]]
  return table[codes] * per_element


# ---------------------------------------------------------------------------------------------
# Maps and the quantiser.


@pytest.mark.parametrize("signed", [True, False])
def test_maps_match_the_documented_formula(signed):
  table = moments.SIGNED_MAP if signed else moments.UNSIGNED_MAP
  np.testing.assert_array_equal(table, ref_map(signed))
  assert table.dtype == np.float32 and table.size == 256


def test_maps_fixed_values():
  s, u = moments.SIGNED_MAP, moments.UNSIGNED_MAP
  assert s[127] == 0 and s[255] == 1 and s[0] == np.float32(-0.99296875)
  assert s[128] == np.float32(5.5e-7) and s[126] == np.float32(-5.5e-7)
  assert u[0] == 0 and u[255] == 1 and u[1] == np.float32(3.25e-7) and u[2] == np.float32(7.75e-7)
  assert u[254] == np.float32(0.1 + 0.9 * 127.5 / 128)


def _inputs():
  rng = np.random.default_rng(0)
  yield "normal", rng.normal(size=(64, 48)).astype(np.float32)
  yield "partial tiles", rng.normal(size=(37, 21)).astype(np.float32) * 1e-3
  yield (
    "wide range",
    (rng.normal(size=(32, 40)) * 10.0 ** rng.integers(-9, 3, (32, 40))).astype(np.float32),
  )
  zeros = rng.normal(size=(48, 32)).astype(np.float32)
  zeros[:16, :16] = 0  # a whole tile of zeros
  yield "zero tile", zeros
  # Values exactly at map points and at thresholds (ties go to the smaller value).
  table = ref_map(True)
  mids = ((table[:-1].astype(np.float64) + table[1:]) / 2).astype(np.float32)
  ties = np.concatenate([table, mids, -mids[:1]])[: 16 * 32].reshape(16, 32)
  ties[0, 0] = 1.0  # absmax 1 in the first tile
  ties[0, 16] = 1.0
  yield "ties", ties.astype(np.float32)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("case", list(dict(_inputs())))
def test_codes_match_reference(case, signed):
  x = dict(_inputs())[case]
  if not signed:
    x = np.abs(x)
  q = quantize_moment(jnp.asarray(x), signed)
  codes, absmax = ref_quantize(x, signed)
  np.testing.assert_array_equal(np.asarray(q.absmax), absmax)
  np.testing.assert_array_equal(np.asarray(q.codes), codes)
  np.testing.assert_array_equal(
    np.asarray(dequantize_moment(q, signed)), ref_dequantize(codes, absmax, signed)
  )


@pytest.mark.parametrize("signed", [True, False])
def test_codes_next_to_every_threshold_and_across_all_magnitudes(signed):
  """Each threshold, the floats either side of it, and every 4099th float32 in [0, 1]
  (both signs where signed), in tiles whose absmax is 1, so ``x / absmax`` is ``x``.
  The code is the count of the reference's thresholds strictly below the value."""
  mids = ref_map(signed).astype(np.float64)
  mids = ((mids[:-1] + mids[1:]) / 2).astype(np.float32)
  up, down = np.float32(2), np.float32(-2)
  sweep = np.arange(0, 0x3F800001, 4099, dtype=np.int64).astype(np.int32).view(np.float32)
  values = np.concatenate([mids, np.nextafter(mids, up), np.nextafter(mids, down), sweep])
  values = np.concatenate([values, -values]) if signed else np.abs(values)
  values = values[np.abs(values) <= 1]
  x = np.resize(values, (-(-values.size // 256) * 16, 16))
  x[::16, 0] = 1.0  # every tile's absmax is 1
  codes = np.asarray(quantize_moment(jnp.asarray(x), signed).codes)
  y = np.where(np.abs(x) < 2.0**-126, 0, x)  # subnormals count as zero
  want = np.searchsorted(mids, y, side="left")
  if not signed:
    want = np.where((want == 0) & (y > 0), 1, want)
  np.testing.assert_array_equal(codes, want)


@pytest.mark.parametrize("signed", [True, False])
def test_error_bound_per_tile(signed):
  x = np.random.default_rng(1).standard_t(3, size=(80, 72)).astype(np.float32)
  x = x if signed else x * x
  table = ref_map(signed)
  half_step = np.max(np.diff(table)) / 2
  x_hat = np.asarray(dequantize_moment(quantize_moment(jnp.asarray(x), signed), signed))
  absmax = np.array(
    [[np.abs(x[i : i + 16, j : j + 16]).max() for j in range(0, 72, 16)] for i in range(0, 80, 16)]
  )
  per_element = np.repeat(np.repeat(absmax, 16, 0), 16, 1)[:80, :72]
  # Half the widest step, plus float32 rounding of map[code] * absmax and of the difference.
  assert np.all(np.abs(x_hat - x) <= per_element * half_step + 2 * np.spacing(np.abs(x)))
  # Nearest value: no map value is closer than the chosen one (up to float32 rounding).
  y = x / per_element
  chosen = np.abs(table[np.asarray(quantize_moment(jnp.asarray(x), signed).codes)] - y)
  best = np.min(np.abs(table[None, :] - y.reshape(-1, 1)), axis=1).reshape(y.shape)
  if not signed:  # the zero rule may pick code 1 over 0 for tiny positive values
    best = np.where((y > 0) & (y < table[1] / 2), np.abs(table[1] - y), best)
  np.testing.assert_allclose(chosen, best, atol=1e-7)


def test_unsigned_positive_never_decodes_to_zero():
  x = np.full((16, 16), 1e-12, np.float32)
  x[0, 0] = 1.0
  q = quantize_moment(jnp.asarray(x), signed=False)
  assert int(q.codes[0, 1]) == 1 and int(q.codes[0, 0]) == 255
  signed = quantize_moment(jnp.asarray(x), signed=True)
  assert int(signed.codes[0, 1]) == moments.SIGNED_ZERO_CODE  # the first moment may round to 0


def test_transposed_layout_gives_transposed_codes():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(40, 70)).astype(np.float32))
  q, qt = quantize_moment(x, True), quantize_moment(x.T, True)
  np.testing.assert_array_equal(np.asarray(qt.codes), np.asarray(q.codes).T)
  np.testing.assert_array_equal(np.asarray(qt.absmax), np.asarray(q.absmax).T)


def test_round_trip_of_representable_values_keeps_codes():
  rng = np.random.default_rng(3)
  codes = rng.integers(0, 256, (32, 48)).astype(np.uint8)
  codes[::16, ::16] = 255  # each tile holds the value 1 * absmax, so absmax survives
  absmax = rng.uniform(0.5, 2.0, (2, 3)).astype(np.float32)
  x = dequantize_moment(moments.QuantizedMoment(jnp.asarray(codes), jnp.asarray(absmax)), True)
  q = quantize_moment(x, True)
  np.testing.assert_array_equal(np.asarray(q.absmax), absmax)
  np.testing.assert_array_equal(np.asarray(q.codes), codes)


def test_rejects_non_2d():
  with pytest.raises(ValueError, match="2-D"):
    quantize_moment(jnp.ones(300), True)


# ---------------------------------------------------------------------------------------------
# Adam with 8-bit moments.


def ref_adam_8bit(params, grads_per_step, b1, b2, eps):
  """NumPy: dequantise, float32 Adam (docs/spec.md section 5), requantise, for each step."""
  state = {k: (None, None) for k in params}
  directions = []
  for t, grads in enumerate(grads_per_step, start=1):
    out = {}
    for k, g in grads.items():
      quantised = g.ndim == 2 and g.size >= 4096
      m, v = state[k]
      if m is None:
        m, v = np.zeros_like(g), np.zeros_like(g)
      elif quantised:
        m, v = ref_dequantize(*m, True), ref_dequantize(*v, False)
      m = np.float32(1 - b1) * g + np.float32(b1) * m
      v = np.float32(1 - b2) * (g * g) + np.float32(b2) * v
      c1 = np.float32(1) / np.float32(1 - np.float32(b1) ** np.float32(t))
      c2 = np.float32(1) / np.float32(1 - np.float32(b2) ** np.float32(t))
      out[k] = (m * c1) / (np.sqrt(v * c2) + np.float32(eps))
      state[k] = (ref_quantize(m, True), ref_quantize(v, False)) if quantised else (m, v)
    directions.append(out)
  return directions, state


def test_scale_by_adam_8bit_matches_numpy_reference():
  rng = np.random.default_rng(4)
  params = {"w": np.zeros((64, 80), np.float32), "b": np.zeros(80, np.float32)}
  grads = [
    {
      "w": (rng.normal(size=(64, 80)) * 10.0 ** rng.uniform(-4, 0, (64, 80))).astype(np.float32),
      "b": rng.normal(size=80).astype(np.float32),
    }
    for _ in range(4)
  ]
  want, want_state = ref_adam_8bit(params, grads, 0.9, 0.999, 1e-8)
  tx = scale_by_adam_8bit(0.9, 0.999, 1e-8)
  update = jax.jit(tx.update)
  state = tx.init(params)
  for step, g in enumerate(grads):
    got, state = update(jax.tree.map(jnp.asarray, g), state)
    for k in g:
      # 1 - b2**t cancels: one ulp of b2**t (NumPy's pow vs XLA's) is 3e-5 of it at t = 2;
      # atol for directions near 0 (|u| is up to 1 here), where m itself cancels.
      np.testing.assert_allclose(np.asarray(got[k]), want[step][k], rtol=1e-4, atol=1e-6, err_msg=k)
  # XLA's fused `(1 - b1) g + b1 m` is not rounded op by op as NumPy's (it differs in about
  # 1 element in 10 by 1 ulp), so a moment may land on the other side of a threshold:
  # codes agree but for rare off-by-one codes, tile maxima to 1 ulp.
  for got, (want_codes, want_absmax) in [
    (state.mu, want_state["w"][0]),
    (state.nu, want_state["w"][1]),
  ]:
    diff = np.abs(np.asarray(got.codes["w"]).astype(int) - want_codes)
    assert diff.max() <= 1 and np.mean(diff) < 2e-3
    np.testing.assert_allclose(np.asarray(got.absmax["w"]), want_absmax, rtol=2.5e-7)
  np.testing.assert_allclose(np.asarray(state.mu.codes["b"]), want_state["b"][0], atol=1e-7)
  assert isinstance(state.mu.absmax["b"], optax.MaskedNode)


def test_state_bytes_per_element():
  params = {"w": jnp.zeros((256, 512))}
  state = scale_by_adam_8bit().init(params)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state.mu))
  assert nbytes / params["w"].size == 1 + 4 / 256
  qstate = qgalore_adamw(1e-3, rank=64, moment_bits=8).init(params)[0].inner_states["qgalore"]
  low_rank = qstate.inner_state.mu  # (512 out, 256 in) -> right -> moments (512, 64)
  assert low_rank.codes["w"].shape == (512, 64) and low_rank.codes["w"].dtype == jnp.uint8
  assert sum(x.nbytes for x in jax.tree.leaves(low_rank)) == 512 * 64 * (1 + 4 / 256)


@pytest.mark.slow
def test_first_step_equals_float_moments_and_later_steps_stay_close():
  rng = np.random.default_rng(5)
  params = {"w": jnp.asarray(rng.normal(size=(96, 64)), jnp.float32), "b": jnp.zeros(64)}
  grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)]
  grads += [jax.tree.map(lambda g, i=i: g + 0.1 * jnp.sin(g * (i + 2)), grads[0]) for i in range(9)]
  runs = {}
  for bits in (None, 8):
    tx = qgalore_adamw(1e-2, rank=16, moment_bits=bits, mask={"w": True, "b": False})
    state = tx.init(params)
    runs[bits] = []
    for g in grads:
      u, state = tx.update(g, state, params)
      runs[bits].append(u)
  first_float, first_8bit = runs[None][0], runs[8][0]
  jax.tree.map(np.testing.assert_array_equal, first_8bit, first_float)
  for step in range(1, 10):
    # Moments carry at most half a map step of relative error (0.7% near the absmax);
    # the direction m/sqrt(v) moves by about as much.
    np.testing.assert_allclose(runs[8][step]["w"], runs[None][step]["w"], rtol=0.05, atol=2e-4)


def test_quadratic_and_mlp_converge_like_float_moments():
  rng = np.random.default_rng(6)
  a = jnp.asarray(rng.normal(size=(128, 96)) / 10, jnp.float32)
  target = jnp.asarray(rng.normal(size=(128, 64)), jnp.float32)
  quad = lambda p: jnp.mean((a @ p["w"] - target) ** 2)
  x = jnp.asarray(rng.normal(size=(256, 32)), jnp.float32)
  y = jnp.sin(x[:, :8] * 2)
  mlp_params = {
    "w1": jnp.asarray(rng.normal(size=(32, 128)) / 6, jnp.float32),
    "w2": jnp.asarray(rng.normal(size=(128, 8)) / 11, jnp.float32),
  }
  mlp = lambda p: jnp.mean((jnp.tanh(x @ p["w1"]) @ p["w2"] - y) ** 2)
  # The least-squares floor of the quadratic (more rows than unknowns), from NumPy.
  w_star = np.linalg.lstsq(np.asarray(a), np.asarray(target), rcond=None)[0]
  quad_floor = float(quad({"w": jnp.asarray(w_star)}))
  for loss_fn, params, make, floor in [
    (
      quad,
      {"w": jnp.zeros((96, 64))},
      lambda bits: adamw_8bit(3e-2) if bits else optax.adamw(3e-2),
      quad_floor,
    ),
    (mlp, mlp_params, lambda bits: qgalore_adamw(1e-2, rank=8, moment_bits=bits), 0.0),
  ]:
    finals = {}
    for bits in (None, 8):
      tx = make(bits)

      @jax.jit
      def step(p, s, tx=tx, loss_fn=loss_fn):
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

      p, s = params, tx.init(params)
      first = None
      for _ in range(300):
        p, s, loss = step(p, s)
        first = float(loss) if first is None else first
      finals[bits] = float(loss_fn(p))
    excess = {bits: final - floor for bits, final in finals.items()}
    assert excess[8] < 0.2 * (first - floor), (first, floor, finals)
    assert excess[8] <= 1.1 * excess[None] + 1e-3, (floor, finals)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(moment_bits=4), "moment_bits"),
    (dict(moment_bits=True), "moment_bits"),
    (dict(moment_bits=8, mu_dtype=jnp.bfloat16), "mu_dtype"),
  ],
)
def test_bad_moment_bits(kwargs, match):
  with pytest.raises(ValueError, match=match):
    qgalore_adamw(1e-3, **kwargs)


def test_nnx_optimizer_and_orbax_round_trip(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  from flax import nnx

  model = nnx.Sequential(
    nnx.Linear(64, 96, rngs=nnx.Rngs(0)), jax.nn.relu, nnx.Linear(96, 64, rngs=nnx.Rngs(1))
  )
  x = jax.random.normal(jax.random.key(0), (32, 64))
  optimizer = nnx.Optimizer(model, qgalore_adamw(1e-2, rank=64, moment_bits=8), wrt=nnx.Param)
  traces = []

  @nnx.jit
  def step(model, optimizer):
    traces.append(1)
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - x) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  first = float(step(model, optimizer))
  for _ in range(20):
    last = float(step(model, optimizer))
  assert last < first and len(traces) == 1

  state = nnx.state(optimizer)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "ckpt", state)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "ckpt", jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  codes = [x for x in jax.tree.leaves(restored) if getattr(x, "dtype", None) == jnp.uint8]
  assert codes, "8-bit moment codes are in the checkpoint"


SHARDED_8BIT = textwrap.dedent(
  """
  import jax, jax.numpy as jnp, numpy as np, optax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from qgalore_jax import qgalore_adamw

  assert jax.device_count() == 8
  rng = np.random.default_rng(0)
  params = {"w1": jnp.asarray(rng.normal(size=(64, 200)) / 8, jnp.float32),
            "w2": jnp.asarray(rng.normal(size=(200, 48)) / 14, jnp.float32)}
  x = jnp.asarray(rng.normal(size=(64, 64)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(64, 48)), jnp.float32)
  # w1 projected at rank 32 (moments 200 x 32 >= 4096: 8-bit), w2 by plain 8-bit AdamW.
  tx = qgalore_adamw(1e-2, rank=32, update_proj_gap=3, moment_bits=8,
                     mask={"w1": True, "w2": False})

  def run(params, x):
    loss = lambda p: jnp.mean((jnp.tanh(x @ p["w1"]) @ p["w2"] - y) ** 2)

    @jax.jit
    def step(p, s):
      u, s = tx.update(jax.grad(loss)(p), s, p)
      return optax.apply_updates(p, u), s

    s = tx.init(params)
    for _ in range(6):
      params, s = step(params, s)
    return params, s

  want, want_state = run(params, x)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  # Shards of 25 columns and 25 rows: tiles straddle shards, so absmax must be global.
  spec = {"w1": P(None, "data"), "w2": P("data", None)}
  sharded = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), spec))
  got, got_state = run(sharded, x)
  assert got["w1"].sharding.spec == P(None, "data")
  # Sharded matmuls sum in another order, so gradients differ by an ulp and a few moment
  # codes flip; a flipped code moves its element's step by a map step. The yardstick is
  # the same run on one device with the input moved by one ulp.
  nudged, _ = run(params, x * (1 + 2**-23))
  for k in params:
    diff = float(np.max(np.abs(np.asarray(got[k]) - np.asarray(want[k]))))
    chaos = float(np.max(np.abs(np.asarray(nudged[k]) - np.asarray(want[k]))))
    print(k, "sharded vs one device", diff, "one-ulp nudge", chaos)
    assert diff <= 4 * chaos + 1e-6
  def codes(state):
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    named = [({getattr(k, "name", None) for k in path}, x) for path, x in flat]
    return [np.asarray(x) for names, x in named if names >= {"codes"} and names & {"mu", "nu"}]

  assert len(codes(want_state)) == 4 and all(c.dtype == np.uint8 for c in codes(want_state))
  for a, b in zip(codes(got_state), codes(want_state)):
    assert np.mean(a != b) < 0.02
  print("SHARDED_OK")
  """
)


@pytest.mark.slow
def test_fsdp_sharded_8bit_moments_match_one_device():
  run_on_8_cpu_devices(SHARDED_8BIT)


def test_min_8bit_size_sets_which_moments_are_quantised():
  params = {"w": jnp.ones((16, 16)), "b": jnp.ones(256)}  # one 16 x 16 tile; not 2-D
  small = scale_by_adam_8bit(min_8bit_size=256).init(params)
  assert small.mu.codes["w"].dtype == jnp.uint8 and small.mu.absmax["w"].shape == (1, 1)
  assert small.nu.codes["w"].dtype == jnp.uint8
  assert small.mu.codes["b"].dtype == jnp.float32  # 1-D moments always stay float32
  default = scale_by_adam_8bit().init(params)
  assert default.mu.codes["w"].dtype == jnp.float32
  assert isinstance(default.mu.absmax["w"], optax.MaskedNode)
  tx = adamw_8bit(1e-3, min_8bit_size=256)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, state = jax.jit(tx.update)(grads, state, params)
  assert state[0].mu.codes["w"].dtype == jnp.uint8
  assert not moments.is_quantized_shape((16, 16))
  assert moments.is_quantized_shape((16, 16), min_size=256)


@pytest.mark.parametrize("value, error", [(0, ValueError), (2.5, TypeError), (True, TypeError)])
def test_bad_min_8bit_size(value, error):
  with pytest.raises(error, match="min_8bit_size"):
    scale_by_adam_8bit(min_8bit_size=value)
  with pytest.raises(error, match="min_8bit_size"):
    adamw_8bit(1e-3, min_8bit_size=value)


def test_large_moments_update_in_row_chunks_with_the_codes_of_one_call(monkeypatch):
  """A leaf above CHUNK_ELEMENTS is updated a chunk of tile rows at a time: the same codes,
  absmax and direction as the whole leaf at once (tiles are independent)."""
  rng = np.random.default_rng(0)
  params = {"e": jnp.zeros((96, 40)), "b": jnp.zeros(40)}
  grads = [{k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in params.items()}]
  grads += [jax.tree.map(lambda g: 0.5 * g + 0.01, grads[0])]

  def run():
    tx = moments.scale_by_adam_8bit(min_8bit_size=16)
    state = tx.init(params)
    for g in grads:
      updates, state = jax.jit(tx.update)(g, state)
    return updates, state

  whole = run()
  monkeypatch.setattr(moments, "CHUNK_ELEMENTS", 16 * 40)  # 6 chunks of one tile row
  chunked = run()
  jax.tree.map(np.testing.assert_array_equal, chunked, whole)
  assert chunked[1].mu.codes["e"].dtype == jnp.uint8

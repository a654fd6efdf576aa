"""qgalore_adamw on a mesh of 8 simulated CPU devices (docs/spec.md section 9).

Each test runs a script in a fresh process with 8 devices (``run_on_8_cpu_devices``). The
references are independent of the code under test: the same training on one device, the
chaos floor of that one-device run (its input moved by one ulp), and placement rules
written out by hand below.
"""

import textwrap

import pytest

from qgalore_jax._src.integration_test import run_on_8_cpu_devices

# A small scanned model: an embedding left to (8-bit) AdamW, a stack of two 64 x 64 layers
# and a head, projected. Shards of 8 rows or columns cut every 16 x 16 moment tile and every
# 256-element projector group in two.
PROBLEM = textwrap.dedent(
  """
  import re
  import jax, jax.numpy as jnp, numpy as np, optax
  from jax.sharding import NamedSharding, PartitionSpec as P, AxisType
  import qgalore_jax
  from qgalore_jax import DimensionNumbers, qgalore_adamw, projection_stats, state_shardings

  assert jax.device_count() == 8
  rng = np.random.default_rng(0)
  PARAMS = {
    "embed": jnp.asarray(rng.normal(size=(16, 64)) / 4, jnp.float32),
    "layers": jnp.asarray(rng.normal(size=(2, 64, 64)) / 8, jnp.float32),
    "head": jnp.asarray(rng.normal(size=(64, 8)) / 8, jnp.float32),
    "bias": jnp.zeros(64, jnp.float32),
  }
  FSDP = {"embed": P(None, "fsdp"), "layers": P(None, "fsdp", None), "head": P("fsdp", None),
          "bias": P("fsdp")}
  X = jnp.asarray(rng.normal(size=(64, 16)), jnp.float32)
  Y = jnp.asarray(rng.normal(size=(64, 8)), jnp.float32)
  NUMBERS = {"embed": None, "bias": None, "head": DimensionNumbers(0, 1),
             "layers": DimensionNumbers(reduction_axis=1, output_axis=2, batch_axis=0)}

  def optimizer(moment_bits=None):
    return qgalore_adamw(1e-2, rank=8, update_proj_gap=10, dimension_numbers=NUMBERS,
                         moment_bits=moment_bits, min_8bit_size=256, weight_decay=0.01)

  def injected():  # hyperparameters as arrays, the chain under apply_if_finite
    make = optax.inject_hyperparams(qgalore_adamw, static_args=qgalore_jax.STATIC_ARGS)
    return make(learning_rate=1e-2, rank=8, update_proj_gap=10, dimension_numbers=NUMBERS,
                weight_decay=0.01, skip_nonfinite=True)

  def galore_state(state):
    is_galore = lambda x: isinstance(x, qgalore_jax.ScaleByQGaLoreState)
    return next(x for x in jax.tree.leaves(state, is_leaf=is_galore) if is_galore(x))

  def loss(p, x):
    p = jax.tree.map(lambda a: jax.sharding.reshard(a, P()), p)  # FSDP: gather to compute
    h = jnp.tanh(x @ p["embed"] + p["bias"])
    for i in range(p["layers"].shape[0]):
      h = jnp.tanh(h @ p["layers"][i])
    return jnp.mean((h @ p["head"] - Y) ** 2)

  def mesh_of(n):
    return jax.make_mesh((n,), ("fsdp",), axis_types=(AxisType.Explicit,),
                         devices=jax.devices()[:n])

  def stepper(tx):
    @jax.jit
    def step(p, s, x):
      u, s = tx.update(jax.grad(loss)(p, x), s, p)
      return optax.apply_updates(p, u), s

    return step

  def train(tx, step, mesh, params, x, steps, state=None):
    with jax.set_mesh(mesh):
      params = jax.device_put(params, {k: NamedSharding(mesh, s) for k, s in FSDP.items()})
      x = jax.device_put(x, NamedSharding(mesh, P()))
      if state is None:
        state = jax.jit(tx.init)(params)
      for _ in range(steps):
        params, state = step(params, state, x)
      return params, state
  """
)

EQUALITY = PROBLEM + textwrap.dedent(
  """
  import tempfile, time
  import orbax.checkpoint as ocp

  def save(path, params, state):
    with ocp.StandardCheckpointer() as ckpt:
      ckpt.save(path, {"params": params, "opt_state": state})
    return jax.tree.map(np.asarray, {"params": params, "opt_state": state})

  def restore_and_resume(tx, step, checkpoint, saved, mesh, steps=10):
    # Restored with state_shardings targets: the saved bits, placed as asked, and from there
    # the trajectory of the uninterrupted run, the same state put on `mesh` directly.
    abstract = {k: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, FSDP[k]))
                for k, a in PARAMS.items()}
    shardings = state_shardings(tx, abstract)
    with jax.set_mesh(mesh):
      shapes = jax.eval_shape(tx.init, abstract)
    as_target = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
    target = {"params": abstract, "opt_state": jax.tree.map(as_target, shapes, shardings)}
    with ocp.StandardCheckpointer() as ckpt:
      restored = ckpt.restore(checkpoint, target)
    for a, b, t in zip(jax.tree.leaves(restored), jax.tree.leaves(saved), jax.tree.leaves(target)):
      np.testing.assert_array_equal(np.asarray(a), b)
      assert a.sharding.is_equivalent_to(t.sharding, a.ndim), (a.sharding, t.sharding)
    resumed = train(tx, step, mesh, restored["params"], X, steps, restored["opt_state"])
    direct = jax.device_put(saved, {"params": {k: a.sharding for k, a in abstract.items()},
                                    "opt_state": shardings})
    again = train(tx, step, mesh, direct["params"], X, steps, direct["opt_state"])
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(again)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    print(f"restored onto {mesh.size} devices and resumed: bit-exact")
    return resumed

  def any_mesh(n, axis_type):
    return jax.make_mesh((n,), ("fsdp",), axis_types=(axis_type,), devices=jax.devices()[:n])

  checkpoint = tempfile.mkdtemp() + "/step40-"
  for bits in (None, 8):
    tx = injected() if bits is None else optimizer(bits)
    step = stepper(tx)
    t0 = time.time()
    want, want_state = train(tx, step, mesh_of(1), PARAMS, X, 40)
    if bits == 8:  # for the restores below
      saved1 = save(checkpoint + "1", want, want_state)
    want, want_state = train(tx, step, mesh_of(1), want, X, 10, want_state)
    t1 = time.time()
    got, got_state = train(tx, step, mesh_of(8), PARAMS, X, 40)
    if bits == 8:
      saved8 = save(checkpoint + "8", got, got_state)
    got, got_state = train(tx, step, mesh_of(8), got, X, 10, got_state)
    t2 = time.time()
    nudged, _ = train(tx, step, mesh_of(1), PARAMS, X * (1 + 2**-23), 50)
    t3 = time.time()
    print(f"seconds: 1 device {t1 - t0:.1f}, 8 devices {t2 - t1:.1f}, nudged {t3 - t2:.1f}")
    for k in PARAMS:
      assert got[k].sharding.spec == FSDP[k], (k, got[k].sharding)
      diff = float(np.max(np.abs(np.asarray(got[k]) - np.asarray(want[k]))))
      chaos = float(np.max(np.abs(np.asarray(nudged[k]) - np.asarray(want[k]))))
      print(f"bits={bits} {k}: 8 devices vs 1 {diff:.3g}, one-ulp nudge {chaos:.3g}")
      assert 0 < chaos < 1e-2, chaos  # the nudge moves the run, not far
      assert diff <= 4 * chaos, (k, diff, chaos)
    counts = lambda s: jax.tree.map(np.asarray, projection_stats(s))
    stats_got, stats_want = counts(got_state), counts(want_state)
    assert stats_got["layers"]["svd_count"].tolist() == stats_want["layers"]["svd_count"].tolist()
    assert int(stats_want["head"]["svd_count"]) >= 3
    # The state stays where init put it: a low-rank moment sharded along its 64-long side.
    galore = galore_state(got_state)
    mu = galore.mu if bits is None else galore.mu.codes
    assert mu["layers"].sharding.spec == P(None, "fsdp", None), mu["layers"].sharding
    assert mu["head"].sharding.spec == P(None, "fsdp"), mu["head"].sharding

  # Checkpoints of the 8-bit runs across device counts, resumed with the steps compiled above:
  # 8 devices' step 40 onto 1 device (Explicit) and 4 (Auto); the other way, 1 device's step
  # 40 and the 4-device run's step 50 (resumed from the 8-device checkpoint) onto 8, resumed
  # over a refresh (at steps 40 and 50).
  t0 = time.time()
  restore_and_resume(tx, step, checkpoint + "8", saved8, mesh_of(1))
  t1 = time.time()
  resumed4 = restore_and_resume(tx, step, checkpoint + "8", saved8, any_mesh(4, AxisType.Auto))
  t2 = time.time()
  restore_and_resume(tx, step, checkpoint + "1", saved1, mesh_of(8), steps=3)
  saved4 = save(checkpoint + "4", *resumed4)
  restore_and_resume(tx, step, checkpoint + "4", saved4, mesh_of(8), steps=3)
  print(f"seconds: restores onto 1 {t1 - t0:.1f}, 4 {t2 - t1:.1f}, 8 {time.time() - t2:.1f}")
  print("SHARDED_OK")
  """
)


@pytest.mark.slow
def test_explicit_fsdp_training_matches_one_device_and_checkpoints_cross_device_counts():
  """50 steps with refreshes, FSDP on an Explicit mesh of 8: float moments (hyperparameters
  injected as arrays, skip_nonfinite) and 8-bit moments; 8-bit checkpoints saved on 8
  devices restored onto 1 and 4, and saved on 1 and 4 restored onto 8 (one process, to
  share the compiled steps)."""
  run_on_8_cpu_devices(EQUALITY)


PLACEMENT = PROBLEM + textwrap.dedent(
  """
  # state_shardings on params of an Auto mesh, against the rule of docs/spec.md section 9
  # written out per leaf. Mesh of 8: a tile grid or group count of 4 or 2 stays replicated.
  auto = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
  params = jax.device_put(PARAMS, {k: NamedSharding(auto, s) for k, s in FSDP.items()})
  tx = optimizer(8)
  shardings = state_shardings(tx, params)
  got = {jax.tree_util.keystr(path): s.spec
         for path, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
  galore = "[0].inner_states['qgalore'].inner_state"
  adam = "[0].inner_states['adam'].inner_state"
  want = {
    f"{galore}.count": P(),
    f"{galore}.mu.codes['layers']": P(None, "fsdp", None),  # (2, m=64, r=8)
    f"{galore}.nu.absmax['layers']": P(None, None, None),  # (2, 4, 1): 4 tiles
    f"{galore}.mu.codes['head']": P(None, "fsdp"),  # (r=8, n=64): "left"
    f"{galore}.projector.codes['layers']": P(None, "fsdp"),  # (2, 256 bytes)
    f"{galore}.projector.scale['layers']": P(None, None),  # (2, 2 groups)
    f"{galore}.subspace.top_vector['head']": P("fsdp"),
    f"{galore}.subspace.cosines['layers']": P(None, None),
    f"{galore}.subspace.gap['layers']": P(None),
    f"{adam}.mu.codes['embed']": P(None, "fsdp"),  # as the param
    f"{adam}.mu.absmax['embed']": P(None, None),  # (1, 4) tiles
    f"{adam}.nu.codes['bias']": P("fsdp"),  # 1-D: float32, as the param
  }
  for key, spec in want.items():
    assert got[key] == spec, (key, got[key], spec)
  assert all(s.mesh == auto for s in jax.tree.leaves(shardings))
  state = jax.jit(tx.init, out_shardings=shardings)(params)
  for s, a in zip(jax.tree.leaves(shardings), jax.tree.leaves(state)):
    assert a.sharding.is_equivalent_to(s, a.ndim), (a.sharding, s)
  # Under an Explicit mesh, init places the state so itself.
  explicit = mesh_of(8)
  with jax.set_mesh(explicit):
    placed = jax.jit(tx.init)(jax.device_put(PARAMS, {k: NamedSharding(explicit, s)
                                                      for k, s in FSDP.items()}))
  for s, a in zip(jax.tree.leaves(shardings), jax.tree.leaves(placed)):
    assert a.sharding.spec == s.spec, (a.sharding, s)

  # Shard independence: shards of 8 columns cut every 16 x 16 tile of the 8-bit moments and
  # every 256-element group of the INT8 codes; the codes are those of one device, bit for
  # bit (elementwise inputs: the first AdamW step's moments, an INT8 update).
  g = {"w": jnp.asarray(rng.normal(size=(40, 64)), jnp.float32)}
  w = {"w": jnp.asarray(rng.normal(size=(40, 64)), jnp.float32)}
  opt = qgalore_jax.adamw_8bit(1e-3, min_8bit_size=256)
  one_step = jax.jit(lambda g, s, w: opt.update(g, s, w)[1])
  with jax.set_mesh(mesh_of(1)):
    want_state = one_step(g, opt.init(w), w)
  with jax.set_mesh(explicit):
    cut = {"w": NamedSharding(explicit, P(None, "fsdp"))}
    ws, gs = jax.device_put(w, cut), jax.device_put(g, cut)
    got_state = one_step(gs, jax.jit(opt.init)(ws), ws)
  assert got_state[0].mu.codes["w"].sharding.spec == P(None, "fsdp")
  for a, b in zip(jax.tree.leaves(got_state), jax.tree.leaves(want_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  apply = jax.jit(lambda q, u: qgalore_jax.apply_updates(q, u, seed=1, step=3))
  u = {"w": g["w"] * 1e-3}
  want_q = apply(qgalore_jax.quantize_params(w), u)
  cut = {"w": NamedSharding(auto, P(None, "fsdp"))}
  got_q = apply(qgalore_jax.quantize_params(jax.device_put(w, cut)), jax.device_put(u, cut))
  for a, b in zip(jax.tree.leaves(got_q), jax.tree.leaves(want_q)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # INT8 weights on the Explicit mesh: 3 int8_train_step steps with Adam of the kernel
  # cut as above (shards of 320 codes) and a stack (shards of 384 codes per slice): the codes,
  # scales and zeros are one device's, bit for bit, placed by the rule of docs/spec.md
  # section 9.1, written out here, and the step traces once.
  qw = {"w": np.asarray(w["w"]), "stack": np.float32(rng.normal(size=(2, 64, 48)) / 8),
        "b": np.zeros(48, np.float32)}  # host arrays: each run places (and donates) its own
  cut = {"w": P(None, "fsdp"), "stack": P(None, None, "fsdp"), "b": P("fsdp")}
  xb = jnp.asarray(rng.normal(size=(16, 40)), jnp.float32)

  def int8_loss(p, x):
    p = jax.tree.map(lambda a: jax.sharding.reshard(a, P()), p)
    h = jnp.tanh(x @ p["w"])
    return sum(jnp.mean(jnp.tanh(h @ p["stack"][i] + p["b"]) ** 2) for i in range(2))

  def int8_run(mesh):
    with jax.set_mesh(mesh):
      params = jax.device_put(qw, {k: NamedSharding(mesh, s) for k, s in cut.items()})
      numbers = {"w": DimensionNumbers(0, 1), "stack": DimensionNumbers(1, 2, 0), "b": None}
      opt = optax.adam(1e-2)

      @jax.jit
      def prepare(params):
        qparams = qgalore_jax.quantize_params(params, dimension_numbers=numbers)
        return qparams, opt.init(qgalore_jax.dequantize_params(qparams))

      qparams, state = prepare(params)
      train_step = qgalore_jax.int8_train_step(int8_loss, opt, seed=5)
      x = jax.device_put(xb, NamedSharding(mesh, P()))
      types = jax.tree.map(jax.typeof, qparams)
      for t in range(3):
        qparams, state, _ = train_step(qparams, state, x, jnp.int32(t))
      assert train_step._cache_size() == 1
      assert jax.tree.map(jax.typeof, qparams) == types
      return qparams, jax.jit(qgalore_jax.dequantize_params)(qparams)

  want_q, _ = int8_run(mesh_of(1))
  got_q, got_w = int8_run(explicit)
  placed = {"w": (P("fsdp"), P(None)), "stack": (P(None, "fsdp"), P(None, None))}
  for k, (codes, scale) in placed.items():
    assert got_q[k].codes.sharding.spec == codes, (k, got_q[k].codes.sharding)
    assert got_q[k].scale.sharding.spec == got_q[k].zero.sharding.spec == scale, k
    assert got_w[k].sharding.spec == cut[k], (k, got_w[k].sharding)
  assert got_q["b"].sharding.spec == cut["b"]
  for a, b in zip(jax.tree.leaves(got_q), jax.tree.leaves(want_q)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # A stack of 8 slices on 8 devices: each device refreshes its own slice (one SVD each).
  # 2-D leaves and a stack of 3 are refreshed together by matrix shape: a Flax kernel
  # (in, out), a (out, in) matrix and the stack's 3 slices, all (96, 64), padded to 8 slices;
  # a (24, 40) kernel alone, padded to 8. Projectors and schedules are one device's, bit for
  # bit, and each matrix is refreshed once.
  g = {
    "w": rng.normal(size=(8, 64, 96)),
    "a": rng.normal(size=(64, 96)),
    "b": rng.normal(size=(96, 64)),
    "c": rng.normal(size=(3, 96, 64)),
    "d": rng.normal(size=(40, 24)),
  }
  g = {k: jnp.asarray(v, jnp.float32) for k, v in g.items()}
  numbers = {
    "w": DimensionNumbers(1, 2, 0),
    "a": DimensionNumbers(0, 1),
    "b": DimensionNumbers(1, 0),
    "c": DimensionNumbers(2, 1, 0),
    "d": DimensionNumbers(0, 1),
  }
  cuts = {"w": P(None, "fsdp", None), "a": P("fsdp", None), "b": P(None, "fsdp"),
          "c": P(None, "fsdp", None), "d": P("fsdp", None)}
  galore = qgalore_jax.scale_by_qgalore(rank=8, dimension_numbers=numbers)
  refresh = jax.jit(lambda g, s: galore.update(g, s)[1])
  with jax.set_mesh(mesh_of(1)):
    want_state = refresh(g, galore.init(g))
  with jax.set_mesh(explicit):
    gs = jax.device_put(g, {k: NamedSharding(explicit, s) for k, s in cuts.items()})
    state = jax.jit(galore.init)(gs)
    compiled = refresh.lower(gs, state).compile()
    got_state = compiled(gs, state)
  # One SVD call in the program per stack of 8 and per matrix shape, each inside shard_map
  # on a device's own slices: (1, 64, 96), (1, 96, 64) and (1, 24, 40) per device.
  svds = re.findall(r'custom_call_target="[^"]*ge(?:sdd|svd)', compiled.as_text())
  assert len(svds) == 3, svds
  counts = jax.tree.map(lambda a: np.asarray(a).tolist(), got_state.subspace.svd_count)
  assert counts == {"w": [1] * 8, "a": 1, "b": 1, "c": [1] * 3, "d": 1}, counts
  for a, b in zip(jax.tree.leaves(got_state[3:]), jax.tree.leaves(want_state[3:])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  print("SHARDED_OK")
  """
)


@pytest.mark.slow
def test_state_shardings_follow_the_params_and_codes_do_not_depend_on_the_mesh():
  run_on_8_cpu_devices(PLACEMENT)


def test_int8_weights_sharded_along_explicit_axes_keep_their_values_and_types():
  """On a 1-device Explicit mesh, with and without ``jax.set_mesh`` (quantize and dequantize
  outside jit): the values of unsharded weights, placed by the rule of docs/spec.md section
  9.1, written out here."""
  import contextlib

  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import AxisType
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from qgalore_jax import apply_updates
  from qgalore_jax import dequantize_params
  from qgalore_jax import quantize_params

  rng = np.random.default_rng(0)
  w = {"k": np.float32(rng.normal(size=(32, 16))), "b": np.zeros(16, np.float32)}
  u = {"k": np.float32(rng.normal(size=(32, 16)) * 1e-2), "b": np.ones(16, np.float32)}
  want_q = quantize_params(w)  # no mesh
  apply = jax.jit(lambda q, u, step: apply_updates(q, u, seed=3, step=step))  # eager: slow
  want = (apply(want_q, u, jnp.int32(2)), dequantize_params(want_q))
  mesh = jax.make_mesh((1,), ("fsdp",), axis_types=(AxisType.Explicit,))
  cut = {"k": NamedSharding(mesh, P("fsdp", None)), "b": NamedSharding(mesh, P("fsdp"))}
  for set_mesh in (True, False):
    with jax.set_mesh(mesh) if set_mesh else contextlib.nullcontext():
      ws, us = jax.device_put(w, cut), jax.device_put(u, cut)
      q = quantize_params(ws)
      got = (apply(q, us, jnp.int32(2)), dequantize_params(q))
    # 512 codes and 2 groups split along the kernel's (in, out) axes' mesh axis; dequantised,
    # the kernel is split along its output axis.
    assert q["k"].codes.sharding.spec == P("fsdp"), q["k"].codes.sharding
    assert q["k"].scale.sharding.spec == q["k"].zero.sharding.spec == P("fsdp")
    assert got[1]["k"].sharding.spec == P(None, "fsdp"), got[1]["k"].sharding
    assert jax.tree.map(jax.typeof, got[0]) == jax.tree.map(jax.typeof, q)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_pinned_projections_compute_the_unpinned_values_on_one_device(monkeypatch):
  """Section 9.5: the sharding constraints of the projections change no value."""
  import jax
  import numpy as np
  from jax.sharding import AxisType
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from qgalore_jax import DimensionNumbers
  from qgalore_jax import qgalore_adamw
  from qgalore_jax._src import sharding

  rng = np.random.default_rng(0)
  # Two stacks, each split along the side its projection contracts ("right" and "left").
  shapes = {"stack": (2, 32, 16), "down": (2, 16, 32)}
  specs = {"stack": P(None, "fsdp", None), "down": P(None, None, "fsdp")}
  numbers = {k: DimensionNumbers(1, 2, 0) for k in shapes}
  params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  grads = [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()} for _ in range(3)]
  mesh = jax.make_mesh((1,), ("fsdp",), axis_types=(AxisType.Explicit,))
  put = lambda t: jax.device_put(t, {k: NamedSharding(mesh, specs[k]) for k in t})
  pinned = []
  real = sharding.projection_specs

  def run():
    tx = qgalore_adamw(1e-2, rank=4, update_proj_gap=2, dimension_numbers=numbers)
    out = []
    with jax.set_mesh(mesh):
      p = put(params)
      state = jax.jit(tx.init)(p)
      update = jax.jit(tx.update)
      for g in grads:  # refreshes on steps 0 and 2
        u, state = update(put(g), state, p)
        out.append(jax.tree.map(np.asarray, (u, state)))
    return out

  def spying(*args):
    specs = real(*args)
    pinned.append(specs is not None)
    return specs

  monkeypatch.setattr(sharding, "projection_specs", spying)
  want = run()
  assert pinned == [True, True], pinned  # every leaf's projection was pinned
  monkeypatch.setattr(sharding, "projection_specs", lambda *args: None)
  got = run()
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
    np.testing.assert_array_equal(a, b)

"""Whole-optimizer parity: ``qgalore_adamw`` and ``QGaLoreAdamW`` training the tiny LLaMA block.

Both backends start from the same weights (Flax kernels (in, out), torch weights (out, in))
and see the same batches, with float or INT8 projection weights, in two modes:

* ``shared``: the reference comparison. The JAX optimizer is fed torch's gradients (its
  own model still computes its loss), and both optimizers take their SVD from one source,
  a float64 NumPy SVD of the (then identical) gradient, sign-fixed and rounded to float32
  (both optimizers take it through their ``projector_fn`` argument, :func:`shared_projectors`;
  JAX reaches NumPy through ``jax.pure_callback``). Both sides then hold the same INT4
  projector codes on every step, and what is left is float32 rounding in the Adam arithmetic
  (XLA fuses multiply-adds, its ``pow`` differs from torch's in the last bit) and in the
  matmul sums.
* ``free``: each backend runs alone, with its own gradients and its own LAPACK SVD: the
  run a user makes. One-ulp differences in the SVD can flip an INT4 projector code, and
  one-ulp differences in a weight can flip an INT8 stochastic-rounding code; the tolerances
  are derived from a deliberately flipped code (:func:`free_tolerances`, ``docs/parity.md``).

Everything is compared in torch's layout: JAX kernels, their updates and the head's
moments are transposed; projected moments are in the canonical low-rank shape on both sides.

``moment_bits=8`` runs both optimizers with 8-bit block-wise moments. The block's moments all
have fewer than the 4096 elements that the format quantises by default, so such a run passes
``min_8bit_size=MOMENT_MIN_SIZE`` (one 16 x 16 tile) to both optimizers: every 2-D
moment is then stored in 8 bits, and the traces also hold the codes and tile maxima
(``parity_tests/moments.py`` compares them). With ``lockstep=True`` the JAX optimizer starts
every step from torch's stored moments (codes, tile maxima and float32 moments), so that a
code flipped by one step's rounding does not carry into the next step.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

import qgalore_jax
import qgalore_torch
from parity_tests import core
from parity_tests import llama
from parity_tests import projector
from qgalore_jax._src import moments as jax_moments

COMPONENT = "whole optimizer"
STEPS = 200
LR, B1, B2, EPS, WEIGHT_DECAY = 3e-3, 0.9, 0.999, 1e-8, 0.01
RANK, GAP, PROJ_GROUP_SIZE, SEED = 8, 20, 64, 0
MODES = ("shared", "free")
MOMENT_MIN_SIZE = 256  # 8-bit runs: moments of one tile or more are quantised (format: 4096)


def numpy_projector(grad_MxN: np.ndarray, rank: int) -> np.ndarray:
  """docs/spec.md section 2's basis from a float64 NumPy SVD, sign-fixed, rounded to float32."""
  m, n = grad_MxN.shape
  r = min(rank, m, n)
  u, _, vt = np.linalg.svd(np.asarray(grad_MxN, np.float64), full_matrices=False)
  rows = vt[:r] if m >= n else u[:, :r].T
  return projector.sign_rule(rows).astype(np.float32)


def jax_numpy_projector(grad_MxN, rank):
  """:func:`numpy_projector` as a ``projector_fn`` for ``qgalore_jax`` (a host callback)."""
  m, n = grad_MxN.shape
  r = min(rank, m, n)
  shape = jax.ShapeDtypeStruct((r, n if m >= n else m), jnp.float32)
  return jax.pure_callback(lambda g: numpy_projector(g, rank), shape, grad_MxN)


def torch_numpy_projector(grad_MxN, rank):
  """:func:`numpy_projector` as a ``projector_fn`` for ``qgalore_torch``."""
  basis = numpy_projector(grad_MxN.detach().cpu().numpy(), rank)
  return torch.from_numpy(basis).to(grad_MxN.device)


def shared_projectors(shared: bool) -> tuple:
  """The ``projector_fn`` of (JAX, torch): the shared NumPy SVD, or each library's own."""
  return (jax_numpy_projector, torch_numpy_projector) if shared else (None, None)


def _moment_options(moment_bits) -> dict:
  """Optimizer arguments for ``moment_bits``: 8-bit runs quantise every moment of a tile or more.

  The format's default threshold (4096 elements) exceeds every moment of the tiny block; with
  ``min_8bit_size=MOMENT_MIN_SIZE`` all of its 2-D moments, projected (32 x 8, 64 x 8, 8 x 64:
  partial tiles) and plain (embedding, head), are quantised.
  """
  if moment_bits is None:
    return {}
  return {"moment_bits": moment_bits, "min_8bit_size": MOMENT_MIN_SIZE}


@dataclasses.dataclass
class Trace:
  """What one backend did, step by step, in torch's layout (NumPy, stacked over steps)."""

  loss: list = dataclasses.field(default_factory=list)
  weights: list = dataclasses.field(default_factory=list)  # dict per step, after the update
  mu: list = dataclasses.field(default_factory=list)  # float32 (8-bit: dequantised)
  nu: list = dataclasses.field(default_factory=list)
  # 8-bit runs: per step, {name: uint8 codes} and {name: float32 tile maxima} of the moments
  # stored in 8 bits.
  mu_codes: list = dataclasses.field(default_factory=list)
  mu_absmax: list = dataclasses.field(default_factory=list)
  nu_codes: list = dataclasses.field(default_factory=list)
  nu_absmax: list = dataclasses.field(default_factory=list)
  codes: list = dataclasses.field(default_factory=list)  # INT8 runs: projection codes
  proj_codes: list = dataclasses.field(default_factory=list)  # packed INT4 projector codes


def _jax_tx(moment_bits=None, projector_fn=None):
  mask = {name: name in llama.PROJECTIONS for name in llama.NAMES}
  return qgalore_jax.qgalore_adamw(
    LR,
    B1,
    B2,
    EPS,
    WEIGHT_DECAY,
    rank=RANK,
    update_proj_gap=GAP,
    proj_group_size=PROJ_GROUP_SIZE,
    mask=mask,
    input_axis=0,
    projector_fn=projector_fn,
    **_moment_options(moment_bits),
  )


def _torch_opt(model, moment_bits=None, projector_fn=None):
  projections = [model.parameter(name) for name in llama.PROJECTIONS]
  others = [model.parameter(name) for name in llama.OTHERS]
  return qgalore_torch.QGaLoreAdamW(
    [
      {
        "params": projections,
        "rank": RANK,
        "update_proj_gap": GAP,
        "proj_group_size": PROJ_GROUP_SIZE,
      },
      {"params": others},
    ],
    lr=LR,
    betas=(B1, B2),
    eps=EPS,
    weight_decay=WEIGHT_DECAY,
    seed=SEED,
    projector_fn=projector_fn,
    **_moment_options(moment_bits),
  )


TORCH_IDS = {name: i for i, name in enumerate(llama.NAMES)}  # position across param groups


def _jax_init(tx, int8: bool):
  """Jitted ``init_params -> (params, state)``: one compilation instead of many eager ops."""

  def init(params):
    if int8:
      mask = {name: name in llama.PROJECTIONS for name in params}
      params = qgalore_jax.quantize_params(params, mask=mask, input_axis=0)
    return params, tx.init(qgalore_jax.dequantize_params(params))

  return jax.jit(init)


def _with_moments(state, stored: dict):
  """``state`` of :func:`_jax_tx` with its moments replaced by ``stored``.

  ``stored[field][name]`` (``field`` "mu" or "nu") is ``(codes, absmax)`` for a moment held
  in 8 bits, ``(moment, None)`` for a float32 one, in the JAX layout.
  """
  partition = state[0]
  inner = dict(partition.inner_states)
  for label, names in (("qgalore", llama.PROJECTIONS), ("adam", llama.OTHERS)):
    masked = inner[label]
    fields = {}
    for field in ("mu", "nu"):
      q = getattr(masked.inner_state, field)
      codes, absmax = dict(q.codes), dict(q.absmax)
      for name in names:
        codes[name], tile_max = stored[field][name]
        if tile_max is not None:
          absmax[name] = tile_max
      fields[field] = q._replace(codes=codes, absmax=absmax)
    inner[label] = masked._replace(inner_state=masked.inner_state._replace(**fields))
  return (partition._replace(inner_states=inner), *state[1:])


def _torch_moments(trace: Trace) -> dict:
  """torch's moments after its latest step, as :func:`_with_moments` takes them."""
  stored = {}
  for field in ("mu", "nu"):
    codes, absmax = getattr(trace, f"{field}_codes")[-1], getattr(trace, f"{field}_absmax")[-1]
    stored[field] = {}
    for name in llama.NAMES:
      transpose = name not in llama.PROJECTIONS
      if name in codes:
        pair = (_layout(name, codes[name], transpose), _layout(name, absmax[name], transpose))
      else:
        pair = (_layout(name, getattr(trace, field)[-1][name], transpose), None)
      stored[field][name] = pair
  return stored


def _jax_step(tx, int8: bool, shared: bool, moment_bits=None):
  """Jitted ``(params, state, tokens, torch_grads, t, moments) -> (params, state, record)``.

  ``moments``, when not ``None``, replaces the state's moments first (:func:`_with_moments`).

  ``record`` holds the loss, the float weights after the update, the moments (8-bit ones
  dequantised, plus their codes and tile maxima) and the INT8 codes, fetched to the host in
  one transfer.
  """

  def step(params, state, tokens, torch_grads, t, moments=None):
    if moments is not None:
      state = _with_moments(state, moments)
    floats = qgalore_jax.dequantize_params(params) if int8 else params
    loss, grads = jax.value_and_grad(llama.jax_loss)(floats, tokens)
    updates, state = tx.update(torch_grads if shared else grads, state, floats)
    if int8:
      params = qgalore_jax.apply_updates(params, updates, seed=SEED, step=t, tensor_ids=TORCH_IDS)
    else:
      params = optax.apply_updates(params, updates)
    inner = state[0].inner_states
    galore, adam = inner["qgalore"].inner_state, inner["adam"].inner_state
    pick = lambda name: galore if name in llama.PROJECTIONS else adam
    record = {
      "loss": loss,
      "weights": qgalore_jax.dequantize_params(params),
      "codes": {n: p.codes for n, p in params.items() if qgalore_jax.is_quantized(p)},
      "proj_codes": {name: galore.projector.codes[name] for name in llama.PROJECTIONS},
    }
    for field, signed in (("mu", True), ("nu", False)):
      stored = {name: getattr(pick(name), field) for name in llama.NAMES}
      if moment_bits is None:
        record[field] = {name: stored[name][name] for name in llama.NAMES}
        continue
      pairs = {n: jax_moments.QuantizedMoment(q.codes[n], q.absmax[n]) for n, q in stored.items()}
      record[field] = {n: jax_moments.load_moment(p, signed, 8) for n, p in pairs.items()}
      eight = {n: p for n, p in pairs.items() if p[0].dtype == jnp.uint8}
      record[f"{field}_codes"] = {n: p[0] for n, p in eight.items()}
      record[f"{field}_absmax"] = {n: p[1] for n, p in eight.items()}
    return params, state, record

  return jax.jit(step)


def _layout(name, value, transpose=True):
  """``value`` of leaf ``name`` in torch's layout: JAX kernels (in, out) are transposed."""
  return value.T if transpose and name in llama.KERNELS else value


def run(
  int8: bool,
  mode: str,
  dev: core.Device,
  steps: int = STEPS,
  with_jax: bool = True,
  moment_bits: int | None = None,
  lockstep: bool = False,
  perturb=None,
):
  """Trains both backends ``steps`` steps; returns the (JAX, torch) traces.

  ``with_jax=False`` runs torch alone (the JAX trace is then ``None``). ``moment_bits=8``
  stores the moments in 8 bits, from one tile up (``min_8bit_size=MOMENT_MIN_SIZE``);
  ``lockstep=True`` (8-bit only) starts each JAX step from torch's stored moments.
  ``perturb(opt, model, t)``, when given, is called after torch's step ``t`` and may edit
  torch's optimizer state (its tensors are public): how a flipped code is injected.
  """
  lockstep = lockstep and bool(moment_bits)
  shared = mode == "shared"
  jax_projector, torch_projector = shared_projectors(shared)
  init = llama.init_params()
  tokens = llama.batches(steps)
  model = llama.TorchBlock(init).to(dev.torch)
  if int8:
    weights = set(llama.PROJECTIONS.values())
    qgalore_torch.quantize_linears(model, lambda name: f"{name}.weight" in weights)
  opt = _torch_opt(model, moment_bits, torch_projector)
  tx = _jax_tx(moment_bits, jax_projector)
  jax_trace, torch_trace = Trace(), Trace()
  if with_jax:
    with core.on(dev):
      params, state = _jax_init(tx, int8)(init)
  step = _jax_step(tx, int8, shared, moment_bits)
  for t in range(steps):
    batch = torch.from_numpy(tokens[t]).to(dev.torch)
    opt.zero_grad()
    loss = model(batch)
    loss.backward()
    grads = {n: _layout(n, core.to_numpy(model.parameter(n).grad)) for n in llama.NAMES}
    opt.step()
    if perturb is not None:
      perturb(opt, model, t)
    moments = _torch_moments(torch_trace) if lockstep and t else None
    _record_torch(torch_trace, model, opt, loss.item())
    if with_jax:
      with core.on(dev):
        params, state, record = step(params, state, jnp.asarray(tokens[t]), grads, t, moments)
      _record_jax(jax_trace, record)
  return (jax_trace if with_jax else None), torch_trace


def _record_torch(trace, model, opt, loss):
  trace.loss.append(loss)
  weights, codes = {}, {}
  moments = {f: {} for f in ("mu", "nu", "mu_codes", "mu_absmax", "nu_codes", "nu_absmax")}
  trace.proj_codes.append(
    {n: core.to_numpy(opt.state[model.parameter(n)]["proj_codes"]) for n in llama.PROJECTIONS}
  )
  for name in llama.NAMES:
    p = model.parameter(name)
    weights[name] = core.to_numpy(p.dequantize() if hasattr(p, "codes") else p)
    for field, key, signed in (("mu", "exp_avg", True), ("nu", "exp_avg_sq", False)):
      stored = opt.state[p][key]
      if stored.dtype == torch.uint8:
        absmax = opt.state[p][f"{key}_absmax"]
        moments[f"{field}_codes"][name] = core.to_numpy(stored)
        moments[f"{field}_absmax"][name] = core.to_numpy(absmax)
        quantized = qgalore_torch.QuantizedMoment(stored, absmax)
        stored = qgalore_torch.dequantize_moment(quantized, signed)
      moments[field][name] = core.to_numpy(stored)
    if hasattr(p, "codes"):
      codes[name] = core.to_numpy(p.codes)
  trace.weights.append(weights)
  for field, values in moments.items():
    getattr(trace, field).append(values)
  trace.codes.append(codes)


def _record_jax(trace, record):
  record = jax.device_get(record)
  trace.loss.append(float(record["loss"]))
  trace.weights.append({n: _layout(n, record["weights"][n]) for n in llama.NAMES})
  # Projected moments are canonical low-rank matrices; the head's follow its kernel.
  trace.mu.append({n: _layout(n, record["mu"][n], n not in llama.PROJECTIONS) for n in llama.NAMES})
  trace.nu.append({n: _layout(n, record["nu"][n], n not in llama.PROJECTIONS) for n in llama.NAMES})
  for field in ("mu_codes", "mu_absmax", "nu_codes", "nu_absmax"):
    values = record.get(field, {})
    layout = {n: _layout(n, v, n not in llama.PROJECTIONS) for n, v in values.items()}
    getattr(trace, field).append(layout)
  trace.codes.append(record["codes"])
  trace.proj_codes.append(record["proj_codes"])


def _stack(per_step: list, names) -> np.ndarray:
  """[steps, total elements of ``names``]: each step's arrays flattened and joined."""
  return np.stack([np.concatenate([d[n].ravel() for n in names]) for d in per_step])


def _updates(trace: Trace, init: dict, names) -> np.ndarray:
  start = {n: llama.to_torch_layout(n, init[n]) for n in names}
  weights = _stack([start, *trace.weights], names)
  return np.diff(weights.astype(np.float64), axis=0)


# Shared mode: normwise float32 rounding. A 1-ulp difference between XLA's and torch's
# float32 ``b2 ** t`` moves ``1 - b2 ** t`` by up to 6e-5 relative at t = 1 (less later), and
# through Adam's bias correction every update by as much; summation order in the matmuls adds
# ~1e-6. 1e-3 of the largest value of a quantity (for weights: of their largest change since
# step 0) leaves room for GPU reductions. The loss is a float32 forward pass of two
# frameworks on (nearly) the same weights: relative 1e-5.
SHARED_NORMWISE = 1e-3
LOSS_RTOL = 1e-5


def flip_one_projector_code(opt, model, t):
  """After torch's step 0, q_proj's stored INT4 projector gets one code moved one step.

  The code of the largest-magnitude entry of the dequantised basis is moved towards the
  middle of [0, 15], as a 1-ulp SVD difference at a rounding boundary would move it; the
  matrix uses the flipped projector until its next refresh.
  """
  if t != 0:
    return
  p = model.parameter("q")
  state = opt.state[p]
  size = min(RANK, *p.shape) * state["top_vector"].numel()  # r x k basis elements
  codes, scale, zero = (state[f"proj_{key}"] for key in ("codes", "scale", "zero"))
  stored = qgalore_torch.QuantizedTensor(codes, scale, zero)
  basis = qgalore_torch.dequantize(stored, (size,), bits=4, group_size=PROJ_GROUP_SIZE)
  codes = qgalore_torch.unpack_int4(codes, size).to(torch.int16)
  i = int(torch.argmax(basis.abs()))
  codes[i] += 1 if codes[i] < 8 else -1
  state["proj_codes"] = qgalore_torch.pack_int4(codes.to(torch.uint8))


def quantities(trace: Trace, init: dict) -> dict:
  """name -> [steps, ...] array of every compared quantity of one trace."""
  out = {"loss": np.array(trace.loss)}
  for group, names in (("projected", llama.PROJECTIONS), ("other", llama.OTHERS)):
    out[f"update, {group}"] = _updates(trace, init, names)
    out[f"weights, {group}"] = _stack(trace.weights, names)
    out[f"exp_avg / mu, {group}"] = _stack(trace.mu, names)
    out[f"exp_avg_sq / nu, {group}"] = _stack(trace.nu, names)
  packed = _stack(trace.proj_codes, llama.PROJECTIONS)  # the same nibble order on both sides
  nibbles = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(len(packed), -1)
  out["INT4 projector codes"] = nibbles.astype(np.int32)
  if trace.codes[0]:
    out["INT8 codes"] = _stack(trace.codes, llama.PROJECTIONS).astype(np.int32)
  for group, names in (("projected", llama.PROJECTIONS), ("other", llama.OTHERS)):
    eight = [n for n in names if n in trace.mu_codes[0]]
    if not eight:
      continue
    for field, label in (("mu", "exp_avg / mu"), ("nu", "exp_avg_sq / nu")):
      codes = _stack(getattr(trace, f"{field}_codes"), eight).astype(np.int32)
      out[f"{label} codes, {group}"] = codes
      out[f"{label} absmax, {group}"] = _stack(getattr(trace, f"{field}_absmax"), eight)
  return out


def shared_tolerances(reference: dict, int8: bool) -> dict:
  """Shared-mode tolerance of each quantity, scaled by the ``reference`` run's values."""
  tol = {}
  for k, v in reference.items():
    if k.startswith("weights"):
      moved = np.abs(v - v[:1]).max()
      tol[k] = core.Tolerance(atol=SHARED_NORMWISE * moved, basis="1e-3 max|W_t - W_0|")
    else:
      tol[k] = core.Tolerance(atol=SHARED_NORMWISE * np.abs(v).max(), basis="1e-3 max|torch|")
  tol["loss"] = core.Tolerance(rtol=LOSS_RTOL, basis="float32 forward pass")
  tol["INT4 projector codes"] = core.EXACT
  if int8:
    tol["INT8 codes"] = core.Tolerance(atol=1.0, basis="1 SR code")
  return tol


# Free mode: a run where one code flipped diverges chaotically from then on (more flips
# follow, INT8 stochastic rounding amplifies them), so the divergence one deliberate flip
# causes is a sample of the same process as the JAX-vs-torch divergence, not a bound on it.
# Measured on CPU: JAX vs torch reached 0.97 of one flip's divergence (INT8, projected
# updates). Four flips' worth leaves room for other platforms' LAPACK.
FREE_FLIPS = 4


def free_tolerances(reference: dict, int8: bool, dev: core.Device) -> dict:
  """Free-mode tolerance of each quantity: ``FREE_FLIPS`` times how far one flipped INT4
  projector code moves torch's own run."""
  _, flipped = run(int8, "free", dev, with_jax=False, perturb=flip_one_projector_code)
  flipped_q = quantities(flipped, llama.init_params())
  return {
    k: core.Tolerance(
      atol=FREE_FLIPS * float(np.abs(flipped_q[k] - v).max()), basis="4 x 1 flipped INT4 code"
    )
    for k, v in reference.items()
  }


@functools.cache
def traces(
  int8: bool, mode: str, dev_name: str, moment_bits=None, lockstep=False
) -> tuple[Trace, Trace]:
  """The (JAX, torch) traces of a full run, cached: the precision suite reuses them."""
  dev = core.device(dev_name)
  return run(int8, mode, dev, moment_bits=moment_bits, lockstep=lockstep)


def measure(int8: bool, mode: str, dev_name: str) -> list[core.Check]:
  """Per-step losses, updates, weights, moments (and INT8 codes) of both backends."""
  dev = core.device(dev_name)
  jt, tt = traces(int8, mode, dev_name)
  init = llama.init_params()
  jax_q, torch_q = quantities(jt, init), quantities(tt, init)
  if mode == "shared":
    tol = shared_tolerances(torch_q, int8)
  else:
    tol = free_tolerances(torch_q, int8, dev)
  case = f"{mode} SVD{'' if mode == 'shared' else 's'}, {'INT8' if int8 else 'float'} weights"
  return [
    core.compare(COMPONENT, f"{case}, {STEPS} steps", k, jax_q[k], torch_q[k], tol[k], dev_name)
    for k in torch_q
  ]

"""Quantiser parity (docs/spec.md section 3): codes, scales, zeros and packed bytes, bit for bit.

Both backends quantise the same float32 canonical matrix (the JAX side jitted, as the
optimizer runs it) at every width from 1 to 8 bits; the inputs cover random matrices and
the edge cases where a quantiser can disagree: constant and all-zero groups, single-sign
groups, huge and tiny magnitudes, values exactly on rounding ties, a partial last group and
odd element counts (the last packed byte holds one code).
"""

import functools

import jax
import numpy as np
import torch

import qgalore_jax
import qgalore_torch
from parity_tests import core

COMPONENT = "quantiser"
BITS = tuple(range(1, 9))


def _random(shape, seed=0, scale=1.0):
  return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


def _ties():
  """Each group spans [0, 1] in steps of 1/30: with 4 bits, w / s lands on .5 ties."""
  return np.tile(np.arange(31, dtype=np.float32) / 30, (4, 1))


def _mixed_groups():
  """Rows of different character in groups of 16: zero, constant, positive, negative, wide."""
  rows = [
    np.zeros(16),
    np.full(16, 0.3),
    np.abs(_random(16, 1)) + 0.5,
    -np.abs(_random(16, 2)) - 0.5,
    _random(16, 3) * 1e4,
    _random(16, 4) * 1e-7,
  ]
  return np.stack(rows).astype(np.float32)


# name -> (canonical float32 matrix, group size)
CASES = {
  "random square 48x48": (lambda: _random((48, 48)), 256),
  "random 40x24, groups 64": (lambda: _random((40, 24), 1), 64),
  "partial last group 7x13, groups 32": (lambda: _random((7, 13), 2), 32),
  "odd count 1x255 (packing)": (lambda: _random((1, 255), 3), 256),
  "constant and zero groups": (lambda: np.repeat([[0.0], [0.7], [-2.5]], 32, 1), 32),
  "single-sign groups": (lambda: np.abs(_random((6, 32), 4)) * np.repeat([[1], [-1]], 3, 0), 32),
  "huge magnitudes 1e30": (lambda: _random((8, 32), 5, 1e30), 64),
  "tiny magnitudes 1e-30": (lambda: _random((8, 32), 6, 1e-30), 64),
  "rounding ties": (_ties, 31),
  "mixed groups of 16": (_mixed_groups, 16),
}


@functools.partial(jax.jit, static_argnums=1)
def jax_quantize_all(x, group_size):
  """Quantised ``x`` and its unpacked codes at every width in ``BITS`` (one compilation)."""
  out = []
  for bits in BITS:
    q = qgalore_jax.quantize(x, bits, group_size)
    out.append((q, qgalore_jax.unpack_int4(q.codes, x.size) if bits <= 4 else q.codes))
  return out


def measure(case: str, dev: core.Device) -> list[core.Check]:
  """Codes, packed bytes, scales and zeros of ``case`` at 1..8 bits, JAX vs torch."""
  make, group_size = CASES[case]
  w = np.asarray(make(), np.float32)
  parts = {"packed bytes": ([], []), "codes": ([], []), "scale": ([], []), "zero": ([], [])}
  with core.on(dev):
    jax_out = jax_quantize_all(jax.device_put(w, dev.jax), group_size)
  for bits, (jq, jcodes) in zip(BITS, jax_out):
    tq = qgalore_torch.quantize(torch.from_numpy(w).to(dev.torch), bits, group_size)
    tcodes = qgalore_torch.unpack_int4(tq.codes, w.size) if bits <= 4 else tq.codes
    for name, j, t in [
      ("packed bytes", jq.codes, tq.codes),
      ("codes", jcodes, tcodes),
      ("scale", jq.scale, tq.scale),
      ("zero", jq.zero, tq.zero),
    ]:
      parts[name][0].append(core.to_numpy(j))
      parts[name][1].append(core.to_numpy(t))
  return [
    core.compare(
      COMPONENT, case, f"{name}, bits 1-8", np.concatenate(j), np.concatenate(t), device=dev.name
    )
    for name, (j, t) in parts.items()
  ]


def measure_all(dev: core.Device) -> list[core.Check]:
  return [c for case in CASES for c in measure(case, dev)]

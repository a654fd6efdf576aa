"""Projector parity (docs/spec.md section 2): orientation and sign-canonical singular vectors.

The JAX side gets a Flax kernel (in, out) and reads it as ``kernel.T``, as the optimizer
does; the torch side gets the (out, in) weight gradient. Both float32 bases must agree to
float32 rounding of the SVD; their 4-bit codes may differ by one step where a value sits on
a rounding boundary (the SVDs of two libraries differ by ~1 ulp). The authors'
``GaLoreProjector`` (q-galore-torch 1.0), with the sign rule of docs/spec.md section 2
applied to its SVD, is the independent oracle for both.

The test matrices have well separated singular values (10 down to 1): the SVD is then well
conditioned, so "to float32 rounding" is a meaningful bound. For nearly equal singular values
any two libraries may return different vectors of the same subspace.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import torch

import qgalore_jax
import qgalore_torch
from parity_tests import core

COMPONENT = "projector"
SHAPES = ((64, 32), (32, 64), (48, 48))  # torch (out, in): "right", "left", square
RANK = 8
BITS = 4
GROUP_SIZE = 32
# |basis_jax - basis_torch| after float32 SVDs of a matrix with singular values 10..1:
# measured <= 1e-5 on CPU; 2e-5 is what the packages' own tests hold NumPy's SVD to.
FLOAT_TOL = core.Tolerance(atol=2e-5, basis="float32 SVD")
CODE_TOL = core.Tolerance(
  atol=1.0, basis="1 flipped code"
)  # one flipped 4-bit code (see module docstring)


def sign_rule(rows: np.ndarray) -> np.ndarray:
  """docs/spec.md section 2 in NumPy: each row times the sign of its first largest entry."""
  pivots = rows[np.arange(rows.shape[0]), np.argmax(np.abs(rows), axis=1)]
  return rows * np.where(pivots < 0, -1.0, 1.0)[:, None].astype(rows.dtype)


def well_conditioned(shape, seed=0) -> np.ndarray:
  """A float32 matrix with singular values evenly spaced from 10 to 1."""
  rng = np.random.default_rng(seed)
  m, n = shape
  u, _ = np.linalg.qr(rng.normal(size=(m, m)))
  v, _ = np.linalg.qr(rng.normal(size=(n, n)))
  k = min(m, n)
  return ((u[:, :k] * np.linspace(10.0, 1.0, k)) @ v[:, :k].T).astype(np.float32)


def sign_fixed_oracle(authors_cls, rank, group_size):
  """The authors' 4-bit projector, its SVD output sign-fixed (docs/spec.md section 2)."""
  oracle = authors_cls(rank, update_proj_gap=200, quant=True, group_size=group_size, n_bit=BITS)
  unsigned = oracle.get_orthogonal_matrix

  def signed(weights, rank, type):
    out = unsigned(weights, rank, type)
    rows = out if type == "right" else out.T
    fixed = torch.from_numpy(sign_rule(rows.cpu().numpy())).to(out.device)
    return fixed if type == "right" else fixed.T.contiguous()

  oracle.get_orthogonal_matrix = signed
  return oracle


def oracle_basis(authors_cls, g_MxN: torch.Tensor, rank: int, group_size: int) -> torch.Tensor:
  """The oracle's dequantised basis rows for canonical ``g_MxN``.

  For "left" (m < n) the oracle gets ``G^T``, whose "right" basis is ``U^T`` of ``G``, so its
  quantisation groups run along the singular vectors as docs/spec.md section 3 requires (its own
  "left" path groups across them).
  """
  oracle = sign_fixed_oracle(authors_cls, rank, group_size)
  left = g_MxN.shape[0] < g_MxN.shape[1]
  oracle.project((g_MxN.T if left else g_MxN).contiguous(), 0)
  codes = oracle.ortho_matrix.to(torch.float32)
  basis = oracle.ortho_matrix_scales * (codes - oracle.ortho_matrix_zeros)
  return basis.reshape(oracle.ortho_matrix_shape)


@functools.partial(jax.jit, static_argnums=(1,))
def _jax_projector(kernel, rank):
  basis = qgalore_jax.compute_projector(kernel.T, rank)
  q = qgalore_jax.quantize(basis, BITS, GROUP_SIZE)
  deq = qgalore_jax.dequantize(q, basis.shape, BITS, GROUP_SIZE)
  codes = qgalore_jax.unpack_int4(q.codes, basis.size)
  low = qgalore_jax.project(kernel.T, deq)
  back = qgalore_jax.project_back(low, deq, qgalore_jax.projector_side(kernel.T.shape))
  return basis, deq, codes, low, back


def _torch_projector(g, rank):
  basis = qgalore_torch.compute_projector(g, rank)
  q = qgalore_torch.quantize(basis, BITS, GROUP_SIZE)
  deq = qgalore_torch.dequantize(q, tuple(basis.shape), BITS, GROUP_SIZE)
  codes = qgalore_torch.unpack_int4(q.codes, basis.numel())
  low = qgalore_torch.project(g, deq)
  side = qgalore_torch.projector_side(tuple(g.shape))
  back = qgalore_torch.project_back(low, deq, side)
  return basis, deq, codes, low, back, float(q.scale.max())


def measure(shape, dev: core.Device, authors_cls=None) -> list[core.Check]:
  """JAX (Flax kernel) vs torch (weight) projector of one gradient, and both vs the oracle."""
  g = well_conditioned(shape, seed=sum(shape))
  case = f"torch {shape[0]}x{shape[1]} ({qgalore_torch.projector_side(shape)}), rank {RANK}"
  with core.on(dev):
    jax_out = _jax_projector(jnp.asarray(g.T), RANK)
  torch_out = _torch_projector(torch.from_numpy(g).to(dev.torch), RANK)
  jb, jdeq, jcodes, jlow, jback = jax_out
  tb, tdeq, tcodes, tlow, tback, scale = torch_out
  step = scale * 1.001 + 1e-6  # one code step of the widest group, plus float32 rounding
  # 1 for "right", 0 for "left"; then the basis shape (r, k).
  kernel_shape = g.T.shape  # the Flax kernel (in, out); JAX reads it as kernel.T
  orientation = [qgalore_jax.projector_side(kernel_shape[::-1]) == "right", *jb.shape]
  torch_orientation = [qgalore_torch.projector_side(shape) == "right", *tb.shape]

  def cmp(quantity, j, t, tol=core.EXACT):
    return core.compare(COMPONENT, case, quantity, j, t, tol, dev.name)

  checks = [
    cmp("side and basis shape", np.array(orientation), np.array(torch_orientation)),
    cmp("float32 basis (sign-canonical)", jb, tb, FLOAT_TOL),
    cmp("4-bit codes", jcodes.astype(jnp.int32), tcodes.to(torch.int32), CODE_TOL),
    cmp("dequantised basis", jdeq, tdeq, core.Tolerance(atol=step, basis="1 code step")),
    cmp("projected gradient", jlow, tlow, _products_tol(g, step)),
    cmp("back-projected", jback, tback, _products_tol(g, step)),
  ]
  if authors_cls is not None:
    want = oracle_basis(authors_cls, torch.from_numpy(g).to(dev.torch), RANK, GROUP_SIZE)
    checks += [
      cmp(
        "JAX vs authors' dequantised basis",
        jdeq,
        want,
        core.Tolerance(atol=step, basis="1 code step"),
      ),
      cmp(
        "torch vs authors' dequantised basis",
        tdeq,
        want,
        core.Tolerance(atol=step, basis="1 code step"),
      ),
    ]
  return checks


def _products_tol(g, step):
  """One flipped code moves a basis entry by ``step``, so a product entry by ``step * max|G|``
  (plus float32 rounding of the sums)."""
  atol = step * float(np.abs(g).max()) * 2
  return core.Tolerance(atol=atol, rtol=1e-5, basis="1 code step x 2 max|G|")


def measure_all(dev: core.Device, authors_cls=None) -> list[core.Check]:
  return [c for shape in SHAPES for c in measure(shape, dev, authors_cls)]

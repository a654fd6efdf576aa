"""Group-wise asymmetric quantisation and INT4 packing (docs/spec.md section 3).

A tensor is read as its canonical matrix, flattened row-major and cut into groups of
``group_size`` consecutive elements; a trailing partial group is quantised on its own
elements. With ``b`` bits and ``Q = 2**b - 1``, per group::

  s = max(max - min, 1e-5) / Q
  z = round(-min / s)                       # round half to even; NOT clamped (see below)
  q = clamp(round(w / s) + z, 0, Q)         # or clamp(floor(w / s + u) + z, 0, Q), see below
  w_hat = s * (q - z)

Given ``noise`` (uniforms ``u`` in [0, 1), one per element), the codes are rounded
stochastically instead, ``E[s * (q - z)] = w`` wherever the clamp is inactive: the rounding
of INT8 weights (docs/spec.md section 6), with ``u`` from ``generator.uniforms``.

docs/spec.md section 3 (after the authors' code) clamps ``z`` to [0, Q], which only matters when
``z`` is stored as a Q-bit integer. Here ``z`` is float32, and the clamp would clip every
single-sign group to [0, max - min] (a rank-1 projector ``[1.0]`` would decode as ``1e-5``).
Without the clamp the codes equal the authors' whenever a group spans zero, and every group
keeps ``|w - w_hat| <= s / 2`` (plus float32 rounding). ``qgalore_jax`` does the same.

Codes of at most 4 bits are stored two per byte (element ``2k`` in the low nibble, ``2k + 1``
in the high nibble), so a 4-bit tensor costs 0.5 byte per element plus 8 bytes per group.
This is the twin of ``qgalore_jax._src.quantization``: the same input gives the same codes,
scales and zeros, bit for bit.
"""

from typing import NamedTuple

import torch

from qgalore_torch._src.checks import check_bits
from qgalore_torch._src.checks import check_int

MIN_RANGE = 1e-5  # floor of (max - min): a constant group gets a tiny, finite scale.


class QuantizedTensor(NamedTuple):
  """A group-wise quantised tensor (docs/spec.md section 3).

  The shape, bit width and group size are not stored: they are static facts known to the
  code that made the tensor, so optimizer state holds tensors only.
  """

  codes: torch.Tensor  # uint8 [ceil(size / 2)] if bits <= 4 (packed), else uint8 [size]
  scale: torch.Tensor  # float32 [num_groups]
  zero: torch.Tensor  # float32 [num_groups]: zero point, an integer value, not clamped


def num_groups(size: int, group_size: int) -> int:
  """Number of quantisation groups for ``size`` elements (the last may be partial)."""
  return -(-size // group_size)


def grouped(flat: torch.Tensor, group_size: int) -> torch.Tensor:
  """Reshapes a flat vector to [num_groups, group_size], padding the last group.

  Shared by every group-wise computation (the quantiser, INT8 updates) so that all of them
  cut and pad groups alike.

  The padding repeats the last element, which belongs to the last group, so it changes
  neither that group's min nor its max.
  """
  pad = num_groups(flat.numel(), group_size) * group_size - flat.numel()
  if pad:
    flat = torch.cat([flat, flat[-1:].expand(pad)])
  return flat.reshape(-1, group_size)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
  """Packs 4-bit codes (uint8 values < 16) two per byte.

  Args:
    codes: uint8 tensor of any shape, read flattened; element ``2k`` goes to the low nibble
      of byte ``k``, element ``2k + 1`` to its high nibble. An odd trailing element leaves
      the high nibble 0.

  Returns:
    uint8 vector of length ``ceil(codes.numel() / 2)``.
  """
  codes = codes.reshape(-1).to(torch.uint8)
  if codes.numel() % 2:
    codes = torch.cat([codes, codes.new_zeros(1)])
  pairs = codes.reshape(-1, 2)
  return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_int4(packed: torch.Tensor, size: int) -> torch.Tensor:
  """Inverse of :func:`pack_int4`: returns the first ``size`` 4-bit codes as uint8."""
  pairs = torch.stack([packed & 0xF, packed >> 4], dim=-1)
  return pairs.reshape(-1)[:size]


def group_scale_zero(groups: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
  """Per-group ``s = max(max - min, 1e-5) / Q`` and unclamped ``z = round(-min / s)``.

  Args:
    groups: float32 [num_groups, group_size] (see the module docstring for the padding).
    bits: code width; ``Q = 2**bits - 1``.

  Returns:
    float32 ``(scale, zero)``, each [num_groups].
  """
  lo = groups.amin(dim=1)
  hi = groups.amax(dim=1)
  # A tensor divisor: CUDA turns division by a Python scalar into a reciprocal multiply,
  # 1 ulp away from the IEEE quotient that the CPU and qgalore_jax compute.
  scale = torch.clamp(hi - lo, min=MIN_RANGE) / torch.full_like(hi, 2**bits - 1)
  return scale, torch.round(-lo / scale)


def quantize(
  x: torch.Tensor, bits: int = 4, group_size: int = 256, *, noise: torch.Tensor | None = None
) -> QuantizedTensor:
  """Quantises ``x`` group-wise, rounding to nearest or stochastically (docs/spec.md sections 3, 6).

  ``x`` is flattened row-major (pass the canonical matrix: projector rows, or weights in
  (out, in) layout) and computed in float32. The codes are ``clamp(round(x / s) + z, 0, Q)``
  without ``noise``, ``clamp(floor(x / s + u) + z, 0, Q)`` with ``noise = u``; the scale
  and zero are the same either way.

  Args:
    x: tensor of any shape and float dtype.
    bits: code width, 1..8. Codes of 4 bits or fewer are packed two per byte.
    group_size: number of consecutive elements sharing one scale and zero.
    noise: ``None`` for round-to-nearest, or float32 uniforms in [0, 1) on the device of
      ``x``, one per element of ``x`` in row-major order (any shape of ``x``'s size), for
      stochastic rounding.

  Returns:
    A :class:`QuantizedTensor` on the device of ``x``.

  Example:
    >>> import torch
    >>> from qgalore_torch import quantize, dequantize
    >>> q = quantize(torch.tensor([[0.0, 0.5], [1.0, -1.0]]), bits=4, group_size=4)
    >>> q.codes.shape, q.scale.shape
    (torch.Size([2]), torch.Size([1]))
    >>> dequantize(q, (2, 2), bits=4, group_size=4)
    tensor([[ 0.0000,  0.5333],
            [ 0.9333, -0.9333]])
    >>> x = torch.tensor([0.0, 0.3, 1.0])  # 0.3 * 255 = 76.5: rounded up if the noise is > 0.5
    >>> quantize(x, bits=8, noise=torch.tensor([0.5, 0.49, 0.5])).codes.tolist()
    [0, 76, 255]
    >>> quantize(x, bits=8, noise=torch.tensor([0.5, 0.51, 0.5])).codes.tolist()
    [0, 77, 255]

  References:
    Zhang et al., `Q-GaLore <https://arxiv.org/abs/2407.08296>`_, section 3.2, 2024.
  """
  check_bits(bits)
  check_int(group_size, "group_size")
  levels = 2**bits - 1
  flat = x.detach().to(torch.float32).reshape(-1)
  groups = grouped(flat, group_size)
  scale, zero = group_scale_zero(groups, bits)
  scaled = groups / scale[:, None]
  if noise is None:
    codes = torch.round(scaled)
  else:
    if noise.numel() != flat.numel():
      raise ValueError(
        f"`noise` must have one value per element of x ({flat.numel()}), got shape"
        f" {tuple(noise.shape)}"
      )
    codes = torch.floor(scaled + grouped(noise.to(torch.float32).reshape(-1), group_size))
  codes = torch.clamp(codes + zero[:, None], 0, levels).to(torch.uint8).reshape(-1)
  codes = codes[: flat.numel()]
  if bits <= 4:
    codes = pack_int4(codes)
  return QuantizedTensor(codes=codes, scale=scale, zero=zero)


def dequantize(
  q: QuantizedTensor, shape: tuple[int, ...], bits: int = 4, group_size: int = 256
) -> torch.Tensor:
  """Returns the float32 tensor ``s * (code - z)`` of ``shape`` (docs/spec.md section 3).

  Args:
    q: what :func:`quantize` returned.
    shape: the shape of the tensor that was quantised.
    bits: the code width it was quantised with.
    group_size: the group size it was quantised with.

  Returns:
    float32 tensor of ``shape`` on the device of ``q``.
  """
  size = 1
  for d in shape:
    size *= d
  codes = unpack_int4(q.codes, size) if bits <= 4 else q.codes
  groups = grouped(codes.to(torch.float32), group_size)
  values = q.scale[:, None] * (groups - q.zero[:, None])
  return values.reshape(-1)[:size].reshape(shape)


def quantized_nbytes(q: QuantizedTensor) -> int:
  """Bytes a :class:`QuantizedTensor` really stores (codes, scales and zeros)."""
  return sum(t.numel() * t.element_size() for t in q)

"""The counter-based uniform generator of stochastic rounding (docs/spec.md section 6).

The twin of ``qgalore_jax._src.generator``, bit for bit: uniforms keyed by (seed, step,
tensor id, element index of the (out, in) weight in row-major order)::

  lowbias32(x) = x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16
  key = lowbias32(lowbias32(lowbias32(seed ^ 0x9e3779b9) ^ step) ^ tensor_id)
  h_i = lowbias32(lowbias32(i ^ key) + key);  u_i = (h_i >> 8) * 2**-24

torch has few uint32 kernels, so the hash runs on int64 tensors holding values in
[0, 2**32); each 32-bit product is split into 16-bit halves so that no intermediate reaches
2**63 (signed overflow is undefined in C++), on CPU and CUDA alike.
"""

import math

import torch

GOLDEN = 0x9E3779B9  # absorbed with the seed, so that seed 0 does not hash to the fixed point 0
MULTIPLIER_1 = 0x7FEB352D  # lowbias32 constants (C. Wellons, "hash-prospector")
MULTIPLIER_2 = 0x846CA68B
MAX_ELEMENTS = 2**32  # element indices are uint32
# Absorbed into a sketch's key, so that a refresh's sketch and the stochastic rounding of the
# same (seed, step, tensor id) draw unrelated streams (docs/spec.md section 2.6).
SKETCH_DOMAIN = 0x736B6574
_MASK32 = 0xFFFFFFFF
_CHUNK = 1 << 22  # elements hashed at once by `uniforms`


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
  """``x * constant mod 2**32`` for int64 ``x`` in [0, 2**32), every product below 2**49."""
  low, high = constant & 0xFFFF, constant >> 16
  return (x * low + (((x * high) & 0xFFFF) << 16)) & _MASK32


def lowbias32(x: torch.Tensor) -> torch.Tensor:
  """The 32-bit integer hash ``lowbias32``, a bijection of [0, 2**32) (docs/spec.md section 6).

  Args:
    x: int64 tensor with values in [0, 2**32).

  Returns:
    int64 tensor of the same shape, values in [0, 2**32).

  Example:
    >>> import torch
    >>> from qgalore_torch._src.generator import lowbias32
    >>> [hex(h) for h in lowbias32(torch.tensor([1, 0xDEADBEEF])).tolist()]
    ['0x688990c0', '0xe628c683']

  References:
    C. Wellons, `Prospecting for hash functions
    <https://nullprogram.com/blog/2018/07/31/>`_, 2018.
  """
  x = x ^ (x >> 16)
  x = _mul32(x, MULTIPLIER_1)
  x = x ^ (x >> 15)
  x = _mul32(x, MULTIPLIER_2)
  return x ^ (x >> 16)


def _as_uint32(value, name: str) -> torch.Tensor:
  """A Python int or integer 0-dim tensor as an int64 CPU-or-device scalar mod 2**32."""
  if isinstance(value, bool):
    raise TypeError(f"`{name}` must be an integer, got bool {value!r}")
  if isinstance(value, int):
    return torch.tensor(value % 2**32, dtype=torch.int64)
  if (
    not isinstance(value, torch.Tensor)
    or value.is_floating_point()
    or value.is_complex()
    or value.dim() != 0
  ):
    raise TypeError(f"`{name}` must be an integer scalar (Python int or int tensor), got {value!r}")
  return value.to(torch.int64) & _MASK32


def stream_key(seed, step, tensor_id) -> torch.Tensor:
  """The key of one tensor's uniforms at one step (docs/spec.md section 6).

  Args:
    seed: integer (Python int or 0-dim integer tensor), taken modulo 2**32.
    step: integer, taken modulo 2**32: the 0-based update count.
    tensor_id: integer, taken modulo 2**32.

  Returns:
    int64 0-dim tensor ``lowbias32(lowbias32(lowbias32(seed ^ GOLDEN) ^ step) ^ tensor_id)``.

  Example:
    >>> from qgalore_torch._src.generator import stream_key
    >>> hex(int(stream_key(1234, 5678, 7)))
    '0x76df4541'
  """
  key = lowbias32(_as_uint32(seed, "seed") ^ GOLDEN)
  key = lowbias32(key ^ _as_uint32(step, "step").to(key.device))
  return lowbias32(key ^ _as_uint32(tensor_id, "tensor_id").to(key.device))


def uniforms(seed, step, tensor_id, shape, device=None) -> torch.Tensor:
  r"""Counter-based uniforms in [0, 1), one per element of a tensor (docs/spec.md section 6).

  .. math::

    h_i = \text{lowbias32}(\text{lowbias32}(i \oplus k) + k), \qquad u_i = \lfloor h_i / 2^8
    \rfloor \cdot 2^{-24}

  with ``k`` = :func:`stream_key` and ``i`` the row-major element index: bit-identical to
  ``qgalore_jax.uniforms`` on any device.

  Args:
    seed: integer (Python int or 0-dim integer tensor).
    step: integer (Python int or 0-dim integer tensor).
    tensor_id: integer (Python int or 0-dim integer tensor).
    shape: shape of the result; at most ``2**32`` elements.
    device: device of the result.

  Returns:
    float32 tensor of ``shape``.

  Example:
    >>> from qgalore_torch import uniforms
    >>> u = uniforms(0, 0, 0, (2, 3))
    >>> u.shape, u.dtype, bool(((0 <= u) & (u < 1)).all())
    (torch.Size([2, 3]), torch.float32, True)

  References:
    Zhang et al., `Q-GaLore <https://arxiv.org/abs/2407.08296>`_, 2024.
  """
  size = math.prod(shape)
  if size > MAX_ELEMENTS:
    raise ValueError(f"uniforms are indexed by uint32: at most 2**32 elements, got {size}")
  out = torch.empty(size, dtype=torch.float32, device=device)
  for start, hashed in _hashes(stream_key(seed, step, tensor_id), size, device):
    out[start : start + _CHUNK] = (hashed >> 8).to(torch.float32) * 2.0**-24
  return out.reshape(shape)


def _hashes(key: torch.Tensor, size: int, device):
  """``(start, h[start : start + _CHUNK])`` chunks of ``h_i = lowbias32(lowbias32(i ^ key) +
  key)``, ``i = 0 .. size - 1``: chunks bound the int64 temporaries of eager torch (about 40
  bytes per element at once)."""
  for start in range(0, size, _CHUNK):
    index = torch.arange(start, min(start + _CHUNK, size), dtype=torch.int64, device=device)
    # The key is a 0-dim CPU tensor: used as a scalar operand, it costs no device sync.
    yield start, lowbias32((lowbias32(index ^ key) + key) & _MASK32)


def sketch_key(seed, step, tensor_id, slice_index) -> torch.Tensor:
  """The key of one matrix's sketch on one refresh (docs/spec.md section 2.6).

  Args:
    seed: integer (Python int or 0-dim integer tensor), taken modulo 2**32.
    step: integer: the matrix's 0-based step of the refresh.
    tensor_id: integer: the parameter's position across the param groups.
    slice_index: integer: the matrix's row-major index in its stack (0 for a 2-D parameter).

  Returns:
    int64 0-dim tensor ``lowbias32(lowbias32(stream_key ^ SKETCH_DOMAIN) ^ slice_index)``.

  Example:
    >>> from qgalore_torch._src.generator import sketch_key
    >>> hex(int(sketch_key(0, 0, 0, 0)))
    '0x2e2262a7'
  """
  key = lowbias32(stream_key(seed, step, tensor_id) ^ SKETCH_DOMAIN)
  return lowbias32(key ^ _as_uint32(slice_index, "slice_index").to(key.device))


def sketch(seed, step, tensor_id, slice_index, shape, device=None) -> torch.Tensor:
  r"""A Rademacher sketch: +1 or -1 per element, from the counter-based hash (section 2.6).

  .. math::

    \Omega_i = 1 - 2 \lfloor h_i / 2^{31} \rfloor

  with ``h_i`` the hash of :func:`uniforms` under :func:`sketch_key` and ``i`` the
  row-major element index: bit-identical to ``qgalore_jax``'s ``sketch`` on any device.

  Args:
    seed: integer (Python int or 0-dim integer tensor).
    step: integer (Python int or 0-dim integer tensor).
    tensor_id: integer (Python int or 0-dim integer tensor).
    slice_index: integer (Python int or 0-dim integer tensor).
    shape: ``(k, l)`` for a refresh.
    device: device of the result.

  Returns:
    float32 tensor of ``shape`` holding +1.0 and -1.0.

  Example:
    >>> from qgalore_torch._src.generator import sketch
    >>> sketch(0, 0, 0, 0, (2, 4)).tolist()
    [[1.0, -1.0, 1.0, -1.0], [1.0, -1.0, 1.0, 1.0]]
  """
  size = math.prod(shape)
  if size > MAX_ELEMENTS:
    raise ValueError(f"a sketch is indexed by uint32: at most 2**32 elements, got {size}")
  out = torch.empty(size, dtype=torch.float32, device=device)
  for start, hashed in _hashes(sketch_key(seed, step, tensor_id, slice_index), size, device):
    out[start : start + _CHUNK] = 1.0 - 2.0 * (hashed >> 31).to(torch.float32)
  return out.reshape(shape)

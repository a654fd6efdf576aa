"""Per-matrix adaptive subspace refresh (docs/spec.md section 4; paper section 3.3).

Each projected matrix has its own gap ``T`` (starts at ``update_proj_gap``) and refreshes its
projector on its 0-based step ``t`` when ``t % T == 0``. On every refresh after the first,
the signed cosine between the previous and the new top singular vector is pushed into a ring
buffer of the last ``queue_size`` cosines; when the buffer is full and its mean is at least
``cos_threshold``, ``T`` becomes ``floor(T * gamma_proj)``. The buffer is never cleared and
``T`` never shrinks, so a stable subspace doubles ``T`` at each later refresh (with the
defaults, SVDs at 0, 200, ..., 1200, 1600, 3200, 6400: 10 in 10k steps).

Two rules of docs/spec.md section 4 beyond the paper, shared with ``qgalore_jax``: a matrix
that has no valid projector yet (``svd_count == 0``) refreshes on every step until it gets
one, as the authors' ``ortho_matrix is None`` test does; and ``T`` is capped at ``MAX_GAP``
so it can never overflow int32.
"""

from typing import NamedTuple

import torch

MAX_GAP = 2**30


class SubspaceState(NamedTuple):
  """Adaptive-refresh state of one projected matrix."""

  gap: torch.Tensor  # int32 []: current refresh interval T
  cosines: torch.Tensor  # float32 [queue_size]: last cosines, newest at the end
  num_cosines: torch.Tensor  # int32 []: how many entries of `cosines` are filled
  top_vector: torch.Tensor  # float32 [k]: previous top singular vector (sign-canonical)
  svd_count: torch.Tensor  # int32 []: number of SVDs accepted so far


def init_subspace(
  k: int, update_proj_gap: int, queue_size: int, device: torch.device | str | None = None
) -> SubspaceState:
  """State of a matrix whose singular vectors have length ``k``, before any refresh.

  Args:
    k: length of a singular vector (``basis_shape(...)[1]``).
    update_proj_gap: initial gap ``T``.
    queue_size: length of the cosine ring buffer.
    device: where the tensors live; ``QGaLoreAdamW`` keeps them on the CPU so that the
      refresh decision never waits for the accelerator.
  """
  return SubspaceState(
    gap=torch.tensor(update_proj_gap, dtype=torch.int32, device=device),
    cosines=torch.zeros(queue_size, dtype=torch.float32, device=device),
    num_cosines=torch.zeros([], dtype=torch.int32, device=device),
    top_vector=torch.zeros(k, dtype=torch.float32, device=device),
    svd_count=torch.zeros([], dtype=torch.int32, device=device),
  )


def refresh_due(state: SubspaceState, step: torch.Tensor) -> torch.Tensor:
  """True when the matrix's 0-based ``step`` is a multiple of its gap, or it has no projector."""
  return (step % state.gap == 0) | (state.svd_count == 0)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
  """Signed cosine similarity of two vectors, with norms floored at 1e-8 (as torch's)."""
  norms = torch.clamp(torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b), min=1e-8)
  return torch.dot(a, b) / norms


def grow_gap(gap: torch.Tensor, gamma_proj: float) -> torch.Tensor:
  """``floor(gap * gamma_proj)``, exact for integer ``gamma_proj``, capped at ``MAX_GAP``."""
  if float(gamma_proj).is_integer():
    return torch.clamp(gap, max=MAX_GAP // int(gamma_proj)) * int(gamma_proj)
  grown = torch.floor(gap.to(torch.float32) * gamma_proj)
  return torch.clamp(grown, max=MAX_GAP).to(torch.int32)


def record_refresh(
  state: SubspaceState, top_vector: torch.Tensor, cos_threshold: float, gamma_proj: float
) -> SubspaceState:
  """State after a refresh whose new sign-canonical top singular vector is ``top_vector``."""
  has_previous = state.svd_count > 0
  queue_size = state.cosines.shape[0]
  c = cosine(state.top_vector, top_vector)
  pushed = torch.cat([state.cosines[1:], c[None]])
  cosines = torch.where(has_previous, pushed, state.cosines)
  num_cosines = torch.where(
    has_previous, torch.clamp(state.num_cosines + 1, max=queue_size), state.num_cosines
  )
  stable = (num_cosines == queue_size) & (torch.mean(cosines) >= cos_threshold)
  gap = torch.where(has_previous & stable, grow_gap(state.gap, gamma_proj), state.gap)
  return SubspaceState(
    gap=gap,
    cosines=cosines,
    num_cosines=num_cosines,
    top_vector=top_vector.to(torch.float32),
    svd_count=state.svd_count + 1,
  )

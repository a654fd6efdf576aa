"""Per-matrix adaptive subspace refresh (docs/spec.md section 4; paper section 3.3).

Each projected matrix has its own gap ``T`` (starts at ``update_proj_gap``) and refreshes its
projector on its 0-based step ``t`` when ``t % T == 0``. On every refresh after the first,
the signed cosine between the previous and the new top singular vector is pushed into a ring
buffer of the last ``queue_size`` cosines; when the buffer is full and its mean is at least
``cos_threshold``, ``T`` becomes ``floor(T * gamma_proj)``. The buffer is never cleared and
``T`` never shrinks, so a stable subspace doubles ``T`` at each later refresh (with the
defaults, SVDs at 0, 200, ..., 1200, 1600, 3200, 6400: 10 in 10k steps).

Two rules of docs/spec.md section 4 beyond the paper, shared by both backends:
a matrix that has no valid projector yet (``svd_count == 0``) refreshes on every step until
it gets one, as the authors' ``ortho_matrix is None`` test does; and ``T`` is capped at
``MAX_GAP`` so it can never overflow int32.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

MAX_GAP = 2**30


class SubspaceState(NamedTuple):
  """Adaptive-refresh state of one projected matrix."""

  gap: jax.Array  # int32 []: current refresh interval T
  cosines: jax.Array  # float32 [queue_size]: last cosines, newest at the end
  num_cosines: jax.Array  # int32 []: how many entries of `cosines` are filled
  top_vector: jax.Array  # float32 [k]: previous top singular vector (sign-canonical)
  svd_count: jax.Array  # int32 []: number of SVDs accepted so far


def init_subspace(k: int, update_proj_gap: int, queue_size: int) -> SubspaceState:
  """State of a matrix whose singular vectors have length ``k``, before any refresh."""
  return SubspaceState(
    gap=jnp.asarray(update_proj_gap, jnp.int32),
    cosines=jnp.zeros((queue_size,), jnp.float32),
    num_cosines=jnp.zeros([], jnp.int32),
    top_vector=jnp.zeros((k,), jnp.float32),
    svd_count=jnp.zeros([], jnp.int32),
  )


def refresh_due(state: SubspaceState, step: jax.Array) -> jax.Array:
  """True when the matrix's 0-based ``step`` is a multiple of its gap, or it has no projector."""
  return (step % state.gap == 0) | (state.svd_count == 0)


def cosine(a: jax.Array, b: jax.Array) -> jax.Array:
  """Signed cosine similarity of two vectors, with norms floored at 1e-8 (as torch's)."""
  norms = jnp.maximum(jnp.linalg.norm(a) * jnp.linalg.norm(b), 1e-8)
  return jnp.dot(a, b) / norms


def grow_gap(gap: jax.Array, gamma_proj: float) -> jax.Array:
  """``floor(gap * gamma_proj)``, exact for integer ``gamma_proj``, capped at ``MAX_GAP``."""
  if float(gamma_proj).is_integer():
    return jnp.minimum(gap, MAX_GAP // int(gamma_proj)) * int(gamma_proj)
  grown = jnp.floor(gap.astype(jnp.float32) * jnp.float32(gamma_proj))
  return jnp.minimum(grown, MAX_GAP).astype(jnp.int32)


def record_refresh(
  state: SubspaceState, top_vector: jax.Array, cos_threshold: float, gamma_proj: float
) -> SubspaceState:
  """State after a refresh whose new sign-canonical top singular vector is ``top_vector``."""
  has_previous = state.svd_count > 0
  queue_size = state.cosines.shape[0]
  c = cosine(state.top_vector, top_vector)
  pushed = jnp.concatenate([state.cosines[1:], c[None]])
  cosines = jnp.where(has_previous, pushed, state.cosines)
  num_cosines = jnp.where(
    has_previous, jnp.minimum(state.num_cosines + 1, queue_size), state.num_cosines
  )
  stable = (num_cosines == queue_size) & (jnp.mean(cosines) >= cos_threshold)
  gap = jnp.where(has_previous & stable, grow_gap(state.gap, gamma_proj), state.gap)
  return SubspaceState(
    gap=gap,
    cosines=cosines,
    num_cosines=num_cosines,
    top_vector=top_vector.astype(jnp.float32),
    svd_count=state.svd_count + 1,
  )

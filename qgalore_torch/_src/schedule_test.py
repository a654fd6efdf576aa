"""Tests of the adaptive refresh schedule (docs/spec.md section 4) against a list reference."""

import numpy as np
import pytest
import torch

from qgalore_torch._src import schedule


def run_schedule(top_vectors, steps, update_proj_gap, cos_threshold, gamma_proj, queue_size):
  """Drives the schedule functions; returns the refresh steps and the final state."""
  state = schedule.init_subspace(top_vectors.shape[1], update_proj_gap, queue_size)
  refreshes = []
  for t in range(steps):
    if bool(schedule.refresh_due(state, torch.tensor(t))):
      state = schedule.record_refresh(state, top_vectors[len(refreshes)], cos_threshold, gamma_proj)
      refreshes.append(t)
  return refreshes, state


def naive_schedule(top_vectors, steps, update_proj_gap, cos_threshold, gamma_proj, queue_size):
  """docs/spec.md section 4 with a Python list as the queue, in float64, as the authors wrote it."""
  gap, queue, previous, refreshes = update_proj_gap, [], None, []
  for t in range(steps):
    if previous is not None and t % gap:
      continue
    v = np.asarray(top_vectors[len(refreshes)], np.float64)
    if previous is not None:
      norms = max(np.linalg.norm(previous) * np.linalg.norm(v), 1e-8)
      queue = [*queue, float(previous @ v) / norms][-queue_size:]
      if len(queue) == queue_size and sum(queue) / queue_size >= cos_threshold:
        gap = int(gap * gamma_proj)
    previous = v
    refreshes.append(t)
  return refreshes, gap, queue


def test_stable_subspace_refreshes_ten_times_in_10k_steps():
  """The paper's example: T0 = 200, cosine 1 every time (docs/spec.md section 4, reference doc)."""
  vectors = torch.ones(20, 4)
  refreshes, state = run_schedule(vectors, 10_000, 200, 0.4, 2, 5)
  assert refreshes == [0, 200, 400, 600, 800, 1000, 1200, 1600, 3200, 6400]
  assert int(state.svd_count) == 10
  assert int(state.gap) == 6400  # the 11th refresh would be at 12800
  assert int(state.num_cosines) == 5


@pytest.mark.parametrize(
  "update_proj_gap, cos_threshold, gamma_proj, queue_size",
  [(3, 0.0, 2, 2), (2, 0.3, 1.5, 3), (5, -0.2, 3, 1), (4, 0.9, 2, 4)],
)
def test_matches_list_reference_on_random_cosines(
  update_proj_gap, cos_threshold, gamma_proj, queue_size
):
  rng = np.random.default_rng(update_proj_gap)
  base = rng.standard_normal(6)
  # Mostly aligned vectors with some sign flips and noise: cosines spread over [-1, 1].
  signs = rng.choice([1.0, 1.0, 1.0, -1.0], size=(400, 1))
  vectors = (signs * (base + 0.8 * rng.standard_normal((400, 6)))).astype(np.float32)
  refreshes, state = run_schedule(
    torch.from_numpy(vectors), 300, update_proj_gap, cos_threshold, gamma_proj, queue_size
  )
  expected, gap, queue = naive_schedule(
    vectors, 300, update_proj_gap, cos_threshold, gamma_proj, queue_size
  )
  assert refreshes == expected
  assert int(state.gap) == gap
  assert int(state.num_cosines) == len(queue)
  np.testing.assert_allclose(state.cosines[queue_size - len(queue) :].numpy(), queue, atol=1e-6)
  np.testing.assert_array_equal(state.top_vector.numpy(), vectors[len(expected) - 1])


def test_state_dtypes_and_first_refresh():
  state = schedule.init_subspace(7, 200, 5)
  int32, float32 = torch.int32, torch.float32
  assert [t.dtype for t in state] == [int32, float32, int32, float32, int32]
  assert bool(schedule.refresh_due(state, torch.tensor(3)))  # no projector yet
  state = schedule.record_refresh(state, torch.ones(7), 0.4, 2)
  assert int(state.svd_count) == 1 and int(state.num_cosines) == 0
  assert not bool(schedule.refresh_due(state, torch.tensor(3)))
  assert bool(schedule.refresh_due(state, torch.tensor(400)))


def test_cosine_is_signed_and_safe_on_zero_vectors():
  a = torch.tensor([1.0, 2.0, 0.0])
  assert float(schedule.cosine(a, -a)) == pytest.approx(-1.0)
  assert float(schedule.cosine(torch.zeros(3), a)) == 0.0


@pytest.mark.parametrize(
  "gap, gamma, expected",
  [(200, 2, 400), (200, 1.5, 300), (7, 1.5, 10), (5, 1, 5), (2**29 + 3, 2, 2**30)],
)
def test_grow_gap_floors_and_caps(gap, gamma, expected):
  grown = schedule.grow_gap(torch.tensor(gap, dtype=torch.int32), gamma)
  assert grown.dtype == torch.int32
  assert int(grown) == min(expected, schedule.MAX_GAP)

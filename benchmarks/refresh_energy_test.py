"""``benchmarks.refresh_energy``: the energy of each method, on gradients made here."""

import numpy as np
import pytest

from benchmarks import refresh_energy


def test_energies_are_one_where_the_sketch_spans_the_whole_space():
  rng = np.random.default_rng(0)
  # k = 12 <= rank 4 + oversample 16: every start block spans the space, every basis is exact.
  grads = [(t, {"w": rng.normal(size=(30, 12))}) for t in (0, 10)]
  got = refresh_energy.energies(grads, rank=4)
  assert {name: len(v) for name, v in got.items()} == {
    "randomized": 2, "randomized q=1": 2, "subspace": 1
  }  # fmt: skip
  for values in got.values():
    assert values == pytest.approx([1.0] * len(values), abs=1e-5)
  assert refresh_energy.summary([0.9, 1.0, 0.95]) == {"n": 3, "median": 0.95, "worst": 0.9}

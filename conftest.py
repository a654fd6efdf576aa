"""Shared pytest fixtures (the authors' projector as an independent oracle, one torch thread)
and the order of the tests (slow ones first)."""

import os

# One BLAS thread per test process: with pytest-xdist on a small machine, OpenBLAS threads
# oversubscribe the cores and a CPU SVD can take 100x longer (set before numpy/jax load).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest

from parity_tests import authors


def pytest_collection_modifyitems(items):
  """Runs the tests marked ``slow`` first (in their collected order, as the rest).

  pytest-xdist (``-n``) hands out tests one at a time as workers finish
  (``--maxschedchunk=1`` in pyproject.toml), so the long ones are spread over the workers
  from the start and the short ones fill the gaps, rather than one long test running alone
  at the end while the other workers wait."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def authors_projector_cls():
  """``GaLoreProjector`` from the authors' ``q-galore-torch`` 1.0 (skips when absent)."""
  pytest.importorskip("torch", reason="torch is needed for the authors' projector")
  cls = authors.projector_cls()
  if cls is None:
    pytest.skip(f"q_galore_torch is not installed ({authors.INSTALL})")
  return cls


@pytest.fixture
def one_thread():
  """One torch intra-op thread for the test (the setting of the torch speed benchmark)."""
  torch = pytest.importorskip("torch")
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)

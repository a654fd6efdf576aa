"""Shared pytest fixtures: the authors' projector as an independent oracle, one torch thread."""

import importlib.util
import os
import pathlib

# One BLAS thread per test process: with pytest-xdist on a small machine, OpenBLAS threads
# oversubscribe the cores and a CPU SVD can take 100x longer (set before numpy/jax load).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest


def _load_authors_module(package: str, module: str):
  """Loads one file of an installed package without running the package's ``__init__``.

  ``q_galore_torch/__init__.py`` imports bitsandbytes, which current releases break; the
  projector file itself only needs torch. Install it with ``pip install --no-deps``.
  """
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    pytest.skip(f"{package} is not installed (pip install --no-deps q-galore-torch==1.0)")
  path = pathlib.Path(next(iter(spec.submodule_search_locations))) / f"{module}.py"
  file_spec = importlib.util.spec_from_file_location(f"_oracle_{package}_{module}", path)
  mod = importlib.util.module_from_spec(file_spec)
  file_spec.loader.exec_module(mod)
  return mod


@pytest.fixture(scope="session")
def authors_projector_cls():
  """``GaLoreProjector`` from the authors' ``q-galore-torch`` 1.0 (skips when absent)."""
  pytest.importorskip("torch", reason="torch is needed for the authors' projector")
  return _load_authors_module("q_galore_torch", "q_galore_projector").GaLoreProjector


@pytest.fixture
def one_thread():
  """One torch intra-op thread for the test (the setting of the torch speed benchmark, and
  the one in which plain AdamW updates a CPU tensor in slices)."""
  torch = pytest.importorskip("torch")
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)

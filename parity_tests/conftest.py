"""Fixtures of the parity suites: one ``dev`` per device, GPU params marked and skipped."""

import pytest

from parity_tests import core

_GPU_OK, _GPU_WHY = core.gpu_available()

DEVICE_PARAMS = [
  pytest.param("cpu", id="cpu"),
  pytest.param(
    "gpu",
    id="gpu",
    marks=[pytest.mark.gpu, pytest.mark.skipif(not _GPU_OK, reason=f"no GPU: {_GPU_WHY}")],
  ),
]


@pytest.fixture(autouse=True)
def _parity_settings():
  """Full float32 matmuls and one torch CPU thread in every parity test."""
  with core.matmul_precision(highest=True), core.single_threaded_torch():
    yield


@pytest.fixture(params=DEVICE_PARAMS)
def dev(request) -> core.Device:
  """Each device the suites run on: the CPU always, the GPU where both backends see one."""
  return core.device(request.param)


@pytest.fixture
def gpu() -> core.Device:
  """The GPU, for CPU-vs-GPU comparisons (skips without one)."""
  if not _GPU_OK:
    pytest.skip(f"no GPU: {_GPU_WHY}")
  return core.device("gpu")

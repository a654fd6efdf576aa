"""Comparison records, devices and matmul precision shared by every parity suite.

A :class:`Check` is one measured quantity (e.g. the INT4 codes of one input, the weights
after 200 steps): its largest absolute and relative error, whether the two backends agree
bit for bit, the tolerance it is held to and whether it passed. Tests assert ``check.passed``;
the report prints the same records.
"""

import contextlib
import dataclasses

import jax
import numpy as np
import torch


@dataclasses.dataclass(frozen=True)
class Tolerance:
  """``|got - want| <= atol + rtol * |want|`` elementwise (numpy ``allclose``); 0, 0 is exact."""

  atol: float = 0.0
  rtol: float = 0.0
  basis: str = ""  # where the tolerance comes from, shown in the report

  @property
  def exact(self) -> bool:
    return self.atol == 0.0 and self.rtol == 0.0

  def __str__(self) -> str:
    if self.exact:
      return "bit-exact"
    text = f"atol={self.atol:.1e}" + (f" rtol={self.rtol:.1e}" if self.rtol else "")
    return f"{text} ({self.basis})" if self.basis else text


EXACT = Tolerance()


@dataclasses.dataclass(frozen=True)
class Check:
  """One compared quantity on one device."""

  component: str
  case: str
  quantity: str
  device: str
  max_abs: float
  max_rel: float
  bit_exact: bool
  tolerance: str
  passed: bool


def compare(component, case, quantity, got, want, tol=EXACT, device="cpu") -> Check:
  """Compares two arrays (NumPy, JAX or torch) elementwise under ``tol``.

  Shapes must match. Relative error is ``|got - want| / |want|`` where ``want != 0``; an
  element where ``want == 0`` and ``got != 0`` counts as relative error ``inf``.
  """
  got, want = to_numpy(got), to_numpy(want)
  if got.shape != want.shape:
    return Check(component, case, quantity, device, np.inf, np.inf, False, str(tol), False)
  bit_exact = got.dtype == want.dtype and np.array_equal(got, want, equal_nan=True)
  g, w = got.astype(np.float64), want.astype(np.float64)
  diff = np.abs(g - w)
  diff[np.isnan(g) & np.isnan(w)] = 0.0
  with np.errstate(divide="ignore", invalid="ignore"):
    rel = np.where(diff == 0, 0.0, diff / np.abs(w))
  max_abs = float(diff.max()) if diff.size else 0.0
  max_rel = float(rel.max()) if rel.size else 0.0
  passed = bit_exact if tol.exact else bool(np.all(diff <= tol.atol + tol.rtol * np.abs(w)))
  return Check(component, case, quantity, device, max_abs, max_rel, bit_exact, str(tol), passed)


def to_numpy(x) -> np.ndarray:
  """A host NumPy copy of a NumPy, JAX or torch array (never a view of a live tensor)."""
  if isinstance(x, torch.Tensor):
    return x.detach().cpu().numpy().copy()
  return np.array(x, copy=True)


def gpu_available() -> tuple[bool, str]:
  """Whether both backends see an NVIDIA GPU, and if not, why (the skip reason)."""
  missing = []
  if not torch.cuda.is_available():
    missing.append(f"torch {torch.__version__} sees no CUDA device")
  try:
    jax.devices("gpu")
  except RuntimeError:
    missing.append(f"jax {jax.__version__} has no GPU backend")
  return not missing, "; ".join(missing)


def devices_present() -> list[str]:
  """``["cpu"]``, plus ``"gpu"`` when both backends see one."""
  return ["cpu", "gpu"] if gpu_available()[0] else ["cpu"]


@dataclasses.dataclass(frozen=True)
class Device:
  """The same accelerator as seen by each backend."""

  name: str  # "cpu" or "gpu"
  jax: jax.Device
  torch: torch.device


def device(name: str) -> Device:
  """The :class:`Device` called ``name``; raises ``RuntimeError`` when it is absent."""
  if name == "cpu":
    return Device("cpu", jax.devices("cpu")[0], torch.device("cpu"))
  ok, why = gpu_available()
  if not ok:
    raise RuntimeError(f"no GPU: {why}")
  return Device("gpu", jax.devices("gpu")[0], torch.device("cuda"))


@contextlib.contextmanager
def on(dev: Device):
  """Runs JAX computations on ``dev`` (torch tensors are placed explicitly by the caller)."""
  with jax.default_device(dev.jax):
    yield


@contextlib.contextmanager
def single_threaded_torch():
  """One torch CPU thread while a suite runs, restored afterwards.

  On a shared CPU, torch's OpenMP pool spins against other processes: the 2400-step
  schedule run took 68 s with 2 threads and 2.4 s with 1 on a loaded 2-core machine.
  """
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  try:
    yield
  finally:
    torch.set_num_threads(threads)


@contextlib.contextmanager
def matmul_precision(highest: bool):
  """Full float32 matmuls in both backends (parity runs), or each library's fast default.

  ``highest``: JAX ``default_matmul_precision("highest")``; torch TF32 off for matmuls and
  cuDNN and ``set_float32_matmul_precision("highest")``. Otherwise JAX ``"default"`` (TF32
  or bf16 passes on GPUs that have them) and torch TF32 on with precision ``"high"``. On a
  CPU neither setting changes a result (measured by ``precision.py``).
  """
  saved = (
    torch.backends.cuda.matmul.allow_tf32,
    torch.backends.cudnn.allow_tf32,
    torch.get_float32_matmul_precision(),
  )
  torch.backends.cuda.matmul.allow_tf32 = not highest
  torch.backends.cudnn.allow_tf32 = not highest
  torch.set_float32_matmul_precision("highest" if highest else "high")
  try:
    with jax.default_matmul_precision("highest" if highest else "default"):
      yield
  finally:
    (
      torch.backends.cuda.matmul.allow_tf32,
      torch.backends.cudnn.allow_tf32,
      precision,
    ) = saved
    torch.set_float32_matmul_precision(precision)

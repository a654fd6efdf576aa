"""The parity report: every component's checks, one table each, for the devices present.

``python -m parity_tests`` calls :func:`main`: it runs the same measurement functions as the
pytest suites (same tolerances), prints the tables and writes
``parity_tests/results/parity_<device>.json`` and ``.md`` with the device, library versions
and date.
"""

import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import platform
import sys

import pytest
import torch

from parity_tests import core
from parity_tests import cross_device
from parity_tests import generator
from parity_tests import moments
from parity_tests import optimizer
from parity_tests import precision
from parity_tests import projector
from parity_tests import quantiser
from parity_tests import schedule

RESULTS = pathlib.Path(__file__).parent / "results"
LIBRARIES = ("qgalore", "jax", "jaxlib", "optax", "flax", "torch", "numpy", "q-galore-torch")
COLUMNS = ("case", "quantity", "max abs err", "max rel err", "bit-exact", "tolerance", "pass")


def authors_projector_cls():
  """The authors' ``GaLoreProjector`` through the repository's ``conftest.py``, or None."""
  path = pathlib.Path(__file__).resolve().parents[1] / "conftest.py"
  spec = importlib.util.spec_from_file_location("_repository_conftest", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  try:
    return module._load_authors_module("q_galore_torch", "q_galore_projector").GaLoreProjector
  except pytest.skip.Exception:
    return None


def run_components(dev: core.Device, authors_cls) -> list[core.Check]:
  """Every component's checks on ``dev`` (and CPU vs GPU when ``dev`` is the GPU)."""
  checks = quantiser.measure_all(dev)
  checks += generator.measure_all(dev)
  checks += projector.measure_all(dev, authors_cls)
  checks += schedule.measure(dev, authors_cls)
  for mode in optimizer.MODES:
    for int8 in (False, True):
      checks += optimizer.measure(int8, mode, dev.name)
  checks += moments.measure_all(dev)
  for lockstep in (True, False):
    checks += moments.measure_optimizer(lockstep, dev.name)
  checks += precision.measure(dev)
  if dev.name == "gpu":
    cpu = core.device("cpu")
    checks += cross_device.measure_codes(cpu, dev)
    checks += moments.measure_cross_device(cpu, dev)
    for int8 in (False, True):
      checks += cross_device.measure_optimizer(cpu, dev, int8)
  return checks


def environment(dev: core.Device) -> dict:
  """Device, library versions, Python and date of a report."""
  versions = {}
  for name in LIBRARIES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = "not installed"
  if dev.name == "gpu":
    described = f"{torch.cuda.get_device_name()} (JAX: {dev.jax.device_kind})"
  else:
    described = f"{_cpu_name()}, {os.cpu_count()} cores, {platform.system()}"
  return {
    "device": described,
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    "python": sys.version.split()[0],
    "versions": versions,
  }


def _cpu_name() -> str:
  """The CPU model from /proc/cpuinfo where there is one, else the architecture."""
  cpuinfo = pathlib.Path("/proc/cpuinfo")
  if cpuinfo.exists():
    for line in cpuinfo.read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  return platform.processor() or platform.machine()


def _row(c: core.Check) -> list[str]:
  return [
    c.case,
    c.quantity,
    f"{c.max_abs:.3g}",
    f"{c.max_rel:.3g}",
    "yes" if c.bit_exact else "no",
    c.tolerance,
    "PASS" if c.passed else "FAIL",
  ]


def markdown(env: dict, checks: list[core.Check]) -> str:
  """The report as markdown: a header, then one table per component."""
  versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
  lines = [
    f"# Parity report: {env['device']}",
    "",
    f"{env['date']}; Python {env['python']}; {versions}.",
    f"{sum(c.passed for c in checks)} of {len(checks)} checks pass.",
    "",
  ]
  for component in dict.fromkeys(c.component for c in checks):
    lines += [f"## {component}", "", "| " + " | ".join(COLUMNS) + " |"]
    lines.append("|" + "---|" * len(COLUMNS))
    rows = [
      [cell.replace("|", "\\|") for cell in _row(c)] for c in checks if c.component == component
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines.append("")
  return "\n".join(lines)


def main() -> int:
  """Runs the report on every device present; returns 1 if any check failed."""
  authors_cls = authors_projector_cls()
  RESULTS.mkdir(exist_ok=True)
  failed = 0
  for name in core.devices_present():
    dev = core.device(name)
    with core.matmul_precision(highest=True), core.single_threaded_torch():
      checks = run_components(dev, authors_cls)
    env = environment(dev)
    if authors_cls is None:
      env["note"] = "q-galore-torch is not installed: the authors' oracle was skipped"
    text = markdown(env, checks)
    print(text)
    (RESULTS / f"parity_{name}.md").write_text(text)
    payload = {**env, "checks": [dataclasses.asdict(c) for c in checks]}
    (RESULTS / f"parity_{name}.json").write_text(json.dumps(payload, indent=1) + "\n")
    failed += sum(not c.passed for c in checks)
  if not core.gpu_available()[0]:
    print(f"No GPU table: {core.gpu_available()[1]}.")
  return 1 if failed else 0

"""The parity report: every component's checks, one table each, for the devices present.

``python -m parity_tests`` calls :func:`main`: it runs the same measurement functions as the
pytest suites (same tolerances), prints the tables and writes ``parity_<device>.json`` and
``.md``, with the device, library versions and date, to ``--out`` (default ``runs/parity``).
``--update-results`` also rewrites the published ``parity_tests/results/`` files.
"""

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import sys

import torch

from parity_tests import authors
from parity_tests import core
from parity_tests import cross_device
from parity_tests import generator
from parity_tests import moments
from parity_tests import optimizer
from parity_tests import precision
from parity_tests import projector
from parity_tests import quantiser
from parity_tests import refresh
from parity_tests import schedule
from parity_tests import stacked

RESULTS = pathlib.Path(__file__).parent / "results"
DEFAULT_OUT = pathlib.Path("runs/parity")
LIBRARIES = ("qgalore", "jax", "jaxlib", "optax", "flax", "torch", "numpy", "q-galore-torch")
COLUMNS = ("case", "quantity", "max abs err", "max rel err", "bit-exact", "tolerance", "pass")


def run_components(dev: core.Device, authors_cls) -> list[core.Check]:
  """Every component's checks on ``dev`` (and CPU vs GPU when ``dev`` is the GPU)."""
  checks = quantiser.measure_all(dev)
  checks += generator.measure_all(dev)
  checks += projector.measure_all(dev, authors_cls)
  checks += refresh.measure_all(dev)
  checks += schedule.measure(dev, authors_cls)
  checks += stacked.measure(dev)
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """The command line of ``python -m parity_tests``.

  Example:
    >>> args = parse_args(["--out", "reports"])
    >>> str(args.out), args.update_results
    ('reports', False)
  """
  parser = argparse.ArgumentParser(
    prog="python -m parity_tests",
    description="Runs every parity check on each device present; prints and saves the report.",
  )
  parser.add_argument(
    "--out",
    type=pathlib.Path,
    default=DEFAULT_OUT,
    help=f"folder of parity_<device>.{{json,md}} (default: {DEFAULT_OUT})",
  )
  parser.add_argument(
    "--update-results",
    action="store_true",
    help="also rewrite the published report in parity_tests/results/",
  )
  return parser.parse_args(argv)


def output_dirs(args: argparse.Namespace) -> list[pathlib.Path]:
  """The folders a run writes its report to: ``--out``, and the published results if asked."""
  return [args.out, RESULTS] if args.update_results else [args.out]


def main(argv: list[str] | None = None) -> int:
  """Runs the report on every device present; returns 1 if any check failed."""
  folders = output_dirs(parse_args(argv))
  authors_cls = authors.projector_cls()
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
    payload = {**env, "checks": [dataclasses.asdict(c) for c in checks]}
    for folder in folders:
      folder.mkdir(parents=True, exist_ok=True)
      (folder / f"parity_{name}.md").write_text(text)
      (folder / f"parity_{name}.json").write_text(json.dumps(payload, indent=1) + "\n")
    failed += sum(not c.passed for c in checks)
  if not core.gpu_available()[0]:
    print(f"No GPU table: {core.gpu_available()[1]}.")
  print(f"Report written to {', '.join(str(f) for f in folders)}.")
  return 1 if failed else 0

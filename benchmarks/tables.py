"""Markdown pieces shared by the speed benchmarks (framework-free)."""

import json


def bandwidth_lines(result: dict, measured: str, counted: str) -> list[str]:
  """The normal steps of ``result`` against the memory-bandwidth floor, as markdown lines.

  Args:
    result: a speed benchmark's result, with ``bandwidth_bytes_per_s``, ``bandwidth_floor``
      (see :func:`floor_rows`) and ``median_ms``; no lines if it has no floor.
    measured: what moved the bytes of the measured bandwidth, e.g. "a jitted STREAM triad".
    counted: which bytes a step's floor counts, appended after "the bytes it cannot avoid
      moving".

  Returns:
    A paragraph, then the table of :func:`floor_rows`.
  """
  floor = result.get("bandwidth_floor")
  if not floor:
    return []
  gbs = result["bandwidth_bytes_per_s"] / 1e9
  text = (
    f"Against the memory-bandwidth floor: {measured} moved {gbs:.1f} GB/s here. A step's"
    f" floor is the bytes it cannot avoid moving {counted} at that rate. A ratio near 1 is a"
    " memory-bound step that wastes no traffic."
  )
  return ["", text, "", *floor_rows(floor, result["median_ms"])]


def floor_rows(floor: dict, median_ms: dict) -> list[str]:
  """The table of each normal step against its memory-bandwidth floor.

  Args:
    floor: per optimizer name, ``{"read": bytes, "written": bytes, "ms": floor in ms}``.
    median_ms: per optimizer name, the measured median step time in ms.

  Returns:
    Markdown lines: the header, then one row per optimizer of ``floor``.

  Example:
    >>> floor_rows({"adamw": {"read": 2e6, "written": 1e6, "ms": 0.5}}, {"adamw": 1.0})[-1]
    '| adamw | 2.0 | 1.0 | 0.500 | 1.000 | 2.00x |'
  """
  lines = [
    "| optimizer (normal step) | read MB | written MB | floor ms | median ms | x floor |",
    "|---|---:|---:|---:|---:|---:|",
  ]
  for name, row in floor.items():
    ms = median_ms[name]
    lines.append(
      f"| {name} | {row['read'] / 1e6:,.1f} | {row['written'] / 1e6:,.1f} | {row['ms']:.3f}"
      f" | {ms:.3f} | {ms / row['ms']:.2f}x |"
    )
  return lines


def write_results(path, result: dict, table: str) -> None:
  """Writes ``result`` as JSON at ``path`` and ``table`` beside it as markdown; prints both."""
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=1) + "\n")
  path.with_suffix(".md").write_text(table)
  print()
  print(table)
  print(f"written to {path} and {path.with_suffix('.md')}")

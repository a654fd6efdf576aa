"""Markdown pieces shared by the speed benchmarks (framework-free)."""


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

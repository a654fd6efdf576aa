"""Every ```python block of README.md runs as written, on the CPU.

Each block runs in a fresh interpreter from the repository root. A block that cannot run on
a CPU-only machine says why on the line before it, as
``<!-- not run by docs/readme_test.py: needs a GPU -->``, and the test skips it with that
reason.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SKIP_MARK = re.compile(r"<!-- not run by docs/readme_test.py: (.+?) -->")
TIMEOUT_S = 300


def python_blocks(markdown: str) -> list[tuple[int, str, str | None]]:
  """The ```python blocks of ``markdown``.

  Args:
    markdown: the text of a markdown file.

  Returns:
    ``(line, code, skip_reason)`` per block: the 1-based line of its opening fence, its
    code, and the reason given on the line before the fence (None when there is none).

  Example:
    >>> python_blocks("Text\\n```python\\nx = 1\\n```\\n```bash\\nls\\n```\\n")
    [(2, 'x = 1\\n', None)]
  """
  lines = markdown.splitlines(keepends=True)
  blocks = []
  i = 0
  while i < len(lines):
    if lines[i].strip() == "```python":
      mark = SKIP_MARK.search(lines[i - 1]) if i else None
      end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
      blocks.append((i + 1, "".join(lines[i + 1 : end]), mark and mark.group(1)))
      i = end
    i += 1
  return blocks


BLOCKS = python_blocks((ROOT / "README.md").read_text())


def test_every_python_fence_is_found():
  fences = (ROOT / "README.md").read_text().count("```python")
  assert len(BLOCKS) == fences > 0


def test_skip_reason_is_read_from_the_line_before_the_block():
  text = "<!-- not run by docs/readme_test.py: needs a GPU -->\n```python\nx = 1\n```\n"
  assert python_blocks(text) == [(2, "x = 1\n", "needs a GPU")]


@pytest.mark.slow
@pytest.mark.parametrize(
  ("line", "code", "skip_reason"), BLOCKS, ids=[f"README.md:{b[0]}" for b in BLOCKS]
)
def test_readme_block_runs_on_cpu(line, code, skip_reason):
  if skip_reason:
    pytest.skip(skip_reason)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""}
  result = subprocess.run(
    [sys.executable, "-c", code],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=TIMEOUT_S,
  )
  assert result.returncode == 0, f"README.md line {line}:\n{code}\n{result.stderr}"

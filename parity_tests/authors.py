"""The authors' ``q-galore-torch`` 1.0, loaded file by file as an independent oracle.

``q_galore_torch/__init__.py`` imports bitsandbytes, which current releases break; the
projector file itself only needs torch. Install the package without its dependencies:
``pip install --no-deps q-galore-torch==1.0``. Used by the tests' ``authors_projector_cls``
fixture (the repository's ``conftest.py``) and by ``python -m parity_tests``.
"""

import importlib.util
import pathlib
import types

INSTALL = "pip install --no-deps q-galore-torch==1.0"


def load_module(package: str, module: str) -> types.ModuleType | None:
  """One file of an installed package, loaded without running the package's ``__init__``.

  Args:
    package: the import name of the installed package (``"q_galore_torch"``).
    module: the file's name without ``.py`` (``"q_galore_projector"``).

  Returns:
    The module, or None when ``package`` is not installed.

  Example:
    >>> load_module("no_such_package_here", "anything") is None
    True
  """
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    return None
  path = pathlib.Path(next(iter(spec.submodule_search_locations))) / f"{module}.py"
  file_spec = importlib.util.spec_from_file_location(f"_oracle_{package}_{module}", path)
  mod = importlib.util.module_from_spec(file_spec)
  file_spec.loader.exec_module(mod)
  return mod


def projector_cls() -> type | None:
  """The authors' ``GaLoreProjector``, or None when ``q-galore-torch`` is not installed."""
  module = load_module("q_galore_torch", "q_galore_projector")
  return None if module is None else module.GaLoreProjector

"""Parity suites: ``qgalore_jax`` and ``qgalore_torch`` compute the same Q-GaLore.

Each component module (``quantiser``, ``generator``, ``projector``, ``schedule``,
``optimizer``, ``moments``, ``precision``, ``cross_device``) holds measurement functions that
run both backends in one process on the same inputs, each in its native layout, and return
:class:`~parity_tests.core.Check` records. The pytest files (``*_test.py``) assert on those
records and ``python -m parity_tests`` prints and saves them, so the report's tolerances are
the tests' tolerances. See ``docs/parity.md``.
"""

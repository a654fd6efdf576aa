"""qgalore_adamw and QGaLoreAdamW train the tiny LLaMA block along the same trajectory."""

import pytest

from parity_tests import optimizer


@pytest.mark.slow
@pytest.mark.parametrize("int8", [False, True], ids=["float", "int8"])
@pytest.mark.parametrize("mode", optimizer.MODES)
def test_llama_block_trajectories_agree(mode, int8, dev):
  for check in optimizer.measure(int8, mode, dev.name):
    assert check.passed, check

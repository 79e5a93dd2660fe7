"""farcast under torchrun: ranks that share the work write, byte for byte, what one process writes;
any rank's failure fails every rank and leaves nothing.

Most tests launch the real CLI with torchrun --standalone (gloo, CPU); a few start the ranks
themselves with torchrun's environment, as srun does, to see every rank's exit code.
"""

from __future__ import annotations

import pytest
import torch

from farcast_cli.evaluate.backtest import SUM_BLOCK, blockwise_sum


@pytest.mark.parametrize("count", [SUM_BLOCK * 40 + 17, SUM_BLOCK - 1])
def test_error_sums_do_not_depend_on_the_number_of_threads(count):
    """torchrun gives each rank one thread; a plain process has every core: the report must agree."""
    values = torch.randn(count, generator=torch.Generator().manual_seed(0)).abs()
    previous = torch.get_num_threads()
    try:
        sums = []
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            sums.append(blockwise_sum(values))
    finally:
        torch.set_num_threads(previous)
    assert sums[0] == sums[1] == sums[2]
    assert sums[0] == pytest.approx(float(values.double().sum()), rel=1e-6)

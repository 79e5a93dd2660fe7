"""Computing each streamed chunk in cache-sized blocks (io/engine.py) gives what computing it whole gives:
the same forecast bytes and the same backtest figures, for float32 and for bfloat16 weights."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAST, write_run

from farcast_cli.evaluate import backtest
from farcast_cli.evaluate.backtest import SUM_BLOCK, _ChunkErrors, _Sums
from farcast_cli.io import engine

BIG = (3, 20_001)


def drifting(steps: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    """Two tensors, one of several SUM_BLOCK rows and a tail, drifting with noise."""
    generator = torch.Generator().manual_seed(3)
    shapes = {"big.weight": BIG, "small.bias": (7,)}
    base = {name: torch.randn(shape, generator=generator) * 0.02 for name, shape in shapes.items()}
    drift = {name: torch.randn(shape, generator=generator) * 1e-3 for name, shape in shapes.items()}
    return {
        step: {name: base[name] + drift[name] * step / 20 + torch.randn(base[name].shape, generator=generator) * 1e-4 for name in shapes}
        for step in steps
    }


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def big_run(request, tmp_path):
    steps = list(range(0, 201, 20))
    return write_run(tmp_path / "run", steps, dtype=request.param, weights=drifting(steps))


def predicted(farcast, run, out, block: int, monkeypatch) -> tuple[bytes, dict]:
    monkeypatch.setattr(engine, "BLOCK_ELEMENTS", block)
    report = json.loads(farcast("predict", run, "-H", 100, "-o", out, "--json", *FAST).stdout)
    return (out / "model.safetensors").read_bytes(), report["backtest"]


def test_blocks_give_the_bytes_and_figures_of_whole_chunks(big_run, farcast, tmp_path, monkeypatch):
    whole = predicted(farcast, big_run, tmp_path / "whole", 1 << 30, monkeypatch)
    blocks = predicted(farcast, big_run, tmp_path / "blocks", SUM_BLOCK, monkeypatch)
    assert blocks[0] == whole[0]
    assert blocks[1] == whole[1]
    assert whole[1]["overall"]["numel"] == 3 * 20_001 + 7


@pytest.mark.parametrize("count", [SUM_BLOCK - 5, 3 * SUM_BLOCK, 5 * SUM_BLOCK + 11])
def test_chunk_errors_by_block_equal_blockwise_sums_of_the_whole_chunk(count):
    generator = torch.Generator().manual_seed(count)
    truth = torch.randn(count, generator=generator)
    predictions = {"a": truth + torch.randn(count, generator=generator) * 1e-3, "b": torch.randn(count, generator=generator)}
    expected = _Sums(predictions)
    expected.add(truth, predictions)
    errors = _ChunkErrors(predictions, count, truth.device)
    for start in range(0, count, 2 * SUM_BLOCK):
        stop = min(count, start + 2 * SUM_BLOCK)
        errors.add(start, torch.stack([torch.sub(p[start:stop], truth[start:stop]) for p in predictions.values()]))
    found = _Sums(predictions)
    errors.add_to(found)
    assert found.values == expected.values and found.count == expected.count == count
    assert backtest.blockwise_sum(torch.ones(count)) == count

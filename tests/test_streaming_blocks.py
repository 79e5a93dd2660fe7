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


def _close(found: object, expected: object, rel: float = 1e-5) -> bool:
    """The same report, its figures within `rel` of each other (sums of other chunkings and matrix products)."""
    if isinstance(expected, dict):
        return isinstance(found, dict) and found.keys() == expected.keys() and all(_close(found[k], v, rel) for k, v in expected.items())
    if isinstance(expected, float) and isinstance(found, float):
        return abs(found - expected) <= rel * max(abs(expected), 1e-30)
    return found == expected


def test_the_backtest_taken_from_the_write_is_the_backtest_on_its_own(big_run, farcast, tmp_path):
    def predict(out, *extra):
        return json.loads(farcast("predict", big_run, "-H", 100, "-o", out, "--json", *FAST, *extra).stdout)

    alongside = predict(tmp_path / "alongside")
    # a minimum skill makes the backtest decide before anything is written: its own pass, then the write
    apart = predict(tmp_path / "apart", "--min-skill", "-1000")
    assert (tmp_path / "alongside" / "model.safetensors").read_bytes() == (tmp_path / "apart" / "model.safetensors").read_bytes()
    assert "backtest" in apart["seconds"] and apart["seconds"]["backtest"] > alongside["seconds"]["backtest"]
    assert alongside["written"] == apart["written"] and alongside["verdict"] == apart["verdict"]
    assert _close(alongside["backtest"], apart["backtest"])
    assert alongside["backtest"]["overall"]["numel"] == 3 * 20_001 + 7


def _pool_rows(dtype: torch.dtype, count: int, sources: int) -> list[torch.Tensor]:
    """Sources as the engine hands them over: typed views of the rows of one read allocation."""
    pool = engine._Pool(1, sources, count * dtype.itemsize, pinned=False)
    rows = pool.free.get()
    generator = torch.Generator().manual_seed(sources)
    data = [row[: count * dtype.itemsize].view(dtype) for row in rows]
    for values in data:
        values.copy_(torch.randn(count, generator=generator))
    return data


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_matrix_blocks_are_the_sources_in_their_compute_dtype(dtype):
    count, settings = 3 * SUM_BLOCK + 5, engine.EngineSettings(torch.device("cpu"), 1 << 20)
    data = _pool_rows(dtype, count, 3)
    blocks = list(engine.matrix_blocks(data, settings, engine.Scratch(3 * settings.block_elements)))
    assert [(start, stop) for start, stop, _ in blocks] == [(0, count)]
    matrix = blocks[0][2]
    assert matrix.shape == (3, count) and matrix.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert all(torch.equal(row, values.to(matrix.dtype)) for row, values in zip(matrix, data))
    stored_so = dtype != torch.bfloat16
    assert (matrix.data_ptr() == data[0].data_ptr()) == stored_so  # a view of the read buffers, not a copy


def test_sources_apart_in_memory_are_copied_into_one_matrix():
    data = [torch.arange(10, dtype=torch.float32) + i for i in range(3)]
    assert engine.source_matrix(data) is None
    settings = engine.EngineSettings(torch.device("cpu"), 1024)
    ((_, _, matrix),) = list(engine.matrix_blocks(data, settings, engine.Scratch(3 * settings.block_elements)))
    assert torch.equal(matrix, torch.stack(data))

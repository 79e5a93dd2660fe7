"""Computing each streamed chunk in cache-sized blocks (io/engine.py) gives what computing it whole gives:
the same forecast bytes and the same backtest figures, for float32 and for bfloat16 weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import FAST, write_run
from dcp_runs import save_dcp_run
from safetensors.torch import load_file

from farcast_cli.evaluate import backtest
from farcast_cli.evaluate.backtest import SUM_BLOCK, _ChunkErrors, _Sums
from farcast_cli.io import engine
from farcast_cli.io.writer import FlushBehind

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
    _assert_same_forecast(tmp_path / "alongside" / "model.safetensors", tmp_path / "apart" / "model.safetensors")
    assert "backtest" in apart["seconds"] and apart["seconds"]["backtest"] > alongside["seconds"]["backtest"]
    assert alongside["written"] == apart["written"] and alongside["verdict"] == apart["verdict"]
    assert _close(alongside["backtest"], apart["backtest"])
    assert alongside["backtest"]["overall"]["numel"] == 3 * 20_001 + 7


def _assert_same_forecast(found: Path, expected: Path) -> None:
    """Float32 outputs byte for byte; 16-bit outputs (computed as rows of the backtest's matrix product
    when taken from the write's pass) within one unit in the last place."""
    a, b = load_file(found), load_file(expected)
    assert a.keys() == b.keys()
    for name, values in b.items():
        assert a[name].dtype == values.dtype
        if values.dtype in (torch.bfloat16, torch.float16):
            assert _ulps(a[name], values) <= 1
        else:
            assert torch.equal(a[name], values)
    if not any(values.dtype in (torch.bfloat16, torch.float16) for values in b.values()):
        assert found.read_bytes() == expected.read_bytes()


def _ulps(found: torch.Tensor, expected: torch.Tensor) -> int:
    """The largest distance in units in the last place between two finite 16-bit float tensors."""

    def ordered(values: torch.Tensor) -> torch.Tensor:
        bits = values.view(torch.int16).to(torch.int64)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return int((ordered(found) - ordered(expected)).abs().max())


@pytest.mark.slow
def test_a_dcp_run_takes_its_backtest_from_the_write_too(tmp_path, farcast):
    steps = list(range(0, 201, 20))
    run = save_dcp_run(tmp_path / "run", drifting(steps), "fsdp")

    def predict(out, *extra):
        return json.loads(farcast("predict", run, "-H", 100, "-o", out, "--json", *FAST, *extra).stdout)

    alongside, apart = predict(tmp_path / "alongside"), predict(tmp_path / "apart", "--min-skill", "-1000")
    written = sorted(p.relative_to(tmp_path / "apart") for p in (tmp_path / "apart").rglob("*.distcp"))
    assert written
    for path in written:
        assert (tmp_path / "alongside" / path).read_bytes() == (tmp_path / "apart" / path).read_bytes()
    assert apart["seconds"]["backtest"] > alongside["seconds"]["backtest"]
    assert alongside["written"] == apart["written"] and alongside["verdict"] == apart["verdict"]
    assert _close(alongside["backtest"], apart["backtest"])
    assert alongside["backtest"]["overall"]["numel"] == 3 * 20_001 + 7


def test_16_bit_outputs_from_the_product_are_within_one_ulp_of_their_own_pass(tmp_path, farcast):
    """A float32 run written in bfloat16 at two steps: each output is a row of the backtest's product."""
    steps = list(range(0, 201, 20))
    run = write_run(tmp_path / "run", steps, weights=drifting(steps))

    def predict(out, *extra):
        return json.loads(farcast("predict", run, "-H", 100, "--emit", 50, "--dtype", "bf16", "-o", out, "--json", *FAST, *extra).stdout)

    alongside, apart = predict(tmp_path / "alongside"), predict(tmp_path / "apart", "--min-skill", "-1000")
    written = sorted(p.relative_to(tmp_path / "apart") for p in (tmp_path / "apart").rglob("*.safetensors"))
    assert len(written) == 2
    for path in written:
        _assert_same_forecast(tmp_path / "alongside" / path, tmp_path / "apart" / path)
        assert load_file(tmp_path / "alongside" / path)["big.weight"].dtype == torch.bfloat16
    assert alongside["written"] == apart["written"] and _close(alongside["backtest"], apart["backtest"])


def test_flushing_behind_writes_back_and_reports_its_failure(tmp_path):
    path = tmp_path / "data.bin"
    with open(path, "wb") as handle:
        flush = FlushBehind(handle.fileno(), every=1)
        for _ in range(3):
            handle.write(b"x" * 1000)
            handle.flush()
            flush.wrote(1000)
        flush.finish()
        assert not flush.thread.is_alive()
    assert path.read_bytes() == b"x" * 3000
    readable, writable = os.pipe()
    try:
        failing = FlushBehind(readable, every=1)
        failing.wrote(1)
        with pytest.raises(OSError):
            failing.finish()
    finally:
        os.close(readable)
        os.close(writable)


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

"""The forecast's work divides by tensor among processes, a large tensor by range: each writes its
share of every file, one finishes the folder, and the result is byte for byte what one process writes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import write_run

from farcast_cli.forecast.write import share_nbytes, split_work
from farcast_cli.io.run import find_run

WRITE_SHARE = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import torch
    from farcast_cli.io.engine import EngineSettings
    from farcast_cli.forecast.write import split_work, write_tensors
    from farcast_cli.model.forecaster import Forecaster
    from farcast_cli.forecast.candidates import candidates
    from farcast_cli.io.run import find_run

    torch.set_num_threads(1)
    run_dir, forecaster_file, folder, part, parts, dtype = sys.argv[1:]
    run, forecaster = find_run(Path(run_dir)), Forecaster.load(Path(forecaster_file))
    last = run.at_step(forecaster.context_end)
    share = split_work(last, int(parts), grain=50)[int(part)]
    settings = EngineSettings(torch.device("cpu"), chunk_elements=50)
    write_tensors(candidates(run, forecaster)["forecast"], last, Path(folder), settings, dtype or None, only=share)
    """
)


def write_in_parts(run: Path, forecaster_file: Path, folder: Path, parts: int, dtype: str = "") -> None:
    """Every share written by its own process, all running at once, then the folder finished."""
    from farcast_cli.forecast.candidates import candidates
    from farcast_cli.forecast.write import finish_forecast
    from farcast_cli.model.forecaster import Forecaster

    folder.mkdir()
    processes = [
        subprocess.Popen([sys.executable, "-c", WRITE_SHARE, str(run), str(forecaster_file), str(folder), str(k), str(parts), dtype])
        for k in range(parts)
    ]
    assert [p.wait(timeout=120) for p in processes] == [0] * parts
    found, forecaster = find_run(run), Forecaster.load(forecaster_file)
    finish_forecast(candidates(found, forecaster)["forecast"], found.at_step(forecaster.context_end), folder, dtype or None)


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "farcast_report.json"}


@pytest.mark.slow
@pytest.mark.parametrize("shards, parts, dtype", [(1, 2, ""), (2, 3, ""), (2, 2, "bf16")])
def test_parts_written_by_separate_processes_equal_one_process(tmp_path, farcast, shards, parts, dtype):
    run = write_run(tmp_path / "run", shards=shards)
    forecaster_file = tmp_path / "f.json"
    farcast("fit", run, "--horizon", 60, "-o", forecaster_file, "--sample", 500, "--backtest", "sample")
    whole = tmp_path / "whole"
    farcast("predict", run, "--forecaster", forecaster_file, "-o", whole, "--max-memory", "64KB", *(["--dtype", dtype] if dtype else []))

    split = tmp_path / "split"
    write_in_parts(run, forecaster_file, split, parts, dtype.upper())
    assert files_of(split) == files_of(whole)
    assert len([name for name in files_of(whole) if name.endswith(".safetensors")]) == shards


def test_split_work_covers_every_element_once_and_cuts_a_dominant_tensor(tmp_path):
    """encoder.weight holds 3/4 of the bytes: it is cut in ranges (at multiples of the grain), so that
    the busiest process gets about its fair share instead of the whole tensor."""
    last = find_run(write_run(tmp_path / "run", shards=2)).last
    infos = {name: last.tensor(name)[1] for name in last.shard_of}
    total = sum(info.nbytes for info in infos.values())
    assert infos["encoder.weight"].nbytes > 0.7 * total
    for parts in (1, 2, 3, 7):
        shares = split_work(last, parts, grain=16)
        assert len(shares) == parts
        for name, info in infos.items():
            ranges = sorted(r for share in shares for r in share.get(name, ()))
            assert ranges[0][0] == 0 and ranges[-1][1] == info.numel, name
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), name
            assert all(start % 16 == 0 for start, _ in ranges), name
        loads = [share_nbytes(last, share) for share in shares]
        assert sum(loads) == total
        assert max(loads) <= total / parts + infos["encoder.weight"].nbytes / parts + 16 * 4
    assert max(share_nbytes(last, share) for share in split_work(last, 2, grain=16)) < 0.55 * total
    assert split_work(last, 3, grain=16) == split_work(last, 3, grain=16)
    assert split_work(last, 2, grain=1024) == [
        {name: ((0, info.numel),) for name, info in infos.items() if name in share} for share in split_work(last, 2, grain=1024)
    ], "a tensor shorter than the grain stays whole"

"""farcast under torchrun: ranks that share the work write, byte for byte, what one process writes;
any rank's failure fails every rank and leaves nothing.

Most tests launch the real CLI with torchrun --standalone (gloo, CPU); a few start the ranks
themselves with torchrun's environment, as srun does, to see every rank's exit code.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import trajectories, without_progress, write_run

from farcast_cli.distributed import (
    ONE_PROCESS,
    SHARED_WRITE_FILE_SYSTEMS,
    Failure,
    Piece,
    RanksFailed,
    World,
    balanced_shares,
    collective_timeout,
    cut_in_pieces,
    file_system_type,
    join_world,
    shared_file_writes,
)
from farcast_cli.errors import UsageError
from farcast_cli.evaluate.backtest import SUM_BLOCK, blockwise_sum, checkpoints_read, scored_tensors, streamed_bytes
from farcast_cli.evaluate.report import REPORT_FILE
from farcast_cli.forecast.candidates import candidates
from farcast_cli.forecast.write import split_files, split_work
from farcast_cli.io.run import find_run
from farcast_cli.model.forecaster import Forecaster
from farcast_cli.model.history import sample_coordinates, sample_pieces
from farcast_cli.model.linear import LinearMap

BIG = 10_000_000


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


def test_one_failure_line_when_ranks_agree_and_one_per_rank_where_they_disagree():
    agree = RanksFailed([Failure(rank, 5, "out: already exists") for rank in range(3)], attempted=3)
    assert agree.lines() == ["out: already exists"] and agree.exit_code == 5
    one = RanksFailed([Failure(2, 3, "f: tensor 'x' holds nan")], attempted=3)
    assert one.lines() == ["[rank 2] f: tensor 'x' holds nan"] and one.exit_code == 3
    two = RanksFailed([Failure(0, 5, "disk full"), Failure(1, 3, "nan"), Failure(3, 3, "nan")], attempted=4)
    assert two.lines() == ["[rank 0] disk full", "[ranks 1, 3] nan"] and two.exit_code == 5
    assert RanksFailed([Failure(0, 2, "--anchor 5 needs 6 checkpoints")], attempted=1).lines() == ["--anchor 5 needs 6 checkpoints"]


class TwoNodes(World):
    size, nodes = 2, 2


def test_shared_output_files_only_where_the_file_system_takes_them(tmp_path, monkeypatch):
    monkeypatch.delenv("FARCAST_WRITE_SPLIT", raising=False)
    assert shared_file_writes(ONE_PROCESS, tmp_path)
    assert file_system_type(tmp_path) not in SHARED_WRITE_FILE_SYSTEMS
    assert not shared_file_writes(TwoNodes(), tmp_path / "not" / "yet")
    assert file_system_type(Path("/proc/self")) == "proc"
    monkeypatch.setenv("FARCAST_WRITE_SPLIT", "tensors")
    assert shared_file_writes(TwoNodes(), tmp_path)
    monkeypatch.setenv("FARCAST_WRITE_SPLIT", "files")
    assert not shared_file_writes(ONE_PROCESS, tmp_path)
    monkeypatch.setenv("FARCAST_WRITE_SPLIT", "shards")
    with pytest.raises(UsageError, match="FARCAST_WRITE_SPLIT"):
        shared_file_writes(ONE_PROCESS, tmp_path)


def test_whole_files_to_each_rank(tmp_path):
    last = find_run(write_run(tmp_path / "run", shards=3)).last
    shares = split_files(last, 2)
    assert sorted(name for share in shares for name in share) == sorted(last.shard_of)
    for share in shares:
        assert {last.shard_of[name] for name in share}.isdisjoint({last.shard_of[name] for name in set(last.shard_of) - share.keys()})


def test_the_busiest_rank_streams_about_its_share_of_the_backtest(tmp_path):
    """encoder.weight is 3/4 of the bytes: its pieces spread over the ranks."""
    run = find_run(write_run(tmp_path / "run", shards=2))
    forecaster = Forecaster("self", 0, 160, [40], LinearMap.of([[0.5], [0.5]], [0.0]), {})
    scored = candidates(run, forecaster)
    whole = streamed_bytes(run, scored, 16)
    largest = max(info.nbytes for info in scored_tensors(run)) * len(checkpoints_read(run.steps, scored))
    for size in (2, 3):
        worlds = [type("Rank", (World,), {"rank": rank, "size": size})() for rank in range(size)]
        shares = [streamed_bytes(run, scored, 16, world) for world in worlds]
        assert sum(shares) == whole
        assert max(shares) <= whole / size + largest / size + 16 * 4 * len(checkpoints_read(run.steps, scored))
        assert max(shares) < 0.6 * whole


def test_pieces_cover_each_item_once_at_multiples_of_the_grain_and_at_natural_cuts():
    pieces = cut_in_pieces([1000, 10, 30], [4000, 40, 120], 4, grain=8)
    assert [(p.item, p.start, p.stop) for p in pieces if p.item > 0] == [(1, 0, 10), (2, 0, 30)]
    big = [p for p in pieces if p.item == 0]
    assert big[0].start == 0 and big[-1].stop == 1000 and all(a.stop == b.start for a, b in zip(big, big[1:]))
    assert len(big) == 4 and all(p.start % 8 == 0 for p in big) and sum(p.weight for p in pieces) == 4160
    loads = [sum(pieces[i].weight for i in share) for share in balanced_shares([p.weight for p in pieces], 4)]
    assert max(loads) <= 4160 / 4 + max(p.weight for p in pieces) and max(loads) < 0.3 * 4160
    natural = cut_in_pieces([1000, 10], [4000, 40], 2, grain=8, natural_cuts=[[125, 250, 375, 625, 750, 875]])
    assert [(p.start, p.stop) for p in natural if p.item == 0] == [(0, 376), (376, 1000)]
    assert cut_in_pieces([1000, 10], [4000, 40], 2, grain=8, divisible=[False, True])[0].stop == 1000
    assert len(cut_in_pieces([1000, 10], [4000, 40], 1, grain=8)) == 2
    assert cut_in_pieces([0, 10], [0, 40], 2, grain=8)[0] == Piece(0, 0, 0, 0)


def test_the_environment_torchrun_sets_is_checked(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert join_world("cpu") is ONE_PROCESS
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(UsageError, match="MASTER_ADDR"):
        join_world("cpu")
    monkeypatch.setenv("FARCAST_DIST_TIMEOUT", "soon")
    with pytest.raises(UsageError, match="FARCAST_DIST_TIMEOUT"):
        collective_timeout()


def launched(*args: object, ranks: int, timeout: str = "30", env: dict[str, str] | None = None) -> subprocess.Popen:
    """`torchrun --standalone --nproc-per-node RANKS -m farcast_cli ARGS`."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), "-m", "farcast_cli"]
    environment = {**rank_env(timeout), **(env or {})}
    return subprocess.Popen([*command, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)


def ranks_started_by_hand(*args: object, ranks: int, timeout: str = "30") -> list[subprocess.Popen]:
    """The ranks started with torchrun's environment, as `srun` does without torchrun: each exit code is seen."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    world = {"WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    return [
        subprocess.Popen(
            [sys.executable, "-m", "farcast_cli", *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**rank_env(timeout), **world, "RANK": str(rank), "LOCAL_RANK": str(rank)},
        )
        for rank in range(ranks)
    ]


def rank_env(timeout: str) -> dict[str, str]:
    return {**os.environ, "FARCAST_DIST_TIMEOUT": timeout, "OMP_NUM_THREADS": "1"}


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    stdout, stderr = process.communicate(timeout=240)
    return process.returncode, stdout, stderr


def farcast_lines(stderr: str) -> list[str]:
    return [line for line in without_progress(stderr).splitlines() if line.startswith("farcast: ")]


def assert_no_farcast_traceback(stderr: str) -> None:
    frames = [line for line in stderr.splitlines() if line.strip().startswith("File ")]
    assert not [frame for frame in frames if "farcast_cli" in frame], stderr


def exit_codes_listed(stderr: str) -> set[int]:
    """The workers' exit codes in torchrun's failure summary."""
    return {int(code) for code in re.findall(r"exitcode\s*:\s*(-?\d+)", stderr)}


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != REPORT_FILE}


def figures(report: dict) -> dict:
    """The report without what differs between two runs: seconds and output paths."""
    return {key: value for key, value in report.items() if key not in ("seconds", "output")}


def assert_nothing_left(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.farcast-*"))


QUICK = ["--max-updates", "100"]
RUNS = {
    "2 ranks, 2 shards of bf16 and int tensors, --emit, full backtest": (2, {"shards": 2, "dtype": torch.bfloat16}, ["--emit", 20]),
    "3 ranks, a file of f32 and int tensors a step, to bf16, sample backtest": (
        3,
        {"layout": "files"},
        ["--backtest", "sample", "--dtype", "bf16"],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(RUNS))
def test_predict_under_torchrun_writes_what_one_process_writes(tmp_path, farcast, case):
    ranks, layout, options = RUNS[case]
    run = write_run(tmp_path / "run", **layout)
    alone = farcast("predict", run, "-H", 60, "-o", tmp_path / "one", *QUICK, *options, "--quiet")

    code, stdout, stderr = finish(launched("predict", run, "-H", 60, "-o", tmp_path / "all", *QUICK, *options, "--json", ranks=ranks))
    assert code == 0, stderr
    assert farcast_lines(stderr) == farcast_lines(alone.stderr), "the ranks say what one process says, once"
    assert files_of(tmp_path / "all") == files_of(tmp_path / "one")
    written = json.loads((tmp_path / "all" / REPORT_FILE).read_text())
    assert figures(written) == figures(json.loads((tmp_path / "one" / REPORT_FILE).read_text()))
    assert json.loads(stdout) == written | {"output": written["output"]}
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(".")]) == 0


def dominated_weights(steps: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    """An embedding of 16384 elements (97% of the bytes) and two small tensors, drifting with noise."""
    generator = torch.Generator().manual_seed(3)
    shapes = {"embed.weight": (256, 64), "head.weight": (4, 64), "head.bias": (4,)}
    start = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    slope = {name: torch.randn(shape, generator=generator) * 0.01 for name, shape in shapes.items()}
    return {s: {n: start[n] + slope[n] * s + 0.01 * torch.randn(start[n].shape, generator=generator) for n in shapes} for s in steps}


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 3])
def test_one_dominant_tensor_is_divided_among_the_ranks_and_the_output_is_what_one_process_writes(tmp_path, farcast, ranks):
    """With chunks of 1024 elements (--max-memory 64KB), the embedding is cut in ranges among the
    ranks, for the backtest and for the writing: the files and the report's figures are one process's."""
    run = write_run(tmp_path / "run", steps=list(range(0, 201, 20)), weights=dominated_weights(list(range(0, 201, 20))), shards=2)
    last = find_run(run).last
    assert all("embed.weight" in share for share in split_work(last, ranks, 1024))
    options = ["-H", 60, "--max-memory", "64KB", *QUICK]
    farcast("predict", run, *options, "-o", tmp_path / "one", "--quiet")
    code, _, stderr = finish(launched("predict", run, *options, "-o", tmp_path / "all", "--quiet", ranks=ranks))
    assert code == 0, stderr
    assert files_of(tmp_path / "all") == files_of(tmp_path / "one")
    reports = [json.loads((tmp_path / name / REPORT_FILE).read_text()) for name in ("one", "all")]
    assert figures(reports[1]) == figures(reports[0])
    assert reports[0]["backtest"]["scope"] == "all coordinates"


@pytest.mark.slow
def test_fit_then_predict_with_the_forecaster_under_torchrun(tmp_path, farcast):
    """The predict step writes whole files per rank (FARCAST_WRITE_SPLIT=files, as on NFS across nodes)."""
    run = write_run(tmp_path / "run", shards=3)
    farcast("fit", run, "-H", 60, "-o", tmp_path / "one.json", *QUICK, "--quiet")
    farcast("predict", run, "--forecaster", tmp_path / "one.json", "-o", tmp_path / "one", "--quiet")

    code, _, stderr = finish(launched("fit", run, "-H", 60, "-o", tmp_path / "all.json", *QUICK, "--quiet", ranks=2))
    assert code == 0, stderr
    fitted = [json.loads((tmp_path / name).read_text()) for name in ("one.json", "all.json")]
    assert [f | {"report": figures(f["report"])} for f in fitted[1:]] == [fitted[0] | {"report": figures(fitted[0]["report"])}]

    by_files = {"FARCAST_WRITE_SPLIT": "files"}
    code, _, stderr = finish(launched("predict", run, "--forecaster", tmp_path / "all.json", "-o", tmp_path / "all", ranks=3, env=by_files))
    assert code == 0, stderr
    assert files_of(tmp_path / "all") == files_of(tmp_path / "one")
    assert len([name for name in files_of(tmp_path / "all") if name.endswith(".safetensors")]) == 3


@pytest.mark.slow
def test_a_nan_in_one_ranks_share_fails_every_rank_with_one_line(tmp_path, farcast):
    steps = list(range(0, 201, 20))
    weights = trajectories(steps)
    weights[100]["head.weight"][1, 2] = float("nan")
    run = write_run(tmp_path / "run", steps=steps, weights=weights)
    alone = farcast("predict", run, "-H", 60, "-o", tmp_path / "one", "--quiet", expect=3)
    picks = sample_coordinates(find_run(run).tensor_infos(), 8192, 0)
    pieces = sample_pieces(picks, 2)
    shares = balanced_shares([piece.weight for piece in pieces], 2)
    head = [info.name for info, _ in picks].index("head.weight")
    reader = next(rank for rank, share in enumerate(shares) if any(pieces[i].item == head for i in share))

    results = [finish(p) for p in ranks_started_by_hand("predict", run, "-H", 60, "-o", tmp_path / "out", *QUICK, ranks=2)]
    assert [code for code, _, _ in results] == [3, 3]
    assert farcast_lines(results[0][2]) == [alone.stderr.strip().replace("farcast: error: ", f"farcast: error: [rank {reader}] ")]
    assert [stderr for _, _, stderr in results[1:]] == [""]
    assert_nothing_left(tmp_path / "out")


@pytest.mark.slow
def test_an_existing_output_is_one_error_line_and_stays_untouched(run_dir, tmp_path, farcast):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    alone = farcast("predict", run_dir, "-H", 60, "-o", out, expect=5)

    code, stdout, stderr = finish(launched("predict", run_dir, "-H", 60, "-o", out, "--json", ranks=3))
    assert code != 0
    assert farcast_lines(stderr) == [alone.stderr.strip()]
    assert exit_codes_listed(stderr) == {5}
    assert f"traceback : {alone.stderr.strip()}" in stderr
    assert stdout == ""
    assert_no_farcast_traceback(stderr)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    assert (out / "mine.txt").read_text() == "keep me"


@pytest.fixture(scope="module")
def big_run(tmp_path_factory) -> Path:
    """Two 40 MB tensors over three checkpoints: writing them in the smallest chunks takes seconds."""
    steps = [0, 10, 20]
    base = torch.randn(BIG, generator=torch.Generator().manual_seed(0))
    weights = {s: {"a": base * (1 + s / 100), "b": base.flip(0) * (1 - s / 100)} for s in steps}
    return write_run(tmp_path_factory.mktemp("big") / "run", steps=steps, weights=weights, extras=False)


SLOW_WRITE = ["-H", 5, "--max-memory", "16KB", "--sample", "500", "--max-updates", "10", "--backtest", "sample"]


def wait_for_writing(out: Path, processes: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + 120
    while not list(out.parent.glob(f".{out.name}.farcast-tmp-*/*.safetensors")):
        assert all(p.poll() is None for p in processes), "finished before writing"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(0.2)


def worker_of(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's worker with this RANK."""
    for pid in subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split():
        if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            return int(pid)
    raise AssertionError(f"no worker of rank {rank}")


@pytest.mark.slow
def test_rank_0_killed_mid_write_leaves_nothing(big_run, tmp_path):
    """The temporary folder is rank 0's, but rank 0 is gone: the others remove it."""
    out = tmp_path / "out"
    launcher = launched("predict", big_run, "-o", out, *SLOW_WRITE, ranks=2)
    wait_for_writing(out, [launcher])
    os.kill(worker_of(launcher, 0), signal.SIGKILL)
    code, _, stderr = finish(launcher)
    assert code != 0
    assert_nothing_left(out)
    assert_no_farcast_traceback(stderr)
    assert len(farcast_lines(stderr)) <= 1, stderr
    assert -9 in exit_codes_listed(stderr)


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_rank_and_leaves_nothing(big_run, tmp_path):
    out = tmp_path / "out"
    launcher = launched("predict", big_run, "-o", out, *SLOW_WRITE, ranks=2)
    wait_for_writing(out, [launcher])
    launcher.send_signal(signal.SIGTERM)
    code, _, stderr = finish(launcher)
    assert code != 0
    assert_nothing_left(out)
    assert_no_farcast_traceback(stderr)
    assert farcast_lines(stderr) in ([], ["farcast: error: interrupted by SIGTERM; temporary files removed"]), stderr


@pytest.mark.slow
def test_a_hung_rank_fails_the_others_after_the_timeout(big_run, tmp_path):
    """No launcher to stop the others here (srun without torchrun): FARCAST_DIST_TIMEOUT bounds the wait."""
    out = tmp_path / "out"
    ranks = ranks_started_by_hand("predict", big_run, "-o", out, *SLOW_WRITE, ranks=2, timeout="3")
    try:
        wait_for_writing(out, ranks)
        ranks[1].send_signal(signal.SIGSTOP)
        started = time.monotonic()
        code, _, stderr = finish(ranks[0])
        waited = time.monotonic() - started
    finally:
        ranks[1].kill()
        ranks[1].communicate()
    assert code == 6
    assert farcast_lines(stderr) == [
        "farcast: error: [rank 0] lost contact with the other ranks (no answer within FARCAST_DIST_TIMEOUT=3 s): "
        "another rank failed, was killed or hangs"
    ]
    assert waited < 30
    assert_nothing_left(out)

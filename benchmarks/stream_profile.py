"""Where predict's streaming time goes: the main thread's time in each streaming phase, by kind of work.

    python benchmarks/stream_profile.py RUN [--backtest full|sample]

Runs `farcast predict RUN -H 100` in this process with cProfile on during the forecast write and the
full backtest only (by default one pass: the full backtest is taken from the write's reads, so its
time is the write's), and groups the main thread's time: waiting for the reader thread (reads not yet
done), dtype conversion, arithmetic, error and finiteness sums, writes, fsync, other (Python). The
reader thread's own busy time (its positional reads, sampling included) is timed apart: it overlaps.
cProfile adds a little to every call, so the phases run a few percent slower than without it.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import io
import pstats
import shutil
import time
from pathlib import Path

from common import warm_cache

from farcast_cli import stages
from farcast_cli.cli import app
from farcast_cli.io import engine

GROUPS = {
    "wait for reads": ("acquire",),
    "conversion": ("copy_",),
    "arithmetic": ("mul", "add_", "sub", "abs_", "square_", "mm", "addmm"),
    "sums": ("sum", "isfinite"),
    "writes": ("write", "pwrite"),
    "fsync": ("fsync",),
}


def profiled(module: object, name: str, phase: str, profiles: dict) -> None:
    """Replace module.name by a wrapper that profiles its calls into profiles[phase]."""
    original = getattr(module, name)

    @functools.wraps(original)
    def run(*args, **kwargs):
        profile, seconds = profiles.setdefault(phase, [cProfile.Profile(), 0.0])
        started = time.perf_counter()
        profile.enable()
        try:
            return original(*args, **kwargs)
        finally:
            profile.disable()
            profiles[phase][1] = seconds + time.perf_counter() - started

    setattr(module, name, run)


def reader_busy() -> list[float]:
    """Time the reader thread's reads (engine.OpenFiles.read_into) into the returned one-item list."""
    busy = [0.0]
    original = engine.OpenFiles.read_into

    def read_into(self, *args):
        started = time.perf_counter()
        try:
            return original(self, *args)
        finally:
            busy[0] += time.perf_counter() - started

    engine.OpenFiles.read_into = read_into
    return busy


def grouped(profile: cProfile.Profile) -> dict[str, float]:
    """Seconds of the built-in calls (torch ops, file calls, lock waits) by group."""
    totals = dict.fromkeys(GROUPS, 0.0)
    for (file, _, function), (_, _, own, _, _) in pstats.Stats(profile).stats.items():
        if file != "~":
            continue
        called = function.strip("<>{}").split(" of ")[0].removeprefix("built-in method ").removeprefix("method ").strip("'")
        called = called.rsplit(".", 1)[-1]
        for group, names in GROUPS.items():
            if called in names:
                totals[group] += own
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--backtest", default="full", choices=["full", "sample"])
    parser.add_argument("--out", type=Path, default=Path("/var/tmp/farcast-stream-profile"))
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    warm_cache(sorted(args.run.glob("*/model.safetensors")))
    profiles: dict = {}
    profiled(stages, "write_tensors", "write_forecast", profiles)
    profiled(stages, "backtest_streaming", "full backtest", profiles)
    busy = reader_busy()
    command = ["predict", str(args.run), "-H", "100", "-o", str(args.out), "--backtest", args.backtest, "--quiet", "--json"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        app(command, prog_name="farcast")
    shutil.rmtree(args.out, ignore_errors=True)
    for phase, (profile, seconds) in profiles.items():
        totals = grouped(profile)
        parts = ", ".join(f"{group} {value:.2f}" for group, value in totals.items())
        print(f"{phase}: {seconds:.2f} s in the main thread = {parts}, other {seconds - sum(totals.values()):.2f}")
    print(f"reader thread busy reading (sampling and streaming): {busy[0]:.2f} s")


if __name__ == "__main__":
    main()

"""Progress on stderr: a rich bar on a terminal, a plain line every few seconds in batch logs."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from farcast_cli.io.engine import Advance


def _seconds(text: str, default: float = 5.0) -> float:
    try:
        return max(0.0, float(text))
    except ValueError:
        return default


PLAIN_EVERY_SECONDS = _seconds(os.environ.get("FARCAST_PROGRESS_SECONDS", "5"))


def phase(what: str, quiet: bool) -> None:
    """A line on stderr as each phase starts, so that a batch log shows where a run is."""
    if not quiet:
        print(f"farcast: {what}", file=sys.stderr, flush=True)


@contextmanager
def byte_progress(label: str, total: int, quiet: bool) -> Iterator[Advance]:
    """Yield a function to call with the number of bytes just processed."""
    if quiet:
        yield lambda n: None
    elif sys.stderr.isatty():
        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task(label, total=total)
            yield lambda n: bar.advance(task, n)
    else:
        yield _plain_lines(label, total)


def _plain_lines(label: str, total: int) -> Advance:
    started = last_print = time.monotonic()
    done = 0

    def advance(n: int) -> None:
        nonlocal done, last_print
        done += n
        now = time.monotonic()
        if now - last_print >= PLAIN_EVERY_SECONDS:
            rate = done / max(now - started, 1e-9) / 1e6
            print(f"farcast: {label}: {done / 1e6:.0f} of {total / 1e6:.0f} MB ({rate:.0f} MB/s)", file=sys.stderr, flush=True)
            last_print = now

    return advance

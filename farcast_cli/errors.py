"""Errors a user can act on, each with its documented exit code."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_LOW_SKILL = 4
EXIT_OUTPUT = 5
EXIT_LOST_RANK = 6
EXIT_SIGINT = 130


class FarcastError(Exception):
    """An error reported to the user as one line, with an exit code.

    `report` optionally carries the report that led to the error, to show beside it.
    """

    exit_code = EXIT_INTERNAL
    report: dict | None = None

    def lines(self) -> list[str]:
        """The error as printed after `farcast: error: `, one line each."""
        return [str(self)]


class InternalError(FarcastError):
    """A check of farcast's own work failed: a bug to report, never the user's input."""

    exit_code = EXIT_INTERNAL


class UsageError(FarcastError):
    exit_code = EXIT_USAGE


class InputError(FarcastError):
    """A problem with a checkpoint or run: the message names the file (and tensor)."""

    exit_code = EXIT_BAD_INPUT


class IncompleteCheckpoint(InputError):
    """A checkpoint file or shard that is missing or shorter than its header says: still being written,
    or cut off when a job was killed."""


class DamagedCheckpoint(InputError):
    """A checkpoint that cannot be read where it is not simply the newest one still being written: it may
    be lost data, so it stops farcast unless the caller asked to skip damaged checkpoints."""


class OutputError(FarcastError):
    """The output cannot be written: it exists, lies inside the input, or the disk refused."""

    exit_code = EXIT_OUTPUT


class LowSkillError(FarcastError):
    exit_code = EXIT_LOW_SKILL


class LostContact(FarcastError):
    """Under torchrun: this rank cannot reach the others (one died, hangs or never joined), so it
    alone knows, and prints it with its rank."""

    exit_code = EXIT_LOST_RANK

    def __init__(self, rank: int, problem: str) -> None:
        super().__init__(f"[rank {rank}] {problem}")


class Interrupted(FarcastError):
    """Raised from a signal handler so that cleanup code runs before exiting."""

    def __init__(self, signal_name: str, exit_code: int) -> None:
        super().__init__(f"interrupted by {signal_name}; temporary files removed")
        self.exit_code = exit_code


class InterruptedAfterPublishing(BaseException):
    """A signal that arrived after the output was published complete: the command did its work, so this
    is no failure. A BaseException, so that no handler of errors takes it for one."""

    def __init__(self, signal_name: str, output: Path) -> None:
        super().__init__(f"interrupted by {signal_name} after {output} was published; it is complete")


INTERRUPTS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass
class _Command:
    """Where the command stands, for the signal handler: `renaming` while its output is renamed into
    place (a signal then waits, `pending`), `published` once it is, `done` once its work and cleanup are
    (then only its outcome is printed)."""

    renaming: bool = False
    pending: int | None = None
    published: Path | None = None
    done: bool = False


_command = _Command()


def interrupted_by(signum: int) -> Interrupted:
    return Interrupted(signal.Signals(signum).name, 128 + signum)


def _on_signal(signum: int, frame: object = None) -> None:
    if _command.renaming:
        _command.pending = signum
    elif _command.done:
        exit_on_signal(signum)
    elif _command.published is not None:
        raise InterruptedAfterPublishing(signal.Signals(signum).name, _command.published)
    else:
        raise interrupted_by(signum)


def exit_on_signal(signum: int, frame: object = None) -> None:
    """The handler where there is nothing left to clean up (start-up with its imports, printing the
    outcome, shutdown): the command's line for the signal, then the process ends at once, never with a
    traceback; with exit 0 once the output was published."""
    if _command.published is not None:
        line, code = str(InterruptedAfterPublishing(signal.Signals(signum).name, _command.published)), 0
    else:
        line, code = f"error: {interrupted_by(signum)}", 128 + signum
    with suppress(Exception):
        sys.stdout.flush()
    os.write(2, f"farcast: {line}\n".encode())
    os._exit(code)


@contextmanager
def signals_as_interrupt() -> Iterator[Callable[[], None]]:
    """Turn SIGINT, SIGTERM (a batch scheduler's time limit) and SIGHUP (the terminal closed) into one
    exception, so that cleanup code runs (temporary folders, eval commands running in their own sessions)
    and every signal ends with the same line; after the output is published, into InterruptedAfterPublishing.
    Yields the function to call once the command's work and cleanup are done: a signal then ends the
    process at once (exit_on_signal), so that no handler of errors while printing can swallow it."""
    _command.__init__()
    previous = {signum: signal.signal(signum, _on_signal) for signum in INTERRUPTS}
    try:
        yield lambda: setattr(_command, "done", True)
    finally:
        for signum, handler_before in previous.items():
            signal.signal(signum, handler_before)


@contextmanager
def publishing(output: Path) -> Iterator[None]:
    """The block renames the finished `output` into place: a signal waits until it is done, and then
    counts as arriving before publication if the block failed, after it if not."""
    _command.renaming = True
    try:
        yield
    except BaseException:
        _command.renaming = False
        _take_pending()
        raise
    _command.renaming = False
    _command.published = output
    _take_pending()


def _take_pending() -> None:
    signum, _command.pending = _command.pending, None
    if signum is not None:
        _on_signal(signum)

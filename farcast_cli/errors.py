"""Errors a user can act on, each with its documented exit code.

Below the CLI, an error names what the caller passed by its parameter's name, marked with `parameter`
("horizon must be a positive number of steps"): a Python caller reads the name they passed. The CLI
runs each command inside `flag_names`, which prints each marked name as the flag the user typed
("--horizon must be ..."): flag names are cli.py's alone.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_LOW_SKILL = 4
EXIT_OUTPUT = 5
EXIT_LOST_RANK = 6
EXIT_SIGINT = 130


MARKED = re.compile("\x00([^\x00]+)\x00")
_flags: dict[str, str] = {}


def parameter(name: str) -> str:
    """`name`, a parameter (or `name=value`), marked inside an error message for flag_names."""
    return f"\x00{name}\x00"


def named(text: str) -> str:
    """`text` with each marked parameter printed as flag_names says (its own name outside the CLI)."""
    return MARKED.sub(lambda marked: _flags.get(marked[1], marked[1]), text)


@contextmanager
def flag_names(flags: Mapping[str, str]) -> Iterator[None]:
    """Within the block, errors print each marked parameter as its flag in `flags` (the CLI's)."""
    previous = dict(_flags)
    _flags.clear()
    _flags.update(flags)
    try:
        yield
    finally:
        _flags.clear()
        _flags.update(previous)


class FarcastError(Exception):
    """An error reported to the user as one line, with an exit code.

    `report` optionally carries the report that led to the error, to show beside it.
    """

    exit_code = EXIT_INTERNAL
    report: dict | None = None

    def __str__(self) -> str:
        return named(super().__str__())

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


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM (a batch scheduler's time limit) and SIGHUP (the terminal closed) into an exception,
    so that cleanup code runs: temporary folders, and eval commands running in their own sessions."""

    def handler(signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        raise Interrupted(name, 128 + signum)

    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler_before in previous.items():
            signal.signal(signum, handler_before)

"""Scoring checkpoints by the user's own loss, cheaply enough to let it decide.

An evaluator takes a checkpoint (a folder in the Trainer layout, a .safetensors file in the files
layout: the same kind of path as the run's own checkpoints) and returns its loss. `EvalCommand` runs a
shell command that prints the loss as the last number on its stdout; the Python API also takes any
callable. `Scorer` runs evaluations, several at once with `jobs`, prints progress lines in batch logs,
and remembers scores in a cache keyed by the evaluator and the checkpoint's content, so that a
checkpoint is never scored twice, within a run of farcast or across runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from farcast_cli.errors import UsageError, parameter
from farcast_cli.io.run import Checkpoint

NUMBER = re.compile(r"[-+]?(?:(?<![A-Za-z])(?:nan|inf(?:inity)?)(?![A-Za-z])|(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)", re.IGNORECASE)
STOP_GRACE_SECONDS = 2.0
EVAL_TIMEOUT_SECONDS = 24 * 3600
FINGERPRINT_PAGES = 16
PAGE_BYTES = 4096
Evaluator = Callable[[Path], float]


def format_loss(loss: float | None) -> str:
    """Every loss farcast prints, at one precision."""
    return "n/a" if loss is None else f"{loss:.5g}"


class EvalCommand:
    """`--eval-cmd`: a shell command with {checkpoint} for the path (appended when absent)."""

    def __init__(self, template: str) -> None:
        self.template = template
        self.cache_key = f"command:{template}"
        self.running: set[subprocess.Popen] = set()
        self.stopped = False
        self.lock = threading.Lock()

    def __str__(self) -> str:
        return self.template

    def __call__(self, checkpoint: Path) -> float:
        quoted = shlex.quote(str(checkpoint))
        command = self.template.replace("{checkpoint}", quoted) if "{checkpoint}" in self.template else f"{self.template} {quoted}"
        returncode, stdout, stderr = self._run(command, checkpoint)
        if returncode != 0:
            last_line = (stderr.strip().splitlines() or ["no message"])[-1][:200]
            raise UsageError(f"{parameter('eval_cmd')} failed on {checkpoint} (exit {returncode}): {last_line}")
        numbers = NUMBER.findall(stdout)
        if not numbers:
            raise UsageError(
                f"{parameter('eval_cmd')} printed no number for {checkpoint}; it must print the loss as the last number on its stdout"
            )
        loss = float(numbers[-1])
        if not math.isfinite(loss):
            raise UsageError(f"{parameter('eval_cmd')} printed {numbers[-1]} as the loss of {checkpoint}; a loss must be a finite number")
        return loss

    def start(self) -> None:
        """Allow commands to run (again): a Scorer calls it, `stop` ends it."""
        with self.lock:
            self.stopped = False

    def stop(self) -> None:
        """End the commands still running and start no more (farcast is stopping: an error elsewhere, or
        an interrupt): SIGTERM to each command's process group, SIGKILL to what is left after a grace."""
        with self.lock:
            self.stopped = True
            running = list(self.running)
        _end(running)

    def _run(self, command: str, checkpoint: Path) -> tuple[int, str, str]:
        """The command in its own process group, so that a timeout or `stop` ends everything it started.
        Its output goes to files, not pipes: a process it left behind cannot keep farcast waiting."""
        with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
            with self.lock:
                if self.stopped:
                    raise UsageError(f"{parameter('eval_cmd')} on {checkpoint}: not started, farcast is stopping")
                process = subprocess.Popen(command, shell=True, stdout=stdout, stderr=stderr, text=True, start_new_session=True)
                self.running.add(process)
            try:
                process.wait(timeout=EVAL_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                _end([process])
                raise UsageError(f"{parameter('eval_cmd')} took over {EVAL_TIMEOUT_SECONDS} s on {checkpoint}") from None
            finally:
                with self.lock:
                    self.running.discard(process)
            stdout.seek(0)
            stderr.seek(0)
            return process.returncode, stdout.read(), stderr.read()


def _end(processes: list[subprocess.Popen]) -> None:
    """SIGTERM to each process group, then SIGKILL to the groups still there after STOP_GRACE_SECONDS."""
    for process in processes:
        _signal_group(process, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        _signal_group(process, signal.SIGKILL)
        process.wait()


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)


def checkpoint_fingerprint(checkpoint: Checkpoint) -> str:
    """A key for a checkpoint's content: each file's name, size, modification time and header, and
    FINGERPRINT_PAGES pages of its data spread evenly, read with a few small reads. The time tells apart
    checkpoints whose sampled pages agree (a run with frozen layers); a copy that keeps the time
    (cp -p, rsync -t) shares the key."""
    digest = hashlib.sha256()
    for name, file in sorted(checkpoint.files.items()):
        data_bytes = file.size - file.data_start
        spacing = (data_bytes - PAGE_BYTES) / max(FINGERPRINT_PAGES - 1, 1)
        starts = sorted({file.data_start + int(spacing * k) for k in range(FINGERPRINT_PAGES)})
        ranges = [(file.data_start - file.header_size, file.data_start)]
        ranges += [(max(file.data_start, start), min(file.size, start + PAGE_BYTES)) for start in starts if data_bytes > 0]
        digest.update(f"{name}\0{file.size}\0{file.mtime_ns}\0".encode())
        for chunk in file.read_ranges(ranges):
            digest.update(chunk)
    return digest.hexdigest()


class ScoreCache:
    """Losses by key in one JSON file (FARCAST_CACHE_DIR, else $XDG_CACHE_HOME/farcast, else
    ~/.cache/farcast). Written by replacing the file, merging what other processes wrote meanwhile."""

    def __init__(self, folder: Path | None = None) -> None:
        self.path = (folder or default_cache_folder()) / "losses.json"
        self.entries = self._read()
        self.lock = threading.Lock()

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return data["entries"] if isinstance(data, dict) and isinstance(data.get("entries"), dict) else {}
        except (OSError, ValueError):
            return {}

    def get(self, key: str) -> float | None:
        entry = self.entries.get(key)
        return entry["loss"] if isinstance(entry, dict) and isinstance(entry.get("loss"), float) else None

    def put(self, key: str, loss: float, what: str) -> None:
        with self.lock:
            self.entries[key] = {"loss": loss, "checkpoint": what, "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                merged = {**self._read(), **self.entries}
                temporary = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}")
                temporary.write_text(json.dumps({"version": 1, "entries": merged}, indent=0))
                temporary.replace(self.path)
            except OSError:
                pass


def default_cache_folder() -> Path:
    if os.environ.get("FARCAST_CACHE_DIR"):
        return Path(os.environ["FARCAST_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "farcast"


@dataclass(frozen=True)
class EvalOptions:
    """The user's loss: an evaluator (None: decide by weight error), evaluations run at once, and the cache."""

    evaluator: Evaluator | None = None
    jobs: int = 1
    cache: bool = True

    def __post_init__(self) -> None:
        if self.jobs < 1:
            raise UsageError(f"{parameter('jobs')} {self.jobs}: at least 1")

    def scorer(self, quiet: bool) -> Scorer | None:
        if self.evaluator is None:
            return None
        return Scorer(self.evaluator, self.jobs, ScoreCache() if self.cache else None, quiet)


@dataclass
class Score:
    loss: float
    seconds: float
    cached: bool


def raise_first_failure(futures: Iterable[Future]) -> None:
    """Raise the error of the first of `futures` that has failed (those not done yet are passed over)."""
    for future in futures:
        if future.done() and not future.cancelled() and future.exception() is not None:
            raise future.exception()


class Scorer:
    """Scores checkpoints with an evaluator: `submit` returns a Future, so that several evaluations run
    at once (`jobs`) while the caller writes the next candidate; each key is evaluated at most once."""

    def __init__(self, evaluator: Evaluator, jobs: int = 1, cache: ScoreCache | None = None, quiet: bool = False) -> None:
        self.evaluator, self.jobs, self.quiet = evaluator, jobs, quiet
        self.cache = cache if getattr(evaluator, "cache_key", None) else None
        self.pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="farcast-eval")
        start = getattr(evaluator, "start", None)
        if start is not None:
            start()
        self.futures: dict[str, Future] = {}
        self.evaluations = self.cache_hits = 0
        self.seconds = 0.0
        self.lock = threading.Lock()

    def __str__(self) -> str:
        return str(getattr(self.evaluator, "template", None) or getattr(self.evaluator, "__qualname__", repr(self.evaluator)))

    def key(self, content: str) -> str:
        return hashlib.sha256(f"{getattr(self.evaluator, 'cache_key', id(self.evaluator))}\0{content}".encode()).hexdigest()

    def known(self, content: str) -> bool:
        key = self.key(content)
        return key in self.futures or (self.cache is not None and self.cache.get(key) is not None)

    def submit(self, content: str, path: Path, label: str, done: Callable[[], None] = lambda: None) -> Future:
        """The loss of the checkpoint at `path`, whose content key is `content`; `done` runs once it is
        evaluated (or found in the cache), to remove a scratch copy."""
        key = self.key(content)
        if key in self.futures:
            done()
            return self.futures[key]
        cached = self.cache.get(key) if self.cache else None
        if cached is not None:
            self.cache_hits += 1
            done()
            future: Future = Future()
            future.set_result(Score(cached, 0.0, True))
        else:
            future = self.pool.submit(self._evaluate, key, path, label, done)
        self.futures[key] = future
        return future

    def raise_failure(self) -> None:
        """Raise an evaluation's failure, if one has failed: no more candidates are worth writing."""
        raise_first_failure(self.futures.values())

    def _evaluate(self, key: str, path: Path, label: str, done: Callable[[], None]) -> Score:
        started = time.perf_counter()
        try:
            loss = float(self.evaluator(path))
        finally:
            done()
        seconds = time.perf_counter() - started
        with self.lock:
            self.evaluations += 1
            self.seconds += seconds
            count = self.evaluations
        if self.cache is not None:
            self.cache.put(key, loss, str(path))
        if not self.quiet:
            print(f"farcast: eval {count}: {label}: loss {format_loss(loss)} ({seconds:.1f} s)", file=sys.stderr, flush=True)
        return Score(loss, seconds, False)

    def close(self) -> None:
        """End what is still running and cancel what has not started: after a success nothing is."""
        stop = getattr(self.evaluator, "stop", None)
        if stop is not None:
            stop()
        self.pool.shutdown(wait=True, cancel_futures=True)

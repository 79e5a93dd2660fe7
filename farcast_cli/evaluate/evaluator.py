"""Scoring checkpoints by the user's own loss, cheaply enough to let it decide.

An evaluator takes a checkpoint (a folder in the Trainer layout, a .safetensors file in the files
layout: the same kind of path as the run's own checkpoints) and returns its loss. `EvalCommand` runs a
shell command per checkpoint that prints the loss as the last number on its stdout; `EvalServer` starts
a command once (one per evaluation running at once) and asks it for one checkpoint's loss per line; the
Python API also takes any callable of a path, or `OnTensors(f)` for a callable of the tensors themselves
(name -> torch.Tensor), which is given candidates computed in memory, never written. `Scorer` runs
evaluations, several at once with `jobs`, prints progress lines in batch logs, and remembers scores in a
cache keyed by the evaluator and the checkpoint's content, so that a checkpoint is never scored twice,
within a run of farcast or across runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from farcast_cli.errors import UsageError
from farcast_cli.io.run import Checkpoint

NUMBER = re.compile(r"[-+]?(?:(?<![A-Za-z])(?:nan|inf(?:inity)?)(?![A-Za-z])|(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)", re.IGNORECASE)
STOP_GRACE_SECONDS = 2.0
EVAL_TIMEOUT_SECONDS = 24 * 3600
FINGERPRINT_PAGES = 16
PAGE_BYTES = 4096
Evaluator = Callable[[Path], float]
TensorLoss = Callable[[Mapping[str, torch.Tensor]], float]
Source = Path | Callable[[], Mapping[str, torch.Tensor]]


def format_loss(loss: float | None) -> str:
    """Every loss farcast prints, at one precision."""
    return "n/a" if loss is None else f"{loss:.5g}"


class OnTensors:
    """An evaluator that takes a checkpoint's tensors (a mapping of name to torch.Tensor, on the CPU, in
    the checkpoint's dtypes) instead of its path: candidates are computed in memory and never written,
    and run checkpoints are read once each. Losses are cached within a run of farcast only (a function
    has no stable name to key a cache across runs)."""

    takes_tensors = True

    def __init__(self, loss: TensorLoss, name: str | None = None) -> None:
        self.loss, self.name = loss, name or getattr(loss, "__qualname__", repr(loss))

    def __str__(self) -> str:
        return self.name

    def __call__(self, tensors: Mapping[str, torch.Tensor]) -> float:
        return self.loss(tensors)


def takes_tensors(evaluator: object) -> bool:
    return bool(getattr(evaluator, "takes_tensors", False))


class EvalCommand:
    """`--eval-cmd`: a shell command with {checkpoint} for the path (appended when absent)."""

    def __init__(self, template: str, timeout: float = EVAL_TIMEOUT_SECONDS) -> None:
        self.template, self.timeout = template, timeout
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
            raise UsageError(f"--eval-cmd failed on {checkpoint} (exit {returncode}): {last_line}")
        numbers = NUMBER.findall(stdout)
        if not numbers:
            raise UsageError(f"--eval-cmd printed no number for {checkpoint}; it must print the loss as the last number on its stdout")
        loss = float(numbers[-1])
        if not math.isfinite(loss):
            raise UsageError(f"--eval-cmd printed {numbers[-1]} as the loss of {checkpoint}; a loss must be a finite number")
        return loss

    def start(self, jobs: int = 1) -> None:
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
                    raise UsageError(f"--eval-cmd on {checkpoint}: not started, farcast is stopping")
                process = subprocess.Popen(command, shell=True, stdout=stdout, stderr=stderr, text=True, start_new_session=True)
                self.running.add(process)
            try:
                process.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                _end([process])
                raise UsageError(f"--eval-cmd took over {self.timeout:g} s on {checkpoint}") from None
            finally:
                with self.lock:
                    self.running.discard(process)
            stdout.seek(0)
            stderr.seek(0)
            return process.returncode, stdout.read(), stderr.read()


class EvalServer:
    """`--eval-server`: a command started once (one per evaluation running at once) that reads checkpoint
    paths, one per line, on its stdin and answers each with one line on its stdout holding the loss (the
    last number on the line, as for `EvalCommand`). Each server runs in its own process group; `stop` ends
    them all. A server that exits, answers with no finite number, or takes over `timeout` seconds fails the
    evaluation, and is ended."""

    def __init__(self, command: str, timeout: float = EVAL_TIMEOUT_SECONDS) -> None:
        self.command, self.timeout = command, timeout
        self.cache_key = f"server:{command}"
        self.idle: list[_ServerProcess] = []
        self.running: set[_ServerProcess] = set()
        self.stopped = False
        self.lock = threading.Lock()

    def __str__(self) -> str:
        return self.command

    def __call__(self, checkpoint: Path) -> float:
        server = self._acquire(checkpoint)
        try:
            answer = server.ask(str(checkpoint), self.timeout)
        except _ServerFailure as failure:
            self._discard(server)
            raise UsageError(f"eval server `{self.command}` on {checkpoint}: {failure}") from None
        numbers = NUMBER.findall(answer)
        loss = float(numbers[-1]) if numbers else math.nan
        if not math.isfinite(loss):
            self._discard(server)
            raise UsageError(
                f"eval server `{self.command}` answered {answer.strip()[:200]!r} for {checkpoint}; a loss must be a finite number"
            )
        with self.lock:
            self.idle.append(server)
        return loss

    def start(self, jobs: int = 1) -> None:
        """Allow servers to start (again): a Scorer calls it, `stop` ends them. Each starts with the first
        evaluation that needs it, not before: a predict whose scores all come from the cache starts none."""
        with self.lock:
            self.stopped = False

    def stop(self) -> None:
        """End every server (farcast is done, or stopping): stdin closed, then SIGTERM and SIGKILL to its group."""
        with self.lock:
            self.stopped = True
            servers = list(self.running)
            self.running.clear()
            self.idle.clear()
        for server in servers:
            server.close_input()
        _end([server.process for server in servers])

    def _acquire(self, checkpoint: Path) -> _ServerProcess:
        """An idle server, else a new one: at most as many run as evaluations run at once."""
        with self.lock:
            if self.stopped:
                raise UsageError(f"eval server `{self.command}` on {checkpoint}: not started, farcast is stopping")
            if self.idle:
                return self.idle.pop()
            server = _ServerProcess(self.command)
            self.running.add(server)
            return server

    def _discard(self, server: _ServerProcess) -> None:
        with self.lock:
            self.running.discard(server)
        server.close_input()
        _end([server.process])


class _ServerFailure(Exception):
    pass


class _ServerProcess:
    """One running server: a thread reads its stdout into a queue, so that an answer can be waited for
    with a timeout; its stderr goes to a file, whose last line names a failure."""

    def __init__(self, command: str) -> None:
        self.stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115 (lives as long as the server)
        self.process = subprocess.Popen(
            command,
            shell=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True, name="farcast-eval-server").start()

    def _read(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            for line in self.process.stdout:
                self.lines.put(line)
        self.lines.put(None)

    def ask(self, path: str, timeout: float) -> str:
        try:
            self.process.stdin.write(path + "\n")
            self.process.stdin.flush()
        except (OSError, ValueError):
            raise _ServerFailure(self._exited()) from None
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise _ServerFailure(f"no answer within {timeout:g} s") from None
        if line is None:
            raise _ServerFailure(self._exited())
        return line

    def _exited(self) -> str:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=STOP_GRACE_SECONDS)
        self.stderr.seek(0)
        last_line = (self.stderr.read().strip().splitlines() or ["no message"])[-1][:200]
        return f"the server exited (exit {self.process.returncode}): {last_line}"

    def close_input(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.process.stdin.close()


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

    evaluator: Evaluator | OnTensors | None = None
    jobs: int = 1
    cache: bool = True

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
    at once (`jobs`) while the caller writes the next candidate; each key is evaluated at most once.

    It keeps the honest cost: `evaluations` (run, not from the cache), `seconds` (their own times
    summed), `wall_seconds` (the time during which at least one ran) and `cache_hits`."""

    def __init__(self, evaluator: Evaluator | OnTensors, jobs: int = 1, cache: ScoreCache | None = None, quiet: bool = False) -> None:
        if jobs < 1:
            raise UsageError(f"evaluations at once (jobs) must be at least 1, not {jobs}")
        self.evaluator, self.jobs, self.quiet = evaluator, jobs, quiet
        self.takes_tensors = takes_tensors(evaluator)
        self.cache = cache if getattr(evaluator, "cache_key", None) else None
        self.pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="farcast-eval")
        start = getattr(evaluator, "start", None)
        if start is not None:
            start(jobs)
        self.futures: dict[str, Future] = {}
        self.evaluations = self.cache_hits = self.submitted = self.running = 0
        self.seconds = self.wall_seconds = 0.0
        self.busy_since = 0.0
        self.lock = threading.Lock()

    def __str__(self) -> str:
        return str(getattr(self.evaluator, "template", None) or getattr(self.evaluator, "command", None) or _callable_name(self.evaluator))

    def key(self, content: str) -> str:
        return hashlib.sha256(f"{getattr(self.evaluator, 'cache_key', id(self.evaluator))}\0{content}".encode()).hexdigest()

    def known(self, content: str) -> bool:
        key = self.key(content)
        return key in self.futures or (self.cache is not None and self.cache.get(key) is not None)

    def submit(self, content: str, source: Source, label: str, done: Callable[[], None] = lambda: None) -> Future:
        """The loss of the checkpoint at `source` (a path, or for an evaluator of tensors a function that
        computes them), whose content key is `content`; `done` runs once it is evaluated (or found in the
        cache), to remove a scratch copy."""
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
            with self.lock:
                self.submitted += 1
            future = self.pool.submit(self._evaluate, key, source, label, done)
        self.futures[key] = future
        return future

    def raise_failure(self) -> None:
        """Raise an evaluation's failure, if one has failed: no more candidates are worth writing."""
        raise_first_failure(self.futures.values())

    def _evaluate(self, key: str, source: Source, label: str, done: Callable[[], None]) -> Score:
        self._begin()
        started = time.perf_counter()
        try:
            loss = float(self.evaluator(source() if callable(source) else source))
        finally:
            done()
            seconds = time.perf_counter() - started
            self._end(seconds)
        if self.cache is not None:
            self.cache.put(key, loss, str(source))
        with self.lock:
            self.evaluations += 1
            if not self.quiet:
                print(
                    f"farcast: eval {self.evaluations} of {self.submitted}: {label}: loss {format_loss(loss)} ({seconds:.1f} s)",
                    file=sys.stderr,
                    flush=True,
                )
        return Score(loss, seconds, False)

    def _begin(self) -> None:
        with self.lock:
            if self.running == 0:
                self.busy_since = time.perf_counter()
            self.running += 1

    def _end(self, seconds: float) -> None:
        with self.lock:
            self.seconds += seconds
            self.running -= 1
            if self.running == 0:
                self.wall_seconds += time.perf_counter() - self.busy_since

    def close(self) -> None:
        """End what is still running and cancel what has not started: after a success nothing is."""
        stop = getattr(self.evaluator, "stop", None)
        if stop is not None:
            stop()
        self.pool.shutdown(wait=True, cancel_futures=True)


def _callable_name(evaluator: object) -> str:
    return str(getattr(evaluator, "name", None) or getattr(evaluator, "__qualname__", None) or repr(evaluator))

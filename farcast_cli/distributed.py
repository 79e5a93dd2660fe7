"""Across processes, GPUs and nodes: farcast under torchrun.

torchrun (or srun with torchrun's environment) starts one farcast per rank with WORLD_SIZE, RANK,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT set; `join_world` joins them into a torch.distributed process
group. Each streaming pass divides its tensors among the ranks (`World.divided`, the same division on
every rank), a tensor larger than a rank's fair share in pieces (`tensor_pieces`); work that is
small and must happen once runs on rank 0 (`World.on_main`) and its result goes to every rank;
`World.together` is the all-ranks-succeeded check. Each of these is one collective that carries
every rank's outcome, so an error on any rank becomes the same `RanksFailed` on every rank, which
rank 0 alone prints. A rank that dies or hangs breaks the collective: the others get `LostContact`
at once (the connection closes) or after FARCAST_DIST_TIMEOUT seconds.

One process (WORLD_SIZE unset or 1) gets `ONE_PROCESS`, which runs every step in place and never
imports torch.distributed.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from farcast_cli.errors import EXIT_INTERNAL, FarcastError, LostContact, UsageError, parameter

if TYPE_CHECKING:
    from farcast_cli.io.run import Checkpoint

TIMEOUT_VARIABLE = "FARCAST_DIST_TIMEOUT"
DEFAULT_TIMEOUT_SECONDS = 1800.0
PATIENT_TIMEOUT = timedelta(days=30)
WRITE_SPLIT_VARIABLE = "FARCAST_WRITE_SPLIT"
SHARED_WRITE_FILE_SYSTEMS = frozenset({"lustre", "gpfs"})
R = TypeVar("R")


def balanced_shares(weights: Sequence[int], parts: int) -> list[list[int]]:
    """Indices of `weights` divided into `parts` lists of about equal total weight (the heaviest
    first, to the lightest part; ties by index), the same on every rank; each list in index order."""
    loads, shares = [0] * parts, [[] for _ in range(parts)]
    for index in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        lightest = loads.index(min(loads))
        shares[lightest].append(index)
        loads[lightest] += weights[index]
    return [sorted(share) for share in shares]


@dataclass(frozen=True)
class Piece:
    """Elements [start, stop) of item `item` (a whole item, or a range of a large one), weighing `weight`."""

    item: int
    start: int
    stop: int
    weight: int


def cut_in_pieces(
    lengths: Sequence[int],
    weights: Sequence[int],
    parts: int,
    grain: int,
    natural_cuts: Sequence[Sequence[int]] = (),
    divisible: Sequence[bool] = (),
) -> list[Piece]:
    """The items (item i: lengths[i] elements weighing weights[i]) as pieces to divide among `parts`, in
    item order: whole, or, for an item heavier than a part's fair share (1/parts of the total), about
    equal ranges of about that share, so that one huge item (an embedding) still spreads over the parts.

    Cuts fall on multiples of `grain` elements: where the streaming's chunks of the whole item begin,
    so that the pieces stream exactly the chunks one process streams. Where an item has natural
    boundaries (`natural_cuts[i]`: a DCP tensor's saved chunks), a cut is the boundary nearest the
    even split, moved to the nearest multiple of grain. Items not `divisible` stay whole."""
    total = sum(weights)
    pieces = []
    for item, (length, weight) in enumerate(zip(lengths, weights)):
        cut = parts > 1 and weight * parts > total and (item >= len(divisible) or divisible[item])
        count = math.ceil(weight * parts / total) if cut else 1
        natural = natural_cuts[item] if item < len(natural_cuts) else ()
        cuts = {_cut_near(length * k // count, natural, grain, length) for k in range(1, count)}
        bounds = sorted({0, length} | cuts)
        pieces += [Piece(item, a, b, weight * (b - a) // max(length, 1)) for a, b in zip(bounds, bounds[1:])] or [Piece(item, 0, 0, 0)]
    return pieces


def _cut_near(target: int, natural: Sequence[int], grain: int, length: int) -> int:
    if natural:
        target = min(natural, key=lambda cut: (abs(cut - target), cut))
    return min(length, round(target / grain) * grain)


def tensor_pieces(checkpoint: Checkpoint, names: Sequence[str], parts: int, grain: int) -> list[Piece]:
    """The named tensors of the checkpoint cut in pieces for `parts` ranks (cut_in_pieces; item i is
    names[i], weighing its bytes), a DCP tensor's cuts at its saved chunks; only tensors farcast
    forecasts are cut (the others are copied as bytes, and may pack several elements in a byte)."""
    tensors = [checkpoint.tensor(name) for name in names]
    return cut_in_pieces(
        [info.numel for _, info in tensors],
        [info.nbytes for _, info in tensors],
        parts,
        grain,
        [getattr(file, "chunk_bounds", ()) for file, _ in tensors],
        [info.is_forecast for _, info in tensors],
    )


@dataclass(frozen=True)
class Failure:
    """One rank's error as the others receive it: its exit code and one-line message."""

    rank: int
    exit_code: int
    message: str


def failure_of(error: Exception, rank: int) -> Failure:
    if isinstance(error, FarcastError):
        return Failure(rank, error.exit_code, str(error))
    return Failure(
        rank, EXIT_INTERNAL, f"internal error: {type(error).__name__}: {error} (rerun with {parameter('debug')} for the traceback)"
    )


class RanksFailed(FarcastError):
    """Raised on every rank when a step failed on some: the exit code is the lowest failing rank's.
    Printed (by rank 0) one line per distinct error, prefixed with the ranks where they disagree."""

    def __init__(self, failures: list[Failure], attempted: int) -> None:
        self.failures = failures
        self.attempted = attempted
        self.exit_code = failures[0].exit_code
        super().__init__("; ".join(self.lines()))

    def lines(self) -> list[str]:
        ranks_of: dict[str, list[int]] = {}
        for failure in self.failures:
            ranks_of.setdefault(failure.message, []).append(failure.rank)
        if len(ranks_of) == 1 and len(self.failures) == self.attempted:
            return list(ranks_of)
        return [f"[{_ranks_label(ranks)}] {message}" for message, ranks in ranks_of.items()]


def _ranks_label(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"


class World:
    """One process: every step runs here at once. Also the interface of `TorchWorld`."""

    rank = 0
    size = 1
    local_rank = 0
    nodes = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, option: str) -> str:
        """The --device this rank uses: `auto` and `cuda` mean this rank's own GPU under torchrun."""
        return option

    def share(self, weights: Sequence[int]) -> list[int]:
        """This rank's indices of `weights` under `divided`."""
        return balanced_shares(weights, self.size)[self.rank]

    def divided(self, weights: Sequence[int], work: Callable[[list[int]], dict[int, R]]) -> list[R]:
        """Items divided among the ranks by weight: each rank runs work(its indices), which returns
        {index: result}; every rank gets all the results in index order."""
        results = work(list(range(len(weights))))
        return [results[i] for i in range(len(weights))]

    def on_main(self, work: Callable[[], R], patient: bool = False) -> R:
        """work() on rank 0, its result (or error) on every rank. `patient`: the others wait without
        FARCAST_DIST_TIMEOUT, for work that runs the user's eval commands."""
        return work()

    def together(self, work: Callable[[], R], passed: Callable[[], None] = lambda: None) -> R:
        """work() on every rank, then the all-ranks-succeeded check: one failure fails every rank.
        `passed` runs as soon as the check has passed, before any signal can interrupt."""
        result = work()
        passed()
        return result

    def close(self) -> None:
        pass


ONE_PROCESS = World()


class TorchWorld(World):
    """Ranks joined in a torch.distributed process group. Messages are small Python objects, sent
    over gloo (CPU) whatever the device."""

    def __init__(self, rank: int, size: int, local_rank: int, timeout: float) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.size, self.local_rank, self.timeout = rank, size, local_rank, timeout
        self._own_error: Exception | None = None
        self.patient_group = dist.new_group(backend="gloo", timeout=PATIENT_TIMEOUT)
        self.nodes = len(set(self._all_gather(socket.gethostname())))

    def device(self, option: str) -> str:
        import torch

        if option in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return option

    def divided(self, weights: Sequence[int], work: Callable[[list[int]], dict[int, R]]) -> list[R]:
        mine = self.share(weights)
        outcomes = self._all_gather(self._attempt(lambda: work(mine)))
        self._raise_failures([failure for _, failure in outcomes], self.size)
        merged: dict[int, R] = {}
        for results, _ in outcomes:
            merged.update(results)
        return [merged[i] for i in range(len(weights))]

    def on_main(self, work: Callable[[], R], patient: bool = False) -> R:
        outcome = self._attempt(work) if self.is_main else None
        result, failure = self._broadcast(outcome, self.patient_group if patient else None)
        self._raise_failures([failure], 1)
        return result

    def together(self, work: Callable[[], R], passed: Callable[[], None] = lambda: None) -> R:
        result, failure = self._attempt(work)
        with signals_held():
            failures = self._all_gather(failure)
            if not any(failures):
                passed()
        self._raise_failures(failures, self.size)
        return result

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.dist.destroy_process_group()

    def _attempt(self, work: Callable[[], R]) -> tuple[R | None, Failure | None]:
        """work()'s result, or its error as a Failure (kept to chain from); signals are not caught."""
        try:
            return work(), None
        except Exception as error:
            self._own_error = error
            return None, failure_of(error, self.rank)

    def _raise_failures(self, failures: list[Failure | None], attempted: int) -> None:
        failed = [f for f in failures if f is not None]
        if failed:
            own, self._own_error = self._own_error, None
            raise RanksFailed(failed, attempted) from own

    def _all_gather(self, value: Any) -> list[Any]:
        gathered: list[Any] = [None] * self.size
        self._collective(lambda: self.dist.all_gather_object(gathered, value))
        return gathered

    def _broadcast(self, value: Any, group: Any) -> Any:
        message = [value]
        self._collective(lambda: self.dist.broadcast_object_list(message, src=0, group=group))
        return message[0]

    def _collective(self, call: Callable[[], None]) -> None:
        try:
            call()
        except RuntimeError as error:
            problem = f"lost contact with the other ranks ({_why_lost(error, self.timeout)}): another rank failed, was killed or hangs"
            raise LostContact(self.rank, problem) from None


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGTERM and SIGINT wait until the block ends (then they are handled as usual)."""
    held = {signal.SIGTERM, signal.SIGINT}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _why_lost(error: BaseException, timeout: float) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "timed out" in text.lower() or "timeout" in text.lower():
        return f"no answer within {TIMEOUT_VARIABLE}={timeout:g} s"
    return text.split("] ", 1)[-1].split(". ", 1)[0][:160]


def launched_rank() -> int:
    """RANK as torchrun (or srun with its environment) sets it; 0 for a plain process."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def launched_size() -> int:
    """WORLD_SIZE as torchrun sets it; 1 for a plain process."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        return 1


def collective_timeout() -> float:
    """Seconds a rank waits for the others at a collective (FARCAST_DIST_TIMEOUT, default 30 min)."""
    text = os.environ.get(TIMEOUT_VARIABLE, "")
    if not text:
        return DEFAULT_TIMEOUT_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise UsageError(f"{TIMEOUT_VARIABLE}={text!r}: expected a positive number of seconds")
    return seconds


def join_world(device_option: str) -> World:
    """The ranks torchrun started, joined; ONE_PROCESS when WORLD_SIZE is unset or 1."""
    size = launched_size()
    if size <= 1:
        return ONE_PROCESS
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise UsageError(
            f"WORLD_SIZE is {size} but {', '.join(missing)} is not set: launch with torchrun, "
            "or set torchrun's environment (RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) for every process"
        )
    rank, local_rank, timeout = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), collective_timeout()
    import torch
    import torch.distributed as dist

    on_gpu = device_option != "cpu" and torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    try:
        dist.init_process_group("cpu:gloo,cuda:nccl" if on_gpu else "gloo", timeout=timedelta(seconds=timeout))
        return TorchWorld(rank, size, local_rank, timeout)
    except RuntimeError as error:
        raise LostContact(rank, f"cannot join the other ranks: {_why_lost(error, timeout)}") from None


def shared_file_writes(world: World, out_dir: Path) -> bool:
    """Whether ranks may write disjoint byte ranges of the same output files (FARCAST_WRITE_SPLIT=
    tensors), or must each write whole files (=files): by default, shared files where all ranks run
    on one node or the output lies on Lustre or GPFS, whole files elsewhere (NFS, say)."""
    choice = os.environ.get(WRITE_SPLIT_VARIABLE, "auto")
    if choice not in ("auto", "tensors", "files"):
        raise UsageError(f"{WRITE_SPLIT_VARIABLE}={choice!r}: expected auto, tensors or files")
    if choice != "auto":
        return choice == "tensors"
    return world.nodes == 1 or file_system_type(out_dir) in SHARED_WRITE_FILE_SYSTEMS


def file_system_type(path: Path) -> str | None:
    """The type of the file system holding `path` (its nearest existing folder), from /proc/self/mounts."""
    place = Path(path).resolve()
    while not place.exists():
        place = place.parent
    try:
        with open("/proc/self/mounts", encoding="utf-8") as mounts:
            entries = [line.split()[1:3] for line in mounts if len(line.split()) > 2]
    except OSError:
        return None
    best, kind = "", None
    for mount_point, fs_type in entries:
        point = mount_point.replace("\\040", " ")
        if (place == Path(point) or Path(point) in place.parents) and len(point) > len(best):
            best, kind = point, fs_type
    return kind

"""The streaming engine: read chunks of tensors in a background thread, hand them to the compute device.

Reading is plain positional reads (or memory mapping, as an option) into a small pool of reused
buffers, pinned when the device is a GPU so that host-to-device copies run at full speed and do not
block. The reader runs ahead by `depth` chunks, so disk reads overlap compute and writing: the
bytes read plus the compute scratch are bounded by `--max-memory`, whatever the model's size.

On the CPU the consumers compute a chunk in blocks of BLOCK_ELEMENTS (matrix_blocks):
each operation over a whole 16 MB chunk streams it from memory, while a block's inputs, conversions,
results and errors stay in the caches, which is several times faster (benchmarks/RESULTS.md, issue 25).
Elementwise results and blockwise_sum's row sums do not depend on where the blocks fall.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from farcast_cli.errors import InputError
from farcast_cli.io.dcp import DcpTensor
from farcast_cli.io.reader import SAFETENSORS_NAMES, TORCH_DTYPES, SafetensorsFile, TensorInfo, pread_exactly

MAX_CHUNK_ELEMENTS = 4 * 1024 * 1024
BLOCK_ELEMENTS = 1 << 18
Advance = Callable[[int], None]


@dataclass(frozen=True)
class Source:
    file: SafetensorsFile
    info: TensorInfo


@dataclass(frozen=True)
class ChunkJob:
    """Elements [start, stop) of one tensor, from each source; `raw` jobs count bytes, not elements."""

    name: str
    start: int
    stop: int
    sources: tuple[Source, ...]
    raw: bool = False

    def byte_range(self, source: Source) -> tuple[int, int]:
        size = 1 if self.raw else source.info.itemsize
        return source.info.begin + self.start * size, source.info.begin + self.stop * size


@dataclass(frozen=True)
class EngineSettings:
    device: torch.device
    chunk_elements: int
    depth: int = 2
    use_mmap: bool = False
    advance: Advance = lambda n: None
    stage: bool | None = None

    @property
    def staged(self) -> bool:
        """The GPU path: copy every chunk from the read buffers to the device without blocking.
        On by default for a GPU; `stage=True` runs the same path on the CPU, for tests."""
        return self.device.type == "cuda" if self.stage is None else self.stage

    @property
    def pinned(self) -> bool:
        return self.staged and self.device.type == "cuda"

    @property
    def block_elements(self) -> int:
        """Elements computed at once: cache-sized blocks on the CPU, whole chunks on a GPU (whose
        kernels want large launches and whose memory is not the bottleneck)."""
        return self.chunk_elements if self.device.type == "cuda" else min(BLOCK_ELEMENTS, self.chunk_elements)


def plan_chunk_elements(max_memory: int, input_bytes: int, scratch_bytes: int, depth: int = 2) -> int:
    """Elements per chunk so that (depth + 1) sets of input buffers plus the scratch fit in max_memory."""
    per_element = (depth + 1) * input_bytes + scratch_bytes
    return int(max(1024, min(MAX_CHUNK_ELEMENTS, max_memory // per_element)))


def chunk_jobs(name: str, numel: int, chunk: int, sources: tuple[Source, ...], raw: bool = False, first: int = 0) -> Iterator[ChunkJob]:
    """Elements [first, numel) of the tensor in jobs of `chunk` elements (bytes, for raw jobs)."""
    for start in range(first, numel, chunk):
        yield ChunkJob(name, start, min(numel, start + chunk), sources, raw)


class OpenFiles:
    """Open file descriptors (or maps), of the reader thread or of a sampled read, closed together."""

    def __init__(self, use_mmap: bool) -> None:
        self.use_mmap = use_mmap
        self.fds: dict[str, int] = {}
        self.maps: dict[str, mmap.mmap] = {}

    def read_into(self, file: SafetensorsFile, begin: int, view: memoryview) -> None:
        if isinstance(file, DcpTensor):
            for path, offset, at, count in file.pieces(begin, len(view)):
                self._read_path(path, offset, view[at : at + count])
            return
        self._read_path(file.path, begin, view)

    def _read_path(self, path: Path, begin: int, view: memoryview) -> None:
        key = str(path)
        try:
            if key not in self.fds:
                self.fds[key] = os.open(path, os.O_RDONLY)
                if self.use_mmap and os.fstat(self.fds[key]).st_size:
                    self.maps[key] = mmap.mmap(self.fds[key], 0, access=mmap.ACCESS_READ)
            if key in self.maps:
                view[:] = self.maps[key][begin : begin + len(view)]
                return
            pread_exactly(self.fds[key], view, begin, path)
        except (OSError, ValueError) as error:
            raise InputError(f"{path}: read failed: {getattr(error, 'strerror', None) or error}") from None

    def close(self) -> None:
        for view in self.maps.values():
            view.close()
        for fd in self.fds.values():
            os.close(fd)


ROW_ALIGNMENT = 64


class _Pool:
    """`depth + 1` sets of byte buffers, one buffer per source, reused chunk after chunk. A set's buffers
    are the rows of one allocation, ROW_ALIGNMENT bytes apart, so that a chunk's sources in their own
    dtype are one (sources x elements) matrix (source_matrix)."""

    def __init__(self, sets: int, sources: int, nbytes: int, pinned: bool) -> None:
        self.free: queue.Queue = queue.Queue()
        width = -(-nbytes // ROW_ALIGNMENT) * ROW_ALIGNMENT
        for _ in range(sets):
            self.free.put(list(torch.empty(sources, width, dtype=torch.uint8, pin_memory=pinned)))


def _reader(jobs: Iterable[ChunkJob], pool: _Pool, ready: queue.Queue, stop: threading.Event, settings: EngineSettings) -> None:
    files = OpenFiles(settings.use_mmap)
    try:
        for job in jobs:
            buffers = None
            while buffers is None:
                if stop.is_set():
                    return
                with contextlib.suppress(queue.Empty):
                    buffers = pool.free.get(timeout=0.1)
            lengths = []
            for source, buffer in zip(job.sources, buffers):
                begin, end = job.byte_range(source)
                files.read_into(source.file, begin, memoryview(buffer.numpy())[: end - begin])
                lengths.append(end - begin)
                settings.advance(end - begin)
            ready.put((job, buffers, lengths))
        ready.put(None)
    except BaseException as error:  # handed to the consumer, which re-raises it
        ready.put(error)
    finally:
        files.close()


def stream(jobs: list[ChunkJob], settings: EngineSettings) -> Iterator[tuple[ChunkJob, list[torch.Tensor]]]:
    """Yield each job with its sources' data, raw bytes for raw jobs; for tensor jobs, on the CPU, views
    of the read buffers in the file's dtype (matrix_blocks converts a block at a time), and staged, copies
    on the device in the compute dtype.

    A yielded tensor may share memory with a reused buffer: use it before asking for the next job.
    """
    if not jobs:
        return
    sources = max(len(job.sources) for job in jobs)
    nbytes = max(job.byte_range(s)[1] - job.byte_range(s)[0] for job in jobs for s in job.sources)
    pool = _Pool(settings.depth + 1, sources, max(nbytes, 1), pinned=settings.pinned)
    converted = _Buffers(settings.device, sources)
    ready: queue.Queue = queue.Queue()
    stop = threading.Event()
    thread = threading.Thread(target=_reader, args=(jobs, pool, ready, stop, settings), daemon=True, name="farcast-reader")
    thread.start()
    try:
        with a_core_for_the_reader(settings.device):
            while True:
                item = ready.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                job, buffers, lengths = item
                if job.raw:
                    yield job, [buffer[:length] for buffer, length in zip(buffers, lengths)]
                else:
                    yield (
                        job,
                        [
                            _to_device(buffer[:length], source.info, settings, converted, slot)
                            for slot, (buffer, length, source) in enumerate(zip(buffers, lengths, job.sources))
                        ],
                    )
                pool.free.put(buffers)
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def a_core_for_the_reader(device: torch.device) -> Iterator[None]:
    """Torch computes on the CPU with a core fewer than the process may use meanwhile (one thread on 2
    cores): the reader thread needs a core of its own, and torch's workers spinning on it slowed both (on
    2 cores, a full backtest's main thread 1.24 -> 0.99 s and the reader's reads 1.21 -> 0.79 s;
    benchmarks/RESULTS.md, issue 25). Results do not depend on the number of threads (blockwise_sum)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(streaming_threads(threads, len(os.sched_getaffinity(0))))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def streaming_threads(threads: int, cores: int) -> int:
    """Torch's threads while a CPU stream is read: one core left to the reader, at least one thread."""
    return max(1, min(threads, cores - 1))


class _Buffers:
    """Reused conversion buffers by dtype, one row per source slot of one allocation (so that a chunk's
    converted sources are one matrix, as the read buffers are), grown when a larger chunk comes."""

    def __init__(self, device: torch.device, slots: int) -> None:
        self.device = device
        self.slots = slots
        self.buffers: dict[torch.dtype, torch.Tensor] = {}

    def get(self, slot: int, count: int, dtype: torch.dtype) -> torch.Tensor:
        buffer = self.buffers.get(dtype)
        if buffer is None or buffer.shape[1] < count:
            buffer = self.buffers[dtype] = torch.empty(self.slots, count, dtype=dtype, device=self.device)
        return buffer[slot, :count]


def compute_dtype(dtype: str) -> torch.dtype:
    """Float32 for 16- and 32-bit weights, float64 for float64 ones."""
    return torch.float64 if dtype == "F64" else torch.float32


def _to_device(raw: torch.Tensor, info: TensorInfo, settings: EngineSettings, converted: _Buffers, slot: int) -> torch.Tensor:
    """The chunk as typed values: a view of the read buffer on the CPU, compute-dtype values on the device when staged."""
    typed = raw.view(TORCH_DTYPES[info.dtype])
    if not settings.staged:
        return typed
    return converted.get(slot, typed.numel(), compute_dtype(info.dtype)).copy_(typed, non_blocking=True)


def matrix_blocks(data: list[torch.Tensor], settings: EngineSettings, blocks: Scratch) -> Iterator[tuple[int, int, torch.Tensor]]:
    """[start, stop) of each block of a streamed chunk (every start a multiple of the block size) and the
    block of every source as one (sources x elements) matrix in their compute dtype: a view of the chunk
    where its sources are stored so in one matrix already (source_matrix), else converted into a reused
    matrix a block at a time, in one operation where they are one matrix in another dtype (a bfloat16 or
    float16 chunk is never converted whole)."""
    count, size = data[0].numel(), settings.block_elements
    compute = max((compute_dtype(SAFETENSORS_NAMES[values.dtype]) for values in data), key=lambda dtype: dtype.itemsize)
    whole = source_matrix(data)
    for start in range(0, count, size):
        stop = min(count, start + size)
        if whole is not None and whole.dtype == compute:
            yield start, stop, whole[:, start:stop]
            continue
        matrix = blocks.get(len(data) * (stop - start), compute, data[0].device).view(len(data), stop - start)
        if whole is not None:
            matrix.copy_(whole[:, start:stop])
        else:
            for row, values in zip(matrix, data):
                row.copy_(values[start:stop])
        yield start, stop, matrix


def source_matrix(data: list[torch.Tensor]) -> torch.Tensor | None:
    """The sources (1-d, of one dtype and length) as the rows of one (sources x elements) view where
    they lie equally spaced in one allocation (the engine's buffers), else None."""
    first, count = data[0], data[0].numel()
    if len(data) == 1:
        return first.view(1, count)
    step = data[1].data_ptr() - first.data_ptr()
    spaced = all(
        values.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        and values.dtype == first.dtype
        and values.data_ptr() - first.data_ptr() == i * step
        and values.numel() == count
        and values.is_contiguous()
        for i, values in enumerate(data)
    )
    if not spaced or step <= 0 or step % first.element_size() or step // first.element_size() < count:
        return None
    return first.as_strided((len(data), count), (step // first.element_size(), 1))


class Scratch:
    """Reused work buffers, one per (dtype, device, pinned), each of `size` elements (or more, grown
    where more are asked for)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.buffers: dict[tuple, torch.Tensor] = {}

    def get(self, count: int, dtype: torch.dtype, device: torch.device, pinned: bool = False) -> torch.Tensor:
        key = (dtype, str(device), pinned)
        buffer = self.buffers.get(key)
        if buffer is None or buffer.numel() < count:
            buffer = self.buffers[key] = torch.empty(max(self.size, count), dtype=dtype, device=device, pin_memory=pinned)
        return buffer[:count]


def to_host(values: torch.Tensor, scratch: Scratch) -> torch.Tensor:
    """A CPU tensor with the values; from a GPU through a reused pinned buffer."""
    if values.device.type == "cpu":
        return values
    host = scratch.get(values.numel(), values.dtype, torch.device("cpu"), pinned=True)
    host.copy_(values, non_blocking=True)
    torch.cuda.current_stream(values.device).synchronize()
    return host


def first_non_finite(values: torch.Tensor) -> int | None:
    """Index of the first NaN or Inf, or None. A single sum rules them out in the common case: in
    the tensor's own dtype (a bfloat16 sum with a float32 result is 15x slower on CPU), except
    float16, whose own sums overflow at 65504."""
    if math.isfinite(float(values.sum(dtype=torch.float32 if values.dtype == torch.float16 else values.dtype))):
        return None
    finite = torch.isfinite(values)
    return None if bool(finite.all()) else int((~finite).nonzero()[0])


def raise_for_non_finite_input(job: ChunkJob, data: list[torch.Tensor]) -> None:
    """Name the first source holding NaN or Inf in this chunk, and where."""
    for source, values in zip(job.sources, data):
        where = first_non_finite(values)
        if where is not None:
            raise InputError(
                f"{source.file.path}: tensor {job.name!r} holds {float(values[where])} at element {job.start + where}; "
                "refusing to forecast from non-finite weights"
            )

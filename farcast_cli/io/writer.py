"""A streaming safetensors writer: the header first, then each tensor's bytes chunk by chunk.

Unlike `safetensors.torch.save_file` it never needs a whole tensor (let alone a model) in memory. The
data section is laid out as that reference writer lays it out (by dtype, larger alignment first, then
by name, after a header padded to a multiple of 8), so every tensor starts at a multiple of its
element size and a file saved by `save_file` comes out in the same order it went in.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from farcast_cli.errors import OutputError
from farcast_cli.io.reader import REFERENCE_DTYPE_RANK, TORCH_DTYPES, TensorInfo, tensor_nbytes


def reference_order(tensors: list[TensorInfo]) -> list[TensorInfo]:
    """The order of the reference writer (safetensors' `prepare`): dtype from the last of its `Dtype`
    enum to the first (so larger alignment first), then name (Rust compares UTF-8 bytes, which order
    like Python's code points)."""
    return sorted(tensors, key=lambda info: (-REFERENCE_DTYPE_RANK[info.dtype], info.name))


def header_bytes(tensors: list[TensorInfo], metadata: dict[str, str]) -> tuple[bytes, dict[str, TensorInfo]]:
    """The padded header and each tensor with offsets relative to the data section, in reference
    order: a pure function of the tensors' names, dtypes and shapes and of the metadata."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    laid_out, position = {}, 0
    for info in reference_order(tensors):
        size = tensor_nbytes(info.dtype, info.shape)
        header[info.name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [position, position + size]}
        laid_out[info.name] = TensorInfo(info.name, info.dtype, info.shape, position, position + size)
        position += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded, laid_out


def output_failure(path: Path, error: OSError) -> OutputError:
    if error.errno == errno.ENOSPC:
        return OutputError(f"{path}: disk full while writing; nothing was kept")
    return OutputError(f"{path}: cannot write: {error.strerror or error}")


FLUSH_BEHIND_BYTES = 64 << 20


class FlushBehind:
    """Writes a file's data back to disk in a thread of its own while more is written (fdatasync every
    `every` bytes written), so that the fsync that publishing needs at the end waits only for the
    last part: the page cache otherwise holds the whole output dirty until then (benchmarks/RESULTS.md,
    issue 25). A failure is kept for `finish`, which joins the thread."""

    def __init__(self, fd: int, every: int | None = None) -> None:
        self.fd, self.every = fd, FLUSH_BEHIND_BYTES if every is None else every
        self.pending = 0
        self.failure: OSError | None = None
        self.requested = False
        self.wanted = threading.Event()
        self.done = False
        self.thread = threading.Thread(target=self._run, daemon=True, name="farcast-flush")
        self.thread.start()

    def wrote(self, nbytes: int) -> None:
        self.pending += nbytes
        if self.pending >= self.every:
            self.pending = 0
            self.requested = True
            self.wanted.set()

    def _run(self) -> None:
        while True:
            self.wanted.wait()
            self.wanted.clear()
            if self.requested:
                self.requested = False
                try:
                    os.fdatasync(self.fd)
                except OSError as error:
                    self.failure = error
                    return
            if self.done:
                return

    def finish(self) -> None:
        """Stop the thread; raise what a write-back in it raised."""
        self.done = True
        self.wanted.set()
        self.thread.join()
        if self.failure is not None:
            raise self.failure


def finish_flushing(flushes: Iterable[FlushBehind], raising: bool = False) -> None:
    """Stop every FlushBehind's thread (each joined, whatever the others raise: none may outlive its
    descriptor); with `raising`, raise the first write-back failure."""
    failures = []
    for flush in flushes:
        try:
            flush.finish()
        except OSError as error:
            failures.append(error)
    if raising and failures:
        raise failures[0]


def _byte_range(info: TensorInfo, start: int, stop: int) -> tuple[int, int]:
    """Elements [start, stop) of the tensor as bytes of its data (all of them for a whole tensor of any dtype)."""
    if (start, stop) == (0, info.numel):
        return 0, info.nbytes
    return start * info.itemsize, stop * info.itemsize


class SafetensorsWriter:
    """Writes one file: takes the tensors in the given order (that of the reads feeding it), each in
    one or more chunks, and puts each at its offset in the reference layout; it seeks only where the
    two orders differ.

    With `only` (tensor name: element ranges), it writes just those ranges, in that order, into a file
    that other writers (other processes) fill with the rest: every writer writes the same header and
    sets the same size, so the work on one file divides by tensor, or by range of a large tensor.
    Without it, the file must not exist yet. With `flush_behind`, the data goes to disk as it is
    written (FlushBehind), for a file that will be closed durable."""

    def __init__(
        self,
        path: Path,
        tensors: list[TensorInfo],
        metadata: dict[str, str],
        only: Mapping[str, Sequence[tuple[int, int]]] | None = None,
        flush_behind: bool = False,
    ) -> None:
        self.path = Path(path)
        header, layout = header_bytes(tensors, metadata)
        self._sequence = [
            (layout[info.name], *_byte_range(info, start, stop))
            for info in tensors
            for start, stop in (((0, info.numel),) if only is None else only.get(info.name, ()))
        ]
        self._data_start = len(header)
        self._next = 0
        self._written = 0
        self._flush: FlushBehind | None = None
        try:
            if only is None:
                self._handle = open(self.path, "xb")  # noqa: SIM115 (held open until close or abort)
            else:
                self._handle = open(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644), "wb")  # noqa: SIM115
                os.ftruncate(self._handle.fileno(), len(header) + sum(layout[info.name].nbytes for info in tensors))
            self._handle.write(header)
        except OSError as error:
            raise output_failure(self.path, error) from None
        if flush_behind:
            self._flush = FlushBehind(self._handle.fileno())
        self._advance_past_full_tensors()

    def write(self, chunk: torch.Tensor) -> None:
        """Write the next chunk of the current tensor; its dtype must be the tensor's."""
        info = self._sequence[self._next][0]
        if chunk.dtype != TORCH_DTYPES[info.dtype]:
            raise ValueError(f"chunk of {chunk.dtype} for tensor {info.name} of {info.dtype}")
        data = chunk.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        self._write_raw(memoryview(data))

    def write_bytes(self, data: bytes | bytearray | memoryview) -> None:
        self._write_raw(memoryview(data))

    def _write_raw(self, data: memoryview) -> None:
        info, start, stop = self._sequence[self._next]
        if start + self._written + len(data) > stop:
            raise ValueError(f"too many bytes for tensor {info.name}")
        try:
            self._handle.write(data)
        except OSError as error:
            raise output_failure(self.path, error) from None
        if self._flush is not None:
            self._flush.wrote(len(data))
        self._written += len(data)
        self._advance_past_full_tensors()

    def _advance_past_full_tensors(self) -> None:
        while self._next < len(self._sequence) and self._written == self._sequence[self._next][2] - self._sequence[self._next][1]:
            self._next += 1
            self._written = 0
        if self._next < len(self._sequence) and self._written == 0:
            info, start, _ = self._sequence[self._next]
            self._move_to(self._data_start + info.begin + start)

    def _move_to(self, position: int) -> None:
        try:
            if self._handle.tell() != position:
                self._handle.seek(position)
        except OSError as error:
            raise output_failure(self.path, error) from None

    def close(self, durable: bool = True) -> None:
        """Flush (and fsync, when `durable`); every tensor must have been written in full."""
        self._advance_past_full_tensors()
        if self._next != len(self._sequence):
            self._stop_flushing()
            self._handle.close()
            raise ValueError(f"{self.path}: closed before tensor {self._sequence[self._next][0].name} was complete")
        try:
            self._stop_flushing(raising=True)
            self._handle.flush()
            if durable:
                os.fsync(self._handle.fileno())
            self._handle.close()
        except OSError as error:
            raise output_failure(self.path, error) from None

    def abort(self) -> None:
        """Close without raising: the failure that made the caller abort is the one to report (closing
        flushes what the buffer still holds, which fails again on a full disk)."""
        self._stop_flushing()
        with contextlib.suppress(OSError):
            self._handle.close()

    def _stop_flushing(self, raising: bool = False) -> None:
        flush, self._flush = self._flush, None
        finish_flushing([] if flush is None else [flush], raising)

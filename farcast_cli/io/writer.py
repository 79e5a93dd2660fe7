"""A streaming safetensors writer: the header first, then each tensor's bytes chunk by chunk.

Unlike `safetensors.torch.save_file` it never needs a whole tensor (let alone a model) in memory.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Collection

import torch

from farcast_cli.errors import OutputError
from farcast_cli.io.reader import TORCH_DTYPES, TensorInfo, tensor_nbytes


def _header_bytes(tensors: list[TensorInfo], metadata: dict[str, str]) -> tuple[bytes, list[TensorInfo]]:
    """The padded header and the tensors with offsets relative to the data section."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    laid_out, position = [], 0
    for info in tensors:
        size = tensor_nbytes(info.dtype, info.shape)
        header[info.name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [position, position + size]}
        laid_out.append(TensorInfo(info.name, info.dtype, info.shape, position, position + size))
        position += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded, laid_out


def output_failure(path: Path, error: OSError) -> OutputError:
    if error.errno == errno.ENOSPC:
        return OutputError(f"{path}: disk full while writing; nothing was kept")
    return OutputError(f"{path}: cannot write: {error.strerror or error}")


class SafetensorsWriter:
    """Writes one file, tensor by tensor in the given order, each tensor in one or more chunks.

    With `only`, it writes just those tensors, each at its offset, into a file that other writers
    (other processes) fill with the rest: every writer writes the same header and sets the same
    size, so the work on one file divides by tensor. Without it, the file must not exist yet."""

    def __init__(self, path: Path, tensors: list[TensorInfo], metadata: dict[str, str], only: Collection[str] | None = None) -> None:
        self.path = Path(path)
        header, self._layout = _header_bytes(tensors, metadata)
        self._data_start = len(header)
        self._only = None if only is None else frozenset(only)
        self._next = 0
        self._written = 0
        try:
            if self._only is None:
                self._handle = open(self.path, "xb")
            else:
                self._handle = open(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644), "wb")
                os.ftruncate(self._handle.fileno(), len(header) + sum(info.nbytes for info in self._layout))
            self._handle.write(header)
        except OSError as error:
            raise output_failure(self.path, error) from None
        self._advance_past_full_tensors()

    def write(self, chunk: torch.Tensor) -> None:
        """Append the next chunk; its dtype must be the current tensor's."""
        info = self._layout[self._next]
        if chunk.dtype != TORCH_DTYPES[info.dtype]:
            raise ValueError(f"chunk of {chunk.dtype} for tensor {info.name} of {info.dtype}")
        data = chunk.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        self._write_raw(memoryview(data), info)

    def write_bytes(self, data: bytes | bytearray | memoryview) -> None:
        self._write_raw(memoryview(data), self._layout[self._next])

    def _write_raw(self, data: memoryview, info: TensorInfo) -> None:
        if self._written + len(data) > info.nbytes:
            raise ValueError(f"too many bytes for tensor {info.name}")
        try:
            self._handle.write(data)
        except OSError as error:
            raise output_failure(self.path, error) from None
        self._written += len(data)
        self._advance_past_full_tensors()

    def _advance_past_full_tensors(self) -> None:
        moved = False
        while self._next < len(self._layout) and (self._written == self._layout[self._next].nbytes or not self._mine(self._layout[self._next])):
            self._next += 1
            self._written = 0
            moved = True
        if moved and self._only is not None and self._next < len(self._layout):
            self._handle.seek(self._data_start + self._layout[self._next].begin)

    def _mine(self, info: TensorInfo) -> bool:
        return self._only is None or info.name in self._only

    def close(self) -> None:
        """Flush and fsync; every tensor must have been written in full."""
        self._advance_past_full_tensors()
        if self._next != len(self._layout):
            self._handle.close()
            raise ValueError(f"{self.path}: closed before tensor {self._layout[self._next].name} was complete")
        try:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
        except OSError as error:
            raise output_failure(self.path, error) from None

    def abort(self) -> None:
        self._handle.close()


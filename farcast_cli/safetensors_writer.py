"""A streaming safetensors writer: the header first, then each tensor's bytes chunk by chunk.

Unlike `safetensors.torch.save_file` it never needs a whole tensor (let alone a model) in memory.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import torch

from farcast_cli.errors import OutputError
from farcast_cli.safetensors_reader import ITEM_SIZES, TORCH_DTYPES, TensorInfo


def _header_bytes(tensors: list[TensorInfo], metadata: dict[str, str]) -> tuple[bytes, list[TensorInfo]]:
    """The padded header and the tensors with offsets relative to the data section."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    laid_out, position = [], 0
    for info in tensors:
        size = info.numel * ITEM_SIZES[info.dtype]
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
    """Writes one file, tensor by tensor in the given order, each tensor in one or more chunks."""

    def __init__(self, path: Path, tensors: list[TensorInfo], metadata: dict[str, str]) -> None:
        self.path = Path(path)
        header, self._layout = _header_bytes(tensors, metadata)
        self._next = 0
        self._written = 0
        try:
            self._handle = open(self.path, "xb")
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
        while self._next < len(self._layout) and self._written == self._layout[self._next].nbytes:
            self._next += 1
            self._written = 0

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


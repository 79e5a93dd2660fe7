"""A streaming writer of distributed checkpoints (DCP), laid out like an input DCP folder (io/dcp.py).

The output has the input's `.distcp` file names and, in each, the model tensors' chunks in the input's
order, each a `torch.save` archive as torch's file-system writer stores it. Each archive is written by
`torch.save` itself under `torch.serialization.skip_data()`, which writes the archive's index and
pickle and leaves the data's place (torch.save seeks over it); its data is then written there chunk
by chunk, so no tensor is ever whole in memory. (The archive's CRC of the data is torch.save's one for
skipped data, which torch.load does not check.) The `.metadata` is torch's `Metadata`, pickled as
torch's writer pickles it, naming the written byte ranges; torch.distributed.checkpoint.load reads
the folder back.

With `only`, a writer writes those tensors' data into files that other writers (other processes)
fill with the rest: every writer writes the same archives at the same places.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path

import torch
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.utils import _create_file_view

from farcast_cli.errors import InternalError
from farcast_cli.io.dcp import METADATA_FILE, PROVENANCE_FILE, Chunk, DcpFolder, read_dcp_folder, stream_pieces, stream_starts
from farcast_cli.io.reader import TORCH_DTYPES
from farcast_cli.io.writer import output_failure


class DcpWriter:
    """Writes one DCP folder: `write(name, start, values)` puts values at element `start` of a tensor's
    stream (its chunks in offset order, as io/dcp.py reads them), in any order."""

    def __init__(self, folder: Path, source: DcpFolder, dtypes: dict[str, str], only: Collection[str] | None = None) -> None:
        self.folder = Path(folder)
        self.source = source
        self.dtypes = dtypes
        self.only = None if only is None else frozenset(only)
        self.chunks: dict[str, list[Chunk]] = {name: [] for name in source.tensors}
        self.items: dict[str, list[tuple[str, Chunk, _StorageInfo]]] = {}
        self._fds: dict[Path, int] = {}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            for relative, members in self._items_by_file().items():
                self._write_archives(relative, members)
        except OSError as error:
            self.abort()
            raise output_failure(self.folder, error) from None
        self._starts = {name: stream_starts(chunks) for name, chunks in self.chunks.items()}

    def _items_by_file(self) -> dict[str, list[tuple[str, Chunk]]]:
        """The model's chunks grouped by the input file that holds them, in the input's order."""
        by_file: dict[str, list[tuple[str, Chunk]]] = {}
        for name, tensor in self.source.tensors.items():
            for chunk in tensor.chunks:
                by_file.setdefault(chunk.path.name, []).append((name, chunk))
        return {relative: sorted(members, key=lambda member: member[1].begin) for relative, members in sorted(by_file.items())}

    def _write_archives(self, relative: str, members: list[tuple[str, Chunk]]) -> None:
        """Every chunk's archive, data left in place, one after the other as torch's writer lays them out."""
        path = self.folder / relative
        flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if self.only is None else 0)
        self._fds[path] = os.open(path, flags, 0o644)
        written = []
        with open(os.dup(self._fds[path]), "wb") as handle:
            for name, chunk in members:
                offset = handle.tell()
                dtype = TORCH_DTYPES[self.dtypes[name]]
                with torch.serialization.skip_data():
                    torch.save(torch.empty(chunk.sizes, dtype=dtype), handle)
                written.append((name, chunk, offset, handle.tell() - offset))
            handle.flush()
        with open(path, "rb") as handle:
            for name, chunk, offset, length in written:
                begin = offset + _data_offset(handle, offset, length)
                placed = Chunk(chunk.offsets, chunk.sizes, path, begin, chunk.numel * TORCH_DTYPES[self.dtypes[name]].itemsize, None)
                self.chunks[name].append(placed)
                self.items.setdefault(name, []).append((relative, placed, _StorageInfo(relative, offset, length)))
        for name in self.chunks:
            self.chunks[name].sort(key=lambda c: c.offsets)

    def write(self, name: str, start: int, values: torch.Tensor) -> None:
        """Elements from `start` of the tensor's stream; their dtype must be the output's."""
        if values.dtype != TORCH_DTYPES[self.dtypes[name]]:
            raise ValueError(f"chunk of {values.dtype} for tensor {name} of {self.dtypes[name]}")
        data = values.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        self.write_bytes(name, start * values.element_size(), memoryview(data))

    def write_bytes(self, name: str, begin: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        for path, offset, at, count in stream_pieces(self.chunks[name], self._starts[name], begin, len(view)):
            try:
                _pwrite_all(self._fds[path], view[at : at + count], offset)
            except OSError as error:
                raise output_failure(path, error) from None

    def close(self, durable: bool = True) -> None:
        try:
            for fd in self._fds.values():
                if durable:
                    os.fsync(fd)
        except OSError as error:
            raise output_failure(self.folder, error) from None
        finally:
            self.abort()

    def abort(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


def _data_offset(handle, offset: int, length: int) -> int:
    """Where torch's loader finds the archive's data, relative to the archive (no data read)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stored = torch.load(_create_file_view(handle, offset, length), map_location="meta", weights_only=True)
    return stored.untyped_storage()._checkpoint_offset


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def write_dcp_metadata(writer: DcpWriter, provenance: str) -> None:
    """The `.metadata` naming every written chunk, and farcast's provenance beside it."""
    source = writer.source.metadata
    entries, storage = {}, {}
    for name, tensor in writer.source.tensors.items():
        dtype = TORCH_DTYPES[writer.dtypes[name]]
        entries[name] = replace(tensor.entry, properties=replace(tensor.entry.properties, dtype=dtype))
        for _, chunk, item in writer.items.get(name, []):
            storage[dcp_metadata.MetadataIndex(name, chunk.offsets, _chunk_index(tensor.entry, chunk.offsets))] = item
    planner_data = source.planner_data if isinstance(source.planner_data, dict) else {}
    metadata = dcp_metadata.Metadata(
        state_dict_metadata=entries,
        planner_data={name: planner_data[name] for name in entries if name in planner_data},
        storage_data=storage,
        storage_meta=dcp_metadata.StorageMeta(),
        version=source.version,
    )
    path = writer.folder / METADATA_FILE
    try:
        with open(path, "xb") as handle:
            pickle.dump(metadata, handle)
            handle.flush()
            os.fsync(handle.fileno())
        (writer.folder / PROVENANCE_FILE).write_text(provenance + "\n", encoding="utf-8")
    except OSError as error:
        raise output_failure(path, error) from None


def _chunk_index(entry: dcp_metadata.TensorStorageMetadata, offsets: tuple[int, ...]) -> int:
    return next(i for i, chunk in enumerate(entry.chunks) if tuple(int(o) for o in chunk.offsets) == offsets)


def check_dcp_output(folder: Path, source: DcpFolder, dtypes: dict[str, str]) -> None:
    """Read the written folder back as an input: the same tensors, dtypes, shapes and chunks."""
    try:
        written = read_dcp_folder(folder)
    except Exception as error:
        raise InternalError(f"{folder}: the written distributed checkpoint cannot be read back ({error}); please report this") from None
    expected = {name: (dtypes[name], tensor.info.shape, tensor.boxes) for name, tensor in source.tensors.items()}
    found = {name: (tensor.info.dtype, tensor.info.shape, tensor.boxes) for name, tensor in written.tensors.items()}
    if found != expected:
        raise InternalError(f"{folder}: the written distributed checkpoint holds other tensors than were written; please report this")

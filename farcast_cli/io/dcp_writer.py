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

import json
import math
import os
import pickle
import warnings
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from farcast_cli.errors import InternalError
from farcast_cli.io.dcp import METADATA_FILE, PROVENANCE_FILE, Chunk, DcpFolder, read_dcp_folder, stream_pieces, stream_starts, torch_dcp
from farcast_cli.io.output import write_text
from farcast_cli.io.reader import TORCH_DTYPES, TensorInfo, tensor_nbytes
from farcast_cli.io.run import INDEX_FILE, SINGLE_FILE
from farcast_cli.io.writer import FlushBehind, finish_flushing, header_bytes, output_failure

if TYPE_CHECKING:
    from torch.distributed.checkpoint import metadata as dcp_metadata
    from torch.distributed.checkpoint.filesystem import _StorageInfo


class _OpenFiles:
    """Output files held open by descriptor while a writer fills them by tensor (`write_bytes`, the
    writer's own placement): fsynced (when durable) and closed together. With `_flush_behind`, each
    file is written back to disk while it is written (io/writer.py FlushBehind), so that the fsync at
    close waits only for each file's last part."""

    folder: Path
    dtypes: dict[str, str]
    _fds: dict
    _flushes: dict

    def write(self, name: str, start: int, values: torch.Tensor) -> None:
        """Elements from `start` of the tensor's stream; their dtype must be the output's."""
        if values.dtype != TORCH_DTYPES[self.dtypes[name]]:
            raise ValueError(f"chunk of {values.dtype} for tensor {name} of {self.dtypes[name]}")
        data = values.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        self.write_bytes(name, start * values.element_size(), memoryview(data))

    def write_bytes(self, name: str, begin: int, data: bytes | bytearray | memoryview) -> None:
        raise NotImplementedError

    def _flush_behind(self) -> None:
        self._flushes = {key: FlushBehind(fd) for key, fd in self._fds.items()}

    def _wrote(self, key: object, nbytes: int) -> None:
        if key in self._flushes:
            self._flushes[key].wrote(nbytes)

    def close(self, durable: bool = True) -> None:
        try:
            self._stop_flushing(raising=True)
            for fd in self._fds.values():
                if durable:
                    os.fsync(fd)
        except OSError as error:
            raise output_failure(self.folder, error) from None
        finally:
            self.abort()

    def abort(self) -> None:
        """Close without raising (the flushing threads joined first: none may outlive its descriptor)."""
        self._stop_flushing()
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def _stop_flushing(self, raising: bool = False) -> None:
        flushes, self._flushes = self._flushes, {}
        finish_flushing(flushes.values(), raising)


class DcpWriter(_OpenFiles):
    """Writes one DCP folder: `write(name, start, values)` puts values at element `start` of a tensor's
    stream (its chunks in offset order, as io/dcp.py reads them), in any order."""

    def __init__(
        self, folder: Path, source: DcpFolder, dtypes: dict[str, str], only: Collection[str] | None = None, flush_behind: bool = False
    ) -> None:
        self.folder = Path(folder)
        self.source = source
        self.dtypes = dtypes
        self.only = None if only is None else frozenset(only)
        self.chunks: dict[str, list[Chunk]] = {name: [] for name in source.tensors}
        self.items: dict[str, list[tuple[str, Chunk, _StorageInfo]]] = {}
        self._fds: dict[Path, int] = {}
        self._flushes: dict[Path, FlushBehind] = {}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            for relative, members in self._items_by_file().items():
                self._write_archives(relative, members)
        except OSError as error:
            self.abort()
            raise output_failure(self.folder, error) from None
        self._starts = {name: stream_starts(chunks) for name, chunks in self.chunks.items()}
        if flush_behind:
            self._flush_behind()

    def _items_by_file(self) -> dict[str, list[tuple[str, Chunk]]]:
        """The model's chunks grouped by the input file that holds them, in the input's order."""
        by_file: dict[str, list[tuple[str, Chunk]]] = {}
        for name, tensor in self.source.tensors.items():
            for chunk in tensor.chunks:
                by_file.setdefault(chunk.path.name, []).append((name, chunk))
        return {relative: sorted(members, key=lambda member: member[1].item.offset) for relative, members in sorted(by_file.items())}

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
                placed = Chunk(chunk.offsets, chunk.sizes, path, chunk.numel * TORCH_DTYPES[self.dtypes[name]].itemsize, begin_at=begin)
                self.chunks[name].append(placed)
                self.items.setdefault(name, []).append((relative, placed, torch_dcp().StorageInfo(relative, offset, length)))
        for name in self.chunks:
            self.chunks[name].sort(key=lambda c: c.offsets)

    def write_bytes(self, name: str, begin: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        for path, offset, at, count in stream_pieces(self.chunks[name], self._starts[name], begin, len(view)):
            try:
                _pwrite_all(self._fds[path], view[at : at + count], offset)
            except OSError as error:
                raise output_failure(path, error) from None
            self._wrote(path, count)


def _data_offset(handle, offset: int, length: int) -> int:
    """Where torch's loader finds the archive's data, relative to the archive (no data read)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stored = torch.load(torch_dcp().create_file_view(handle, offset, length), map_location="meta", weights_only=True)
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
            storage[torch_dcp().metadata.MetadataIndex(name, chunk.offsets, _chunk_index(tensor.entry, chunk.offsets))] = item
    planner_data = source.planner_data if isinstance(source.planner_data, dict) else {}
    metadata = torch_dcp().metadata.Metadata(
        state_dict_metadata=entries,
        planner_data={name: planner_data[name] for name in entries if name in planner_data},
        storage_data=storage,
        storage_meta=torch_dcp().metadata.StorageMeta(),
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
    """Read the written folder back as an input: the same tensors, dtypes, shapes and chunks, each
    chunk's archive loaded by torch."""
    try:
        written = read_dcp_folder(folder)
        for tensor in written.tensors.values():
            for chunk in tensor.chunks:
                chunk.begin  # noqa: B018 (locating the chunk loads its archive)
    except Exception as error:
        raise InternalError(f"{folder}: the written distributed checkpoint cannot be read back ({error}); please report this") from None
    expected = {name: (dtypes[name], tensor.info.shape, tensor.boxes) for name, tensor in source.tensors.items()}
    found = {name: (tensor.info.dtype, tensor.info.shape, tensor.boxes) for name, tensor in written.tensors.items()}
    if found != expected:
        raise InternalError(f"{folder}: the written distributed checkpoint holds other tensors than were written; please report this")


MAX_SHARD_BYTES = 5 * 10**9
"""Hugging Face's default largest shard (save_pretrained's max_shard_size="5GB")."""


def hf_name(source: DcpFolder, name: str) -> str:
    """The tensor's name in a Hugging Face layout: without the "model" group that accelerate's FSDP
    saving puts the model's state dict in ({"model": state_dict})."""
    planner_data = source.metadata.planner_data if isinstance(source.metadata.planner_data, dict) else {}
    path = planner_data.get(name)
    if isinstance(path, tuple) and len(path) == 2 and path[0] == "model" and isinstance(path[1], str):
        return path[1]
    return name


def consolidated_layout(source: DcpFolder, dtypes: dict[str, str]) -> dict[str, list[TensorInfo]]:
    """The safetensors files of a consolidated output, each with its tensors (Hugging Face names, in the
    source's order), a new file when the next tensor would pass max_shard_bytes: `model.safetensors`
    alone, or `model-0000k-of-0000n.safetensors` shards."""
    shards: list[list[TensorInfo]] = [[]]
    size, max_shard_bytes = 0, MAX_SHARD_BYTES
    for name, tensor in source.tensors.items():
        info = TensorInfo(hf_name(source, name), dtypes[name], tensor.info.shape, 0, tensor_nbytes(dtypes[name], tensor.info.shape))
        if shards[-1] and size + info.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(info)
        size += info.nbytes
    if len(shards) == 1:
        return {SINGLE_FILE: shards[0]}
    return {f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors": infos for k, infos in enumerate(shards)}


class ConsolidatedWriter(_OpenFiles):
    """Writes a DCP source's tensors as whole tensors into safetensors files (consolidated_layout), with
    the interface of DcpWriter: each piece of a tensor's stream (its chunks in offset order) goes to its
    place in the tensor's row-major data, by positional writes (runs of a chunk's rows where the chunk
    splits a later dimension, one run per chunk where it splits only the first)."""

    def __init__(
        self,
        folder: Path,
        source: DcpFolder,
        dtypes: dict[str, str],
        metadata: dict[str, str],
        only: Collection[str] | None = None,
        flush_behind: bool = False,
    ) -> None:
        self.folder = Path(folder)
        self.source = source
        self.dtypes = dtypes
        self._fds: dict[str, int] = {}
        self._flushes: dict[str, FlushBehind] = {}
        self._place: dict[str, tuple[str, int]] = {}
        by_hf_name = {hf_name(source, name): name for name in source.tensors}
        try:
            for shard, infos in consolidated_layout(source, dtypes).items():
                header, laid_out = header_bytes(infos, metadata)
                path = self.folder / shard
                self._fds[shard] = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_EXCL if only is None else 0), 0o644)
                os.ftruncate(self._fds[shard], len(header) + sum(info.nbytes for info in infos))
                _pwrite_all(self._fds[shard], memoryview(header), 0)
                for info in infos:
                    self._place[by_hf_name[info.name]] = (shard, len(header) + laid_out[info.name].begin)
        except OSError as error:
            self.abort()
            raise output_failure(self.folder, error) from None
        if flush_behind:
            self._flush_behind()

    def write_bytes(self, name: str, begin: int, data: bytes | bytearray | memoryview) -> None:
        """Bytes from `begin` of the tensor's stream, each run at its row-major place."""
        view = memoryview(data).cast("B")
        tensor = self.source.tensors[name]
        itemsize = TORCH_DTYPES[self.dtypes[name]].itemsize
        shard, data_begin = self._place[name]
        position = begin
        for chunk in tensor.chunks:
            chunk_bytes = chunk.numel * itemsize
            if position >= chunk_bytes:
                position -= chunk_bytes
                continue
            for local, target, count in _row_major_runs(chunk, tensor.info.shape, itemsize, position, len(view)):
                try:
                    _pwrite_all(self._fds[shard], view[local - position : local - position + count], data_begin + target)
                except OSError as error:
                    raise output_failure(self.folder / shard, error) from None
                self._wrote(shard, count)
            view = view[min(chunk_bytes - position, len(view)) :]
            position = 0
            if not len(view):
                return


def _row_major_runs(chunk: Chunk, shape: tuple[int, ...], itemsize: int, start: int, count: int) -> list[tuple[int, int, int]]:
    """Bytes [start, start + count) of a chunk's data (its own row-major order) as runs (byte in the
    chunk, byte in the tensor, length) that are contiguous in the tensor's row-major data."""
    sizes, offsets = chunk.sizes, chunk.offsets
    full = len(sizes)
    while full > 0 and sizes[full - 1 :] == shape[full - 1 :]:
        full -= 1
    outer_dims = max(full - 1, 0)
    run = math.prod(sizes[outer_dims:]) * itemsize
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    base = sum(offsets[d] * strides[d] for d in range(outer_dims, len(sizes)))
    stop = min(start + count, chunk.numel * itemsize)
    runs = []
    position = start
    while position < stop:
        row, within = divmod(position, run)
        target = base
        for d in reversed(range(outer_dims)):
            row, index = divmod(row, sizes[d])
            target += (offsets[d] + index) * strides[d]
        length = min(run - within, stop - position)
        runs.append((position, target * itemsize + within, length))
        position += length
    return runs


def write_consolidated_index(folder: Path, source: DcpFolder, dtypes: dict[str, str]) -> dict[str, list[TensorInfo]]:
    """The shard index of a sharded consolidated output (none for a single model.safetensors)."""
    layout = consolidated_layout(source, dtypes)
    if len(layout) > 1:
        weight_map = {info.name: shard for shard, infos in layout.items() for info in infos}
        index = {
            "metadata": {"total_size": sum(info.nbytes for infos in layout.values() for info in infos)},
            "weight_map": dict(sorted(weight_map.items())),
        }
        write_text(folder / INDEX_FILE, json.dumps(index, indent=2) + "\n")
    return layout

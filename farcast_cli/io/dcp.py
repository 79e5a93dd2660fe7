"""PyTorch distributed checkpoints (DCP): a folder with a `.metadata` file and `*.distcp` files, as
`torch.distributed.checkpoint.save` writes them (FSDP sharded state dicts saved by transformers.Trainer
and accelerate in `checkpoint-N/pytorch_model_fsdp_0/`, torchtitan's `step-N/`, any job's own).

The metadata names every tensor with its dtype, shape and chunks (boxes of the tensor, one per rank
that held a part), and where each chunk lies: a byte range of a `.distcp` file. torch's file-system
writer stores each chunk there as one `torch.save` archive. Both are read only with torch's own
machinery, never by parsing their bytes here:

- `.metadata` is a pickle of torch's `Metadata` dataclasses. torch's `FileSystemReader.read_metadata`
  unpickles it without restriction; here it is unpickled with Python's documented restriction
  (`Unpickler.find_class`) to the globals torch's weights-only loader allows plus the metadata
  classes. (torch's weights-only unpickler itself reads pickle protocol 2 only; `.metadata` is
  protocol 4 or 5.)
- Each chunk's archive is opened by `torch.load(weights_only=True, map_location="meta")` on its byte
  range, which reads the archive's index and pickle but no data, and gives the storage's offset in the
  archive (`untyped_storage()._checkpoint_offset`, what torch's own `mmap` loading uses). The chunk's
  data is then read with positional reads, chunk by chunk, like a safetensors tensor's. Archives are
  opened when their chunk is first read, not when the run is found (half a millisecond each: tens of
  seconds for a run of many ranks, tensors and checkpoints); finding the run checks the metadata,
  the files' names and sizes only.

A tensor is seen as one stream of elements: its chunks one after the other in the order of their
offsets, each in row-major order (for chunks that split the first dimension only, as FSDP's do, that
is the tensor's own row-major order). Forecasting is element-wise, so every checkpoint of a run must
split each tensor into the same chunks; the output is written with those chunks again.
"""

from __future__ import annotations

import bisect
import collections
import functools
import math
import os
import pathlib
import pickle
import re
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch._weights_only_unpickler as weights_only

from farcast_cli.errors import IncompleteCheckpoint, InputError
from farcast_cli.io.reader import SAFETENSORS_NAMES, TensorInfo, pread_exactly

if TYPE_CHECKING:
    from torch.distributed.checkpoint import metadata as dcp_metadata
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    from farcast_cli.io.run import Checkpoint

METADATA_FILE = ".metadata"
FSDP_MODEL_FOLDER = re.compile(r"^pytorch_model_fsdp_(\d+)$")
NUMBERED_FOLDER = re.compile(r"^(.+)-(\d+)$")
PROVENANCE_FILE = "farcast.json"
TRAINING_STATE_GROUPS = {
    "optimizer": "optimizer state",
    "optim": "optimizer state",
    "optimizers": "optimizer state",
    "lr_scheduler": "learning-rate scheduler state",
    "lr_schedulers": "learning-rate scheduler state",
    "scheduler": "learning-rate scheduler state",
    "dataloader": "data loader state",
    "data_loader": "data loader state",
    "train_state": "training loop state",
    "trainer_state": "training loop state",
    "rng": "random number generator state",
    "rng_state": "random number generator state",
    "scaler": "gradient scaler state",
}


@functools.cache
def torch_dcp() -> types.SimpleNamespace:
    """torch's distributed-checkpoint classes, imported at the first DCP read or write: importing that
    package takes half a second (its planners pull in sympy), which every other command would pay."""
    from torch.distributed.checkpoint import metadata
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.utils import _create_file_view

    return types.SimpleNamespace(metadata=metadata, StorageInfo=_StorageInfo, create_file_view=_create_file_view)


@functools.cache
def _allowed_classes() -> dict[str, type]:
    metadata = torch_dcp().metadata
    classes = (
        metadata.Metadata,
        metadata.TensorStorageMetadata,
        metadata.BytesStorageMetadata,
        metadata.ChunkStorageMetadata,
        metadata.TensorProperties,
        metadata._MEM_FORMAT_ENCODING,
        metadata.MetadataIndex,
        metadata.StorageMeta,
        torch_dcp().StorageInfo,
        pathlib.PosixPath,
        pathlib.PurePosixPath,
        collections.OrderedDict,
    )
    return {f"{cls.__module__}.{cls.__qualname__}": cls for cls in classes}


class _MetadataUnpickler(pickle.Unpickler):
    """Only the globals torch's weights-only loader allows and torch's checkpoint metadata classes."""

    def find_class(self, module: str, name: str) -> object:
        key = f"{module}.{name}"
        allowed = weights_only._get_allowed_globals()
        if key in allowed:
            return allowed[key]
        if key in _allowed_classes():
            return _allowed_classes()[key]
        raise pickle.UnpicklingError(f"refusing to load {key}, which is not part of a checkpoint's metadata")


def load_metadata(folder: Path) -> dcp_metadata.Metadata:
    """The folder's `.metadata`, unpickled with the restriction above."""
    path = folder / METADATA_FILE
    try:
        with open(path, "rb") as handle:
            metadata = _MetadataUnpickler(handle).load()
    except OSError as error:
        raise InputError(f"{path}: cannot read: {error.strerror or error}") from None
    except Exception as error:
        raise InputError(f"{path}: not a distributed checkpoint's metadata ({str(error).splitlines()[0][:120]})") from None
    if not isinstance(metadata, torch_dcp().metadata.Metadata) or not isinstance(metadata.storage_data, dict):
        raise InputError(f"{path}: not a distributed checkpoint's metadata written by torch's file-system writer")
    return metadata


@dataclass
class Chunk:
    """One box of a tensor: `offsets` and `sizes` per dimension; its data is `nbytes` bytes of `path`
    from byte `begin`, in row-major order.

    An input chunk (`item`: its archive's byte range) is located when its bytes are first read: its
    archive is opened then (locate_chunk), so that finding a run opens no archive, and a rank under
    torchrun opens only the archives of its share."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    path: Path
    nbytes: int
    item: _StorageInfo | None = None
    name: str = ""
    dtype: torch.dtype | None = None
    begin_at: int | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)

    @property
    def begin(self) -> int:
        if self.begin_at is None:
            self.begin_at = locate_chunk(self)
        return self.begin_at


class DcpTensor:
    """One tensor of a DCP checkpoint as a contiguous stream of bytes (its chunks in offset order).

    It stands where a SafetensorsFile stands for the readers (`read_ranges`, `size`, `tensors`, ...),
    with the tensor's data from byte 0: `pieces` says which file bytes a range of the stream is."""

    data_start = 0
    header_size = 0

    def __init__(self, folder: DcpFolder, info: TensorInfo, chunks: list[Chunk], entry: dcp_metadata.TensorStorageMetadata) -> None:
        self.folder = folder
        self.path = folder.path
        self.info = info
        self.chunks = chunks
        self.entry = entry
        self.tensors = {info.name: info}
        self._starts = stream_starts(chunks)

    @property
    def metadata(self) -> dict[str, str]:
        return self.folder.provenance

    @property
    def size(self) -> int:
        return self._starts[-1]

    @property
    def mtime_ns(self) -> int:
        return max((self.folder.stats[chunk.path][1] for chunk in self.chunks), default=0)

    @property
    def boxes(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        return [(chunk.offsets, chunk.sizes) for chunk in self.chunks]

    @property
    def chunk_bounds(self) -> list[int]:
        """Elements of the stream where a saved chunk other than the first begins: where work on the
        tensor divides naturally (distributed.tensor_pieces)."""
        return [start // self.info.itemsize for start in self._starts[1:-1]]

    def check_unchanged(self) -> None:
        self.folder.check_unchanged()

    def pieces(self, begin: int, length: int) -> list[tuple[Path, int, int, int]]:
        """Bytes [begin, begin + length) of the stream as (file, file offset, offset in the range, length)."""
        return stream_pieces(self.chunks, self._starts, begin, length)

    def read_ranges(self, ranges: list[tuple[int, int]]) -> list[bytearray]:
        """Several byte ranges of the stream, as positional reads of the chunks' files (each opened once)."""
        buffers, fds = [], {}
        try:
            for begin, end in ranges:
                buffer = bytearray(end - begin)
                view = memoryview(buffer)
                for path, offset, at, count in self.pieces(begin, end - begin):
                    if path not in fds:
                        fds[path] = _open_for_reading(path)
                    _read_exactly(fds[path], path, offset, view[at : at + count])
                buffers.append(buffer)
        finally:
            for fd in fds.values():
                os.close(fd)
        return buffers


def stream_starts(chunks: list[Chunk]) -> list[int]:
    """Where each chunk's bytes begin in the tensor's stream, and the stream's length last."""
    starts = [0]
    for chunk in chunks:
        starts.append(starts[-1] + chunk.nbytes)
    return starts


def stream_pieces(chunks: list[Chunk], starts: list[int], begin: int, length: int) -> list[tuple[Path, int, int, int]]:
    """Bytes [begin, begin + length) of a tensor's stream as (file, file offset, offset in the range, length)."""
    found = []
    index = bisect.bisect_right(starts, begin) - 1
    position = begin
    while position < begin + length:
        chunk = chunks[index]
        within = position - starts[index]
        count = min(chunk.nbytes - within, begin + length - position)
        found.append((chunk.path, chunk.begin + within, position - begin, count))
        position += count
        index += 1
    return found


def _open_for_reading(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY)
    except OSError as error:
        raise InputError(f"{path}: cannot open: {error.strerror}") from None


def _read_exactly(fd: int, path: Path, offset: int, view: memoryview) -> None:
    try:
        pread_exactly(fd, view, offset, path)
    except OSError as error:
        raise InputError(f"{path}: read failed: {error.strerror}") from None


@dataclass
class DcpFolder:
    """A DCP folder: its metadata, the model's tensors in it, and what it holds beside them."""

    path: Path
    metadata: dcp_metadata.Metadata
    tensors: dict[str, DcpTensor] = field(default_factory=dict)
    left_out: list[tuple[str, str]] = field(default_factory=list)
    stats: dict[Path, tuple[int, int]] = field(default_factory=dict)
    provenance: dict[str, str] = field(default_factory=dict)

    @property
    def files(self) -> list[Path]:
        return sorted(self.stats)

    @property
    def nbytes(self) -> int:
        return sum(size for size, _ in self.stats.values())

    def check_unchanged(self) -> None:
        for path, key in self.stats.items():
            try:
                stat = path.stat()
            except OSError as error:
                raise InputError(f"{path}: vanished while being read ({error.strerror})") from None
            if (stat.st_size, stat.st_mtime_ns) != key:
                raise InputError(f"{path}: changed while being read; is a training job still writing it?")


def holds_dcp(folder: Path) -> bool:
    return (folder / METADATA_FILE).is_file()


def looks_like_dcp(folder: Path) -> bool:
    """A `.metadata`, or `.distcp` files still waiting for theirs."""
    return holds_dcp(folder) or any(path.suffix == ".distcp" for path in folder.iterdir())


def dcp_folder_of(checkpoint_folder: Path) -> Path | None:
    """Where a checkpoint folder keeps its DCP model state: itself (torchtitan, plain saves) or the
    Trainer's `pytorch_model_fsdp_0/` inside it; None if neither."""
    if holds_dcp(checkpoint_folder):
        return checkpoint_folder
    inner = sorted(p for p in checkpoint_folder.iterdir() if FSDP_MODEL_FOLDER.match(p.name) and p.is_dir())
    for folder in inner:
        if not holds_dcp(folder):
            raise IncompleteCheckpoint(f"{folder}: no {METADATA_FILE}; the distributed checkpoint is incomplete (still being saved?)")
    if len(inner) > 1:
        raise InputError(
            f"{checkpoint_folder}: holds {len(inner)} FSDP models ({', '.join(p.name for p in inner)}); farcast reads one model"
        )
    return inner[0] if inner else None


def _group(metadata: dcp_metadata.Metadata, name: str) -> str:
    """The top-level key of the state dict the entry came from (dcp.save flattens nested dicts)."""
    path = metadata.planner_data.get(name) if isinstance(metadata.planner_data, dict) else None
    if isinstance(path, tuple) and path and isinstance(path[0], str):
        return path[0]
    return name.split(".", 1)[0]


def why_left_out(metadata: dcp_metadata.Metadata, name: str, entry: object) -> str | None:
    """Why an entry is not a model weight farcast forecasts or copies, or None if it is one."""
    if not isinstance(entry, torch_dcp().metadata.TensorStorageMetadata):
        return "not a tensor (saved as pickled bytes, never loaded)"
    group = _group(metadata, name)
    if group in TRAINING_STATE_GROUPS:
        return TRAINING_STATE_GROUPS[group]
    if entry.properties.dtype not in SAFETENSORS_NAMES:
        return f"a tensor of {entry.properties.dtype}, which farcast does not read"
    return None


def read_dcp_folder(path: Path) -> DcpFolder:
    """Read a DCP folder's metadata and find every model tensor's chunks in its files; any defect is an
    InputError naming the file."""
    metadata = load_metadata(path)
    folder = DcpFolder(path, metadata)
    folder.provenance = _read_provenance(path)
    by_chunk = _storage_by_chunk(metadata, path)
    for name, entry in metadata.state_dict_metadata.items():
        reason = why_left_out(metadata, name, entry)
        if reason is not None:
            folder.left_out.append((name, reason))
            continue
        dtype = SAFETENSORS_NAMES[entry.properties.dtype]
        shape = tuple(int(size) for size in entry.size)
        _check_tiling(name, entry, path / METADATA_FILE)
        chunks = []
        for chunk_entry in sorted(entry.chunks, key=lambda c: tuple(c.offsets)):
            offsets = tuple(int(o) for o in chunk_entry.offsets)
            item = by_chunk.get((name, offsets))
            if item is None:
                raise InputError(f"{path / METADATA_FILE}: no storage recorded for the chunk of {name!r} at offsets {list(offsets)}")
            sizes = tuple(int(s) for s in chunk_entry.sizes)
            chunks.append(_checked_chunk(folder, name, entry.properties.dtype, offsets, sizes, item))
        nbytes = math.prod(shape) * torch.tensor([], dtype=entry.properties.dtype).element_size()
        folder.tensors[name] = DcpTensor(folder, TensorInfo(name, dtype, shape, 0, nbytes), chunks, entry)
    return folder


def _read_provenance(path: Path) -> dict[str, str]:
    """farcast's own outputs carry a farcast.json (the `farcast` entry a safetensors output has in its metadata)."""
    file = path / PROVENANCE_FILE
    if not file.is_file():
        return {}
    try:
        return {"farcast": file.read_text(encoding="utf-8")}
    except (OSError, UnicodeDecodeError):
        return {}


def _storage_by_chunk(metadata: dcp_metadata.Metadata, path: Path) -> dict[tuple[str, tuple[int, ...]], _StorageInfo]:
    found = {}
    for index, item in metadata.storage_data.items():
        if not isinstance(index, torch_dcp().metadata.MetadataIndex) or not isinstance(item, torch_dcp().StorageInfo):
            raise InputError(f"{path / METADATA_FILE}: storage entries are not those of torch's file-system writer")
        if index.offset is not None:
            found[(index.fqn, tuple(int(o) for o in index.offset))] = item
    return found


def _check_tiling(name: str, entry: dcp_metadata.TensorStorageMetadata, where: Path) -> None:
    """The chunks must cover the tensor exactly: inside it, not overlapping, adding up to it."""
    shape = tuple(int(s) for s in entry.size)
    boxes = [(tuple(int(o) for o in c.offsets), tuple(int(s) for s in c.sizes)) for c in entry.chunks]
    for offsets, sizes in boxes:
        if (
            len(offsets) != len(shape)
            or len(sizes) != len(shape)
            or any(o < 0 or s < 0 or o + s > d for o, s, d in zip(offsets, sizes, shape))
        ):
            raise InputError(
                f"{where}: a chunk of {name!r} (offsets {list(offsets)}, sizes {list(sizes)}) lies outside its shape {list(shape)}"
            )
    for i, (first_offsets, first_sizes) in enumerate(boxes):
        for second_offsets, second_sizes in boxes[i + 1 :]:
            if all(a < c + d and c < a + b for a, b, c, d in zip(first_offsets, first_sizes, second_offsets, second_sizes)):
                raise InputError(f"{where}: chunks of {name!r} at offsets {list(first_offsets)} and {list(second_offsets)} overlap")
    if sum(math.prod(sizes) for _, sizes in boxes) != math.prod(shape):
        raise InputError(f"{where}: the chunks of {name!r} do not cover its shape {list(shape)}")


def _checked_chunk(
    folder: DcpFolder, name: str, dtype: torch.dtype, offsets: tuple[int, ...], sizes: tuple[int, ...], item: _StorageInfo
) -> Chunk:
    """The chunk as the metadata places it, checked against its file's name and size (its archive is
    opened later, by locate_chunk)."""
    relative = item.relative_path
    if not isinstance(relative, str) or "/" in relative or relative.startswith("."):
        raise InputError(f"{folder.path / METADATA_FILE}: names the file {relative!r}, outside its folder")
    path = folder.path / relative
    if path not in folder.stats:
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise InputError(f"{folder.path / METADATA_FILE}: names {relative}, which does not exist") from None
        except OSError as error:
            raise InputError(f"{path}: cannot read: {error.strerror}") from None
        folder.stats[path] = (stat.st_size, stat.st_mtime_ns)
    size = folder.stats[path][0]
    if item.transform_descriptors:
        raise InputError(
            f"{path}: the chunks of {name!r} are stored transformed ({', '.join(item.transform_descriptors)}); farcast reads plain ones"
        )
    if item.offset < 0 or item.length < 0 or item.offset + item.length > size:
        raise InputError(
            f"{path}: the chunk of {name!r} runs to byte {item.offset + item.length} but the file has {size} bytes (truncated?)"
        )
    nbytes = math.prod(sizes) * dtype.itemsize
    return Chunk(offsets, sizes, path, nbytes, item, name, dtype)


def locate_chunk(chunk: Chunk) -> int:
    """Where the chunk's data begins in its file, from torch's loader of the chunk's archive (no data read)."""
    path, name, item = chunk.path, chunk.name, chunk.item
    try:
        with open(path, "rb") as handle, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stored = torch.load(torch_dcp().create_file_view(handle, item.offset, item.length), map_location="meta", weights_only=True)
    except OSError as error:
        raise InputError(f"{path}: cannot read: {error.strerror or error}") from None
    except Exception as error:
        raise InputError(
            f"{path}: the chunk of {name!r} at bytes {item.offset}..{item.offset + item.length} is not a tensor torch can load "
            f"({str(error).splitlines()[0][:100]})"
        ) from None
    if not isinstance(stored, torch.Tensor) or stored.dtype != chunk.dtype or tuple(stored.shape) != chunk.sizes:
        found = f"{stored.dtype} {list(stored.shape)}" if isinstance(stored, torch.Tensor) else type(stored).__name__
        raise InputError(f"{path}: the chunk of {name!r} holds {found}, but the metadata says {chunk.dtype} {list(chunk.sizes)}")
    if stored.numel() and not stored.is_contiguous():
        raise InputError(f"{path}: the chunk of {name!r} is stored in a non-row-major layout, which farcast does not read")
    begin = item.offset + stored.untyped_storage()._checkpoint_offset + stored.storage_offset() * stored.element_size()
    if begin + chunk.nbytes > item.offset + item.length:
        raise InputError(f"{path}: the chunk of {name!r} claims data past its own byte range (corrupt?)")
    return begin


def check_same_chunks(reference: dict[str, DcpTensor], other: dict[str, DcpTensor], other_path: Path, reference_path: Path) -> None:
    """Every checkpoint must split each tensor into the same chunks (the element order depends on it)."""
    for name, tensor in other.items():
        if name in reference and tensor.boxes != reference[name].boxes:
            raise InputError(
                f"{other_path}: tensor {name!r} is split into other chunks than in {reference_path.name} "
                "(saved by another number of ranks?); farcast needs the same chunks in every checkpoint"
            )


def describe_dcp(checkpoint: Checkpoint) -> dict:
    """What `inspect` says of a DCP checkpoint: its folder, files, tensors with their chunks, and the
    entries that are not model weights and are left out of outputs."""
    folder = checkpoint.dcp
    return {
        "folder": str(folder.path.relative_to(checkpoint.path)),
        "files": [{"name": path.name, "bytes": folder.stats[path][0]} for path in folder.files],
        "bytes": folder.nbytes,
        "tensors": [
            {
                "name": name,
                "dtype": tensor.info.dtype,
                "shape": list(tensor.info.shape),
                "chunks": [[list(o), list(s)] for o, s in tensor.boxes],
            }
            for name, tensor in folder.tensors.items()
        ],
        "left_out_entries": [{"name": name, "why": why} for name, why in folder.left_out],
    }

"""A lazy safetensors reader: a strictly validated header, then positional reads of byte ranges.

The header is parsed by our own code rather than the safetensors library so that every defect
(duplicate names, gaps, overlaps, truncation) becomes a one-line error naming the file, and so that
data is read with plain `pread` calls: memory-mapped reads are very slow on network file systems.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from farcast_cli.errors import InputError

MAX_HEADER_BYTES = 100_000_000

TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
SAFETENSORS_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}
ITEM_SIZES = {name: torch.empty((), dtype=dtype).element_size() for name, dtype in TORCH_DTYPES.items()}
FORECAST_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie in its file (offsets are absolute file positions)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return ITEM_SIZES[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def is_forecast(self) -> bool:
        return self.dtype in FORECAST_DTYPES


class SafetensorsFile:
    """One safetensors file: its validated header and positional reads of its data."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            stat = self.path.stat()
            with open(self.path, "rb") as handle:
                self.header_size, raw_header = _read_raw_header(handle, stat.st_size, self.path)
        except PermissionError:
            raise InputError(f"{self.path}: permission denied") from None
        except IsADirectoryError:
            raise InputError(f"{self.path}: is a folder, not a safetensors file") from None
        except OSError as error:
            raise InputError(f"{self.path}: cannot read: {error.strerror or error}") from None
        self._stat_key = (stat.st_size, stat.st_mtime_ns)
        self.metadata, self.tensors = _parse_header(raw_header, self.header_size, stat.st_size, self.path)

    @property
    def data_start(self) -> int:
        return 8 + self.header_size

    @property
    def size(self) -> int:
        return self._stat_key[0]

    def check_unchanged(self) -> None:
        """Fail if the file changed since its header was read (a writer still at work)."""
        try:
            stat = self.path.stat()
        except OSError as error:
            raise InputError(f"{self.path}: vanished while being read ({error.strerror})") from None
        if (stat.st_size, stat.st_mtime_ns) != self._stat_key:
            raise InputError(f"{self.path}: changed while being read; is a training job still writing it?")

    def read_bytes(self, begin: int, end: int) -> bytearray:
        """Read bytes [begin, end) of the file with positional reads."""
        return self.read_ranges([(begin, end)])[0]

    def read_ranges(self, ranges: list[tuple[int, int]]) -> list[bytearray]:
        """Read several byte ranges with one open file, as positional reads."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as error:
            raise InputError(f"{self.path}: cannot open: {error.strerror}") from None
        try:
            return [self._read_range(fd, begin, end) for begin, end in ranges]
        except OSError as error:
            raise InputError(f"{self.path}: read failed: {error.strerror}") from None
        finally:
            os.close(fd)

    def _read_range(self, fd: int, begin: int, end: int) -> bytearray:
        buffer = bytearray(end - begin)
        pread_exactly(fd, memoryview(buffer), begin, self.path)
        return buffer

    def read_elements(self, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of a tensor, flattened, in the file's dtype, on the CPU."""
        raw = self.read_bytes(info.begin + start * info.itemsize, info.begin + stop * info.itemsize)
        if not raw:
            return torch.empty(0, dtype=TORCH_DTYPES[info.dtype])
        return torch.frombuffer(raw, dtype=TORCH_DTYPES[info.dtype])


def pread_exactly(fd: int, view: memoryview, offset: int, path: Path) -> None:
    """Fill `view` from byte `offset` of an open file with positional reads; a short file is an error."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise InputError(f"{path}: file ended early at byte {offset + done}; truncated while being read?")
        done += n


def _read_raw_header(handle, file_size: int, path: Path) -> tuple[int, bytes]:
    if file_size < 8:
        raise InputError(f"{path}: file is {file_size} bytes, too short to be safetensors (truncated?)")
    (header_size,) = struct.unpack("<Q", handle.read(8))
    if header_size > MAX_HEADER_BYTES:
        raise InputError(f"{path}: header length {header_size} exceeds the 100 MB limit; not a safetensors file?")
    if 8 + header_size > file_size:
        raise InputError(f"{path}: header length {header_size} runs past the end of the {file_size}-byte file (truncated?)")
    raw = handle.read(header_size)
    if len(raw) != header_size:
        raise InputError(f"{path}: file ended inside the header (truncated?)")
    return header_size, raw


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


class _DuplicateKey(Exception):
    pass


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-standard JSON constant {name}")


def _decode_header(raw: bytes, path: Path) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: header is not valid UTF-8 (byte {error.start})") from None
    if not text.startswith("{"):
        raise InputError(f"{path}: header does not start with '{{'; not a safetensors file?")
    try:
        header = json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except _DuplicateKey as error:
        raise InputError(f"{path}: duplicate tensor name {error.args[0]!r} in header") from None
    except (ValueError, RecursionError) as error:
        raise InputError(f"{path}: header is not valid JSON ({str(error).splitlines()[0][:120]})") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: header is not a JSON object")
    return header


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_entry(name: str, entry: object, data_start: int, path: Path) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise InputError(f"{where}: entry needs dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ITEM_SIZES:
        raise InputError(f"{where}: unknown or unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise InputError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise InputError(f"{where}: data_offsets {offsets!r} is not a pair of non-negative integers")
    begin, end = offsets
    if begin > end:
        raise InputError(f"{where}: data_offsets {offsets} end before they begin")
    expected = math.prod(shape) * ITEM_SIZES[dtype]
    if end - begin != expected:
        raise InputError(f"{where}: holds {end - begin} bytes but shape {shape} of {dtype} needs {expected}")
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _parse_header(raw: bytes, header_size: int, file_size: int, path: Path) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    header = _decode_header(raw, path)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InputError(f"{path}: __metadata__ must map strings to strings")
    data_start = 8 + header_size
    tensors = {name: _parse_entry(name, entry, data_start, path) for name, entry in header.items()}
    _check_layout(tensors, data_start, file_size, path)
    return metadata, tensors


def _check_layout(tensors: dict[str, TensorInfo], data_start: int, file_size: int, path: Path) -> None:
    """Entries must tile the data section exactly: no gaps, no overlaps, nothing past the end."""
    position = data_start
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin < position:
            raise InputError(f"{path}: tensor {info.name!r} overlaps the tensor before it")
        if info.begin > position:
            raise InputError(f"{path}: gap of {info.begin - position} bytes before tensor {info.name!r}")
        position = info.end
    if position > file_size:
        raise InputError(f"{path}: data runs to byte {position} but the file has {file_size} bytes (truncated?)")
    if position < file_size:
        raise InputError(f"{path}: {file_size - position} unexpected bytes after the last tensor")

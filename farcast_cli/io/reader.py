"""A lazy safetensors reader: a strictly validated header, then positional reads of byte ranges.

The header is parsed by our own code rather than the safetensors library so that every defect
(duplicate names, gaps, overlaps, truncation) becomes a one-line error naming the file, and so that
data is read with plain `pread` calls: memory-mapped reads are very slow on network file systems.

What it accepts follows the safetensors library 0.8.0 (Rust `SafeTensors::read_metadata`, which
`safe_open`, `load_file` and `deserialize` all go through), checked with crafted files in
tests/test_safetensors_agreement.py: a file the library reads, farcast reads, and one it refuses,
farcast refuses. That includes serde_json's limits, which Python's json does not have: JSON whitespace
may precede the `{`; no string may hold a lone UTF-16 surrogate escape; at most 127 nested levels; a
number whose double overflows as serde_json computes it is refused; `-0` and 2**64 or more are not
unsigned integers; unknown entry fields are ignored; a dtype may be written `{"F32": null}` and an
entry as the list `[dtype, shape, data_offsets]`; element and bit counts must fit 64 bits (multiplied
in shape order); sub-byte dtypes (F4, F6_*) must fill whole bytes.

The one deliberate difference: a tensor name or `__metadata__` key given twice is refused, where the
library keeps the last copy; two parsers that disagree on which copy wins are a known attack. (A field
given twice inside an entry and a second `__metadata__` are refused by both, and duplicates inside
fields nobody reads are accepted by both.)
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from farcast_cli.errors import IncompleteCheckpoint, InputError

MAX_HEADER_BYTES = 100_000_000
MAX_JSON_DEPTH = 127
USIZE_MAX = 2**64 - 1

DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}
"""Every dtype the library knows, with its size in bits, in the order of its `Dtype` enum (increasing
alignment): its writer lays tensors out from the last of these to the first."""
REFERENCE_DTYPE_RANK = {name: rank for rank, name in enumerate(DTYPE_BITS)}

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
ITEM_SIZES = {name: bits // 8 for name, bits in DTYPE_BITS.items() if bits % 8 == 0}
FORECAST_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
ENTRY_FIELDS = ("dtype", "shape", "data_offsets")
_ENTRY_FIELD_SET = frozenset(ENTRY_FIELDS)


def tensor_nbytes(dtype: str, shape: tuple[int, ...] | list[int]) -> int:
    """Bytes of a tensor: its bit count over 8 (sub-byte dtypes such as F4 pack several elements in a byte)."""
    return math.prod(shape) * DTYPE_BITS[dtype] // 8


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
        """Bytes per element, for whole-byte dtypes: F4 and F6 elements are copied as raw bytes only."""
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

    @property
    def mtime_ns(self) -> int:
        return self._stat_key[1]

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
        raise IncompleteCheckpoint(f"{path}: file is {file_size} bytes, too short to be safetensors (truncated?)")
    (header_size,) = struct.unpack("<Q", handle.read(8))
    if header_size > MAX_HEADER_BYTES:
        raise InputError(f"{path}: header length {header_size} exceeds the 100 MB limit; not a safetensors file?")
    if 8 + header_size > file_size:
        raise IncompleteCheckpoint(f"{path}: header length {header_size} runs past the end of the {file_size}-byte file (truncated?)")
    raw = handle.read(header_size)
    if len(raw) != header_size:
        raise IncompleteCheckpoint(f"{path}: file ended inside the header (truncated?)")
    return header_size, raw


class _RepeatedKeys(dict):
    """A JSON object that held some keys more than once; Python's json keeps the last copy of each."""

    __slots__ = ("duplicates",)

    def __init__(self, pairs: list[tuple[str, object]]) -> None:
        super().__init__(pairs)
        seen: set[str] = set()
        self.duplicates: list[str] = []
        for key, _ in pairs:
            if key in seen:
                self.duplicates.append(key)
            seen.add(key)


def _json_object(pairs: list[tuple[str, object]]) -> dict:
    value = dict(pairs)
    return value if len(value) == len(pairs) else _RepeatedKeys(pairs)


def _duplicates(value: dict) -> list[str]:
    return value.duplicates if isinstance(value, _RepeatedKeys) else []


class _NumberOutOfRange(ValueError):
    pass


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-standard JSON constant {name}")


def _json_int(text: str) -> int | float:
    """An integer as serde_json reads it: `-0` is the float -0.0 (so never a count), and one so long
    that its double overflows is an error."""
    if len(text) < 20 and text != "-0":
        return int(text)
    if text == "-0":
        return -0.0
    if len(text) > 300 and _serde_overflows(text):
        raise _NumberOutOfRange(text)
    return int(text)


def _json_float(text: str) -> float:
    value = float(text)
    if not abs(value) < 1e300 and _serde_overflows(text):
        raise _NumberOutOfRange(text)
    return value


_NUMBER = re.compile(r"-?(\d+)(?:\.(\d+))?(?:[eE]([-+]?)(\d+))?")
_POW10 = tuple(float(f"1e{power}") for power in range(309))
_I32_MAX = 2**31 - 1


def _serde_overflows(text: str) -> bool:
    """Whether serde_json, built without float_roundtrip as safetensors builds it, refuses this JSON
    number as out of range. It keeps the digits that fit a u64 significand, drops the rest (counting
    dropped integer digits into the exponent) and scales by powers of ten in double precision, so it
    refuses a few numbers just under the largest double that Python's exact parsing reads."""
    integer, fraction, exponent_sign, exponent_digits = _NUMBER.fullmatch(text).groups()
    significand, exponent = 0, 0
    for kept, digit in enumerate(integer):
        if significand * 10 + int(digit) > USIZE_MAX:
            exponent = len(integer) - kept
            break
        significand = significand * 10 + int(digit)
    for digit in fraction or "":
        if significand * 10 + int(digit) > USIZE_MAX:
            break
        significand = significand * 10 + int(digit)
        exponent -= 1
    if exponent_digits is not None:
        written = int(exponent_digits)
        if written > _I32_MAX:
            return significand != 0 and exponent_sign != "-"
        exponent = exponent - written if exponent_sign == "-" else exponent + written
    return _serde_scale_overflows(significand, max(-(2**31), min(_I32_MAX, exponent)))


def _serde_scale_overflows(significand: int, exponent: int) -> bool:
    scaled = float(significand)
    while abs(exponent) > 308:
        if scaled == 0.0:
            return False
        if exponent >= 0:
            return True
        scaled /= 1e308
        exponent += 308
    return exponent >= 0 and math.isinf(scaled * _POW10[exponent])


_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_INNERMOST_PAIR = re.compile(r"\[\]|\{\}")


def _too_deep(text: str) -> bool:
    """Whether arrays and objects nest more than MAX_JSON_DEPTH levels in valid JSON text (brackets
    inside strings do not count): each pass strips the innermost pairs, so it takes one pass per level."""
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return False
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    for _ in range(MAX_JSON_DEPTH):
        brackets = _INNERMOST_PAIR.sub("", brackets)
    return bool(brackets)


def _decode_header(raw: bytes, path: Path) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: header is not valid UTF-8 (byte {error.start})") from None
    try:
        header = json.loads(
            text, object_pairs_hook=_json_object, parse_constant=_reject_constant, parse_int=_json_int, parse_float=_json_float
        )
    except _NumberOutOfRange as error:
        raise InputError(f"{path}: header holds the number {str(error)[:40]} which is out of range for a 64-bit float") from None
    except RecursionError:
        raise InputError(f"{path}: header JSON nests more than {MAX_JSON_DEPTH} levels deep") from None
    except ValueError as error:
        raise InputError(f"{path}: header is not valid JSON ({str(error).splitlines()[0][:120]})") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: header is not a JSON object")
    if _too_deep(text):
        raise InputError(f"{path}: header JSON nests more than {MAX_JSON_DEPTH} levels deep")
    if _SURROGATE_ESCAPE.search(text):
        _refuse_lone_surrogates(header, path)
    return header


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")
_NOT_UNICODE = "is not valid Unicode (it holds a lone UTF-16 surrogate)"


def _holds_lone_surrogate(value: object) -> bool:
    """Python's json turns a lone `\\ud800` escape into a lone surrogate; UTF-8 (and serde_json) has none."""
    if isinstance(value, str):
        return _LONE_SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(_holds_lone_surrogate(key) or _holds_lone_surrogate(item) for key, item in value.items())
    if isinstance(value, list):
        return any(_holds_lone_surrogate(item) for item in value)
    return False


def _refuse_lone_surrogates(header: dict, path: Path) -> None:
    """Name the first key whose name or value is not valid Unicode."""
    for key, value in header.items():
        if key == "__metadata__":
            _refuse_lone_surrogates_in(value, f"{path}: __metadata__", "key", "value of key")
        elif _holds_lone_surrogate(key):
            raise InputError(f"{path}: tensor name {key!r} {_NOT_UNICODE}")
        else:
            _refuse_lone_surrogates_in(value, f"{path}: tensor {key!r}:", "field name", "field")


def _refuse_lone_surrogates_in(value: object, where: str, key_label: str, value_label: str) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if _holds_lone_surrogate(key):
                raise InputError(f"{where} {key_label} {key!r} {_NOT_UNICODE}")
            if _holds_lone_surrogate(item):
                raise InputError(f"{where} {value_label} {key!r} {_NOT_UNICODE}")
    elif _holds_lone_surrogate(value):
        raise InputError(f"{where} {_NOT_UNICODE}")


def _is_count(value: object) -> bool:
    """An unsigned 64-bit integer, the only numbers serde_json reads as `usize`."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= USIZE_MAX


def _entry_fields(entry: object, where: str) -> tuple[object, object, object]:
    """dtype, shape and data_offsets of an entry: a map (serde ignores fields it does not know), or,
    as serde also reads a struct, the list of the three in that order."""
    if isinstance(entry, list) and len(entry) == len(ENTRY_FIELDS):
        return entry[0], entry[1], entry[2]
    if not isinstance(entry, dict) or not entry.keys() >= _ENTRY_FIELD_SET:
        raise InputError(f"{where}: entry needs dtype, shape and data_offsets")
    repeated = [field for field in _duplicates(entry) if field in ENTRY_FIELDS]
    if repeated:
        raise InputError(f"{where}: field {repeated[0]!r} appears twice in its entry")
    return entry["dtype"], entry["shape"], entry["data_offsets"]


def _dtype_name(value: object) -> str | None:
    """A known dtype name, written as a string or as serde's one-key map form {"F32": null}."""
    if isinstance(value, dict) and len(value) == 1 and not _duplicates(value):
        ((value, unit),) = value.items()
        if unit is not None:
            return None
    return value if isinstance(value, str) and value in DTYPE_BITS else None


def _checked_nbytes(dtype: str, shape: list[int], where: str) -> int:
    """The tensor's bytes, refused where the library refuses: an element or bit count past 64 bits
    (multiplied in shape order, so a later 0 does not save it) or bits that do not fill whole bytes."""
    elements = 1
    for size in shape:
        elements *= size
        if elements > USIZE_MAX:
            raise InputError(f"{where}: shape {shape} overflows a 64-bit element count")
    bits = elements * DTYPE_BITS[dtype]
    if bits > USIZE_MAX:
        raise InputError(f"{where}: shape {shape} of {dtype} overflows a 64-bit bit count")
    if bits % 8:
        raise InputError(f"{where}: shape {shape} of {dtype} is {bits} bits, not a whole number of bytes")
    return bits // 8


def _parse_entry(name: str, entry: object, data_start: int, path: Path) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    written_dtype, shape, offsets = _entry_fields(entry, where)
    dtype = _dtype_name(written_dtype)
    if dtype is None:
        raise InputError(f"{where}: unknown or unsupported dtype {written_dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise InputError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise InputError(f"{where}: data_offsets {offsets!r} is not a pair of non-negative integers")
    begin, end = offsets
    if begin > end:
        raise InputError(f"{where}: data_offsets {offsets} end before they begin")
    expected = _checked_nbytes(dtype, shape, where)
    if end - begin != expected:
        raise InputError(f"{where}: holds {end - begin} bytes but shape {shape} of {dtype} needs {expected}")
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _refuse_duplicate_names(header: dict, path: Path) -> None:
    repeated = _duplicates(header)
    if repeated and repeated[0] == "__metadata__":
        raise InputError(f"{path}: __metadata__ appears twice in the header")
    if repeated:
        raise InputError(f"{path}: duplicate tensor name {repeated[0]!r} in header")


def _parse_metadata(header: dict, path: Path) -> dict[str, str]:
    """`__metadata__`: absent or null, or a map of strings to strings with each key once."""
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InputError(f"{path}: __metadata__ must map strings to strings")
    if _duplicates(metadata):
        raise InputError(f"{path}: duplicate __metadata__ key {_duplicates(metadata)[0]!r} in header")
    return dict(metadata)


def _parse_header(raw: bytes, header_size: int, file_size: int, path: Path) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    header = _decode_header(raw, path)
    _refuse_duplicate_names(header, path)
    metadata = _parse_metadata(header, path)
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
        raise IncompleteCheckpoint(f"{path}: data runs to byte {position} but the file has {file_size} bytes (truncated?)")
    if position < file_size:
        raise InputError(f"{path}: {file_size - position} unexpected bytes after the last tensor")

"""Mutated safetensors files: farcast reads them or reports a clean error, never a crash or a hang, and
it agrees with the safetensors library on every one of them, in both directions."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import pytest
import safetensors
import torch
from conftest import write_run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from farcast_cli.errors import InputError
from farcast_cli.io.reader import DTYPE_BITS, SafetensorsFile

VALID = save(
    {
        "w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "h": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        "ids": torch.arange(3, dtype=torch.int64),
        "flag": torch.tensor([True, False]),
    },
    metadata={"format": "pt"},
)
HEADER_LENGTH = struct.unpack("<Q", VALID[:8])[0]
HEADER = json.loads(VALID[8 : 8 + HEADER_LENGTH])
DATA = VALID[8 + HEADER_LENGTH :]
FUZZ = settings(max_examples=1500, derandomize=True, deadline=2000, suppress_health_check=[HealthCheck.too_slow])

Tensors = dict[str, tuple[str, list[int], bytes]]


def library_view(data: bytes) -> Tensors | None:
    """What the library reads from the file, or None where it refuses it."""
    try:
        return {name: (view["dtype"], list(view["shape"]), bytes(view["data"])) for name, view in safetensors.deserialize(data)}
    except SafetensorError:
        return None


def farcast_view(file: SafetensorsFile) -> Tensors:
    return {name: (info.dtype, list(info.shape), bytes(file.read_bytes(info.begin, info.end))) for name, info in file.tensors.items()}


def names_something_twice(data: bytes) -> bool:
    """Whether the header gives a tensor name or a `__metadata__` key twice: the library keeps the
    last copy, farcast refuses the file (its one deliberate difference)."""
    pairs = json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]], object_pairs_hook=lambda items: items)
    metadata = [value for key, value in pairs if key == "__metadata__" and isinstance(value, list)]
    return any(len({key for key, _ in keys}) != len(keys) for keys in [pairs, *metadata])


def read_everything(data: bytes) -> None:
    """farcast refuses, in one printable line naming the file, exactly the files the library refuses
    (and those naming something twice); where both read a file they give the same tensors byte for
    byte and the same metadata."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.safetensors"
        path.write_bytes(data)
        theirs = library_view(data)
        try:
            file = SafetensorsFile(path)
            ours = farcast_view(file)
        except InputError as error:
            message = str(error)
            assert message.startswith(f"{path}: ") and message.isprintable(), message
            only_farcast_refuses = ": duplicate " in message and names_something_twice(data)
            assert theirs is None or only_farcast_refuses, f"the library reads what farcast refuses: {message}"
            return
        assert theirs is not None, "farcast reads a file the library refuses"
        assert ours == theirs
        with safe_open(path, "pt") as handle:
            assert file.metadata == (handle.metadata() or {})


@pytest.mark.slow
@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_random_byte_changes(changes):
    data = bytearray(VALID)
    for position, value in changes:
        data[position] = value
    read_everything(bytes(data))


@pytest.mark.slow
@FUZZ
@given(st.integers(0, len(VALID)), st.binary(max_size=64))
def test_truncation_and_trailing_bytes(cut, tail):
    read_everything(VALID[:cut] + tail)


@pytest.mark.slow
@FUZZ
@given(st.integers(0, 2**64 - 1))
def test_any_header_length(length):
    read_everything(struct.pack("<Q", length) + VALID[8:])


texts = st.text(max_size=8) | st.text(st.characters(categories=["Cs", "Ll", "So"]), max_size=4)
json_leaves = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | texts
json_leaves |= st.sampled_from(sorted(DTYPE_BITS))
json_values = st.recursive(
    json_leaves,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=12,
) | st.builds(lambda depth, leaf: json.loads("[" * depth + json.dumps(leaf) + "]" * depth), st.integers(123, 128), json_leaves)
json_whitespace = st.text(st.sampled_from(" \t\n\r\x0c\xa0"), max_size=3)


@FUZZ
@given(
    st.sampled_from(sorted(HEADER)),
    st.sampled_from(["dtype", "shape", "data_offsets", "an unknown field", None]),
    json_values,
    json_whitespace,
    json_whitespace,
)
@pytest.mark.slow
def test_header_field_replaced(key, field, value, lead, trail):
    """A field of an entry (or a new one, which the library ignores, or a metadata value) replaced by
    any JSON value, the header between any whitespace."""
    header = json.loads(json.dumps(HEADER))
    if field is None:
        header[key] = value
    else:
        header[key][field] = value
    encoded = (lead + json.dumps(header) + trail).encode()
    read_everything(struct.pack("<Q", len(encoded)) + encoded + DATA)


def object_text(pairs: list[tuple[str, str]]) -> str:
    """A JSON object from (key, value as JSON text) pairs, so that a key may appear twice."""
    return "{" + ", ".join(f"{json.dumps(key)}: {value}" for key, value in pairs) + "}"


@settings(max_examples=100, derandomize=True, deadline=2000)
@given(st.booleans(), st.integers(0, 8), st.integers(0, 8))
def test_keys_given_twice(in_metadata, copied, position):
    """A tensor name or metadata key given a second time, before or after the first: the library keeps
    the last copy, farcast refuses the file naming the key."""
    metadata = [(key, json.dumps(value)) for key, value in [*HEADER["__metadata__"].items(), ("note", "a")]]
    entries = [(key, json.dumps(value)) for key, value in HEADER.items() if key != "__metadata__"]
    target = metadata if in_metadata else entries
    target.insert(position % (len(target) + 1), target[copied % len(target)])
    encoded = object_text([("__metadata__", object_text(metadata)), *entries]).encode()
    read_everything(struct.pack("<Q", len(encoded)) + encoded + DATA)


digits = st.integers(0, 10**25).map(str)
json_numbers = (
    st.builds(
        "{}{}{}{}".format,
        st.sampled_from(["", "-"]),
        digits,
        st.just("") | digits.map(".{}".format),
        st.just("") | st.builds("{}{}{}".format, st.sampled_from("eE"), st.sampled_from(["", "+", "-"]), st.integers(270, 330)),
    )
    | st.integers(10**300, 10**310).map(str)
    | digits.map("1.797693134862315{}e308".format)
)


@settings(max_examples=500, derandomize=True, deadline=2000)
@given(json_numbers)
def test_numbers_in_an_unknown_field(number):
    """A number where nobody reads it: refused only where serde_json's double overflows, which its
    rounding makes happen a little below Python's."""
    encoded = json.dumps({**HEADER, "w": {**HEADER["w"], "note": "NUMBER"}}).replace('"NUMBER"', number).encode()
    read_everything(struct.pack("<Q", len(encoded)) + encoded + DATA)


TOKENS = [
    " ",
    "\t",
    "\x0c",
    "\xa0",
    "-0",
    "0",
    "-1",
    "1.0",
    "1e999",
    "1.7976931348623158e308",
    "18446744073709551615",
    "18446744073709551616",
    "null",
    "true",
    "NaN",
    "[",
    "]",
    "{",
    "}",
    ",",
    ":",
    '"',
    "\\",
    '"dtype"',
    '"shape"',
    '"data_offsets"',
    '"__metadata__"',
    '"w"',
    '"\\ud800"',
    '"\\udc00x"',
    '"\\ud83d\\ude00"',
    '"F4"',
    '"F6_E2M3"',
    '"F8_E8M0"',
    '"U8"',
    '{"F32": null}',
    "[" * 126,
    "]" * 126,
]


@pytest.mark.slow
@settings(FUZZ, max_examples=800)
@given(st.integers(0, len(json.dumps(HEADER))), st.integers(0, 6), st.sampled_from(TOKENS))
def test_header_text_spliced(start, length, token):
    """A JSON token in place of a few characters of the header: syntax the two parsers might read apart."""
    text = json.dumps(HEADER)
    encoded = (text[:start] + token + text[start + length :]).encode()
    read_everything(struct.pack("<Q", len(encoded)) + encoded + DATA)


@settings(
    max_examples=60, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), min_size=1, max_size=6))
def test_cli_on_mutated_checkpoints(farcast, tmp_path_factory, changes):
    """Through the CLI: exit 0 or 3, one line on stderr, never a traceback."""
    run = write_run(tmp_path_factory.mktemp("fuzz") / "run", steps=[0, 10, 20])
    path = run / "checkpoint-20" / "model.safetensors"
    data = bytearray(path.read_bytes())
    for position, value in changes:
        data[position % len(data)] = value
    path.write_bytes(bytes(data))
    result = farcast("inspect", run, expect=None)
    assert result.exit_code in (0, 3), (result.exit_code, result.stderr, result.exception)
    assert "Traceback" not in result.stderr
    if result.exit_code == 3:
        assert result.stderr.startswith("farcast: error: ") and result.stderr.count("\n") == 1

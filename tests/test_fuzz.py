"""Mutated safetensors files: farcast reads them correctly or reports a clean error, never a crash or a hang."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import torch
from conftest import write_run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save

from farcast_cli.errors import InputError
from farcast_cli.io.reader import SafetensorsFile

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
FUZZ = settings(max_examples=1500, derandomize=True, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


def read_everything(data: bytes) -> None:
    """Parse and read every tensor; if we accept the file, the safetensors library must agree on every value."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.safetensors"
        path.write_bytes(data)
        try:
            file = SafetensorsFile(path)
            ours = {name: file.read_elements(info, 0, info.numel) for name, info in file.tensors.items()}
        except InputError as error:
            assert str(path) in str(error) and "\n" not in str(error)
            return
        try:
            with safe_open(path, "pt") as handle:
                theirs = {name: handle.get_tensor(name).reshape(-1) for name in handle.keys()}
        except Exception:
            return
        assert ours.keys() == theirs.keys()
        for name, values in ours.items():
            assert torch.equal(values.view(torch.uint8), theirs[name].view(torch.uint8)), name


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_random_byte_changes(changes):
    data = bytearray(VALID)
    for position, value in changes:
        data[position] = value
    read_everything(bytes(data))


@FUZZ
@given(st.integers(0, len(VALID)), st.binary(max_size=64))
def test_truncation_and_trailing_bytes(cut, tail):
    read_everything(VALID[:cut] + tail)


@FUZZ
@given(st.integers(0, 2**64 - 1))
def test_any_header_length(length):
    read_everything(struct.pack("<Q", length) + VALID[8:])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(
    st.sampled_from(sorted(HEADER)),
    st.sampled_from(["dtype", "shape", "data_offsets", None]),
    json_values,
    st.integers(-8, 8),
)
def test_header_field_replaced(tensor, field, value, padding):
    header = json.loads(json.dumps(HEADER))
    if field is None or tensor == "__metadata__":
        header[tensor] = value
    else:
        header[tensor][field] = value
    encoded = json.dumps(header).encode()
    encoded += b" " * max(padding, 0)
    read_everything(struct.pack("<Q", len(encoded)) + encoded + VALID[8 + HEADER_LENGTH :])


@settings(max_examples=60, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
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

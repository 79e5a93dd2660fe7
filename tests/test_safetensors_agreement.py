"""farcast and the safetensors library agree, class by class (issue 13), checked against the installed
library (0.8, the version the project depends on): a file it reads, farcast reads and writes back in a
form it reads again; a file it refuses, farcast refuses with one line naming the file and the key.
The one deliberate difference, duplicate tensor names and metadata keys, is pinned down here too."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import safetensors
import torch
from conftest import FAST
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from test_bad_input import HEADER_CASES, raw_safetensors

from farcast_cli.errors import InputError
from farcast_cli.io.reader import DTYPE_BITS, ITEM_SIZES, SAFETENSORS_NAMES, SafetensorsFile, TensorInfo
from farcast_cli.io.writer import SafetensorsWriter, reference_order

STEPS = (0, 10, 20)
DTYPE_NAMES = {**SAFETENSORS_NAMES, torch.float8_e8m0fnu: "F8_E8M0", torch.float8_e4m3fnuz: "F8_E4M3FNUZ"}
W_BYTES = 384


def entry(name: str, dtype: str, shape: list[int] | str, begin: int, end: int) -> str:
    """One header entry as JSON text; `name` and `dtype` go in as written, escapes included."""
    return '"%s": {"dtype": "%s", "shape": %s, "data_offsets": [%d, %d]}' % (name, dtype, shape, begin, end)


W = entry("w", "F32", [96], 0, W_BYTES)


def w_bytes(step: int) -> bytes:
    return struct.pack("<96f", *(0.01 * i + 0.1 * step for i in range(96)))


def write_header(path: Path, header: str, data: bytes) -> Path:
    """A file whose header is `header` verbatim: escapes, whitespace and duplicates as written."""
    encoded = header.encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


def crafted_run(root: Path, header: str, tail: bytes = b"") -> Path:
    """Three checkpoints with this header: tensor "w" (F32, 384 bytes) moves with the step, the `tail`
    bytes after it stay."""
    for step in STEPS:
        folder = root / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        write_header(folder / "model.safetensors", header, w_bytes(step) + tail)
    return root


def library_reads(path: Path) -> bool:
    try:
        safetensors.deserialize(path.read_bytes())
    except SafetensorError:
        return False
    return True


def library_tensors(data: bytes) -> dict[str, tuple[str, list[int], bytes]]:
    return {name: (view["dtype"], list(view["shape"]), bytes(view["data"])) for name, view in safetensors.deserialize(data)}


def farcast_tensors(path: Path) -> dict[str, tuple[str, list[int], bytes]]:
    file = SafetensorsFile(path)
    return {name: (info.dtype, list(info.shape), bytes(file.read_bytes(info.begin, info.end))) for name, info in file.tensors.items()}


def header_of(path: Path) -> dict:
    data = path.read_bytes()
    return json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]])


def layout_of(path: Path) -> list[tuple[str, str, list[int], list[int]]]:
    """The tensor entries in data order: name, dtype, shape, offsets."""
    entries = {name: entry for name, entry in header_of(path).items() if name != "__metadata__"}
    return sorted(((name, e["dtype"], e["shape"], e["data_offsets"]) for name, e in entries.items()), key=lambda entry: entry[3])


def data_section(path: Path) -> bytes:
    data = path.read_bytes()
    return data[8 + struct.unpack("<Q", data[:8])[0] :]


def predict(farcast, run: Path, out: Path, *extra: object):
    return farcast("predict", run, "--horizon", 10, "-o", out, "--shrink", 0, *FAST, *extra, expect=None)


def assert_refused(result, path: Path, *fragments: str) -> None:
    assert result.exit_code == 3, (result.exit_code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("farcast: error: ") and lines[0].isprintable(), result.stderr
    for fragment in (str(path), *fragments):
        assert fragment in lines[0], (fragment, lines[0])


def assert_refused_everywhere(farcast, run: Path, bad: Path, out: Path, *fragments: str) -> None:
    """The library refuses the file; `inspect` and `predict` refuse it naming it, and leave no output."""
    assert not library_reads(bad)
    assert_refused(farcast("inspect", run, expect=None), bad, *fragments)
    assert_refused(predict(farcast, run, out), bad, *fragments)
    assert not out.exists()


def break_one_checkpoint(run: Path, header: str, tail: bytes = b"") -> Path:
    """The middle checkpoint gets this header: the error must name that file."""
    return write_header(run / "checkpoint-10" / "model.safetensors", header, w_bytes(10) + tail)


B = entry("b", "U8", [1], 384, 385)
LONE_SURROGATES = {
    "tensor name": ("{%s, %s}" % (W, entry("b\\ud800", "U8", [1], 384, 385)), "tensor name 'b\\ud800' is not valid Unicode"),
    "low half alone": ("{%s, %s}" % (W, entry("\\udc00b", "U8", [1], 384, 385)), "tensor name '\\udc00b' is not valid Unicode"),
    "metadata key": ('{"__metadata__": {"\\udfff": "x"}, %s, %s}' % (W, B), "__metadata__ key '\\udfff' is not valid Unicode"),
    "metadata value": (
        '{"__metadata__": {"source": "a\\ud83d"}, %s, %s}' % (W, B),
        "__metadata__ value of key 'source' is not valid Unicode",
    ),
    "dtype": ("{%s, %s}" % (W, entry("b", "U8\\udc00", [1], 384, 385)), "tensor 'b': field 'dtype' is not valid Unicode"),
    "unknown field": ("{%s, %s}" % (W[:-1] + ', "note": ["\\ud800"]}', B), "tensor 'w': field 'note' is not valid Unicode"),
}


@pytest.mark.parametrize("case", list(LONE_SURROGATES))
def test_lone_surrogates_are_refused_naming_the_key(tmp_path, farcast, case):
    header, fragment = LONE_SURROGATES[case]
    run = crafted_run(tmp_path / "run", "{%s, %s}" % (W, B), b"\x07")
    bad = break_one_checkpoint(run, header, b"\x07")
    assert_refused_everywhere(farcast, run, bad, tmp_path / "out", fragment)


def test_a_surrogate_pair_is_one_character_and_goes_through(tmp_path, farcast):
    header = '{"__metadata__": {"note": "\\ud83d\\ude00"}, %s, %s}' % (W, entry("b\\ud83d\\ude00", "U8", [1], 384, 385))
    run = crafted_run(tmp_path / "run", header, b"\x07")
    assert library_reads(run / "checkpoint-20" / "model.safetensors")
    assert predict(farcast, run, tmp_path / "out").exit_code == 0
    written = tmp_path / "out" / "model.safetensors"
    assert load_file(written)["b\U0001f600"].tolist() == [7]
    with safe_open(written, "pt") as handle:
        assert handle.metadata()["note"] == "\U0001f600"


@pytest.mark.parametrize("lead", [" ", "\t\n\r  "])
def test_json_whitespace_before_the_brace_is_read_as_the_library_reads_it(tmp_path, farcast, lead):
    run = crafted_run(tmp_path / "run", lead + "{%s}" % W)
    last = run / "checkpoint-20" / "model.safetensors"
    assert library_reads(last)
    assert farcast_tensors(last) == library_tensors(last.read_bytes())
    assert json.loads(farcast("inspect", run, "--json").stdout)["tensors"] == 1
    assert predict(farcast, run, tmp_path / "out").exit_code == 0
    written = (tmp_path / "out" / "model.safetensors").read_bytes()
    assert written[8:9] == b"{"
    assert library_tensors(written)["w"] == library_tensors(last.read_bytes())["w"]


@pytest.mark.parametrize("lead", ["\x0c", "\u00a0", "\ufeff"])
def test_whitespace_json_does_not_allow_is_refused_by_both(tmp_path, farcast, lead):
    run = crafted_run(tmp_path / "run", "{%s}" % W)
    bad = break_one_checkpoint(run, lead + "{%s}" % W)
    assert_refused_everywhere(farcast, run, bad, tmp_path / "out", "header is not valid JSON")


QUANTISED = {
    "scale_e8m0": ("F8_E8M0", [3], bytes([127, 128, 126])),
    "q_fnuz": ("F8_E4M3FNUZ", [5], bytes([1, 2, 3, 4, 5])),
    "k_fnuz": ("F8_E5M2FNUZ", [2], bytes([9, 250])),
    "packed_f4": ("F4", [2, 4], bytes([0x12, 0x34, 0x56, 0x78])),
    "mx_f6a": ("F6_E2M3", [4], bytes([0xAB, 0xCD, 0xEF])),
    "mx_f6b": ("F6_E3M2", [8], bytes([1, 2, 3, 4, 5, 6])),
}


def quantised_header() -> tuple[str, bytes]:
    """ "w" and then the quantised tensors, in name order after it (not the reference order)."""
    entries, tail, position = [W], b"", W_BYTES
    for name, (dtype, shape, data) in sorted(QUANTISED.items()):
        entries.append(entry(name, dtype, shape, position, position + len(data)))
        tail, position = tail + data, position + len(data)
    return "{" + ", ".join(entries) + "}", tail


def test_new_and_sub_byte_dtypes_are_listed_and_copied_byte_for_byte(tmp_path, farcast):
    run = crafted_run(tmp_path / "run", *quantised_header())
    last = run / "checkpoint-20" / "model.safetensors"
    assert library_reads(last)
    report = json.loads(farcast("inspect", run, "--json").stdout)
    assert set(report["dtypes"]) == {"F32"} | {dtype for dtype, _, _ in QUANTISED.values()}
    assert report["forecast_tensors"] == 1 and report["tensors"] == 7
    assert predict(farcast, run, tmp_path / "out").exit_code == 0
    written = tmp_path / "out" / "model.safetensors"
    assert library_tensors(written.read_bytes()) == library_tensors(last.read_bytes())
    assert [entry[1] for entry in layout_of(written)] == ["F32", "F8_E5M2FNUZ", "F8_E4M3FNUZ", "F8_E8M0", "F6_E3M2", "F6_E2M3", "F4"]


@pytest.mark.parametrize(
    "dtype, shape, nbytes",
    [("F4", [2, 3], 3), ("F4", [7], 4), ("F4", [], 0), ("F4", [0], 0)]
    + [("F6_E3M2", [4], 3), ("F6_E2M3", [3], 3), ("F6_E2M3", [2, 2], 3), ("F8_E8M0", [5], 5)],
)
def test_sub_byte_sizes_follow_the_library(tmp_path, dtype, shape, nbytes):
    """Bits over 8; a bit count that is not a multiple of 8 is refused, as the library refuses it."""
    path = write_header(tmp_path / "x.safetensors", "{%s}" % entry("t", dtype, shape, 0, nbytes), bytes(nbytes))
    bits = DTYPE_BITS[dtype] * torch.Size(shape).numel()
    assert library_reads(path) == (bits % 8 == 0)
    if bits % 8 == 0:
        assert farcast_tensors(path) == library_tensors(path.read_bytes())
    else:
        with pytest.raises(InputError, match="not a whole number of bytes"):
            SafetensorsFile(path)


DUPLICATES = {
    "field in an entry": (
        '{"w": {"dtype": "F32", "shape": [96], "shape": [96], "data_offsets": [0, 384]}}',
        "tensor 'w': field 'shape' appears twice",
        False,
    ),
    "__metadata__": ('{"__metadata__": {}, "__metadata__": {}, %s}' % W, "__metadata__ appears twice in the header", False),
    "metadata key": ('{"__metadata__": {"a": "1", "a": "2"}, %s}' % W, "duplicate __metadata__ key 'a'", True),
    "tensor name": ("{%s, %s}" % (W, W), "duplicate tensor name 'w'", True),
}


@pytest.mark.parametrize("case", list(DUPLICATES))
def test_duplicates_name_what_is_duplicated(tmp_path, farcast, case):
    """The library refuses the first two and keeps the last copy of the others; farcast refuses all
    four (its one deliberate difference), saying what was given twice."""
    header, fragment, library_keeps_last = DUPLICATES[case]
    run = crafted_run(tmp_path / "run", "{%s}" % W)
    bad = break_one_checkpoint(run, header)
    assert library_reads(bad) == library_keeps_last
    assert_refused(farcast("inspect", run, expect=None), bad, fragment)
    assert_refused(predict(farcast, run, tmp_path / "out"), bad, fragment)
    assert not (tmp_path / "out").exists()


ENTRY_WITH = '{"w": {"dtype": "F32", "shape": [96], "data_offsets": [0, 384], "extra": %s}}'
REFUSED_BY_BOTH = {
    "-0 offset": ('{"w": {"dtype": "F32", "shape": [96], "data_offsets": [-0, 384]}}', "data_offsets [-0.0, 384]"),
    "-0 in a shape": ("{%s, %s}" % (W, entry("e", "F32", "[-0]", 384, 384)), "shape [-0.0]"),
    "nested 128 levels": (ENTRY_WITH % ("[" * 126 + "]" * 126), "nests more than 127 levels"),
    "nested 200 levels": (ENTRY_WITH % ("[" * 198 + "]" * 198), "nests more than 127 levels"),
    "a dimension of 2**64": ("{%s, %s}" % (W, entry("e", "F32", [2**64, 0], 384, 384)), "is not a list"),
    "overflow before a 0": ("{%s, %s}" % (W, entry("e", "F32", [2**32, 2**32, 0], 384, 384)), "overflows"),
    "1e999 in an unknown field": (ENTRY_WITH % "1e999", "out of range"),
    "a double that serde_json overflows": (ENTRY_WITH % "1.7976931348623158e308", "out of range"),
    "a 400-digit integer": (ENTRY_WITH % ("9" * 400), "out of range"),
    "__metadata__ as a string": ('{"__metadata__": "", %s}' % W, "__metadata__ must map strings to strings"),
}


@pytest.mark.parametrize("case", list(REFUSED_BY_BOTH))
def test_leniencies_python_json_has_are_refused_like_the_library(tmp_path, farcast, case):
    header, fragment = REFUSED_BY_BOTH[case]
    run = crafted_run(tmp_path / "run", "{%s}" % W)
    bad = break_one_checkpoint(run, header)
    assert_refused_everywhere(farcast, run, bad, tmp_path / "out", fragment)


READ_BY_BOTH = {
    "nested 127 levels": ENTRY_WITH % ("[" * 125 + "]" * 125),
    "-0 in an unknown field": ENTRY_WITH % "-0",
    "the largest double": ENTRY_WITH % "1.7976931348623157e308",
    "duplicate keys inside an unknown field": ENTRY_WITH % '{"k": 1, "k": 2}',
    "brackets inside strings": ENTRY_WITH % '"[[[[{{{{"',
    "escaped backslash before u": ENTRY_WITH % '"\\\\ud800"',
    "dtype as a one-key map": '{"w": {"dtype": {"F32": null}, "shape": [96], "data_offsets": [0, 384]}}',
    "entry as a list": '{"w": ["F32", [96], [0, 384]]}',
    "__metadata__ null": '{"__metadata__": null, %s}' % W,
    "the largest u64 dimension beside a 0": "{%s, %s}" % (W, entry("e", "F32", [2**64 - 1, 0], 384, 384)),
}


@pytest.mark.parametrize("case", list(READ_BY_BOTH))
def test_what_the_library_reads_farcast_reads_and_writes_back(tmp_path, farcast, case):
    run = crafted_run(tmp_path / "run", READ_BY_BOTH[case])
    last = run / "checkpoint-20" / "model.safetensors"
    assert farcast_tensors(last) == library_tensors(last.read_bytes())
    assert predict(farcast, run, tmp_path / "out").exit_code == 0
    assert library_tensors((tmp_path / "out" / "model.safetensors").read_bytes()) == library_tensors(last.read_bytes())


DELIBERATE_DIFFERENCES = {"duplicate names", "duplicate metadata key"}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_every_broken_header_in_the_catalogue_is_refused_by_the_library_too(tmp_path, case):
    header, data, length, _ = HEADER_CASES[case]
    path = raw_safetensors(tmp_path / "x.safetensors", header, data, length)
    assert library_reads(path) == (case in DELIBERATE_DIFFERENCES)


def mixed_checkpoint(step: int) -> dict[str, torch.Tensor]:
    """Every dtype torch and save_file share, with names that are not ASCII and not in dtype order."""
    generator = torch.Generator().manual_seed(step)
    values = torch.randn(40, generator=generator) + 0.01 * step
    raw = torch.randint(0, 120, (14,), dtype=torch.uint8, generator=generator)
    tensors = {
        "zèbre.weight": values[:12].reshape(3, 4).to(torch.float64),
        "a.bias": values[12:17].to(torch.float16),
        "层.norm": values[17:24].to(torch.bfloat16),
        "m.weight": values[24:34].reshape(2, 5),
        "b.ids": torch.arange(5, dtype=torch.int32),
        "c.positions": torch.arange(3, dtype=torch.int64),
        "d.mask": torch.tensor([True, False, True]),
        "e.bytes": raw[:3],
        "f.signed": raw[3:5].to(torch.int8),
        "g.fp8": raw[5:8].view(torch.float8_e4m3fn),
        "h.scale": raw[8:10].view(torch.float8_e8m0fnu),
        "i.fnuz": raw[10:11].view(torch.float8_e4m3fnuz),
        "j.packed": raw[11:12].view(torch.float4_e2m1fn_x2).reshape(1, 1),
        "k.complex": torch.complex(values[34:36], values[36:38]),
        "😀.u16": raw[12:14].view(torch.uint16),
    }
    return {name: tensor.clone() for name, tensor in tensors.items()}


def save_file_run(root: Path) -> Path:
    for step in STEPS:
        (root / f"checkpoint-{step}").mkdir(parents=True)
        save_file(mixed_checkpoint(step), root / f"checkpoint-{step}" / "model.safetensors", metadata={"format": "pt"})
    return root


def test_a_save_file_checkpoint_comes_out_in_its_own_layout_with_the_same_bytes(tmp_path, farcast):
    """Forecast = last checkpoint (--shrink 0): the output's layout is the one save_file gives the same
    tensors, its data section is byte for byte the same, and every tensor starts aligned."""
    run = save_file_run(tmp_path / "run")
    last = run / "checkpoint-20" / "model.safetensors"
    assert predict(farcast, run, tmp_path / "out").exit_code == 0
    written = tmp_path / "out" / "model.safetensors"
    reference = tmp_path / "reference.safetensors"
    save_file(load_file(last), reference, metadata={"format": "pt"})
    assert layout_of(written) == layout_of(reference) == layout_of(last)
    assert data_section(written) == data_section(reference)
    assert_aligned(written)


def assert_aligned(path: Path) -> None:
    data_start = len(path.read_bytes()) - len(data_section(path))
    assert data_start % 8 == 0
    for name, dtype, _, (begin, _) in layout_of(path):
        assert (data_start + begin) % ITEM_SIZES.get(dtype, 1) == 0, (name, dtype, begin)


def test_a_checkpoint_out_of_reference_order_is_reordered_and_stays_readable(tmp_path, farcast):
    """Written in name order (a BOOL first, an F64 after an odd number of bytes): the output is in the
    reference order, aligned, and holds the same values; with --dtype the order follows the new dtypes."""
    root = tmp_path / "run"
    for step in STEPS:
        tensors = mixed_checkpoint(step)
        tensors.pop("j.packed")
        save_in_order(root / f"checkpoint-{step}" / "model.safetensors", tensors, sorted(tensors))
    last = root / "checkpoint-20" / "model.safetensors"
    assert [entry[0] for entry in layout_of(last)] == sorted(load_file(last))
    for dtype in (None, "bf16"):
        out = tmp_path / f"out-{dtype}"
        assert predict(farcast, root, out, *(["--dtype", dtype] if dtype else [])).exit_code == 0
        written = out / "model.safetensors"
        reference = tmp_path / f"reference-{dtype}.safetensors"
        save_file(load_file(written), reference)
        assert layout_of(written) == layout_of(reference)
        assert_aligned(written)
        if dtype is None:
            assert library_tensors(written.read_bytes()) == library_tensors(last.read_bytes())


def save_in_order(path: Path, tensors: dict[str, torch.Tensor], order: list[str]) -> None:
    """A valid file whose data follows `order`, as other tools than save_file may write it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    data, position = b"", 0
    for name in order:
        chunk = tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {
            "dtype": DTYPE_NAMES[tensors[name].dtype],
            "shape": list(tensors[name].shape),
            "data_offsets": [position, position + len(chunk)],
        }
        data, position = data + chunk, position + len(chunk)
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def test_outputs_with_non_ascii_names_and_mixed_dtypes_load_in_transformers(tmp_path, farcast):
    transformers_modeling = pytest.importorskip("transformers.modeling_utils")
    run = save_file_run(tmp_path / "run")
    assert predict(farcast, run, tmp_path / "out").exit_code == 0
    written = tmp_path / "out" / "model.safetensors"
    loaded = transformers_modeling.load_state_dict(str(written))
    expected = load_file(run / "checkpoint-20" / "model.safetensors")
    assert sorted(loaded) == sorted(expected)
    for name, value in expected.items():
        assert loaded[name].dtype == value.dtype and torch.equal(loaded[name].view(torch.uint8), value.view(torch.uint8)), name


def test_writers_sharing_a_file_lay_it_out_as_one_writer_does(tmp_path):
    """Fed in an order that is not the reference order, two writers each writing half the tensors at
    their offsets produce the same file as one writer: the layout is a function of the tensors only."""
    infos = [TensorInfo("a", "BOOL", (3,), 0, 3), TensorInfo("b", "F64", (2,), 0, 16), TensorInfo("c", "F4", (4,), 0, 2)]
    infos.append(TensorInfo("d", "I32", (1,), 0, 4))
    payload = {info.name: bytes(range(10 + info.nbytes))[10:] for info in infos}
    one = tmp_path / "one.safetensors"
    writer = SafetensorsWriter(one, infos, {"format": "pt"})
    for info in infos:
        writer.write_bytes(payload[info.name])
    writer.close()
    shared = tmp_path / "shared.safetensors"
    for share in ({"a": ((0, 3),), "d": ((0, 1),)}, {"b": ((0, 2),), "c": ((0, 4),)}):
        writer = SafetensorsWriter(shared, infos, {"format": "pt"}, only=share)
        for info in infos:
            if info.name in share:
                writer.write_bytes(payload[info.name])
        writer.close()
    assert one.read_bytes() == shared.read_bytes()
    shared.unlink()
    for share in ({"a": ((0, 3),), "b": ((1, 2),)}, {"b": ((0, 1),), "c": ((0, 4),), "d": ((0, 1),)}):  # b in two processes
        writer = SafetensorsWriter(shared, infos, {"format": "pt"}, only=share)
        for info in infos:
            for start, stop in share.get(info.name, ()):
                writer.write_bytes(
                    payload[info.name][start * info.itemsize : stop * info.itemsize] if info.dtype == "F64" else payload[info.name]
                )
        writer.close()
    assert one.read_bytes() == shared.read_bytes()
    assert [entry[0] for entry in layout_of(one)] == [info.name for info in reference_order(infos)] == ["b", "d", "c", "a"]
    assert library_tensors(one.read_bytes()) == {info.name: (info.dtype, list(info.shape), payload[info.name]) for info in infos}

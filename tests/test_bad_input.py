"""Bad input gets one line naming the file and the problem, a documented exit code, and no output."""

from __future__ import annotations

import json
import math
import pickle
import struct
from pathlib import Path

import pytest
import torch
from conftest import FAST, write_run
from safetensors.torch import save_file

from farcast_cli.errors import InputError
from farcast_cli.io.reader import SafetensorsFile

VALID_DATA = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)


def raw_safetensors(path: Path, header: bytes | dict, data: bytes = VALID_DATA, header_length: int | None = None) -> Path:
    encoded = json.dumps(header).encode() if isinstance(header, dict) else header
    length = len(encoded) if header_length is None else header_length
    path.write_bytes(struct.pack("<Q", length) + encoded + data)
    return path


def entry(dtype: str = "F32", shape: list = (4,), offsets: list = (0, 16)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


ENTRY = json.dumps(entry()).encode()


def assert_clean_failure(result, out: Path, code: int, *fragments: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("farcast: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.farcast-*"))


def predict(farcast, run: Path, out: Path, *extra: object):
    return farcast("predict", run, "--horizon", 40, "-o", out, *FAST, *extra, expect=None)


def corrupt_last(run_dir: Path, header: bytes | dict, data: bytes = VALID_DATA, header_length: int | None = None) -> Path:
    """Damage a checkpoint between complete ones: a broken newest one may be still being written, and is skipped."""
    return raw_safetensors(run_dir / "checkpoint-180" / "model.safetensors", header, data, header_length)


HEADER_CASES = {
    "header past end": (b'{"a":1}', b"", 10**6, "runs past the end"),
    "header over 100 MB": (b"{}", b"", 200_000_000, "exceeds the 100 MB limit"),
    "not JSON": (b"{not json}", VALID_DATA, None, "not valid JSON"),
    "not UTF-8": (b'{"\xff\xfe": 1}', VALID_DATA, None, "not valid UTF-8"),
    "JSON array": (b"[1, 2]", VALID_DATA, None, "header is not a JSON object"),
    "whitespace JSON does not allow": (b'\x0c{"a": %s}' % ENTRY, VALID_DATA, None, "not valid JSON"),
    "duplicate names": (b'{"w": %s, "w": %s}' % (ENTRY, ENTRY), VALID_DATA, None, "duplicate tensor name 'w'"),
    "duplicate entry field": (
        b'{"w": {"dtype": "F32", "dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}',
        VALID_DATA,
        None,
        "tensor 'w': field 'dtype' appears twice",
    ),
    "duplicate metadata key": (b'{"__metadata__": {"a": "1", "a": "2"}, "w": %s}' % ENTRY, VALID_DATA, None, "__metadata__ key 'a'"),
    "two __metadata__": (b'{"__metadata__": {}, "__metadata__": {}, "w": %s}' % ENTRY, VALID_DATA, None, "__metadata__ appears twice"),
    "lone surrogate in a name": (b'{"w\\ud800": %s}' % ENTRY, VALID_DATA, None, "tensor name 'w\\ud800' is not valid Unicode"),
    "lone surrogate in metadata": (
        b'{"__metadata__": {"a": "\\udc00"}, "w": %s}' % ENTRY,
        VALID_DATA,
        None,
        "__metadata__ value of key 'a' is not valid Unicode",
    ),
    "-0 offset": (b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [-0, 16]}}', VALID_DATA, None, "data_offsets [-0.0, 16]"),
    "nested 128 deep": ({"a": {**entry(), "extra": json.loads("[" * 126 + "]" * 126)}}, VALID_DATA, None, "nests more than 127 levels"),
    "number out of range": (
        b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16], "x": 1e999}}',
        VALID_DATA,
        None,
        "number 1e999 which is out of range",
    ),
    "64-bit overflow": ({"a": entry("F32", [2**40, 2**40, 0], [0, 0]), "b": entry()}, VALID_DATA, None, "overflows a 64-bit element count"),
    "half a byte": ({"a": entry("F4", [31], [0, 16])}, VALID_DATA, None, "shape [31] of F4 is 124 bits, not a whole number of bytes"),
    "overlap": ({"a": entry("F32", [2], [0, 8]), "b": entry("F32", [2], [4, 12])}, VALID_DATA, None, "tensor 'b' overlaps"),
    "gap": ({"a": entry("F32", [1], [0, 4]), "b": entry("F32", [2], [8, 16])}, VALID_DATA, None, "gap of 4 bytes before tensor 'b'"),
    "past the end": ({"a": entry("F32", [6], [0, 24])}, VALID_DATA, None, "data runs to byte"),
    "trailing bytes": ({"a": entry("F32", [2], [0, 8])}, VALID_DATA, None, "8 unexpected bytes after the last tensor"),
    "size mismatch": ({"a": entry("F32", [3], [0, 16])}, VALID_DATA, None, "holds 16 bytes but shape [3] of F32 needs 12"),
    "unknown dtype": ({"a": entry("F7", [4], [0, 16])}, VALID_DATA, None, "unknown or unsupported dtype 'F7'"),
    "negative shape": ({"a": entry("F32", [-4], [0, 16])}, VALID_DATA, None, "is not a list of non-negative integers"),
    "offsets reversed": ({"a": entry("F32", [0], [16, 0])}, VALID_DATA, None, "end before they begin"),
    "bad metadata": ({"__metadata__": {"format": 1}, "a": entry()}, VALID_DATA, None, "__metadata__ must map strings to strings"),
    "NaN literal": (b'{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 16]}}', VALID_DATA, None, "not valid JSON"),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_broken_file_is_named_with_its_problem(run_dir, farcast, tmp_path, case):
    header, data, length, problem = HEADER_CASES[case]
    broken = corrupt_last(run_dir, header, data, length)
    out = tmp_path / "out"
    assert_clean_failure(predict(farcast, run_dir, out), out, 3, str(broken), problem)


def test_file_too_short_for_a_header(run_dir, farcast, tmp_path):
    path = run_dir / "checkpoint-180" / "model.safetensors"
    path.write_bytes(b"\x01\x02\x03")
    out = tmp_path / "out"
    assert_clean_failure(predict(farcast, run_dir, out), out, 3, str(path), "file is 3 bytes, too short to be safetensors")


def test_truncated_checkpoint(run_dir, farcast, tmp_path):
    path = run_dir / "checkpoint-100" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    out = tmp_path / "out"
    assert_clean_failure(predict(farcast, run_dir, out), out, 3, str(path), "(truncated?)")


def test_index_naming_a_missing_shard(tmp_path, farcast):
    run = write_run(tmp_path / "run", shards=2)
    (run / "checkpoint-100" / "model-00002-of-00002.safetensors").unlink()
    out = tmp_path / "out"
    assert_clean_failure(
        predict(farcast, run, out),
        out,
        3,
        "checkpoint-100/model.safetensors.index.json",
        "names shard model-00002-of-00002.safetensors which does not exist",
    )


def test_tensor_in_two_shards(tmp_path, farcast):
    run = write_run(tmp_path / "run", shards=2)
    folder = run / "checkpoint-100"
    save_file({"encoder.bias": torch.zeros(24), "mask": torch.tensor([True])}, folder / "model-00002-of-00002.safetensors")
    out = tmp_path / "out"
    assert_clean_failure(predict(farcast, run, out), out, 3, str(folder), "tensor 'encoder.bias' is in two shards")


def test_stray_shard_is_reported_and_ignored(tmp_path, farcast):
    run = write_run(tmp_path / "run", shards=2)
    save_file({"x": torch.zeros(2)}, run / "checkpoint-100" / "model-00003-of-00003.safetensors")
    result = predict(farcast, run, tmp_path / "out")
    assert result.exit_code == 0
    assert "model-00003-of-00003.safetensors: stray shard, not named by the index; ignored" in result.stderr


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda t: t.pop("head.bias"), "tensor 'head.bias' of the last checkpoint checkpoint-200 is missing"),
        (lambda t: t.update(extra=torch.zeros(2)), "tensor 'extra' is not in the last checkpoint"),
        (lambda t: t.update({"head.bias": torch.zeros(5)}), "tensor 'head.bias' has shape [5] but [4]"),
        (lambda t: t.update({"head.bias": torch.zeros(4, dtype=torch.float16)}), "tensor 'head.bias' is F16 but F32"),
    ],
)
def test_checkpoints_that_disagree(run_dir, farcast, tmp_path, change, problem):
    from safetensors.torch import load_file

    path = run_dir / "checkpoint-60" / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)
    out = tmp_path / "out"
    assert_clean_failure(predict(farcast, run_dir, out), out, 3, str(run_dir / "checkpoint-60"), problem)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("step", [0, 100, 200])
def test_non_finite_weights_are_located(run_dir, farcast, tmp_path, bad, step):
    from safetensors.torch import load_file

    path = run_dir / f"checkpoint-{step}" / "model.safetensors"
    tensors = load_file(path)
    tensors["encoder.weight"][3, 5] = bad
    save_file(tensors, path, metadata={"format": "pt"})
    out = tmp_path / "out"
    assert_clean_failure(predict(farcast, run_dir, out), out, 3, str(path), "tensor 'encoder.weight'", f"holds {bad}", "element 53")


def test_one_checkpoint_is_not_a_run(tmp_path, farcast):
    run = write_run(tmp_path / "run", steps=[100])
    out = tmp_path / "out"
    assert_clean_failure(predict(farcast, run, out), out, 3, "only one checkpoint (checkpoint-100)", "at least two")


def test_two_checkpoints_cannot_be_fitted_on_themselves(tmp_path, farcast):
    run = write_run(tmp_path / "run", steps=[0, 100])
    out = tmp_path / "out"
    assert_clean_failure(predict(farcast, run, out), out, 3, f"{run}: only 2 checkpoints", "needs at least three")


def test_no_checkpoints(tmp_path, farcast):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    assert_clean_failure(predict(farcast, tmp_path / "empty", out), out, 3, "no checkpoints found")


def test_checkpoint_still_being_written_is_skipped_with_a_warning(run_dir, farcast, tmp_path):
    partial = run_dir / "tmp-checkpoint-220"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\x10\x00")
    result = farcast("predict", run_dir, "--horizon", 40, "-o", tmp_path / "out", "--json", *FAST)
    assert f"warning: {partial}: skipped, a checkpoint still being written" in result.stderr
    assert json.loads(result.stdout)["steps"][-1] == 200


def test_file_that_changes_while_read_is_caught(run_dir):
    file = SafetensorsFile(run_dir / "checkpoint-0" / "model.safetensors")
    file.check_unchanged()
    with open(file.path, "ab") as handle:
        handle.write(b"more")
    with pytest.raises(InputError, match="changed while being read"):
        file.check_unchanged()


def test_trainer_state_disagreeing_with_the_folder(run_dir, farcast, tmp_path):
    state = run_dir / "checkpoint-100" / "trainer_state.json"
    state.write_text(json.dumps({"global_step": 99}))
    out = tmp_path / "out"
    assert_clean_failure(predict(farcast, run_dir, out), out, 3, str(state), "global_step is 99 but the folder name says step 100")


@pytest.mark.parametrize(
    "files, problem",
    [
        ({"adapter_model.safetensors": b"", "adapter_config.json": b"{}"}, "PEFT adapter only"),
        ({"global_step100/mp_rank_00_model_states.pt": b"", "zero_to_fp32.py": b""}, "DeepSpeed ZeRO"),
        ({"__0_0.distcp": b""}, "its .metadata is missing"),
        ({"__0_0.distcp": b"", ".metadata": b""}, "not a distributed checkpoint's metadata"),
        ({"pytorch_model.bin": b""}, "never loads pickles"),
    ],
)
def test_folders_without_full_safetensors_weights_say_what_to_do(tmp_path, farcast, files, problem):
    run = tmp_path / "run"
    for step in (10, 20, 30):
        for name, content in files.items():
            path = run / f"checkpoint-{step}" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
    out = tmp_path / "out"
    assert_clean_failure(predict(farcast, run, out), out, 3, "checkpoint-10", problem)


class _Sentinel:
    path = ""

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickles_beside_the_weights_are_never_loaded(run_dir, farcast, tmp_path):
    sentinel = tmp_path / "pickle-was-loaded"
    _Sentinel.path = str(sentinel)
    for folder in run_dir.glob("checkpoint-*"):
        for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
            (folder / name).write_bytes(pickle.dumps(_Sentinel()))
    farcast("predict", run_dir, "--horizon", 40, "-o", tmp_path / "out", *FAST)
    assert not sentinel.exists()
    assert not list((tmp_path / "out").glob("*.pt")) and not list((tmp_path / "out").glob("*.bin"))


def test_output_that_exists_is_kept_without_force_and_replaced_with_it(run_dir, farcast, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    result = predict(farcast, run_dir, out)
    assert result.exit_code == 5 and "already exists; choose a new folder or pass --force" in result.stderr
    assert (out / "precious.txt").read_text() == "mine"
    assert predict(farcast, run_dir, out, "--force").exit_code == 0
    assert (out / "model.safetensors").exists() and not (out / "precious.txt").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "the replaced folder is gone, nothing left beside it"


@pytest.mark.parametrize("where", ["checkpoint-200", "checkpoint-200/sub", ".", "checkpoint-999"])
def test_output_inside_or_over_the_input_is_refused(run_dir, farcast, where):
    out = run_dir / where
    result = predict(farcast, run_dir, out, "--force")
    assert result.exit_code == 5, result.stderr
    assert "farcast: error:" in result.stderr
    assert (run_dir / "checkpoint-200" / "model.safetensors").exists()
    assert not (run_dir / "checkpoint-200" / "sub").exists() and not (run_dir / "checkpoint-999").exists()


def test_output_under_a_file(run_dir, farcast, tmp_path):
    (tmp_path / "a-file").write_text("x")
    out = tmp_path / "a-file" / "out"
    result = predict(farcast, run_dir, out)
    assert result.exit_code == 5 and "farcast: error:" in result.stderr
    assert (tmp_path / "a-file").read_text() == "x"


def test_missing_parent_folders_are_made_and_removed_again_on_failure(run_dir, farcast, tmp_path):
    out = tmp_path / "new" / "deeper" / "out"
    assert predict(farcast, run_dir, out).exit_code == 0 and (out / "model.safetensors").exists()
    corrupt_last(run_dir, b"{broken")
    failed = tmp_path / "other" / "deeper" / "out"
    assert predict(farcast, run_dir, failed).exit_code == 3
    assert not (tmp_path / "other").exists()


def test_no_traceback_unless_debug(run_dir, farcast, tmp_path):
    corrupt_last(run_dir, b"{broken")
    quiet = predict(farcast, run_dir, tmp_path / "out")
    assert "Traceback" not in quiet.stderr
    loud = farcast("--debug", "predict", run_dir, "--horizon", 40, "-o", tmp_path / "out", expect=None)
    assert isinstance(loud.exception, InputError)


def test_bad_option_values_are_usage_errors(run_dir, farcast, tmp_path):
    for args, problem in [
        (("--max-memory", "lots"), "cannot read size 'lots'"),
        (("--device", "tpu"), "--device 'tpu'"),
        (("--emit", 500), "--emit 500"),
        (("--max-memory", "inf"), "cannot read size 'inf'"),
        (("--anchor", 0), "--anchor 0"),
        (("--lr", "nan"), "--lr positive and finite"),
        (("--shrink", "lots"), "--shrink 'lots'"),
        (("--eval-jobs", 0), "--eval-jobs 0"),
    ]:
        out = tmp_path / "out"
        assert_clean_failure(predict(farcast, run_dir, out, *args), out, 2, problem)


@pytest.mark.parametrize("dtype, last_value", [(torch.float16, 60000.0), (torch.bfloat16, 3.0e38)])
def test_forecast_that_overflows_the_output_dtype_is_refused(tmp_path, farcast, dtype, last_value):
    """-0.5 x first + 1.4 x last leaves float16's range (65504) after the float32 arithmetic, and
    bfloat16's along with float32's: either way no checkpoint with Inf in it is written."""
    from farcast_cli.model.forecaster import Forecaster
    from farcast_cli.model.linear import LinearMap

    steps = [0, 50, 100]
    weights = {s: {"w": torch.full((4, 8), last_value * s / 100)} for s in steps}
    run = write_run(tmp_path / "run", steps=steps, dtype=dtype, extras=False, weights=weights)
    forecaster_file = tmp_path / "f.json"
    Forecaster("self", 0, 100, [50], LinearMap.of([[-0.5], [1.4]], [0.0]), {}).save(forecaster_file)
    out = tmp_path / "out"
    result = farcast("predict", run, "--forecaster", forecaster_file, "-o", out, "--quiet", expect=3)
    assert_clean_failure(result, out, 3, str(run / "checkpoint-100" / "model.safetensors"), "tensor 'w'", "overflows", "element 0")


def test_incomplete_newest_checkpoints_are_skipped_and_last_step_reads_no_later_one(tmp_path):
    from farcast_cli.errors import InputError
    from farcast_cli.io.run import find_run

    run = write_run(tmp_path / "run")
    data = (run / "checkpoint-200" / "model.safetensors").read_bytes()
    (run / "checkpoint-200" / "model.safetensors").write_bytes(data[: len(data) // 2])
    (run / "checkpoint-220").mkdir()
    found = find_run(run)
    assert found.steps[-1] == 180
    assert [w for w in found.warnings if "checkpoint-200" in w or "checkpoint-220" in w] and len(found.warnings) == 2
    assert find_run(run, last_step=160).steps[-1] == 160 and not find_run(run, last_step=160).warnings
    (run / "checkpoint-100" / "model.safetensors").write_bytes(data[:100])
    with pytest.raises(InputError, match="checkpoint-100"):
        find_run(run)
    assert 100 not in find_run(run, skip_damaged=True).steps

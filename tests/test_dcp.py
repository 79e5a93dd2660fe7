"""Runs saved by torch.distributed.checkpoint (DCP): discovery, inspect, streaming predict, the DCP
output that dcp.load restores, and bad input; on real checkpoints saved by dcp.save from one process
and (slow) from two gloo processes with tensors split across the ranks."""

from __future__ import annotations

import json
import pickle
import threading
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import FAST, write_run
from dcp_runs import SPLIT_ON_COLUMNS, TIED, folder_for, fsdp_model, model_state, save_dcp_run, train_fsdp_run

from farcast_cli import commands
from farcast_cli.io import writer
from farcast_cli.io.dcp import read_dcp_folder
from farcast_cli.io.dcp_writer import DcpWriter

SHAPES = {"encoder.weight": (24, 16), "encoder.bias": (24,), "head.weight": (4, 24), "head.bias": (4,)}
STEPS = list(range(0, 201, 20))
TOLERANCE = 0.01


def linear_weights(steps: list[int], seed: int = 0) -> dict[int, dict[str, torch.Tensor]]:
    """w(t) = a + b t, in float64 (biases are stored in bf16 by model_state)."""
    generator = torch.Generator().manual_seed(seed)
    start = {name: torch.randn(shape, generator=generator, dtype=torch.float64) for name, shape in SHAPES.items()}
    slope = {name: torch.randn(shape, generator=generator, dtype=torch.float64) * 0.01 for name, shape in SHAPES.items()}
    return {step: {name: start[name] + slope[name] * step for name in SHAPES} for step in steps}


def load_dcp(folder: Path, like: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """dcp.load into a state dict of zeros shaped like `like` (nested under "model" for the fsdp layout)."""
    state = {name: torch.zeros_like(value) for name, value in like.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load({"model": state} if prefix else state, checkpoint_id=folder)
    return state


def error_over_jump(found: dict[str, torch.Tensor], truth: dict[str, torch.Tensor], last: dict[str, torch.Tensor]) -> dict[str, float]:
    return {
        name: float((found[name].double() - truth[name].double()).abs().max() / (truth[name].double() - last[name].double()).abs().max())
        for name in SHAPES
    }


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> Path:
    return save_dcp_run(tmp_path_factory.mktemp("dcp") / "run", linear_weights(STEPS), "fsdp")


@pytest.fixture(scope="module")
def split_run(tmp_path_factory) -> Path:
    return save_dcp_run(tmp_path_factory.mktemp("dcp2") / "run", linear_weights(STEPS, seed=1), "titan", ranks=2)


def test_inspect_reads_an_fsdp_run_as_dcp(fsdp_run, farcast):
    info = json.loads(farcast("inspect", fsdp_run, "--json").stdout)
    assert info["layout"] == "dcp"
    assert info["steps"] == STEPS
    found = info["distributed"]
    assert found["folder"] == "pytorch_model_fsdp_0"
    assert [f["name"] for f in found["files"]] == ["__0_0.distcp"]
    tensors = {t["name"]: t for t in found["tensors"]}
    assert set(tensors) == {f"model.{name}" for name in [*SHAPES, "position_ids", TIED[1]]}
    assert tensors["model.encoder.bias"]["dtype"] == "BF16" and tensors["model.encoder.weight"]["dtype"] == "F64"
    assert tensors["model.head.weight"]["chunks"] == [[[0, 0], [4, 24]]]
    assert info["copied_files"] == ["config.json"]
    assert {f["name"] for f in info["left_out_files"]} == {"rng_state.pth", "trainer_state.json"}
    text = farcast("inspect", fsdp_run).stdout
    assert "distributed checkpoint in pytorch_model_fsdp_0/: .metadata and 1 .distcp file(s)" in text


def test_a_linear_fsdp_run_is_forecast_exactly_and_dcp_load_restores_it(fsdp_run, farcast, tmp_path):
    out = tmp_path / "out"
    farcast("predict", fsdp_run, "-H", 100, "-o", out, "--shrink", "none", "--quiet")
    assert sorted(p.name for p in (out / "pytorch_model_fsdp_0").iterdir()) == [".metadata", "__0_0.distcp", "farcast.json"]
    assert (out / "config.json").exists() and not (out / "trainer_state.json").exists()
    truth, last = model_state(linear_weights([300])[300]), model_state(linear_weights([200])[200])
    found = load_dcp(out / "pytorch_model_fsdp_0", truth, prefix="model")
    errors = error_over_jump(found, truth, last)
    assert errors["encoder.weight"] < TOLERANCE and errors["head.weight"] < TOLERANCE
    assert errors["encoder.bias"] < 0.05 and errors["head.bias"] < 0.05
    assert found["encoder.bias"].dtype == torch.bfloat16
    assert torch.equal(found["position_ids"], truth["position_ids"])
    assert torch.equal(found[TIED[0]], found[TIED[1]])


def test_a_forecast_inside_a_dcp_run_is_not_history(fsdp_run, farcast, tmp_path):
    run = tmp_path / "run"
    for step in (160, 180, 200):
        folder = folder_for(fsdp_run, "fsdp", step)[0]
        (run / folder.name).mkdir(parents=True)
        for path in folder.rglob("*"):
            target = run / folder.name / path.relative_to(folder)
            target.mkdir(exist_ok=True) if path.is_dir() else target.write_bytes(path.read_bytes())
    farcast("predict", run, "-H", 20, "-o", tmp_path / "out", *FAST)
    (tmp_path / "out").rename(run / "checkpoint-220")
    (run / "checkpoint-220" / "farcast_report.json").unlink()
    info = commands.inspect_run(run).to_json()
    assert info["steps"] == [160, 180, 200]
    assert [Path(f["path"]).name for f in info["forecasts"]] == ["checkpoint-220"]


def test_dtype_option_writes_the_dcp_output_in_that_dtype(fsdp_run, farcast, tmp_path):
    farcast("predict", fsdp_run, "-H", 100, "-o", tmp_path / "out", "--dtype", "f32", *FAST)
    written = read_dcp_folder(tmp_path / "out" / "pytorch_model_fsdp_0")
    assert {t.info.dtype for t in written.tensors.values()} == {"F32", "I64"}


def _copy_run(source: Path, target: Path) -> Path:
    for path in sorted(source.rglob("*")):
        place = target / path.relative_to(source)
        place.mkdir(parents=True, exist_ok=True) if path.is_dir() else place.write_bytes(path.read_bytes())
    return target


def _break_missing_file(dcp_folder: Path) -> str:
    (dcp_folder / "__0_0.distcp").unlink()
    return f"{dcp_folder / '.metadata'}: names __0_0.distcp, which does not exist"


def _break_truncated(dcp_folder: Path) -> str:
    path = dcp_folder / "__0_0.distcp"
    path.write_bytes(path.read_bytes()[:-500])
    return f"{path}: the chunk of"


def _break_renamed(dcp_folder: Path) -> str:
    (dcp_folder / "__0_0.distcp").rename(dcp_folder / "__0_9.distcp")
    return f"{dcp_folder / '.metadata'}: names __0_0.distcp, which does not exist"


def _break_tiling(dcp_folder: Path) -> str:
    path = dcp_folder / ".metadata"
    metadata = pickle.loads(path.read_bytes())
    entry = metadata.state_dict_metadata["model.head.weight"]
    entry.chunks[0].sizes = torch.Size([3, 24])
    path.write_bytes(pickle.dumps(metadata))
    return f"{path}: the chunks of 'model.head.weight' do not cover its shape [4, 24]"


def _break_overwritten_chunk(dcp_folder: Path) -> str:
    path = dcp_folder / "__0_0.distcp"
    data = bytearray(path.read_bytes())
    data[:64] = b"\0" * 64
    path.write_bytes(bytes(data))
    return f"{path}: the chunk of"


@pytest.mark.parametrize("damage", [_break_missing_file, _break_truncated, _break_renamed, _break_tiling, _break_overwritten_chunk])
def test_a_damaged_dcp_checkpoint_is_one_line_naming_the_file_and_nothing_is_written(fsdp_run, farcast, tmp_path, damage):
    run = _copy_run(fsdp_run, tmp_path / "run")
    expected = damage(run / "checkpoint-100" / "pytorch_model_fsdp_0")
    result = farcast("predict", run, "-H", 100, "-o", tmp_path / "out", *FAST, expect=3)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("farcast: error: ")
    assert expected in lines[0]
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def _flushing_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "farcast-flush"]


def test_a_dcp_output_written_back_behind_its_writes_is_the_same_bytes(fsdp_run, farcast, tmp_path, monkeypatch):
    """The DCP writer writes each .distcp back to disk while it is written (FlushBehind, here after
    every write): the same bytes as written without it, and no flushing thread left behind."""
    farcast("predict", fsdp_run, "-H", 100, "-o", tmp_path / "plain", *FAST)
    monkeypatch.setattr(writer, "FLUSH_BEHIND_BYTES", 1)
    farcast("predict", fsdp_run, "-H", 100, "-o", tmp_path / "flushed", *FAST)
    written = sorted(p.relative_to(tmp_path / "plain") for p in (tmp_path / "plain").rglob("*") if p.suffix in (".distcp", ".metadata"))
    assert written and all((tmp_path / "plain" / p).read_bytes() == (tmp_path / "flushed" / p).read_bytes() for p in written)
    assert _flushing_threads() == []

    source = read_dcp_folder(fsdp_run / "checkpoint-200" / "pytorch_model_fsdp_0")
    dtypes = {name: tensor.info.dtype for name, tensor in source.tensors.items()}
    dcp_writer = DcpWriter(tmp_path / "aborted", source, dtypes, flush_behind=True)
    assert len(_flushing_threads()) == len(dcp_writer._fds) > 0
    dcp_writer.abort()
    assert _flushing_threads() == []


def test_a_dcp_write_that_fails_while_flushing_behind_leaves_nothing(farcast, tmp_path, monkeypatch):
    """A forecast that overflows float32 fails in the middle of the write (the output files open and
    written back behind): one error line, no output, no flushing thread left."""
    weights = linear_weights(STEPS)
    for step, tensors in weights.items():
        tensors["encoder.weight"] = torch.full(SHAPES["encoder.weight"], 1.5e36 * step, dtype=torch.float32)
    run = save_dcp_run(tmp_path / "run", weights, "fsdp")
    monkeypatch.setattr(writer, "FLUSH_BEHIND_BYTES", 1)
    result = farcast("predict", run, "-H", 100, "-o", tmp_path / "out", "--backtest", "sample", *FAST, expect=3)
    assert "the forecast of tensor 'model.encoder.weight' overflows torch.float32" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    assert _flushing_threads() == []


def test_finding_a_run_opens_no_chunk_archive_and_the_first_read_of_a_damaged_one_names_its_file(fsdp_run, tmp_path):
    """Archives are opened when their chunk is read: a run is found (and inspected) without loading any."""
    from farcast_cli.errors import InputError
    from farcast_cli.io.run import find_run

    run = _copy_run(fsdp_run, tmp_path / "run")
    expected = _break_overwritten_chunk(run / "checkpoint-100" / "pytorch_model_fsdp_0")
    found = find_run(run)
    assert all(chunk.begin_at is None for c in found.checkpoints for t in c.dcp.tensors.values() for chunk in t.chunks)
    assert commands.inspect_run(run).steps == STEPS
    damaged = found.at_step(100).dcp.tensors
    with pytest.raises(InputError, match="the chunk of .* is not a tensor torch can load") as raised:
        for tensor in damaged.values():
            tensor.read_ranges([(0, tensor.size)])
    assert str(raised.value).startswith(expected)
    head = found.last.dcp.tensors["model.head.weight"]
    assert bytes(head.read_ranges([(0, head.size)])[0]) == model_state(linear_weights([200])[200])["head.weight"].numpy().tobytes()


def test_one_checkpoint_given_as_the_run_says_what_to_give(fsdp_run, farcast):
    folder = fsdp_run / "checkpoint-20" / "pytorch_model_fsdp_0"
    result = farcast("inspect", folder, expect=3)
    expected = "is one distributed checkpoint; give the folder that holds the run's checkpoint-<step>/ or <name>-<step>/ folders"
    assert result.stderr.strip() == f"farcast: error: {folder}: {expected}"


def test_the_metadata_is_never_unpickled_beyond_checkpoint_classes(fsdp_run, farcast, tmp_path):
    run = _copy_run(fsdp_run, tmp_path / "run")
    marker = tmp_path / "ran"
    path = run / "checkpoint-100" / "pytorch_model_fsdp_0" / ".metadata"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path.write_bytes(pickle.dumps({"state_dict_metadata": Payload()}))
    result = farcast("inspect", run, expect=3)
    assert f"{path}: not a distributed checkpoint's metadata" in result.stderr
    assert not marker.exists()


def test_a_run_mixing_dcp_and_safetensors_checkpoints_is_refused(fsdp_run, farcast, tmp_path):
    run = _copy_run(fsdp_run, tmp_path / "run")
    write_run(tmp_path / "other", steps=[220])
    (tmp_path / "other" / "checkpoint-220").rename(run / "checkpoint-220")
    result = farcast("inspect", run, expect=3)
    assert "is a distributed checkpoint but the last checkpoint checkpoint-220 is safetensors" in result.stderr


@pytest.mark.slow
def test_a_run_split_across_two_ranks_is_forecast_exactly_with_its_chunks(split_run, farcast, tmp_path):
    info = json.loads(farcast("inspect", split_run, "--json").stdout)
    tensors = {t["name"]: t for t in info["distributed"]["tensors"]}
    assert tensors[SPLIT_ON_COLUMNS]["chunks"] == [[[0, 0], [24, 8]], [[0, 8], [24, 8]]]
    assert tensors["head.weight"]["chunks"] == [[[0, 0], [2, 24]], [[2, 0], [2, 24]]]
    assert {e["why"] for e in info["distributed"]["left_out_entries"]} >= {
        "optimizer state",
        "not a tensor (saved as pickled bytes, never loaded)",
    }
    out = tmp_path / "out"
    farcast("predict", split_run, "-H", 100, "-o", out, "--shrink", "none", "--max-memory", "64KiB", "--quiet")
    assert sorted(p.name for p in out.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    written = read_dcp_folder(out)
    source = read_dcp_folder(folder_for(split_run, "titan", 200)[1])
    assert {n: t.boxes for n, t in written.tensors.items()} == {n: t.boxes for n, t in source.tensors.items()}
    truth, last = model_state(linear_weights([300], seed=1)[300]), model_state(linear_weights([200], seed=1)[200])
    found = load_dcp(out, truth)
    errors = error_over_jump(found, truth, last)
    assert errors[SPLIT_ON_COLUMNS] < TOLERANCE and errors["head.weight"] < TOLERANCE and errors["head.bias"] < 0.05
    assert torch.equal(found[TIED[0]], found[TIED[1]])


@pytest.mark.slow
def test_the_loss_decides_on_a_dcp_run_and_the_evaluator_gets_loadable_folders(fsdp_run, tmp_path):
    """An evaluator is pointed at checkpoint folders like the run's own (the DCP folder inside, as saved)."""
    goal = model_state(linear_weights([400])[400])
    seen: list[Path] = []

    def distance_to_step_400(folder: str) -> float:
        seen.append(Path(folder))
        found = load_dcp(Path(folder) / "pytorch_model_fsdp_0", goal, prefix="model")
        return sum(float((found[name].double() - goal[name].double()).norm()) for name in SHAPES)

    report = commands.predict(
        fsdp_run,
        tmp_path / "out",
        horizon=100,
        settings=commands.FitSettings(sample=2000, max_updates=100),
        options=commands.StreamOptions(quiet=True),
        evaluation=commands.EvalOptions(distance_to_step_400, cache=False),
    )
    assert report.best == "forecast"
    assert report.steps_saved > 0.5
    assert fsdp_run / "checkpoint-200" in seen
    assert any(path.name.startswith(".out.farcast") or ".out.farcast" in str(path) for path in seen)
    assert report.written_loss < report.last_checkpoint_loss


def test_resumable_is_refused_on_a_dcp_run(fsdp_run, farcast, tmp_path):
    result = farcast("predict", fsdp_run, "-H", 100, "-o", tmp_path / "out", "--resumable", "--schedule", "keep", expect=2)
    assert "this run holds distributed checkpoints (DCP)" in result.stderr


@pytest.mark.slow
def test_predict_under_torchrun_writes_what_one_process_writes_on_a_split_run(split_run, farcast, tmp_path):
    from test_distributed import files_of, finish, launched

    farcast("predict", split_run, "-H", 60, "-o", tmp_path / "one", *FAST)
    code, _, stderr = finish(launched("predict", split_run, "-H", 60, "-o", tmp_path / "all", *FAST, ranks=2))
    assert code == 0, stderr
    assert files_of(tmp_path / "all") == files_of(tmp_path / "one")
    assert set(files_of(tmp_path / "one")) == {".metadata", "__0_0.distcp", "__1_0.distcp", "farcast.json"}
    farcast("predict", split_run, "-H", 60, "-o", tmp_path / "one-st", "--output-format", "safetensors", *FAST)
    code, _, stderr = finish(
        launched("predict", split_run, "-H", 60, "-o", tmp_path / "all-st", "--output-format", "safetensors", *FAST, ranks=2)
    )
    assert code == 0, stderr
    assert files_of(tmp_path / "all-st") == files_of(tmp_path / "one-st")
    assert set(files_of(tmp_path / "one-st")) == {"model.safetensors"}


@pytest.mark.slow
def test_a_dominant_tensor_saved_by_two_ranks_is_divided_at_its_saved_chunks_under_torchrun(tmp_path, farcast):
    """The embedding (97% of the bytes) is saved in two chunks of 128 rows: two farcast ranks each take
    one (the cut is the saved chunks' boundary), and write what one process writes, in both formats."""
    from test_distributed import dominated_weights, figures, files_of, finish, launched

    from farcast_cli.distributed import tensor_pieces
    from farcast_cli.evaluate.report import REPORT_FILE
    from farcast_cli.io.run import find_run

    run = save_dcp_run(tmp_path / "run", dominated_weights(STEPS), "titan", ranks=2)
    last = find_run(run).last
    assert last.tensor("embed.weight")[0].chunk_bounds == [128 * 64]
    pieces = tensor_pieces(last, ["embed.weight", "head.weight"], 2, 1024)
    assert [(p.start, p.stop) for p in pieces if p.item == 0] == [(0, 128 * 64), (128 * 64, 256 * 64)]
    options = ["-H", 60, "--max-memory", "64KB", *FAST]
    for output in ([], ["--output-format", "safetensors"]):
        one, all_ranks = tmp_path / f"one{len(output)}", tmp_path / f"all{len(output)}"
        farcast("predict", run, *options, *output, "-o", one)
        code, _, stderr = finish(launched("predict", run, *options, *output, "-o", all_ranks, ranks=2))
        assert code == 0, stderr
        assert files_of(all_ranks) == files_of(one)
        reports = [json.loads((folder / REPORT_FILE).read_text()) for folder in (one, all_ranks)]
        assert figures(reports[1]) == figures(reports[0]) and reports[0]["backtest"]["scope"] == "all coordinates"


@pytest.mark.slow
def test_safetensors_output_is_a_hugging_face_layout_that_from_pretrained_loads(tmp_path, farcast, monkeypatch):
    """A GPT-2 built from a config (tied input and output embeddings), saved as accelerate's FSDP does
    ({"model": state_dict} in checkpoint-N/pytorch_model_fsdp_0/), moving on a straight line."""
    transformers = pytest.importorskip("transformers")
    from farcast_cli.io import dcp_writer

    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16)
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(config).state_dict()
    slopes: dict[int, torch.Tensor] = {}
    for value in base.values():
        slopes.setdefault(value.data_ptr(), torch.randn_like(value) * 0.01)

    def at(step: int) -> dict[str, torch.Tensor]:
        return {name: value + slopes[value.data_ptr()] * step for name, value in base.items()}

    for step in STEPS:
        folder = tmp_path / "run" / f"checkpoint-{step}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save({"model": at(step)}, checkpoint_id=folder / "pytorch_model_fsdp_0")
        config.save_pretrained(folder)
    monkeypatch.setattr(dcp_writer, "MAX_SHARD_BYTES", 8_000)
    out = tmp_path / "out"
    farcast("predict", tmp_path / "run", "-H", 100, "-o", out, "--shrink", "none", "--shared", "--output-format", "safetensors", *FAST)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"]) == set(base)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(out).state_dict()
    truth, last = at(300), at(200)
    for name, value in truth.items():
        jump = float((value - last[name]).abs().max())
        assert float((loaded[name] - value).abs().max()) <= TOLERANCE * jump + 1e-6, name


@pytest.mark.slow
def test_a_real_fsdp_run_on_two_ranks_is_read_and_its_forecast_loads_into_the_model(tmp_path, farcast):
    """FSDP2 (fully_shard) trains on the CPU with gloo in the torch we use: its sharded checkpoints are
    read as they are, and the forecast loads into the same model, unsharded, through dcp.load."""
    run = train_fsdp_run(tmp_path / "run", steps=80, every=10)
    info = json.loads(farcast("inspect", run, "--json").stdout)
    assert info["steps"] == list(range(10, 81, 10))
    tensors = {t["name"]: t for t in info["distributed"]["tensors"]}
    assert tensors["model.0.weight"]["chunks"] == [[[0, 0], [16, 16]], [[16, 0], [16, 16]]]
    farcast("predict", run, "-H", 40, "-o", tmp_path / "out", *FAST)
    model = fsdp_model()
    state = {name: torch.zeros_like(value) for name, value in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load({"model": state}, checkpoint_id=tmp_path / "out" / "pytorch_model_fsdp_0")
    model.load_state_dict(state)
    last = {name: torch.zeros_like(value) for name, value in state.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load({"model": last}, checkpoint_id=run / "checkpoint-80" / "pytorch_model_fsdp_0")
    assert all(torch.isfinite(value).all() for value in state.values())
    assert any(not torch.equal(state[name], last[name]) for name in state)


def _streamed(run: Path, name: str, stage: bool) -> torch.Tensor:
    from farcast_cli.io.engine import EngineSettings, Source, chunk_jobs, stream
    from farcast_cli.io.run import find_run

    file, info = find_run(run).last.tensor(name)
    settings = EngineSettings(torch.device("cpu"), chunk_elements=100, stage=stage)
    return torch.cat([data[0].clone() for _, data in stream(list(chunk_jobs(name, info.numel, 37, (Source(file, info),))), settings)])


@pytest.mark.parametrize("stage", [False, True])
def test_the_engine_streams_a_dcp_tensor_in_small_chunks(fsdp_run, stage):
    """Staged is the GPU path (pinned buffers, copies to the device), run on the CPU."""
    expected = model_state(linear_weights([200])[200])["encoder.bias"]
    assert torch.equal(_streamed(fsdp_run, "model.encoder.bias", stage), expected.to(torch.float32))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [False, True])
def test_the_engine_streams_a_split_tensor_in_chunks_that_cross_its_pieces(split_run, stage):
    """Read chunks of 37 elements cross the boundary between the two ranks' column halves; the stream is
    the halves one after the other."""
    expected = model_state(linear_weights([200], seed=1)[200])[SPLIT_ON_COLUMNS]
    halves = torch.cat([expected[:, :8].reshape(-1), expected[:, 8:].reshape(-1)])
    assert torch.equal(_streamed(split_run, SPLIT_ON_COLUMNS, stage), halves)


def test_the_newest_dcp_checkpoint_without_its_metadata_is_skipped_as_incomplete(fsdp_run, tmp_path):
    """torch writes .metadata last: a checkpoint without it is still being saved (or was cut off)."""
    run = _copy_run(fsdp_run, tmp_path / "run")
    (run / "checkpoint-200" / "pytorch_model_fsdp_0" / ".metadata").unlink()
    info = commands.inspect_run(run).to_json()
    assert info["steps"] == STEPS[:-1]
    assert any("checkpoint-200: skipped, incomplete" in warning for warning in info["warnings"])


def test_skip_damaged_skips_a_truncated_dcp_checkpoint_between_complete_ones(fsdp_run, farcast, tmp_path):
    run = _copy_run(fsdp_run, tmp_path / "run")
    _break_truncated(run / "checkpoint-100" / "pytorch_model_fsdp_0")
    info = json.loads(farcast("inspect", run, "--skip-damaged", "--json").stdout)
    assert 100 not in info["steps"] and len(info["steps"]) == len(STEPS) - 1

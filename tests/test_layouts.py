"""Checkpoint layouts as types (io/run.py, Layout): a layout added inside the test is found, forecast,
scored by an evaluator and guarded against, with nothing else changed."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import write_run
from safetensors.torch import load_file

from farcast_cli import commands
from farcast_cli.errors import OutputError, UsageError
from farcast_cli.evaluate.evaluator import EvalOptions
from farcast_cli.io.run import LAYOUTS, Found, Layout, find_run, folder_checkpoint
from farcast_cli.model.fit import FitSettings

FIT = FitSettings(sample=2000, max_updates=300)
QUIET = commands.StreamOptions(quiet=True)


class EpochFolders(Layout):
    """A toy layout: epoch_<step>/ folders, each holding model.safetensors."""

    name, expected, description = "epochs", "epoch_<step>/ folders", "epoch folders"
    FOLDER = re.compile(r"^epoch_(\d+)$")

    def find(self, folder: Path, entries: list[Path]) -> list[Found]:
        steps = {p: self.FOLDER.match(p.name) for p in entries if p.is_dir()}
        return [(int(m.group(1)), p, lambda place, step=int(m.group(1)): folder_checkpoint(place, step)) for p, m in steps.items() if m]

    def claims(self, name: str) -> bool:
        return self.FOLDER.match(name) is not None


@pytest.fixture
def epoch_run(tmp_path: Path) -> Iterator[Path]:
    run = write_run(tmp_path / "run", extras=False)
    for folder in run.glob("checkpoint-*"):
        (folder / "trainer_state.json").unlink()
        folder.rename(run / folder.name.replace("checkpoint-", "epoch_"))
    LAYOUTS.insert(0, EpochFolders())
    try:
        yield run
    finally:
        LAYOUTS.pop(0)


def test_a_new_layout_is_found_forecast_and_evaluated(epoch_run, tmp_path):
    run = find_run(epoch_run)
    assert run.layout.name == "epochs" and run.steps == list(range(0, 201, 20))
    seen: dict[Path, bool] = {}

    def loss(checkpoint: Path) -> float:
        seen[checkpoint] = checkpoint.is_dir()
        return float(load_file(checkpoint / "model.safetensors")["head.bias"].abs().sum())

    report = commands.predict(epoch_run, tmp_path / "out", horizon=40, settings=FIT, options=QUIET, evaluation=EvalOptions(loss))
    assert report.layout == "epochs" and report.criterion == "validation loss"
    assert all(seen.values()) and epoch_run / "epoch_200" in seen and len(seen) > 11
    assert set(load_file(tmp_path / "out" / "model.safetensors")) == {"encoder.weight", "encoder.bias", "head.weight", "head.bias"}


def test_a_new_layouts_names_are_guarded_and_it_is_not_resumable(epoch_run, tmp_path):
    with pytest.raises(OutputError, match="would look like a checkpoint of the run itself"):
        commands.predict(epoch_run, epoch_run / "epoch_240", horizon=40, settings=FIT, options=QUIET)
    with pytest.raises(UsageError, match="this run holds epoch folders"):
        commands.predict(epoch_run, tmp_path / "out", horizon=40, settings=FIT, options=QUIET, resumable=True, schedule="keep")


def test_the_built_in_layouts_are_tried_in_order(tmp_path):
    assert [layout.name for layout in LAYOUTS] == ["trainer", "dcp", "files"]
    assert find_run(write_run(tmp_path / "files", layout="files")).layout.evaluated(tmp_path) == tmp_path / "model.safetensors"
    assert find_run(write_run(tmp_path / "trainer")).layout.evaluated(tmp_path) == tmp_path

"""What a first-time user meets: the help, inspect's summary, and what an output copies and leaves out."""

from __future__ import annotations

import json

import pytest
from conftest import write_run


def test_the_options_most_people_need_come_first_and_the_rest_in_panels(farcast):
    text = farcast("predict", "--help").stdout
    first_panel = min(text.index(panel) for panel in ("Fitting", "Evaluation by your loss", "Output", "Streaming and devices"))
    for option in ("--output", "--horizon", "--fallback", "--json", "--eval-cmd"):
        assert text.index(option) < first_panel, option
    assert "required unless" in text and "--forecaster" in text
    for panel in ("Fitting", "Evaluation by your loss", "Output", "Streaming and devices", "Resuming training from the forecast"):
        assert f"─ {panel} ─" in text, panel


@pytest.mark.parametrize("command", ["inspect", "fit", "predict"])
def test_every_command_shows_examples(farcast, command):
    text = farcast(command, "--help").stdout
    assert "Examples:" in text and f"farcast {command} " in text


def test_inspect_summarises_the_steps_and_lists_them_with_all(tmp_path, farcast):
    run = write_run(tmp_path / "run", steps=list(range(0, 501, 5)), extras=False)
    summary = farcast("inspect", run).stdout
    assert "checkpoints: 101 checkpoints, steps 0..500 every 5 (--all lists them)" in summary
    assert summary.count("step ") < 5 and "tensors: all 4 forecast; dtypes F32" in summary
    full = farcast("inspect", run, "--all").stdout
    assert sum(line.startswith("  step ") for line in full.splitlines()) == 101
    info = json.loads(farcast("inspect", run, "--json").stdout)
    assert len(info["checkpoints"]) == 101 and info["steps_summary"] == "101 checkpoints, steps 0..500 every 5"


def test_inspect_and_dry_run_say_what_an_output_copies_and_leaves_out(run_dir, farcast, tmp_path):
    (run_dir / "checkpoint-200" / "scheduler.pt").write_bytes(b"state")
    text = farcast("inspect", run_dir).stdout
    assert "tensors: 4 forecast, 2 copied unchanged (BOOL, I64); dtypes BOOL, F32, I64" in text
    assert "copied into outputs: config.json, tokenizer.json" in text
    for name in ("optimizer.pt", "scheduler.pt"):
        assert f"left out of outputs: {name}: the trainer's pickled state, which farcast never loads" in text
    assert "left out of outputs: trainer_state.json: the trainer's state at the last step" in text
    plan = json.loads(farcast("predict", run_dir, "-H", 100, "-o", tmp_path / "out", "--dry-run", "--json").stdout)
    assert plan["copied_files"] == ["config.json", "tokenizer.json"]
    assert {left["name"] for left in plan["left_out_files"]} == {"optimizer.pt", "scheduler.pt", "trainer_state.json"}
    assert "left out of outputs: scheduler.pt" in farcast("predict", run_dir, "-H", 100, "-o", tmp_path / "out", "--dry-run").stdout

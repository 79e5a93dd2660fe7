"""--eval-cmd: the user's loss decides what is written, through the CLI and the Python API.

The eval commands here read safetensors with numpy alone (a torch import would cost more than a
second per evaluation): the 'loss' is the distance of the weights to chosen target weights.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST, trajectories, write_run
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from farcast_cli import commands
from farcast_cli.evaluate.evaluator import EvalCommand, EvalOptions
from farcast_cli.evaluate.loss import step_reaching, steps_saved
from farcast_cli.model.fit import FitSettings

DISTANCE = """
import json, struct, sys
from pathlib import Path
import numpy as np

def tensors(path):
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    found = {}
    for file in files:
        data = file.read_bytes()
        size = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8 : 8 + size])
        for name, entry in header.items():
            if name != "__metadata__" and entry["dtype"] == "F32":
                begin, end = entry["data_offsets"]
                found[name] = np.frombuffer(data[8 + size + begin : 8 + size + end], dtype=np.float32)
    return found

weights, target = tensors(sys.argv[1]), tensors(sys.argv[2])
print("loss", sum(float(np.abs(weights[n] - t).sum()) for n, t in target.items()))
"""


def distance_command(folder: Path, target: dict[str, torch.Tensor]) -> str:
    """An eval command whose loss is the L1 distance to `target`."""
    script = folder / "distance.py"
    script.write_text(DISTANCE)
    save_file({name: value.float().contiguous() for name, value in target.items()}, folder / "target.safetensors")
    return f"{sys.executable} {script} {{checkpoint}} {folder / 'target.safetensors'}"


@pytest.fixture
def heading_loss(tmp_path: Path) -> str:
    """A loss that falls as the weights approach where the run is heading (their step-2000 values)."""
    return distance_command(tmp_path, trajectories([2000])[2000])


def predict_json(farcast, *args: object, expect: int = 0) -> dict:
    return json.loads(farcast("predict", *args, "--json", *FAST, expect=expect).stdout)


@pytest.mark.slow
def test_the_loss_chooses_the_forecast_and_its_settings(run_dir, farcast, tmp_path, heading_loss):
    report = predict_json(farcast, run_dir, "-H", 100, "-o", tmp_path / "out", "--eval-cmd", heading_loss)
    loss = report["loss"]
    assert report["criterion"] == "validation loss"
    curve_steps = [step for step, _ in loss["curve"]]
    assert curve_steps[0] == 140 and curve_steps[-1] == 200 and set(curve_steps) <= {140, 160, 180, 200}
    assert [value for _, value in loss["curve"]] == sorted((value for _, value in loss["curve"]), reverse=True)
    forecasts = [p for p in loss["points"] if p["method"] == "forecast"]
    assert {p["anchor"] for p in forecasts} == {1, 5}
    assert {0.5, 1.0} <= {p["shrink"] for p in forecasts}
    assert loss["evaluations"] <= 15 and loss["eval_wall_seconds"] <= loss["eval_seconds"] + 1e-3
    best = min(forecasts, key=lambda p: p["loss"])
    assert loss["best_forecast"] == best and loss["chosen"] == best
    assert report["forecaster"]["anchor"] == best["anchor"] and report["forecaster"]["fit"]["shrink"] == best["shrink"]
    assert report["steps_saved"] == best["steps_saved"] > 0.2 and report["beats_last"] is True
    assert report["written"]["method"] == "forecast"
    assert report["written_loss"] < report["last_checkpoint_loss"]
    assert "By your loss" in report["verdict"] and "optimistic" in report["verdict"]
    assert not list(tmp_path.glob(".farcast-*"))


def turning_run(root: Path) -> tuple[Path, dict]:
    """Weights that rise, turn back at step 100 and fall."""
    steps = list(range(0, 201, 20))
    base = torch.randn(24, 16, generator=torch.Generator().manual_seed(3))
    weights = {s: {"encoder.weight": base * (1 + s / 100 - (s / 100) ** 2 / 2)} for s in steps}
    return write_run(root, steps=steps, weights=weights, extras=False), weights


@pytest.mark.slow
def test_a_forecast_that_loses_by_the_loss_is_not_written_unless_forced(tmp_path, farcast):
    """The loss is the distance to where the weights end (step 200): the rise the forecast learned leads
    away from it. The straight line through the last two does best in the backtest, but over 3 spacings
    of 20 steps where the 100 asked are 5: it is not written either, and the last checkpoint is kept."""
    run, weights = turning_run(tmp_path / "run")
    command = distance_command(tmp_path, weights[200])
    report = predict_json(farcast, run, "-H", 100, "-o", tmp_path / "out", "--eval-cmd", command)
    loss = report["loss"]
    assert min(loss["points"], key=lambda p: p["loss"])["method"] == "line" and loss["line_tested"] is False
    assert report["best"] == loss["chosen"]["method"] == "last" and report["beats_last"] is False
    assert "does NOT beat keeping the last checkpoint" in report["verdict"]
    assert report["written"]["method"] == "last" and report["written"]["from_steps"] == [200]
    assert torch.equal(load_file(tmp_path / "out" / "model.safetensors")["encoder.weight"], weights[200]["encoder.weight"])
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as handle:
        entry = json.loads(handle.metadata()["farcast"])
    assert entry == {"version": entry["version"], "method": "keep last", "from_steps": [200], "stands_for_step": 300, "copy_of_step": 200}
    forced = predict_json(farcast, run, "-H", 100, "-o", tmp_path / "forced", "--eval-cmd", command, "--no-fallback")
    assert forced["written"]["method"] == "forecast" and "although keeping the last checkpoint did better" in forced["written"]["why"]
    assert forced["loss"]["evaluations"] == 1 and forced["loss"]["cache_hits"] >= report["loss"]["evaluations"] - 1 > 5


@pytest.mark.slow
def test_a_straight_line_tested_as_far_as_asked_is_written_when_it_wins(tmp_path, farcast):
    run, weights = turning_run(tmp_path / "run")
    command = distance_command(tmp_path, weights[200])
    one_short = predict_json(farcast, run, "-H", 80, "-o", tmp_path / "short", "--eval-cmd", command)
    assert (one_short["loss"]["cut_step"], one_short["loss"]["line_tested"]) == (140, False), "3 spacings tested, 4 asked"
    report = predict_json(farcast, run, "-H", 40, "-o", tmp_path / "out", "--eval-cmd", command)
    assert report["loss"]["line_tested"] is True and report["best"] == "line" and "a straight line did best" in report["verdict"]
    assert report["written"]["method"] == "line" and report["written"]["from_steps"] == [180, 200]
    line = weights[200]["encoder.weight"] + (weights[200]["encoder.weight"] - weights[180]["encoder.weight"]) * 40 / 20
    assert torch.allclose(load_file(tmp_path / "out" / "model.safetensors")["encoder.weight"], line, atol=1e-5)


@pytest.mark.slow
def test_the_shrink_search_stops_at_two(tmp_path, farcast):
    """Weights on a straight line; the loss is the distance to where the line is 40 jumps further on:
    the largest factor wins, and the search goes no further than 2 (larger factors did not carry over
    from the backtest to the real jump on the benchmark workloads)."""
    steps = list(range(0, 201, 20))
    start = torch.randn(8, 8, generator=torch.Generator().manual_seed(5))
    weights = {s: {"w": start * (1 + s / 100)} for s in steps}
    run = write_run(tmp_path / "run", steps=steps, weights=weights, extras=False)
    report = predict_json(farcast, run, "-H", 100, "-o", tmp_path / "out", "--eval-cmd", distance_command(tmp_path, {"w": start * 50}))
    shrinks = sorted(p["shrink"] for p in report["loss"]["points"] if p["method"] == "forecast" and p["anchor"] == 1)
    assert shrinks[:2] == [0.5, 1.0] and shrinks[-1] == 2.0 and len(shrinks) <= 5
    assert report["loss"]["best_forecast"]["shrink"] == 2.0


def test_a_win_within_the_runs_own_jitter_keeps_the_last_checkpoint():
    from farcast_cli.evaluate.loss import LossPoint, _choose, curve_noise

    jitter = curve_noise([1.0, 0.9, 0.95, 0.8, 0.85])
    assert jitter == pytest.approx(0.2 / 0.6745 / 6**0.5)
    last, slightly, clearly = (
        LossPoint("last", None, None, 0.85, 0.0),
        LossPoint("forecast", 1, 1.0, 0.84, 0.1),
        LossPoint("lawa", None, None, 0.5, 1.0),
    )
    assert _choose([last, slightly], jitter) is last and _choose([last, slightly, clearly], jitter) is clearly
    assert _choose([last, slightly], 0.0) is slightly


@pytest.mark.slow
def test_scores_are_cached_by_content_and_parallel_jobs_agree(run_dir, farcast, tmp_path, heading_loss):
    first = predict_json(farcast, run_dir, "-H", 100, "-o", tmp_path / "a", "--eval-cmd", heading_loss, "--eval-jobs", 2)
    second = predict_json(farcast, run_dir, "-H", 100, "-o", tmp_path / "b", "--eval-cmd", heading_loss)
    assert first["loss"]["evaluations"] > 8 and first["loss"]["cache_hits"] == 0
    assert second["loss"]["evaluations"] == 0 and second["loss"]["cache_hits"] == first["loss"]["evaluations"]
    assert second["loss"]["points"] == first["loss"]["points"] and second["written_loss"] == first["written_loss"]
    uncached = predict_json(farcast, run_dir, "-H", 100, "-o", tmp_path / "c", "--eval-cmd", heading_loss, "--no-eval-cache")
    assert uncached["loss"]["points"] == first["loss"]["points"] and uncached["loss"]["cache_hits"] == 0


@pytest.mark.slow
def test_min_skill_reads_steps_saved_with_an_eval_command(run_dir, farcast, tmp_path, heading_loss):
    result = farcast("predict", run_dir, "-H", 100, "-o", tmp_path / "out", "--eval-cmd", heading_loss, "--min-skill", 1.5, *FAST, expect=4)
    assert "steps saved by your loss in the backtest is" in result.stderr and "below --min-skill 1.5" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_jump_the_history_cannot_test_is_not_called_a_win(tmp_path, farcast):
    """Five checkpoints left by rotation, and a horizon far longer than they span: the backtest can only
    jump 20 steps, under half of 200."""
    run = write_run(tmp_path / "run", steps=[420, 440, 460, 480, 500])
    report = predict_json(farcast, run, "-H", 200, "-o", tmp_path / "out", "--fallback")
    assert report["tested"] is False and report["beats_last"] is None
    assert report["verdict"].startswith("UNTESTED at this size") and "under half the 200 asked" in report["verdict"]
    assert report["written"]["method"] == "last"
    result = farcast("predict", run, "-H", 200, "-o", tmp_path / "other", "--min-skill", -1, *FAST, expect=4)
    assert "too short to test the one asked" in result.stderr
    for horizon, tested in [(80, True), (100, False)]:
        report = predict_json(farcast, run, "-H", horizon, "-o", tmp_path / f"at-{horizon}", "--fallback")
        plan = report["backtest"]["plan"]
        assert plan["target_step"] - plan["last_step"] == 40 and report["tested"] is tested, (horizon, report["verdict"])


def test_the_loss_is_the_last_number_printed_and_words_are_not_numbers(tmp_path):
    assert EvalCommand("echo eval_loss 0.42 '(info, nano)' # {checkpoint}")(tmp_path) == 0.42
    assert EvalCommand("echo step 300 loss 1.5e-2 # {checkpoint}")(tmp_path) == 0.015


@pytest.mark.parametrize(
    "command, problem",
    [("false", "failed on"), ("true {checkpoint}", "printed no number"), ("echo {checkpoint} loss nan", "a loss must be a finite number")],
)
def test_a_broken_eval_command_is_reported(run_dir, farcast, tmp_path, command, problem):
    result = farcast("predict", run_dir, "-H", 100, "-o", tmp_path / "out", "--eval-cmd", command, *FAST, expect=2)
    assert problem in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".farcast-*"))


def test_a_python_callable_is_an_evaluator(run_dir, tmp_path):
    target = trajectories([2000])[2000]
    seen: list[Path] = []

    def distance(checkpoint: Path) -> float:
        seen.append(checkpoint)
        weights = load_file(checkpoint / "model.safetensors")
        return sum(float((weights[n] - t).abs().sum()) for n, t in target.items())

    report = commands.predict(
        run_dir, tmp_path / "out", horizon=100, settings=FitSettings(sample=2000, max_updates=100),
        options=commands.StreamOptions(quiet=True), evaluation=EvalOptions(distance),
    )  # fmt: skip
    assert report.criterion == "validation loss" and report.loss.chosen.method == "forecast"
    assert len(seen) == report.loss.evaluations and report.loss.cache_hits == 0
    assert report.written_loss == pytest.approx(distance(tmp_path / "out"))


def test_steps_saved_is_signed_and_says_when_it_is_extrapolated():
    curve = [(100, 1.0), (200, 0.8), (300, 0.5)]
    assert step_reaching(curve, 0.65) == pytest.approx(250)
    assert steps_saved(curve, [], 0.65) == (pytest.approx(0.75), False)
    assert steps_saved(curve, [], 0.4) == (1.0, False)
    assert steps_saved(curve, [(50, 1.1), (0, 1.3)], 1.2) == (pytest.approx(-0.375), False)
    assert steps_saved(curve, [], 1.1) == (pytest.approx(-0.25), True)
    assert steps_saved(curve, [(50, 1.1), (0, 1.3)], 5.0) == (-1.0, True)
    assert steps_saved(curve, [(50, 1.1), (-100, 1.3)], 5.0) == (-1.0, False)


@pytest.mark.slow
def test_batch_logs_get_plain_lines(run_dir, farcast, tmp_path, heading_loss):
    result = farcast("predict", run_dir, "-H", 100, "-o", tmp_path / "out", "--eval-cmd", heading_loss, *FAST)
    lines = result.stdout.splitlines()
    assert all(len(line) < 400 and not any(c in line for c in "│━┃─") for line in lines)
    for prefix in (
        "backtest overall: ",
        "loss backtest: ",
        "loss candidate: keep last",
        "loss chosen: ",
        "verdict: By your loss",
        "written: ",
    ):
        assert sum(line.startswith(prefix) for line in lines) == 1, prefix


def test_a_failing_evaluation_ends_the_others_still_running(run_dir, farcast, tmp_path):
    """With two at once, the first evaluation hangs and the second fails: farcast stops at once, and the
    hanging command (and what it started) is ended, not left behind."""
    marks = tmp_path / "marks"
    marks.mkdir()
    command = (
        f"if mkdir {marks}/first 2>/dev/null; then sleep 120 & echo $! > {marks}/sleeping; wait; echo 1; "
        f"else while [ ! -s {marks}/sleeping ]; do sleep 0.1; done; exit 3; fi # {{checkpoint}}"
    )
    started = time.monotonic()
    result = farcast("predict", run_dir, "-H", 100, "-o", tmp_path / "out", "--eval-cmd", command, "--eval-jobs", 2, *FAST, expect=2)
    assert "failed on" in result.stderr and time.monotonic() - started < 60
    sleeping = int((marks / "sleeping").read_text())
    for _ in range(50):
        if not Path(f"/proc/{sleeping}").exists() or "Z" in Path(f"/proc/{sleeping}/stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the hanging eval command's sleep (pid {sleeping}) is still running")
    assert not (tmp_path / "out").exists()

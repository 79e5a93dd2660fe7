"""The candidate registry: a candidate registered in the test itself is scored by both backtests,
reported, rendered, drawn and written, with nothing else changed (forecast/candidates.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import write_run
from rich.console import Console
from safetensors import safe_open
from safetensors.torch import load_file

from farcast_cli import commands
from farcast_cli.evaluate.evaluator import EvalOptions
from farcast_cli.evaluate.plot import plot_data
from farcast_cli.evaluate.render import plain_lines, render
from farcast_cli.evaluate.report import Report
from farcast_cli.forecast.candidates import CANDIDATES, Candidate, register, unregister
from farcast_cli.model.fit import FitSettings
from farcast_cli.model.linear import LinearMap

FIT = FitSettings(sample=2000, max_updates=300)
QUIET = commands.StreamOptions(quiet=True)

RESTART = Candidate(
    key="first",
    label="restart",
    name="restarting from the first checkpoint",
    written="the first checkpoint, unchanged",
    provenance=lambda inputs: "first checkpoint",
    inputs=lambda checkpoints, end: [checkpoints[0]],
    combine=lambda inputs, targets: LinearMap.keep(1, 0, len(targets)),
    most_inputs=1,
)
HALF_LINE = Candidate(
    key="halfway",
    label="half a line",
    name="half a straight line",
    written="half the straight line",
    provenance=lambda inputs: "half a line",
    inputs=lambda checkpoints, end: [checkpoints[end - 1], checkpoints[end]],
    combine=lambda inputs, targets: LinearMap.of([[-0.5] * len(targets), [1.5] * len(targets)], [0.0] * len(targets)),
    most_inputs=2,
)


@pytest.fixture
def two_toys() -> Iterator[None]:
    """Six candidates: more than the backtest's scratch held when it had fixed slots."""
    register(RESTART)
    register(HALF_LINE)
    try:
        yield
    finally:
        unregister(RESTART.key)
        unregister(HALF_LINE.key)
    assert list(CANDIDATES) == ["forecast", "last", "line", "lawa"]


def test_registered_candidates_are_scored_in_the_weight_backtest(tmp_path, two_toys):
    run = write_run(tmp_path / "run", noise=0.001)
    full = commands.predict(run, tmp_path / "full", horizon=40, settings=FIT, options=QUIET)
    sample = commands.predict(
        run, tmp_path / "sample", horizon=40, settings=FIT, options=commands.StreamOptions(backtest="sample", quiet=True)
    )
    plan = full.backtest.plan
    checkpoint = lambda step: load_file(run / f"checkpoint-{step}" / "model.safetensors")  # noqa: E731
    previous, last, truth = checkpoint(plan.line_from_step), checkpoint(plan.last_step), checkpoint(int(plan.target_step))
    halfway = full.backtest.tensors["encoder.weight"].errors["halfway"].mae
    expected = (1.5 * last["encoder.weight"] - 0.5 * previous["encoder.weight"] - truth["encoder.weight"]).abs().mean()
    assert halfway == pytest.approx(float(expected), rel=1e-5)
    for key in CANDIDATES:
        assert full.backtest.overall.errors[key].mae == pytest.approx(sample.backtest.overall.errors[key].mae, rel=1e-5)
    assert set(full.skills) == {"last", "line", "lawa", "first", "halfway"}


def test_a_registered_candidate_is_reported_rendered_and_written(tmp_path, two_toys):
    run = write_run(tmp_path / "run", noise=0.001)
    first = load_file(run / "checkpoint-0" / "model.safetensors")

    def distance_to_first(checkpoint: Path) -> float:
        weights = load_file(checkpoint / "model.safetensors")
        return sum(float((weights[name] - value).abs().sum()) for name, value in first.items() if value.is_floating_point())

    out = tmp_path / "out"
    report = commands.predict(run, out, horizon=40, settings=FIT, options=QUIET, evaluation=EvalOptions(distance_to_first))
    assert {p.method for p in report.loss.points} >= {"first", "halfway"}
    assert report.loss.chosen.method == report.best == "first" and report.beats["first"] is False
    assert report.written.method == "first" and report.written.label == "the first checkpoint, unchanged"
    assert "restarting from the first checkpoint did best" in report.verdict
    written = load_file(out / "model.safetensors")
    assert all(torch.equal(written[name], value) for name, value in first.items())
    with safe_open(out / "model.safetensors", "pt") as handle:
        assert json.loads(handle.metadata()["farcast"])["method"] == "first checkpoint"

    saved = json.loads((out / "farcast_report.json").read_text())
    assert {"skill_vs_first", "skill_vs_halfway", "beats_first", "beats_halfway"} <= set(saved)
    assert saved["backtest"]["overall"]["halfway"]["mae"] == report.backtest.overall.errors["halfway"].mae
    assert json.loads(json.dumps(Report.from_json(saved).to_json())) == saved

    lines = plain_lines(report)
    overall = next(line for line in lines if line.startswith("backtest overall:"))
    assert "mae_first" in overall and "skill_vs_halfway" in overall
    assert any(line.startswith("loss candidate: restart: loss 0,") for line in lines)
    console = Console(record=True, width=250)
    render(report, console)
    table = console.export_text()
    assert "MAE halfway" in table and "skill vs first" in table
    assert "restart" in [candidate["label"] for candidate in plot_data(report)["candidates"]]


def test_the_dry_run_plans_for_every_candidates_inputs(tmp_path):
    run = write_run(tmp_path / "run")
    wide = Candidate(
        key="wide",
        label="average of the last 9",
        name="averaging the last 9 checkpoints",
        written="the average of the last 9 checkpoints",
        provenance=lambda inputs: "average of the last 9",
        inputs=lambda checkpoints, end: list(checkpoints[max(0, end - 8) : end + 1]),
        combine=lambda inputs, targets: LinearMap.of([[1 / len(inputs)] * len(targets)] * len(inputs), [0.0] * len(targets)),
        most_inputs=9,
    )
    plan = lambda: commands.predict(run, tmp_path / "out", horizon=40, settings=FIT, options=QUIET, dry_run=True)  # noqa: E731
    before = plan()
    register(wide)
    try:
        after = plan()
    finally:
        unregister(wide.key)
    assert set(after.backtest_read.read.checkpoints) > set(before.backtest_read.read.checkpoints)
    assert after.memory.read_buffers_bytes > before.memory.read_buffers_bytes


def test_a_candidate_every_report_needs_cannot_be_removed():
    with pytest.raises(ValueError, match="every report needs"):
        unregister("last")
    with pytest.raises(ValueError, match="registered already"):
        register(CANDIDATES["line"])

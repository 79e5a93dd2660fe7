"""`farcast predict`: the forecast checkpoint, its layout, and its report, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FAST, write_run
from safetensors import safe_open
from safetensors.torch import load_file


def read_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def test_forecast_checkpoint_matches_the_last_checkpoint_layout(run_dir, farcast, tmp_path):
    out = tmp_path / "forecast"
    result = farcast("predict", run_dir, "--horizon", 100, "-o", out, *FAST)
    forecast = read_checkpoint(out)
    last = load_file(run_dir / "checkpoint-200" / "model.safetensors")
    assert sorted(forecast) == sorted(last)
    for name, value in last.items():
        assert forecast[name].shape == value.shape and forecast[name].dtype == value.dtype
    assert torch.equal(forecast["position_ids"], last["position_ids"])
    assert torch.equal(forecast["mask"], last["mask"])
    assert not torch.equal(forecast["encoder.weight"], last["encoder.weight"])
    with safe_open(out / "model.safetensors", "pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == "pt"
    assert json.loads(metadata["farcast"])["forecast_step"] == 300 and "stands_for_step" not in json.loads(metadata["farcast"])
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "farcast_report.json", "model.safetensors", "tokenizer.json"]
    assert "wrote" in result.stdout


def test_forecast_moves_weights_towards_the_true_future(tmp_path, farcast):
    """On relaxing trajectories the forecast must land closer to the truth than the last checkpoint."""
    from conftest import trajectories

    steps = list(range(0, 201, 20))
    run = write_run(tmp_path / "run", steps=steps, extras=False)
    farcast("predict", run, "--horizon", 100, "-o", tmp_path / "out", *FAST)
    truth = trajectories([300])[300]
    forecast = read_checkpoint(tmp_path / "out")
    last = load_file(run / "checkpoint-200" / "model.safetensors")
    error = sum((forecast[n] - truth[n]).abs().sum() for n in truth)
    keep_last = sum((last[n] - truth[n]).abs().sum() for n in truth)
    assert error < 0.9 * keep_last


def test_report_compares_with_both_baselines(run_dir, farcast, tmp_path):
    result = farcast("predict", run_dir, "--horizon", 100, "-o", tmp_path / "out", "--json", *FAST)
    report = json.loads(result.stdout)
    assert report == json.loads((tmp_path / "out" / "farcast_report.json").read_text()) | {"output": report["output"]}
    overall = report["backtest"]["overall"]
    assert set(overall) >= {"forecast", "last", "line", "skill_vs_last", "skill_vs_line"}
    assert report["skill_vs_last"] == overall["skill_vs_last"] > 0
    assert report["beats_last"] is True
    assert set(report["backtest"]["tensors"]) == {"encoder.weight", "encoder.bias", "head.weight", "head.bias"}
    assert report["backtest"]["plan"]["target_step"] == 200
    assert report["target_steps"] == [300]


def test_the_report_in_a_batch_log_is_plain_lines_that_say_what_was_measured(run_dir, farcast, tmp_path):
    result = farcast("predict", run_dir, "--horizon", 100, "-o", tmp_path / "out", *FAST)
    lines = result.stdout.splitlines()
    for prefix in (
        "backtest tensor encoder.weight: numel 384,",
        "backtest tensor head.bias: ",
        "backtest overall: ",
        "written: the forecast",
    ):
        assert sum(line.startswith(prefix) for line in lines) == 1, prefix
    verdict = next(line for line in lines if line.startswith("verdict: "))
    assert "In weight error, the forecast beats keeping the last checkpoint" in verdict
    assert "measures weight error, not your loss" in verdict and "--eval-cmd" in verdict


def test_on_a_terminal_the_weight_backtest_is_a_table(run_dir, tmp_path):
    import io

    from rich.console import Console

    from farcast_cli import commands
    from farcast_cli.evaluate.render import render
    from farcast_cli.model.fit import FitSettings

    report = commands.predict(
        run_dir, tmp_path / "out", horizon=100, settings=FitSettings(sample=2000), options=commands.StreamOptions(quiet=True)
    )
    text = io.StringIO()
    render(report, Console(file=text, width=200, force_terminal=True, no_color=True))
    table = [line for line in text.getvalue().splitlines() if "encoder.weight" in line]
    assert len(table) == 1 and "│" in table[0] and f"{report.backtest.tensors['encoder.weight'].skills['last']:+.3f}" in table[0]
    assert "skill vs last" in text.getvalue() and "verdict: In weight error" in text.getvalue()


def test_losing_forecast_says_so_plainly(tmp_path, farcast):
    """A run that turns back: the trend of its history points the wrong way at the end."""
    steps = list(range(0, 201, 20))
    base = torch.randn(24, 16, generator=torch.Generator().manual_seed(3))
    weights = {s: {"encoder.weight": base * (1 + (s / 100) - (s / 100) ** 2 * 0.5)} for s in steps}
    run = write_run(tmp_path / "run", steps=steps, weights=weights, extras=False)
    result = farcast("predict", run, "--horizon", 200, "-o", tmp_path / "out", "--json", *FAST)
    report = json.loads(result.stdout)
    assert report["beats_last"] is False
    assert "does NOT beat keeping the last checkpoint" in report["verdict"]


def test_min_skill_exits_4_and_writes_nothing(run_dir, farcast, tmp_path):
    result = farcast("predict", run_dir, "--horizon", 100, "-o", tmp_path / "out", "--min-skill", 0.999, *FAST, expect=4)
    assert "below --min-skill 0.999" in result.stderr
    assert not (tmp_path / "out").exists()
    assert "skill_vs_last" in result.stdout and "verdict: " in result.stdout


def test_plain_file_layout(tmp_path, farcast):
    run = write_run(tmp_path / "run", layout="files")
    farcast("predict", run, "--horizon", 60, "-o", tmp_path / "out", *FAST)
    forecast = read_checkpoint(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["farcast_report.json", "model.safetensors"]
    assert forecast["encoder.weight"].shape == (24, 16)


def test_sharded_input_gives_the_same_shards_and_index(tmp_path, farcast):
    run = write_run(tmp_path / "run", shards=3)
    out = tmp_path / "out"
    farcast("predict", run, "--horizon", 60, "-o", out, *FAST)
    source = run / "checkpoint-200"
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in source.glob("*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in read_checkpoint(out).values())
    for shard in source.glob("*.safetensors"):
        assert sorted(load_file(out / shard.name)) == sorted(load_file(shard))


def test_bf16_input_stays_bf16_and_the_report_names_the_rounding_floor(tmp_path, farcast):
    run = write_run(tmp_path / "run", dtype=torch.bfloat16)
    result = farcast("predict", run, "--horizon", 60, "-o", tmp_path / "out", "--json", *FAST)
    assert read_checkpoint(tmp_path / "out")["encoder.weight"].dtype == torch.bfloat16
    assert any("BF16" in note and "2^-8" in note for note in json.loads(result.stdout)["notes"])


def test_dtype_option_converts_forecast_tensors_only(run_dir, farcast, tmp_path):
    farcast("predict", run_dir, "--horizon", 60, "-o", tmp_path / "out", "--dtype", "bf16", *FAST)
    forecast = read_checkpoint(tmp_path / "out")
    assert forecast["encoder.weight"].dtype == torch.bfloat16
    assert forecast["position_ids"].dtype == torch.int64


def test_emit_writes_one_checkpoint_per_step(run_dir, farcast, tmp_path):
    out = tmp_path / "out"
    result = farcast("predict", run_dir, "--horizon", 100, "--emit", 50, "--emit", 25, "-o", out, "--json", *FAST)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-225", "checkpoint-250", "checkpoint-300", "farcast_report.json"]
    assert json.loads(result.stdout)["target_steps"] == [225, 250, 300]
    near, far = read_checkpoint(out / "checkpoint-225"), read_checkpoint(out / "checkpoint-300")
    last = load_file(run_dir / "checkpoint-200" / "model.safetensors")
    step_near = (near["encoder.weight"] - last["encoder.weight"]).abs().mean()
    step_far = (far["encoder.weight"] - last["encoder.weight"]).abs().mean()
    assert 0 < step_near < step_far


def test_same_seed_gives_identical_bytes_and_chunking_does_not_change_them(run_dir, farcast, tmp_path):
    farcast("predict", run_dir, "--horizon", 100, "-o", tmp_path / "a", *FAST)
    farcast("predict", run_dir, "--horizon", 100, "-o", tmp_path / "b", "--max-memory", "1KB", *FAST)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_sample_backtest_is_close_to_the_full_one(run_dir, farcast, tmp_path):
    full = json.loads(farcast("predict", run_dir, "-H", 100, "-o", tmp_path / "a", "--json", *FAST).stdout)
    quick = json.loads(farcast("predict", run_dir, "-H", 100, "-o", tmp_path / "b", "--json", "--backtest", "sample", *FAST).stdout)
    assert quick["backtest"]["scope"].endswith("sampled coordinates")
    assert quick["skill_vs_last"] == pytest.approx(full["skill_vs_last"], abs=0.05)


def test_python_api_returns_the_report(run_dir, tmp_path):
    from farcast_cli import commands as pipeline
    from farcast_cli.model.fit import FitSettings

    report = pipeline.predict(
        run_dir, tmp_path / "out", horizon=100, settings=FitSettings(sample=2000), options=pipeline.StreamOptions(quiet=True)
    ).to_json()
    assert report["output"] == [str(tmp_path / "out")]
    assert report["backtest"]["overall"]["numel"] == 24 * 16 + 24 + 4 * 24 + 4


@pytest.mark.slow
def test_python_module_entry_point(run_dir):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "farcast_cli", "inspect", str(run_dir)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "checkpoints: 11 checkpoints, steps 0..200 every 20 (--all lists them)" in result.stdout
    assert "parameters: 523 (508 forecast)" in result.stdout


def turning_run(root: Path) -> Path:
    """A run that turns back: the trend of its history points the wrong way at the end."""
    steps = list(range(0, 201, 20))
    base = torch.randn(24, 16, generator=torch.Generator().manual_seed(3))
    weights = {s: {"encoder.weight": base * (1 + (s / 100) - (s / 100) ** 2 * 0.5)} for s in steps}
    return write_run(root, steps=steps, weights=weights, extras=False)


def test_fallback_writes_the_candidate_that_won_the_backtest(tmp_path, farcast):
    run = turning_run(tmp_path / "run")
    report = json.loads(farcast("predict", run, "-H", 200, "-o", tmp_path / "out", "--fallback", "--json", *FAST).stdout)
    assert report["beats_last"] is False
    best = report["best"]
    overall = report["backtest"]["overall"]
    assert best != "forecast" and overall[best]["mae"] == min(overall[m]["mae"] for m in ("forecast", "last", "line", "lawa"))
    assert report["written"]["method"] == best and "so --fallback writes it instead of the forecast" in report["written"]["why"]
    checkpoint = {s: load_file(run / f"checkpoint-{s}" / "model.safetensors")["encoder.weight"] for s in (120, 140, 160, 180, 200)}
    expected = {
        "last": checkpoint[200],
        "line": checkpoint[200] + (checkpoint[200] - checkpoint[180]) * 200 / 20,
        "lawa": sum(checkpoint.values()) / 5,
    }
    labels = {"last": "keep last", "line": "straight line", "lawa": "average of the last 5"}
    assert torch.allclose(read_checkpoint(tmp_path / "out")["encoder.weight"], expected[best], atol=1e-5)
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as handle:
        entry = json.loads(handle.metadata()["farcast"])
    assert entry["method"] == labels[best] and entry["stands_for_step"] == 400 and "forecast_step" not in entry
    assert report["written"]["label"] != "the forecast" and report["written"]["from_steps"] == entry["from_steps"]


def test_without_fallback_the_losing_forecast_is_still_written_and_labelled(tmp_path, farcast):
    run = turning_run(tmp_path / "run")
    report = json.loads(farcast("predict", run, "-H", 200, "-o", tmp_path / "out", "--json", *FAST).stdout)
    assert report["written"]["method"] == "forecast"
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as handle:
        assert json.loads(handle.metadata()["farcast"])["method"] == "farcast"


def test_fallback_keeps_a_winning_forecast(run_dir, farcast, tmp_path):
    report = json.loads(farcast("predict", run_dir, "-H", 100, "-o", tmp_path / "out", "--fallback", "--json", *FAST).stdout)
    assert report["beats_last"] is True and report["best"] == "forecast"
    assert report["written"]["method"] == "forecast"


def test_report_scores_the_average_of_the_last_checkpoints(run_dir, farcast, tmp_path):
    report = json.loads(farcast("predict", run_dir, "-H", 100, "-o", tmp_path / "out", "--json", *FAST).stdout)
    overall = report["backtest"]["overall"]
    assert overall["skill_vs_lawa"] == pytest.approx(1 - overall["forecast"]["mae"] / overall["lawa"]["mae"])
    assert overall["lawa"]["mae"] > overall["last"]["mae"]

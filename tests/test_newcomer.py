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


def test_plot_png_and_svg_draw_the_reports_own_numbers(run_dir, farcast, tmp_path):
    from xml.etree import ElementTree

    from farcast_cli.evaluate.plot import plot_data
    from farcast_cli.evaluate.report import Report

    report = json.loads(
        farcast("predict", run_dir, "-H", 100, "-o", tmp_path / "out", "--plot", tmp_path / "p.png", "--json", "--quiet").stdout
    )
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    farcast("predict", run_dir, "-H", 100, "-o", tmp_path / "out2", "--plot", tmp_path / "plots" / "p.svg", "--quiet")
    assert ElementTree.parse(tmp_path / "plots" / "p.svg").getroot().tag.endswith("svg")
    assert len(report["trajectories"]) == 9 and {t["tensor"] for t in report["trajectories"]} == {
        "encoder.weight",
        "head.weight",
        "encoder.bias",
    }
    saved = json.loads((tmp_path / "out" / "farcast_report.json").read_text())
    data = plot_data(Report.from_json(saved))
    assert data["trajectories"] == saved["trajectories"]
    assert data["skills"] == {name: table["skill_vs_last"] for name, table in saved["backtest"]["tensors"].items()}
    first = saved["trajectories"][0]
    assert first["values"][-1] != first["forecast"]["values"][0] and first["backtest"]["target_step"] == 200
    assert Report.from_json(saved).to_json() == saved


def test_plot_refuses_a_file_it_cannot_draw_before_any_work(run_dir, farcast, tmp_path):
    result = farcast("predict", run_dir, "-H", 100, "-o", tmp_path / "out", "--plot", tmp_path / "p.jpg", expect=2)
    assert "--plot" in result.stderr and ".png or .svg" in result.stderr and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_matplotlib_is_imported_only_for_a_plot(run_dir, tmp_path):
    import subprocess
    import sys

    script = (
        "import sys\nfrom farcast_cli.cli import main\n"
        f"sys.argv = ['farcast', 'predict', {str(run_dir)!r}, '-H', '100', '-o', {str(tmp_path / 'out')!r}, '--quiet']\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
        "print('matplotlib' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "False"

"""What a user meets in a terminal and in a batch job: a run folder left by a killed job, the report at 80
columns and in a log, exit codes a script can trust, one-line messages, and how to install."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST, write_run

README = Path(__file__).resolve().parent.parent / "README.md"


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def warnings_about(stderr: str, folder: Path) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("farcast: warning: ") and str(folder) in line]


def test_incomplete_newest_checkpoints_are_skipped_each_with_a_warning_and_in_the_report(tmp_path, farcast):
    run = write_run(tmp_path / "run", steps=list(range(0, 181, 20)))
    sharded = write_run(tmp_path / "sharded", steps=[200], shards=2)
    truncate(run / "checkpoint-180" / "model.safetensors")
    (run / "checkpoint-200").mkdir()
    (sharded / "checkpoint-200" / "model-00002-of-00002.safetensors").unlink()
    (sharded / "checkpoint-200").rename(run / "checkpoint-220")
    report = json.loads(farcast("predict", run, "-H", 40, "-o", tmp_path / "out", "--json", *FAST).stdout)
    assert report["steps"][-1] == 160
    why = {
        "checkpoint-180": "data runs to byte",
        "checkpoint-200": "no model.safetensors and no model.safetensors.index.json",
        "checkpoint-220": "names shard model-00002-of-00002.safetensors which does not exist",
    }
    assert [Path(s["path"]).name for s in report["skipped_checkpoints"]] == list(why)
    result = farcast("inspect", run)
    for name, problem in why.items():
        (line,) = warnings_about(result.stderr, run / name)
        assert "incomplete" in line and problem in line
    assert "`skipped_checkpoints`" in README.read_text()


def test_last_step_reads_no_later_checkpoint_and_a_damaged_one_between_stops_unless_skipped(tmp_path, farcast):
    run = write_run(tmp_path / "run")
    truncate(run / "checkpoint-160" / "model.safetensors")
    report = json.loads(farcast("predict", run, "-H", 40, "-o", tmp_path / "early", "--last-step", 140, "--json", *FAST).stdout)
    assert report["steps"][-1] == 140 and report["skipped_checkpoints"] == [] and report["warnings"] == []

    stopped = farcast("predict", run, "-H", 40, "-o", tmp_path / "out", *FAST, expect=3)
    (line,) = stopped.stderr.strip().splitlines()
    assert line.startswith(f"farcast: error: {run / 'checkpoint-160' / 'model.safetensors'}: ")
    assert "between complete checkpoints" in line and "--skip-damaged" in line
    assert not (tmp_path / "out").exists()

    skipped = farcast("predict", run, "-H", 40, "-o", tmp_path / "out", "--skip-damaged", "--json", *FAST)
    report = json.loads(skipped.stdout)
    assert 160 not in report["steps"] and report["steps"][-1] == 200
    assert [Path(s["path"]).name for s in report["skipped_checkpoints"]] == ["checkpoint-160"]
    assert len(warnings_about(skipped.stderr, run / "checkpoint-160")) == 1


def transformer_run(root: Path, layers: int = 4, width: int = 16) -> Path:
    """A run whose tensors are named like a GPT-2 model's (52 of them, 15 shown in a table)."""
    shapes = {"transformer.wte.weight": (96, width), "transformer.wpe.weight": (32, width)}
    for i in range(layers):
        for part, shape in {"ln_1": (width,), "attn.c_attn": (width, 3 * width), "attn.c_proj": (width, width), "ln_2": (width,),
                            "mlp.c_fc": (width, 4 * width), "mlp.c_proj": (4 * width, width)}.items():  # fmt: skip
            shapes[f"transformer.h.{i}.{part}.weight"] = shape
            shapes[f"transformer.h.{i}.{part}.bias"] = shape[-1:]
    shapes.update({"transformer.ln_f.weight": (width,), "transformer.ln_f.bias": (width,)})
    generator = torch.Generator().manual_seed(0)
    ends = {name: (torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)) for name, shape in shapes.items()}
    steps = list(range(0, 201, 20))
    weights = {t: {name: b + (a - b) * (0.99**t) for name, (a, b) in ends.items()} for t in steps}
    return write_run(root, steps, weights=weights, extras=False)


def on_a_terminal(command: list[str], columns: int) -> str:
    """stdout of a command run with a real terminal (a pty) of this width."""
    leader, follower = pty.openpty()
    environment = {**os.environ, "COLUMNS": str(columns)}
    process = subprocess.Popen([str(part) for part in command], stdout=follower, stderr=subprocess.PIPE, env=environment)
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 1 << 16)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    assert process.wait(timeout=300) == 0, process.stderr.read()
    return re.sub(r"\x1b\[[0-9;]*m", "", output.decode()).replace("\r\n", "\n")


@pytest.mark.slow
@pytest.mark.parametrize("columns", [80, 120])
def test_the_terminal_table_fits_the_width_with_whole_numbers_and_readable_names(tmp_path, columns):
    run, out = transformer_run(tmp_path / "run"), tmp_path / "out"
    shown = on_a_terminal([sys.executable, "-m", "farcast_cli", "predict", run, "-H", 40, "-o", out, *FAST], columns)
    report = json.loads((out / "farcast_report.json").read_text())
    table = [line for line in shown.splitlines() if line[:1] in "┏┃┡│└"]
    assert table and all(len(line) <= columns for line in table), "\n".join(table)
    assert "backtest table: tensor names without their common prefix 'transformer.'" in shown
    assert "h.0.mlp.c_fc.weight" in shown and "tran…" not in shown and "transfor…" not in shown
    overall = next(line for line in table if "overall" in line)
    assert f"{report['backtest']['overall']['forecast']['mae']:.3e}" in overall and f"{report['skill_vs_last']:+.3f}" in overall
    assert "... 37 more in the JSON report" in shown.splitlines()
    assert ("left out to fit: MAE lawa" in shown) == (columns < 140)


def test_a_batch_log_says_how_many_tensors_it_left_out(tmp_path, farcast):
    result = farcast("predict", transformer_run(tmp_path / "run"), "-H", 40, "-o", tmp_path / "out", *FAST)
    assert "backtest tensors: ... 37 more in the JSON report" in result.stdout.splitlines()
    assert len([line for line in result.stdout.splitlines() if line.startswith("backtest tensor ")]) == 15


def test_outputs_inside_the_run_and_dry_runs_onto_an_existing_output_exit_5(run_dir, farcast, tmp_path):
    inside = farcast("predict", run_dir, "-H", 40, "-o", run_dir / "forecast-inside", *FAST, expect=5)
    assert f"{run_dir / 'forecast-inside'}: lies inside the run folder" in inside.stderr and not (run_dir / "forecast-inside").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    dry = farcast("predict", run_dir, "-H", 40, "-o", existing, "--dry-run", expect=5)
    assert dry.stderr.strip() == f"farcast: error: {existing}: already exists; choose a new folder or pass --force to replace it"
    assert "write:" not in dry.stdout
    farcast("predict", run_dir, "-H", 40, "-o", existing, "--dry-run", "--force")
    farcast("predict", run_dir, "-H", 40, "-o", run_dir / "inside", "--dry-run", expect=5)


def test_schedule_without_resumable_is_refused(run_dir, farcast, tmp_path):
    result = farcast("predict", run_dir, "-H", 40, "-o", tmp_path / "out", "--schedule", "keep", *FAST, expect=2)
    assert result.stderr.strip() == (
        "farcast: error: --schedule keep applies only to a --resumable output; add --resumable or drop --schedule"
    )


@pytest.mark.parametrize(
    "args, problem",
    [
        (["predict", "RUN", "-H", "abc", "-o", "out"], "Invalid value for '--horizon' / '-H'"),
        (["predict", "RUN", "-H", "40"], "Missing option '--output' / '-o'"),
        (["predcit", "RUN"], "No such command 'predcit'. Did you mean 'predict'?"),
    ],
)
def test_usage_errors_are_one_line(run_dir, farcast, args, problem):
    result = farcast(*[run_dir if a == "RUN" else a for a in args], expect=2)
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"farcast: error: {problem}") and line.endswith("--help)")


@pytest.mark.parametrize("command", [[], ["predict"], ["fit"], ["inspect"]])
def test_help_shows_no_bool_type_and_names_arguments_plainly(farcast, command):
    shown = farcast(*command, "--help").stdout
    assert "<bool>" not in shown and "{run_dir}" not in shown
    assert "[OPTIONS] RUN_DIR" in shown if command else "[OPTIONS] COMMAND" in shown


def test_a_batch_log_shows_each_phase_as_it_starts(run_dir, farcast, tmp_path):
    result = farcast("predict", run_dir, "-H", 40, "-o", tmp_path / "out", "--sample", 2000)
    phases = [line.split(":")[1].strip() for line in result.stderr.splitlines() if line.startswith("farcast: ")]
    assert phases == ["sampling", "fitting", "backtest", "writing"], result.stderr


def test_readme_says_what_a_cpu_only_and_a_gpu_user_install():
    install = README.read_text().split("## A first run")[0]
    assert "--index-url https://download.pytorch.org/whl/cpu" in install
    assert "GPU node" in install

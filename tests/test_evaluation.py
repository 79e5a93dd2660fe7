"""--eval-cmd: the steps-saved view of the backtest, scored by the user's own command."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import FAST, trajectories
from safetensors.torch import save_file

from farcast_cli.evaluate.loss import step_reaching

EVAL_SCRIPT = """
import sys
from pathlib import Path
from safetensors.torch import load_file
folder = Path(sys.argv[1])
weights = {}
for file in folder.glob("*.safetensors"):
    weights.update(load_file(file))
target = load_file(sys.argv[2])
print("loss:", sum(float((weights[n].float() - t).abs().sum()) for n, t in target.items()))
"""


@pytest.fixture
def distance_eval(tmp_path: Path) -> str:
    """A 'loss' that falls as the weights approach where the run is heading (their step-2000 values)."""
    script = tmp_path / "eval.py"
    script.write_text(EVAL_SCRIPT)
    save_file(trajectories([2000])[2000], tmp_path / "target.safetensors")
    return f"{sys.executable} {script} {{checkpoint}} {tmp_path / 'target.safetensors'}"


def test_steps_saved_in_the_backtest(run_dir, farcast, tmp_path, distance_eval):
    report = json.loads(farcast("predict", run_dir, "-H", 100, "-o", tmp_path / "out", "--eval-cmd", distance_eval, "--json", *FAST).stdout)
    evaluation = report["backtest"]["eval"]
    steps = [step for step, _ in evaluation["curve"]]
    assert steps == [140, 160, 180, 200]
    losses = [loss for _, loss in evaluation["curve"]]
    assert losses == sorted(losses, reverse=True)
    assert evaluation["steps_saved"]["last"] == 0.0
    assert evaluation["steps_saved"]["forecast"] > 0.2
    assert report["written_loss"] < report["last_checkpoint_loss"]
    assert not list(tmp_path.glob(".farcast-eval-*"))


def test_steps_saved_in_a_reference_fit(tmp_path, farcast, distance_eval):
    from conftest import write_run

    reference = write_run(tmp_path / "reference", steps=list(range(0, 301, 20)))
    report = json.loads(
        farcast(
            "fit", reference, "--context-end", 100, "-H", 200, "-o", tmp_path / "f.json", "--eval-cmd", distance_eval, "--json", *FAST
        ).stdout
    )
    evaluation = report["backtest"]["eval"]
    assert evaluation["curve"][0][0] == 100 and evaluation["curve"][-1][0] == 300
    assert evaluation["steps_saved"]["forecast"] > evaluation["steps_saved"]["last"] == 0.0


@pytest.mark.parametrize("command, problem", [("false", "failed on"), ("true {checkpoint}", "printed no number")])
def test_a_broken_eval_command_is_reported(run_dir, farcast, tmp_path, command, problem):
    result = farcast("predict", run_dir, "-H", 100, "-o", tmp_path / "out", "--eval-cmd", command, *FAST, expect=2)
    assert problem in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".farcast-*"))


def test_step_reaching_interpolates_along_the_curve():
    curve = [(100, 1.0), (200, 0.8), (300, 0.5)]
    assert step_reaching(curve, 0.65) == pytest.approx(250)
    assert step_reaching(curve, 1.2) == 100
    assert step_reaching(curve, 0.4) is None

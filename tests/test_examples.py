"""The examples run as users run them: the batch job that alternates training and resumable forecasts, for
a plain PyTorch script and for transformers.Trainer, and both scripts farcasting in-process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from farcast_cli.io.run import find_run

pytestmark = pytest.mark.slow  # each test runs a training script in a fresh process

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def job(script: str, run: Path, total: int, every: int, horizon: int) -> subprocess.CompletedProcess:
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable}
    command = ["bash", str(EXAMPLES / "farcast_job.sh"), str(EXAMPLES / script), str(run), str(total), str(every), str(horizon)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def decisions(output: str) -> dict[int, bool]:
    """Step -> whether the job resumed from a forecast there, from the job's own lines."""
    lines = [line.split() for line in output.splitlines() if line.startswith("step ")]
    return {int(words[1].rstrip(":")): words[2] == "resuming" for words in lines}


def check_decisions_match_the_run(run: Path, made: dict[int, bool], horizon: int) -> None:
    """A jump leaves a resumable forecast folder the trainer resumed from; a skip leaves none, and the
    report in the job's log says the forecast did not beat the last checkpoint."""
    found = find_run(run)
    assert sorted(c.saved_step for c in found.forecasts) == sorted(step + horizon for step, jumped in made.items() if jumped)
    for step, jumped in made.items():
        log = (run / f"farcast-at-{step}.log").read_text()
        assert "verdict: " in log and (("written: the forecast" in log) == jumped)
    for forecast in found.forecasts:
        state = json.loads((forecast.path / "trainer_state.json").read_text())
        assert state["global_step"] == forecast.saved_step and "farcast" in state["log_history"][-1]
        assert (forecast.path / "optimizer.pt").read_bytes() == (
            run / f"checkpoint-{forecast.saved_step - horizon}" / "optimizer.pt"
        ).read_bytes()


def test_the_batch_job_resumes_a_pytorch_loop_from_its_forecasts(tmp_path):
    run = tmp_path / "run"
    done = job("pytorch/train.py", run, 120, 40, 20)
    assert done.returncode == 0, done.stderr
    made = decisions(done.stdout)
    assert sorted(made)[0] == 40 and len(made) == 2
    check_decisions_match_the_run(run, made, 20)
    found = find_run(run)
    assert max(c.saved_step for c in found.checkpoints + found.forecasts) == 120


def test_the_batch_job_with_the_trainer(tmp_path):
    pytest.importorskip("transformers")
    run = tmp_path / "run"
    done = job("trainer/train.py", run, 60, 20, 10)
    assert done.returncode == 0, done.stderr
    made = decisions(done.stdout)
    assert list(made) == [40], "the Trainer saves no step 0: the first farcast needs checkpoints 20, 30 and 40"
    check_decisions_match_the_run(run, made, 10)
    found = find_run(run)
    assert max(c.saved_step for c in found.checkpoints + found.forecasts) == 60


@pytest.mark.parametrize("script, first_checkpoint", [("pytorch/train.py", 0), ("trainer/train.py", 10)])
def test_the_scripts_farcast_in_process(tmp_path, script, first_checkpoint):
    if script.startswith("trainer"):
        pytest.importorskip("transformers")
    run = tmp_path / "run"
    command = [sys.executable, str(EXAMPLES / script), "--run", str(run), "--stop-at", "60", "--farcast-every", "30"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    found = find_run(run)
    assert found.last.saved_step == 60 and [j.at_step for j in found.jumps] == sorted({j.at_step for j in found.jumps})
    decided = re.findall(r"farcast at step (\d+): (made|skipped) a jump", done.stderr)
    assert [int(step) for step, _ in decided] == [30, 60], done.stderr
    assert [j.at_step for j in found.jumps] == [int(step) for step, what in decided if what == "made"]
    for jump in found.jumps:
        assert jump.at_step in (30, 60)
        before = sum(j.horizon for j in found.jumps if j.at_step < jump.at_step)
        assert jump.horizon == round(0.5 * (jump.at_step + before - first_checkpoint))

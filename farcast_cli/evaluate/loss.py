"""Steps saved: score checkpoints with the user's own evaluation command, and read the loss curve.

`--eval-cmd 'python eval.py {checkpoint}'` must print a loss (the last number on its stdout).
In the backtest, the true run's checkpoints across the held-out jump give the loss curve; a
candidate's loss L then maps to the first step at which the true run reached L. Steps saved is
that step minus the cut, as a fraction of the jump: 0 is no better than keeping the last
checkpoint, 1 is as good as training the whole jump.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from farcast_cli.errors import UsageError
from farcast_cli.forecast.candidates import Combination
from farcast_cli.forecast.write import write_forecast
from farcast_cli.io.engine import EngineSettings
from farcast_cli.io.run import Run

NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
EVAL_TIMEOUT_SECONDS = 3600


def run_eval_command(template: str, checkpoint: Path) -> float:
    """Run the user's command on one checkpoint folder and read the last number it prints."""
    quoted = shlex.quote(str(checkpoint))
    command = template.replace("{checkpoint}", quoted) if "{checkpoint}" in template else f"{template} {quoted}"
    try:
        done = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=EVAL_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        raise UsageError(f"--eval-cmd took over {EVAL_TIMEOUT_SECONDS} s on {checkpoint}") from None
    if done.returncode != 0:
        last_line = (done.stderr.strip().splitlines() or ["no message"])[-1][:200]
        raise UsageError(f"--eval-cmd failed on {checkpoint} (exit {done.returncode}): {last_line}")
    numbers = NUMBER.findall(done.stdout)
    if not numbers:
        raise UsageError(f"--eval-cmd printed no number for {checkpoint}; it must print the loss")
    return float(numbers[-1])


def step_reaching(curve: list[tuple[int, float]], loss: float) -> float | None:
    """The first step at which the loss curve reaches `loss` (linear between checkpoints), or None."""
    for (step_a, loss_a), (step_b, loss_b) in zip(curve, curve[1:]):
        if loss_a <= loss:
            return float(step_a)
        if loss_b <= loss:
            return step_a + (step_b - step_a) * (loss_a - loss) / (loss_a - loss_b)
    return float(curve[0][0]) if curve and curve[0][1] <= loss else None


def steps_saved(
    run: Run,
    cut: int,
    backtest_candidates: dict[str, Combination],
    template: str,
    scratch_parent: Path,
    settings: Callable[[], EngineSettings],
) -> dict:
    """Loss of each backtest candidate and of the true checkpoints from the cut to the last; steps saved."""
    curve = [(checkpoint.step, run_eval_command(template, checkpoint.path)) for checkpoint in run.checkpoints[cut:]]
    start, end = curve[0][0], curve[-1][0]
    losses = {"last": curve[0][1]}
    with tempfile.TemporaryDirectory(prefix=".farcast-eval-", dir=scratch_parent) as scratch:
        for method in ("forecast", "line", "lawa"):
            folder = Path(scratch) / method
            folder.mkdir()
            write_forecast(backtest_candidates[method], run.checkpoints[cut], folder, settings())
            losses[method] = run_eval_command(template, folder)
    saved = {}
    for method, loss in losses.items():
        reached = step_reaching(curve, loss)
        saved[method] = 1.0 if reached is None else (reached - start) / (end - start)
    return {
        "command": template,
        "curve": curve,
        "losses": losses,
        "steps_saved": saved,
        "beyond_target": [m for m, loss in losses.items() if loss < min(value for _, value in curve)],
    }

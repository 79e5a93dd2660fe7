"""A training loop that farcasts as it goes: `Farcaster.step(model, step)` after each checkpoint save.

Every `every` real steps it forecasts `jump` times the steps elapsed (on the run's time axis) past the
newest checkpoint, through the same pipeline as `farcast predict` (streamed, backtested; by the user's
loss when an evaluator is given). Where the backtest says the forecast beats keeping the last checkpoint,
it copies the forecast into the model's parameters in place (no new tensors on the device), keeps the
optimizer state, optionally moves the learning-rate schedule on, and records the jump in the run folder
so that later checkpoints are read at their forecast-time step. A jump the backtest says loses is skipped.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from farcast_cli import commands
from farcast_cli.errors import FarcastError, UsageError
from farcast_cli.evaluate.evaluator import EvalCommand, EvalOptions
from farcast_cli.evaluate.report import Report
from farcast_cli.io.output import RUN_SCRATCH as SCRATCH
from farcast_cli.io.run import Jump, find_run, record_jump
from farcast_cli.model.fit import FitSettings

log = logging.getLogger("farcast")


@dataclass(frozen=True)
class JumpResult:
    """One farcast inside the loop: at which global step, how far, whether the weights were replaced, and why."""

    step: int
    horizon: int
    applied: bool
    why: str
    seconds: float
    report: Report | None


class Farcaster:
    """Farcast a run every `every` steps by `jump` x its elapsed steps (see the module docstring).

    `evaluator`: a callable taking a checkpoint folder and returning its loss, or an eval command with
    {checkpoint}; None decides by weight error. `schedule`: "keep" leaves the learning-rate scheduler
    alone; "advance" steps it on by the horizon. `gate=False` applies every forecast, winning or not."""

    def __init__(
        self,
        run_dir: Path,
        every: int = 200,
        jump: float = 0.5,
        evaluator: Callable[[Path], float] | str | None = None,
        schedule: str = "keep",
        gate: bool = True,
        min_checkpoints: int = 3,
        settings: FitSettings = FitSettings(),
        device: str = "cpu",
        eval_jobs: int = 1,
        quiet: bool = True,
    ) -> None:
        if schedule not in ("keep", "advance"):
            raise UsageError(f"schedule must be keep or advance, not {schedule!r}")
        if every < 1 or jump <= 0:
            raise UsageError("every must be a positive number of steps and jump a positive fraction")
        self.run_dir, self.every, self.jump, self.schedule, self.gate = Path(run_dir), every, jump, schedule, gate
        self.min_checkpoints, self.settings = max(3, min_checkpoints), settings
        self.evaluation = EvalOptions(EvalCommand(evaluator) if isinstance(evaluator, str) else evaluator, eval_jobs)
        self.options = commands.StreamOptions(device=device, quiet=quiet)
        self.last_attempt: int | None = None
        self.history: list[JumpResult] = []

    def due(self, step: int) -> bool:
        return step >= self.every and (self.last_attempt is None or step - self.last_attempt >= self.every)

    def step(self, model: torch.nn.Module, step: int, lr_scheduler=None) -> JumpResult | None:
        """Call after saving the checkpoint of global step `step`; returns what was done, None when not due."""
        if not self.due(step):
            return None
        started = time.perf_counter()
        out = self.run_dir / SCRATCH / f"forecast-{step}"
        horizon, report, failed = 0, None, False
        try:
            run = find_run(self.run_dir)
            if len(run.checkpoints) < self.min_checkpoints:
                return None
            self.last_attempt = step
            horizon = max(1, round(self.jump * (run.last.step - run.steps[0])))
            report = commands.predict(
                self.run_dir, out, horizon=horizon, settings=self.settings, options=self.options, evaluation=self.evaluation,
                fallback=False, force=True,
            )  # fmt: skip
            applied, why = self._verdict(report)
            if applied:
                load_into(model, out)
                self._advance(lr_scheduler, horizon)
                record_jump(self.run_dir, Jump(step, horizon))
        except FarcastError as error:
            self.last_attempt = step
            applied, why, failed = False, f"farcast failed, training goes on: {error}", True
        finally:
            shutil.rmtree(out, ignore_errors=True)
        result = JumpResult(step, horizon, applied, why, time.perf_counter() - started, report)
        self.history.append(result)
        level = logging.WARNING if failed else logging.INFO
        log.log(level, "farcast at step %d: %s a jump of %d steps (%s)", step, "made" if applied else "skipped", horizon, why)
        return result

    def _verdict(self, report: Report) -> tuple[bool, str]:
        if not self.gate:
            return True, "applied without a gate"
        if report.tested is False:
            return False, "the history cannot test a jump this long"
        if report.beats_last:
            return True, f"the forecast beat keeping the last checkpoint by {report.criterion}"
        return False, f"the forecast did not beat keeping the last checkpoint by {report.criterion}"

    def _advance(self, lr_scheduler, horizon: int) -> None:
        if self.schedule == "advance" and lr_scheduler is not None:
            for _ in range(horizon):
                lr_scheduler.step()


def load_into(model: torch.nn.Module, folder: Path) -> None:
    """Copy a checkpoint's tensors into the model's parameters and buffers of the same names, in place,
    one tensor at a time (onto the model's device, in its dtype)."""
    state = model.state_dict(keep_vars=True)
    files = sorted(Path(folder).glob("*.safetensors"))
    names = {}
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as handle:
            names[file] = list(handle.keys())  # noqa: SIM118 (safe_open is not iterable)
    unknown = [name for found in names.values() for name in found if name not in state]
    if unknown:
        raise UsageError(f"{folder}: tensors {unknown[:3]} are not in the model being trained; is this its run?")
    with torch.no_grad():
        for file, found in names.items():
            with safe_open(file, framework="pt", device="cpu") as handle:
                for name in found:
                    state[name].copy_(handle.get_tensor(name))

"""A training loop that farcasts as it goes: `Farcaster.step(model, step)` after each checkpoint save.

Every `every` real steps it forecasts `jump` times the steps elapsed (on the run's time axis) past the
newest observation, and where the forecast wins it replaces the model's weights in place (no new tensors
on the device), keeps the optimizer state, optionally moves the learning-rate schedule on, and records
the jump in the run folder so that later checkpoints are read at their forecast-time step. A jump that
loses is not made.

Two sources of history. `source="memory"` (the default, integrations/memory.py): the model is observed at
every call (a sample of its coordinates, and its first weights whole), fitted with the fit `farcast
predict` uses, gated by the weight backtest on the sample or verified by the user's `loss_fn(model)`
before and after the jump, and applied tensor by tensor; nothing is read back or written but the jump
record. `source="run"`: the whole `farcast predict` pipeline through the run's checkpoints on disk
(streamed, backtested on every coordinate, by the user's `evaluator` of a checkpoint folder when given).
Under DDP, with either source, rank 0 decides and jumps and every rank gets its weights (memory.py).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from farcast_cli import commands
from farcast_cli.errors import FarcastError, UsageError
from farcast_cli.evaluate.evaluator import EvalCommand, EvalOptions
from farcast_cli.evaluate.report import Report
from farcast_cli.forecast.candidates import REFERENCE
from farcast_cli.integrations import memory
from farcast_cli.io.output import RUN_SCRATCH as SCRATCH
from farcast_cli.io.run import Jump, JumpRecord, find_run
from farcast_cli.model.fit import FitSettings
from farcast_cli.model.forecaster import SelfFit
from farcast_cli.model.observed import ObservedRun

log = logging.getLogger("farcast")
SOURCES = ("memory", "run")
REFIT_GROWTH = 4.0
"""A fit reused for its cost (`fit_share`) serves until the observations have grown this many times since
it. On the two workloads where the rule binds (the digits MLP with Adam and with SGD and momentum, a
step of 0.3-0.5 ms), 4 against 2 over 8 seeds: the same steps saved, a jump's own cost a quarter lower,
and the runs' final loss (over the plain run's) 0.015-0.079 lower every 50 steps with every gate; 8
blew the weight-gated runs up (ending 25-31% higher), as never refitting did: benchmarks/RESULTS.md,
"How stale a reused fit may grow". Reused at every attempt instead, it lost 0.03-0.05 (+- 0.03) on the
small LM every 40 steps over 10 seeds, where a fit is 1% of the training and `fit_share` leaves it
alone ("A fit reused while it costs more than the training")."""
LOOP_FIT = FitSettings(objective="l2")
"""The loop's default fit: the closed-form least squares (`farcast predict --objective l2`), not PAPER.md's
L1 by Adam that `farcast predict` defaults to. In the loop table (benchmarks/RESULTS.md, "The loop in
memory") it saved as many steps as L1 on every workload and rhythm measured, at a third of a jump's cost."""


@dataclass(frozen=True)
class JumpResult:
    """One farcast inside the loop: at which global step, how far, whether the weights were replaced, and why.

    `seconds` is farcast's own time for the attempt, `loss_fn`'s excluded (that is `loss_seconds`);
    `loss_before` and `loss_after` are `loss_fn`'s verdict where one was given and the jump was tried;
    `report` is the `farcast predict` report of a jump made from the run on disk. Where `loss_fn` returns
    per-batch losses, `loss_before` and `loss_after` are their means and `loss_error` the standard error
    of the mean paired difference (after - before, batch by batch)."""

    step: int
    horizon: int
    applied: bool
    why: str
    seconds: float
    report: Report | None
    loss_before: float | None = None
    loss_after: float | None = None
    loss_seconds: float = 0.0
    loss_error: float | None = None


class Farcaster:
    """Farcast a run every `every` steps by `jump` x its elapsed steps (see the module docstring).

    `loss_fn(model)` (memory): the model's loss on your held-out batches; a jump stays only where it
    lowers that loss by more than `margin`, else the weights are put back exactly. `margin` is 0 by
    default: both losses are taken on the same batches, so their difference is the jump's effect on
    them, not batch-to-batch noise, and a margin in your loss's units only refuses small gains (in the
    loop table, refusing the jumps worth less than a share of the steps they skip lost the gains on the
    MLP and the CNN and did not lift the small LM, whose spread is its runs' own chaos: RESULTS.md,
    "The loop table, third session"). `loss_fn` may return one float, or one loss per batch (a 1-D
    sequence or tensor of two or more, the same batches each call): then the jump must also lower
    their mean by more than `standard_errors` x the standard error of the mean paired difference
    (after - before, batch by batch). That error says how far the gain on these batches could come
    from the batches rather than the jump: with margin 0, a jump that does nothing on batches like
    them passes half the time. 0.5 by default (a jump of no effect passes 31% of the time): in the
    loop table it lifted the small LM every 40 steps by +0.04 +- 0.02 over 10 seeds and kept the
    MLP's and the CNN's gains, where 1 and 2 lost part of the MLP's (RESULTS.md, "The loop table,
    fourth session"). One float gives no such error: with one loss the jump must instead lower it by
    more than `movement` x how far the loss moved since the last attempt (from the loss kept there to
    the loss before this jump; nothing at the first attempt), a scale of the loss's own movement on
    your batches. 0.05 by default (0 for the margin alone): in the loop table it lifted the small LM
    every 40 steps from x0.96 to x1.00 over 16 seeds (+0.04 +- 0.02 seed by seed, though not on the 6
    seeds added last) and kept the MLP's gains and the CNN's but one jump in four every 300 steps
    (x1.04 -> x1.02); RESULTS.md, "The one-loss gate's floor". Where you can, return per-batch
    losses. Without `loss_fn` the weight backtest on the sample gates. `settings`:
    the fit's (LOOP_FIT, the closed form, by default; `FitSettings(objective="l1")` for the fit `farcast
    predict` makes by default). `evaluator` (run): a callable taking a checkpoint folder and returning
    its loss, or an eval command with {checkpoint}; None decides by weight error.
    `schedule`: "keep" leaves the learning-rate scheduler alone; "advance" steps it on by the horizon.
    `gate=False` applies every forecast, winning or not. `max_steps`: no jump at or after this step:
    the run's last step (the weights saved there would not hold it), or earlier where the late jumps
    cost the run its end (on the digits MLP every 50 steps they did, 2-8%, until a refused fit's
    verdict was made to stand; every 200 steps the weight-gated runs still end 6% higher, and with
    `loss_fn` 1-3%; on the CNN they help: RESULTS.md, "Which jumps cost the digits MLP its end" and "A
    refused fit stands too"). `keep_first_on`: where the first observed
    weights are kept (memory): "cpu", or "device" (the model's). `max_overhead`: the largest share of
    the loop's wall time (since the first call) that farcast may take, its calls of `loss_fn` included;
    after the first attempt, a due jump waits for a later call while making it, at the cost of the
    last attempt, would take farcast past that share (None: every `every` steps, whatever a jump costs). It bounds what the loop
    can lose by the clock where steps are cheap (a half-millisecond step makes a 5 ms jump 10 steps);
    the jumps then depend on timing, so two runs may jump at different steps. `fit_share` (memory):
    where the last fit (and its weight verdict) took farcast more than this share of the training
    since the last attempt (5% by default), a due jump reuses that fit until the observations have
    grown fourfold since it (REFIT_GROWTH): its map applied to the weights as they are then, which jumps
    `jump` x the steps elapsed then (the map is fitted for that fraction: model/pairs.py's time rule),
    and its weight verdict, kept or refused: a refusal stands as long as a kept jump does (retrying a
    refused fit at every attempt, while kept ones stood, fished for a pass: on both digits MLPs the
    marginal fits it found, reused, left the runs 2-12% higher; RESULTS.md, "A refused fit stands too").
    A history too short to test a jump gives no verdict, and the next attempt fits anew. `loss_fn`
    verifies every jump, reused or not. None fits at every attempt. Which jumps reuse a fit depends on timing. Options are checked here,
    not at the first save."""

    def __init__(
        self,
        run_dir: Path | str | None,
        every: int = 200,
        jump: float = 0.5,
        evaluator: Callable[[Path], float] | str | None = None,
        schedule: str = "keep",
        gate: bool = True,
        min_checkpoints: int = 3,
        settings: FitSettings = LOOP_FIT,
        device: str = "cpu",
        eval_jobs: int = 1,
        quiet: bool = True,
        source: str = "memory",
        loss_fn: Callable[[torch.nn.Module], float] | None = None,
        margin: float = 0.0,
        max_steps: int | None = None,
        keep_first_on: str = "cpu",
        standard_errors: float = 0.5,
        max_overhead: float | None = None,
        movement: float = 0.05,
        fit_share: float | None = 0.05,
    ) -> None:
        _check_options(schedule, every, jump, source, evaluator, loss_fn, margin, settings, standard_errors)
        _check_at_least_zero("movement", movement, "a share of the loss's move")
        _check_share("max_overhead", max_overhead, "the loop's time")
        _check_share("fit_share", fit_share, "the training between two attempts")
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.record: JumpRecord | None = None
        self.every, self.jump, self.schedule, self.gate = every, jump, schedule, gate
        self.min_checkpoints, self.settings, self.source, self.max_steps = max(3, min_checkpoints), settings, source, max_steps
        self.loss_fn, self.margin, self.standard_errors, self.movement = loss_fn, margin, standard_errors, movement
        self.kept_loss: float | None = None
        self.evaluation = EvalOptions(EvalCommand(evaluator) if isinstance(evaluator, str) else evaluator, eval_jobs)
        self.options = commands.StreamOptions(device=device, quiet=quiet)
        self.observed = ObservedRun(settings.sample, settings.seed, keep_first_on)
        self.jumped = 0
        self.observe_seconds = 0.0
        self.last_attempt: int | None = None
        self.history: list[JumpResult] = []
        self.max_overhead, self.postponed = max_overhead, 0
        self.fit_share, self.kept_fit, self.fit_seconds = fit_share, None, None
        self.refit_growth = REFIT_GROWTH
        self.attempt_seconds: dict[str, float] = {}
        self._clock = _Clock()

    def due(self, step: int) -> bool:
        if self.max_steps is not None and step >= self.max_steps:
            return False
        return step >= self.every and (self.last_attempt is None or step - self.last_attempt >= self.every)

    def step(self, model: torch.nn.Module, step: int, lr_scheduler=None) -> JumpResult | None:
        """Call after saving the checkpoint of global step `step` (on every rank under DDP); returns what
        was done, None when not due."""
        if self.run_dir is None:
            raise UsageError("the Farcaster has no run folder to record its jumps in")
        if self.record is None or self.record.run_dir != self.run_dir:
            self.close()
            self.record = JumpRecord(self.run_dir, background=True)
        rank, ranks = memory.world()
        due = self.due(step)
        result = None
        self._clock.start()
        if rank == 0:
            try:
                self.record.flush()
                result = self._on_rank_zero(model, step, due)
            except BaseException as error:
                if ranks > 1 and due:
                    memory.from_rank_zero(error)
                raise
        if ranks > 1 and due:
            result = memory.from_rank_zero(result)
            if isinstance(result, BaseException):
                raise RuntimeError(f"farcast failed on rank 0: {result}")
            if result is not None and result.applied:
                memory.share_weights(model)
        if result is None:
            return None
        self.last_attempt = step
        self._clock.spend(result.seconds + result.loss_seconds)
        self._clock.mark()
        if result.applied:
            self.jumped += result.horizon
            self._advance(lr_scheduler, result.horizon)
        return self._logged(result)

    def flush(self) -> None:
        """Wait until the jump record (farcast_jumps.json) holds every jump made: it is written on a
        thread of its own, so the file may lag `step` by one write until the next `step`, `flush` or
        `close`. A write that failed raises here (OutputError, naming the file)."""
        if self.record is not None:
            self.record.flush()

    def close(self) -> None:
        """`flush`, and end the record's writing thread (a later jump starts another). The Farcaster
        is also a context manager that closes on exit; at the interpreter's exit the last write is
        waited for, and its error printed."""
        if self.record is not None:
            self.record.close()

    def __enter__(self) -> Farcaster:
        return self

    def __exit__(self, *exception) -> None:
        self.close()

    def _on_rank_zero(self, model: torch.nn.Module, step: int, due: bool) -> JumpResult | None:
        """Observe the model at this step, and jump where due (from the run on disk with source="run")."""
        if self.source == "run":
            return self._from_run(model, step) if due and not self._postponed("fit") else None
        started = time.perf_counter()
        try:
            self.observed.observe(model.state_dict(), step + self.jumped)
            unobserved = None
        except FarcastError as error:
            unobserved = error
        seconds = time.perf_counter() - started
        self.observe_seconds += seconds
        self._clock.spend(seconds)
        if not due or len(self.observed) < self.min_checkpoints:
            return None
        kept = self._reusable()
        if self._postponed(_attempt_kind(kept)):
            return None
        if unobserved is not None:
            return JumpResult(step, 0, False, f"farcast failed, training goes on: {unobserved}", 0.0, None)
        return self._from_memory(model, step, kept)

    def _postponed(self, kind: str) -> bool:
        """Whether a due jump waits, to keep farcast within `max_overhead` of the loop's time (logged once);
        `kind` (`_attempt_kind`): what the attempt would do, estimated at the last such attempt's cost."""
        if self.max_overhead is None or not self.history:
            return False
        last = self.history[-1]
        own = self.attempt_seconds.get(kind, last.seconds)
        if self._clock.within(self.max_overhead, own + last.loss_seconds):
            return False
        if not self.postponed:
            log.info("farcast postpones a due jump: it would take more than %g of the loop's time", self.max_overhead)
        self.postponed += 1
        return True

    def _from_memory(self, model: torch.nn.Module, step: int, kept: memory.KeptFit | None) -> JumpResult | None:
        """Fit from the observed history (or reuse `kept`), gate or verify, and jump in place (rank 0). `loss_fn` is called
        before anything else, outside the guard that lets training go on: a loss that fails, or returns
        what is neither a loss nor per-batch losses, stops training at its first call, before any jump."""
        started, loss_seconds, error = time.perf_counter(), 0.0, None
        horizon = self.horizon(self.observed.steps[0], self.observed.steps[-1])
        before = after = None
        if self.loss_fn is not None:
            before, loss_seconds = _timed_loss(self.loss_fn, model)
        try:
            fit, verdict, why = (kept, kept.verdict, kept.why) if kept else self._fit_and_verdict(horizon)
            applied = bool(verdict)
            if applied and self.loss_fn is None:
                memory.apply_jump(model, self.observed, fit.forecaster)
            elif applied:
                applied, why, error, after, seconds = self._verified_jump(model, fit, before)
                loss_seconds += seconds
            if applied:
                self.record.add(Jump(step, horizon))
            self.kept_fit = fit if verdict is not None else None
            if kept:
                why += f"; the fit of {fit.observations} observations reused" + (
                    " with its verdict, not tested again" if self._weight_gated else ""
                )
        except FarcastError as failure:
            applied, why, self.kept_fit = False, f"farcast failed, training goes on: {failure}", None
        seconds = time.perf_counter() - started - loss_seconds
        self.attempt_seconds[_attempt_kind(kept)] = seconds
        return JumpResult(step, horizon, applied, why, seconds, None, _mean(before), _mean(after), loss_seconds, error)

    def _verified_jump(self, model: torch.nn.Module, fit: memory.KeptFit, before: Losses) -> tuple:
        """The jump applied and verified by `loss_fn`, put back bit for bit where it does not stay (or the
        loss fails): whether it stays, why, the losses' paired error, the loss after, and its seconds."""
        backup = {} if self.gate else None
        memory.apply_jump(model, self.observed, fit.forecaster, backup)
        applied = False
        try:
            after, seconds = _timed_loss(self.loss_fn, model)
            applied, why, error = self._loss_decision(before, after)
        finally:
            if not applied and backup is not None:
                memory.restore(model, backup)
        return applied, why, error, after, seconds

    @property
    def _weight_gated(self) -> bool:
        """Whether the weight backtest decides (no `loss_fn`, the gate on): its fits are scored, and a reused
        one brings its verdict, made at its own horizon and not tested again."""
        return self.loss_fn is None and self.gate

    def _reusable(self) -> memory.KeptFit | None:
        """The kept fit, where it took more than `fit_share` of the training since the last attempt and
        the observations have grown less than `refit_growth`-fold (REFIT_GROWTH) since it (the class docstring)."""
        kept = self.kept_fit
        if kept is None or self.fit_share is None or len(self.observed) >= self.refit_growth * kept.observations:
            return None
        return kept if self.fit_seconds > self.fit_share * self._clock.training() else None

    def _fit_and_verdict(self, horizon: int) -> tuple[memory.KeptFit, bool | None, str]:
        """A new fit, and the weight gate's verdict on it (True where `loss_fn` decides; `fit_seconds`: the
        time they took)."""
        started = time.perf_counter()
        fitted = memory.fit_in_memory(self.observed, horizon, self.settings, scored=self._weight_gated)
        verdict, why = self._weight_decision(fitted, horizon) if self.loss_fn is None else (True, "")
        self.fit_seconds = time.perf_counter() - started
        return memory.KeptFit(fitted.forecaster, len(self.observed), why, bool(verdict)), verdict, why

    def _weight_decision(self, fitted: SelfFit, horizon: int) -> tuple[bool | None, str]:
        """Whether the forecast beat keeping the last checkpoint in the backtest on the sample; None where
        the history cannot test the jump (no verdict on the fit, so a later attempt fits anew)."""
        if not self.gate:
            return True, "applied without a gate"
        verdict = memory.weight_verdict(self.observed, fitted, horizon)
        if verdict.tested is None:
            return None, "the history is too short to hold checkpoints out and test a jump"
        if verdict.tested is False:
            return None, "the history cannot test a jump this long"
        how = f"by weight error on the sample (skill {verdict.skill:+.3f})"
        if verdict.beats_last:
            return True, f"the forecast beat keeping the last checkpoint {how}"
        return False, f"the forecast did not beat keeping the last checkpoint {how}"

    def _loss_decision(self, before: Losses, after: Losses) -> tuple[bool, str, float | None]:
        """Keep the jump where it lowers the loss by more than `margin` and, with per-batch losses, by
        more than `standard_errors` x the standard error of the mean paired difference (that error is
        returned too), with one loss by more than `movement` x how far it moved since the last attempt."""
        error = _paired_error(before, after)
        gain = _mean(before) - _mean(after)
        losses = f"loss {_mean(before):.5g} -> {_mean(after):.5g}"
        if error is not None:
            losses += f", standard error {error:.2g} over {len(before)} batches"
        if not self.gate:
            return True, f"applied without a gate ({losses})", error
        needed, unit = self._needed(before, error)
        applied = gain > needed
        if error is None:
            self.kept_loss = _mean(after if applied else before)
        if applied:
            return True, f"the jump lowered your loss ({losses})", error
        return False, f"the jump did not lower your loss by more than {unit} ({losses}); weights restored", error

    def _needed(self, before: Losses, error: float | None) -> tuple[float, str]:
        """The gain a jump must beat, and how it was set."""
        if error is not None:
            needed = max(self.margin, self.standard_errors * error)
            return needed, f"{needed:.2g} (max of margin, {self.standard_errors:g} standard errors)"
        if not self.movement or self.kept_loss is None:
            return self.margin, f"{self.margin:g}"
        moved = abs(self.kept_loss - _mean(before))
        needed = max(self.margin, self.movement * moved)
        return needed, f"{needed:.2g} (max of margin, {self.movement:g} x the loss's move {moved:.2g} since the last attempt)"

    def _from_run(self, model: torch.nn.Module, step: int) -> JumpResult | None:
        """The jump through `farcast predict` on the run's checkpoints (source="run")."""
        started = time.perf_counter()
        out = self.run_dir / SCRATCH / f"forecast-{step}"
        horizon, report = 0, None
        try:
            run = find_run(self.run_dir)
            if len(run.checkpoints) < self.min_checkpoints:
                return None
            horizon = self.horizon(run.steps[0], run.last.step)
            report = commands.predict(
                self.run_dir, out, horizon=horizon, settings=self.settings, options=self.options, evaluation=self.evaluation,
                fallback=False, force=True,
            )  # fmt: skip
            applied, why = self._verdict(report)
            if applied:
                load_into(model, out)
                self.record.add(Jump(step, horizon))
        except FarcastError as error:
            applied, why = False, f"farcast failed, training goes on: {error}"
        finally:
            shutil.rmtree(out, ignore_errors=True)
            with suppress(OSError):
                out.parent.rmdir()
        return JumpResult(step, horizon, applied, why, time.perf_counter() - started, report)

    def _logged(self, result: JumpResult | None) -> JumpResult | None:
        if result is None:
            return None
        self.history.append(result)
        failed = result.why.startswith("farcast failed")
        level = logging.WARNING if failed else logging.INFO
        made = "made" if result.applied else "skipped"
        if log.isEnabledFor(level):
            cost = f"farcast {1e3 * result.seconds:.1f} ms" + (f", loss_fn {1e3 * result.loss_seconds:.1f} ms" if self.loss_fn else "")
            share = f"{self._clock.share():.1%} of the loop's time since the first call"
            what = f"{made} a jump of {result.horizon} steps ({result.why})"
            log.log(level, "farcast at step %d: %s [%s; %s]", result.step, what, cost, share)
        return result

    def _verdict(self, report: Report) -> tuple[bool, str]:
        if not self.gate:
            return True, "applied without a gate"
        if report.tested is False:
            return False, "the history cannot test a jump this long"
        if report.beats[REFERENCE]:
            return True, f"the forecast beat keeping the last checkpoint by {report.criterion}"
        return False, f"the forecast did not beat keeping the last checkpoint by {report.criterion}"

    def horizon(self, first_step: float, last_step: float) -> int:
        """A jump's steps: `jump` x the steps from the first checkpoint (or observation) to the last, at least one."""
        return max(1, round(self.jump * (last_step - first_step)))

    def _advance(self, lr_scheduler, horizon: int) -> None:
        if self.schedule == "advance" and lr_scheduler is not None:
            for _ in range(horizon):
                lr_scheduler.step()


def _check_options(schedule, every, jump, source, evaluator, loss_fn, margin, settings, standard_errors) -> None:
    if schedule not in ("keep", "advance"):
        raise UsageError(f"schedule must be keep or advance, not {schedule!r}")
    if every < 1 or jump <= 0:
        raise UsageError("every must be a positive number of steps and jump a positive fraction")
    if source not in SOURCES:
        raise UsageError(f"source must be memory or run, not {source!r}")
    if source == "memory" and evaluator is not None:
        raise UsageError("evaluator scores checkpoint folders on disk: give it with source='run', or give loss_fn(model) instead")
    if source == "run" and loss_fn is not None:
        raise UsageError("loss_fn scores the model in memory: use it with source='memory', or give evaluator= with source='run'")
    if loss_fn is not None and not callable(loss_fn):
        raise UsageError("loss_fn must be a callable taking the model and returning its loss")
    if margin < 0:
        raise UsageError(f"margin must be a loss difference of 0 or more, not {margin}")
    _check_at_least_zero("standard_errors", standard_errors, "a number of standard errors")
    if not isinstance(settings, FitSettings):
        raise UsageError("settings must be a FitSettings")


Losses = float | np.ndarray
"""What `loss_fn` returned: one loss, or one per batch."""


def _check_at_least_zero(name: str, value: float, what: str) -> None:
    if not isinstance(value, int | float) or not 0 <= value < float("inf"):
        raise UsageError(f"{name} must be {what}, 0 or more, not {value!r}")


def _check_share(name: str, share: float | None, of: str) -> None:
    if share is not None and not (isinstance(share, int | float) and 0 < share <= 1):
        raise UsageError(f"{name} must be a share of {of} above 0 and at most 1, or None, not {share!r}")


def _attempt_kind(kept: memory.KeptFit | None) -> str:
    """What a due attempt does, whose costs differ by milliseconds: fit anew, or reuse a kept fit's jump
    (applied, verified where `loss_fn` decides) or its refusal (nothing done)."""
    return "fit" if kept is None else "reused jump" if kept.verdict else "reused refusal"


class _Clock:
    """The loop's wall time since the first call, farcast's own share of it, and the training (the
    rest) since the last attempt."""

    def __init__(self) -> None:
        self.started: float | None = None
        self.spent = 0.0
        self.marked: tuple[float, float] | None = None

    def mark(self) -> None:
        self.marked = (time.perf_counter(), self.spent)

    def training(self) -> float:
        """The loop's time since the last `mark` (the first call before any), farcast's own excluded."""
        at, spent = self.marked or (self.started, 0.0)
        return time.perf_counter() - at - (self.spent - spent)

    def start(self) -> None:
        if self.started is None:
            self.started = time.perf_counter()

    def spend(self, seconds: float) -> None:
        self.spent += seconds

    def share(self) -> float:
        """farcast's share of the loop's time since the first call."""
        return self.spent / max(time.perf_counter() - self.started, 1e-9)

    def within(self, share: float, more: float) -> bool:
        """Whether farcast's time, `more` seconds added, stays within `share` of the time since the first call."""
        return self.spent + more <= share * (time.perf_counter() - self.started)


def _timed_loss(loss_fn: Callable[[torch.nn.Module], object], model: torch.nn.Module) -> tuple[Losses, float]:
    started = time.perf_counter()
    with torch.no_grad():
        loss = _losses(loss_fn(model))
    return loss, time.perf_counter() - started


def _losses(value: object) -> Losses:
    """`loss_fn`'s return as a float, or as per-batch losses (float64, one dimension, two or more)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu", torch.float64).numpy()
    wrong = UsageError(f"loss_fn must return a float or a 1-D sequence of per-batch losses, not {type(value).__name__}")
    if value is None or isinstance(value, bool | str | bytes):
        raise wrong
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise wrong from None
    if array.ndim == 0:
        return float(array)
    if array.ndim != 1 or len(array) < 2:
        raise UsageError(f"loss_fn must return a float or a 1-D sequence of two or more per-batch losses, not shape {array.shape}")
    return array


def _mean(loss: Losses | None) -> float | None:
    return None if loss is None else float(np.mean(loss))


def _paired_error(before: Losses, after: Losses) -> float | None:
    """The standard error of the mean of after - before, batch by batch; None for single losses."""
    if isinstance(before, float) and isinstance(after, float):
        return None
    if isinstance(before, float) or isinstance(after, float) or before.shape != after.shape:
        shapes = [1 if isinstance(x, float) else len(x) for x in (before, after)]
        raise UsageError(f"loss_fn returned {shapes[0]} losses before the jump and {shapes[1]} after: it must score the same batches")
    differences = after - before
    return float(differences.std(ddof=1) / np.sqrt(len(differences)))


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

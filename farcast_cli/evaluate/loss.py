"""Let the user's loss decide: the loss backtest, and steps saved.

The backtest holds out the run's last checkpoints: from a cut c it forecasts the last checkpoint K
(model/forecaster.py, `held_out_trial`). The true run's loss at c, c+1, ..., K is the curve. Every
candidate is scored by the evaluator (evaluate/evaluator.py): the forecast at each shrink factor of a
grid and each anchor (one fit per anchor serves the whole grid: the forecast is linear in the factor),
the straight line, the average of the last checkpoints, and keeping the checkpoint at c. A candidate's
loss L maps to the first step at which the curve reaches L; steps saved is that step minus c, as a
fraction of the jump K - c: 0 is keeping the checkpoint at c, 1 the whole jump (at least: a loss below
the curve's end counts as 1). A loss worse than at c is placed on the run's earlier checkpoints for a
negative figure, down to -1 (one jump back): they are scored as far back as the best forecast needs,
and a worse candidate is placed by extending the curve's trend, and marked extrapolated.

The candidate with the lowest loss is chosen if it beats keeping the checkpoint by more than the run's
own jitter: the typical wobble of its loss from one checkpoint to the next (`curve_noise`); else the
checkpoint is kept. The choice is made on the same backtest that scores it, so the chosen figure is
the best of all those tried there: optimistic, and the report says so.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from farcast_cli.evaluate.evaluator import Scorer, checkpoint_fingerprint, raise_first_failure
from farcast_cli.forecast.candidates import CANDIDATES, FORECAST, REFERENCE, Combination, baselines, candidates, line_tested
from farcast_cli.forecast.write import combination_key, write_forecast
from farcast_cli.io.engine import EngineSettings
from farcast_cli.io.run import Checkpoint, Run
from farcast_cli.model.fit import FitSettings
from farcast_cli.model.forecaster import Forecaster, held_out_trial
from farcast_cli.model.history import History

SHRINK_STEP = 0.25
SHRINK_MAX = 2.0
ANCHORS = (1, 5)


@dataclass(frozen=True)
class LossPoint:
    """One candidate scored in the loss backtest: the forecast with its anchor and shrink factor, or an alternative."""

    method: str
    anchor: int | None
    shrink: float | None
    loss: float
    steps_saved: float
    extrapolated: bool = False

    @property
    def label(self) -> str:
        if self.method != FORECAST.key:
            return CANDIDATES[self.method].label if self.method in CANDIDATES else self.method
        return f"forecast (anchor {self.anchor}, shrink {self.shrink:g})"


@dataclass
class LossBacktest:
    evaluator: str
    cut_step: int
    target_step: int
    curve: list[tuple[int, float]]
    points: list[LossPoint]
    chosen: LossPoint
    best_forecast: LossPoint | None
    earlier: list[tuple[int, float]] = field(default_factory=list)
    noise: float = 0.0
    line_tested: bool = True
    evaluations: int = 0
    cache_hits: int = 0
    eval_seconds: float = 0.0

    def point(self, method: str) -> LossPoint:
        return next(p for p in self.points if p.method == method)

    @classmethod
    def from_json(cls, data: dict) -> LossBacktest:
        point = lambda d: None if d is None else LossPoint(**d)  # noqa: E731
        pairs = lambda rows: [(int(step), float(loss)) for step, loss in rows]  # noqa: E731
        fields = {**data, "points": [point(d) for d in data["points"]], "chosen": point(data["chosen"])}
        fields.update(best_forecast=point(data["best_forecast"]), curve=pairs(data["curve"]), earlier=pairs(data["earlier"]))
        return cls(**fields)


def step_reaching(curve: Sequence[tuple[float, float]], loss: float) -> float | None:
    """The first step at which the loss curve reaches `loss` (linear between checkpoints), or None."""
    for (step_a, loss_a), (step_b, loss_b) in zip(curve, curve[1:]):
        if loss_a <= loss:
            return float(step_a)
        if loss_b <= loss:
            return step_a + (step_b - step_a) * (loss_a - loss) / (loss_a - loss_b)
    return float(curve[0][0]) if curve and curve[0][1] <= loss else None


def steps_saved(curve: Sequence[tuple[float, float]], earlier: Sequence[tuple[float, float]], loss: float) -> tuple[float, bool]:
    """Signed steps saved (module docstring), and whether it is extrapolated. `earlier` is the run's loss
    at checkpoints before the cut, latest first; a loss worse than all of them is placed by extending the
    line through the two earliest points of the curve, down to -1."""
    start, end = curve[0][0], curve[-1][0]
    if loss <= curve[0][1]:
        reached = step_reaching(curve, loss)
        return (1.0 if reached is None else (reached - start) / (end - start)), False
    backwards = [curve[1], curve[0], *earlier] if len(curve) > 1 else [curve[0], *earlier]
    for (later_step, later_loss), (step, value) in zip(backwards[1:], backwards[2:]):
        if value >= loss:
            back = later_step - (later_step - step) * (loss - later_loss) / (value - later_loss)
            return max(-1.0, (back - start) / (end - start)), False
    (later_step, later_loss), (step, value) = backwards[-2], backwards[-1]
    if start - step >= end - start or value <= later_loss:
        return -1.0, start - step < end - start
    back = step - (step - later_step) * (loss - value) / (later_loss - value)
    return max(-1.0, (back - start) / (end - start)), True


class CandidateScores:
    """Scores combinations of a run's checkpoints: a combination that is one checkpoint unchanged is
    scored in place; any other is written to a scratch folder (no fsync, config files linked), scored,
    and removed as soon as its evaluation ends."""

    def __init__(self, run: Run, scorer: Scorer, scratch_parent: Path, engine: Callable[[], EngineSettings]) -> None:
        self.run, self.scorer, self.engine = run, scorer, engine
        self.scratch = Path(tempfile.mkdtemp(prefix=".farcast-eval-", dir=scratch_parent))
        self.fingerprints: dict[Path, str] = {}
        self.count = 0

    def fingerprint(self, checkpoint: Checkpoint) -> str:
        if checkpoint.path not in self.fingerprints:
            self.fingerprints[checkpoint.path] = checkpoint_fingerprint(checkpoint)
        return self.fingerprints[checkpoint.path]

    def checkpoint(self, checkpoint: Checkpoint, label: str) -> Future:
        return self.scorer.submit(self.fingerprint(checkpoint), checkpoint.path, label)

    def combination(self, candidate: Combination, label: str) -> Future:
        self.scorer.raise_failure()
        kept = candidate.kept_input()
        if kept is not None:
            return self.checkpoint(kept, label)
        key = combination_key(candidate, [self.fingerprint(c) for c in candidate.inputs])
        if self.scorer.known(key):
            return self.scorer.submit(key, Path(), label)
        self.count += 1
        folder = self.scratch / f"candidate-{self.count}"
        folder.mkdir()
        last = candidate.inputs[-1]
        write_forecast(candidate, last, folder, self.engine(), scratch=True)
        return self.scorer.submit(key, self.run.layout.evaluated(folder), label, done=lambda: shutil.rmtree(folder, ignore_errors=True))

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)


def loss_backtest(
    run: Run,
    history: History,
    horizon: int,
    settings: FitSettings,
    scores: CandidateScores,
    anchors: Sequence[int] = ANCHORS,
) -> LossBacktest | None:
    """Score every candidate on the held-out jump by the evaluator and choose the best (module docstring).
    None when the run is too short to hold checkpoints out."""
    trials = {anchor: held_out_trial(history, horizon, settings, anchor) for anchor in anchors}
    trials = {anchor: trial for anchor, trial in trials.items() if trial is not None}
    if not trials:
        return None
    first = next(iter(trials.values()))
    cut = run.steps.index(first.context_end)
    curve, futures = _curve_and_alternatives(run, first, scores)
    for anchor, trial in trials.items():
        for alpha in _grid(settings.shrink):
            futures[(FORECAST.key, anchor, alpha)] = _forecast_future(scores, run, trial, anchor, alpha)
    if settings.shrink is None:
        _refine(scores, run, trials, futures, [future for _, future in curve])
    steps = run.steps
    tested = line_tested(steps[cut - 1], steps[cut], steps[-1], horizon, steps[-1] - steps[-2])
    return _scored(run, cut, scores, curve, futures, tested)


def reference_loss_backtest(run: Run, forecaster: Forecaster, scores: CandidateScores) -> LossBacktest:
    """The reference forecaster and the alternatives, scored on the reference run up to the forecast's
    last target, where the truth is known."""
    curve, futures = _curve_and_alternatives(run, forecaster, scores)
    futures[(FORECAST.key, forecaster.anchor, forecaster.shrink)] = scores.combination(
        candidates(run, forecaster)[FORECAST.key], "reference forecast"
    )
    return _scored(run, run.steps.index(forecaster.context_end), scores, curve, futures)


def _curve_and_alternatives(
    run: Run, forecaster: Forecaster, scores: CandidateScores
) -> tuple[list[tuple[int, Future]], dict[tuple, Future]]:
    """The run's loss from the forecaster's context end on, and the alternatives' (keeping the checkpoint
    at the context end is the curve's first point)."""
    cut = run.steps.index(forecaster.context_end)
    curve = [(c.step, scores.checkpoint(c, f"checkpoint {c.step}")) for c in run.checkpoints[cut:]]
    options = candidates(run, forecaster)
    futures: dict[tuple, Future] = {(REFERENCE, None, None): curve[0][1]}
    for candidate in baselines():
        if candidate.key != REFERENCE:
            futures[(candidate.key, None, None)] = scores.combination(options[candidate.key], options[candidate.key].method)
    return curve, futures


def _scored(
    run: Run, cut: int, scores: CandidateScores, pending: list[tuple[int, Future]], futures: dict[tuple, Future], line_ok: bool = True
) -> LossBacktest:
    """Wait for every score, place each candidate on the run's loss curve, and choose."""
    settle([future for _, future in pending] + list(futures.values()))
    curve = [(step, future.result().loss) for step, future in pending]
    losses = {key: future.result().loss for key, future in futures.items()}
    forecasts = [loss for (method, _, _), loss in losses.items() if method == FORECAST.key]
    earlier = _earlier_losses(run, cut, scores, curve, min(forecasts, default=losses[(REFERENCE, None, None)]))
    points = [
        LossPoint(method, anchor, alpha, loss, *steps_saved(curve, earlier, loss)) for (method, anchor, alpha), loss in losses.items()
    ]
    forecasts = [p for p in points if p.method == FORECAST.key]
    noise = curve_noise([value for _, value in reversed(earlier)] + [value for _, value in curve])
    return LossBacktest(
        evaluator=str(scores.scorer),
        cut_step=run.steps[cut],
        target_step=run.steps[-1],
        curve=curve,
        points=points,
        chosen=_choose(points, noise, line_ok),
        best_forecast=min(forecasts, key=lambda p: p.loss) if forecasts else None,
        earlier=earlier,
        noise=noise,
        line_tested=line_ok,
    )


def _choose(points: list[LossPoint], noise: float, line_tested: bool = True) -> LossPoint:
    """The candidate with the lowest loss, if it beats keeping the checkpoint by more than the run's own
    jitter (`noise`); else keeping it: a win smaller than the loss's wobble between checkpoints is none.
    The straight line competes only where the backtest extrapolated it as far as the jump asks."""
    last = next(p for p in points if p.method == REFERENCE)
    competing = (p for p in points if line_tested or not (p.method in CANDIDATES and CANDIDATES[p.method].extrapolates))
    best = min(competing, key=lambda p: (p.loss, p.method != REFERENCE))
    return best if best.loss < last.loss - noise else last


def _grid(shrink: float | None) -> list[float]:
    """The shrink factors tried: the grid from SHRINK_STEP to SHRINK_MAX, or the one --shrink gave."""
    if shrink is not None:
        return [shrink]
    return [SHRINK_STEP * k for k in range(1, round(SHRINK_MAX / SHRINK_STEP) + 1)]


def _forecast_future(scores: CandidateScores, run: Run, trial: Forecaster, anchor: int, alpha: float) -> Future:
    combination = candidates(run, trial.shrunk(alpha))[FORECAST.key]
    return scores.combination(combination, f"backtest forecast, anchor {anchor}, shrink {alpha:g}")


def _refine(scores: CandidateScores, run: Run, trials: dict[int, Forecaster], futures: dict[tuple, Future], curve: list[Future]) -> None:
    """Around each anchor's best factor on the grid, try half a step either side (within the grid)."""
    settle([*futures.values(), *curve])
    last_loss = futures[(REFERENCE, None, None)].result().loss
    for anchor, trial in trials.items():
        tried = {
            alpha: futures[(FORECAST.key, a, alpha)].result().loss
            for (method, a, alpha) in list(futures)
            if method == FORECAST.key and a == anchor
        }
        best = min(tried, key=tried.get)
        if tried[best] >= last_loss:
            continue
        for alpha in (best - SHRINK_STEP / 2, best + SHRINK_STEP / 2):
            if 0 < alpha <= SHRINK_MAX:
                futures[(FORECAST.key, anchor, alpha)] = _forecast_future(scores, run, trial, anchor, alpha)


def settle(futures: Iterable[Future]) -> None:
    """Wait for every score, but raise the first failure as soon as it happens: a broken eval command
    must not wait for the others still running."""
    done, _ = wait(list(futures), return_when=FIRST_EXCEPTION)
    raise_first_failure(done)


def curve_noise(losses: Sequence[float]) -> float:
    """The jitter of the run's loss from checkpoint to checkpoint, as a standard deviation: for a smooth
    trend plus independent noise, a second difference has variance 6 sigma^2 (the median of their sizes,
    robust to a turn in the trend). 0 with fewer than three points."""
    second = [abs(a - 2 * b + c) for a, b, c in zip(losses, losses[1:], losses[2:])]
    return 0.0 if not second else float(np.median(second) / 0.6745 / np.sqrt(6))


def _earlier_losses(run: Run, cut: int, scores: CandidateScores, curve: list[tuple[int, float]], worst: float) -> list[tuple[int, float]]:
    """The run's loss at checkpoints before the cut, latest first, scored until one reaches `worst` or
    lies a whole jump back (steps saved stops at -1 there)."""
    start, jump = curve[0][0], curve[-1][0] - curve[0][0]
    earlier: list[tuple[int, float]] = []
    for checkpoint in reversed(run.checkpoints[:cut]):
        if worst <= curve[0][1] or (earlier and (earlier[-1][1] >= worst or start - earlier[-1][0] >= jump)):
            break
        earlier.append((checkpoint.step, scores.checkpoint(checkpoint, f"checkpoint {checkpoint.step}").result().loss))
    return earlier

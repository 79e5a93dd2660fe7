"""Let the user's loss decide: the loss backtest, and steps saved.

The backtest holds out the run's last checkpoints: from a cut c it forecasts the last checkpoint K
(model/forecaster.py, `held_out_trial`). The true run's loss at c, c+1, ..., K is the curve. The
candidates are scored by the evaluator (evaluate/evaluator.py): the straight line, the average of the
last checkpoints, keeping the checkpoint at c, and the forecast of each anchor at the shrink factors a
search asks for (`next_shrink`: the loss along the shrink factor is close to a parabola, so from 0.5
and 1 it evaluates each parabola's lowest point, on steps of 1/8 up to 2, until that point is one
already evaluated or cannot beat the best forecast found; one fit per anchor serves every factor: the
forecast is linear in it). A candidate's loss L maps to the first step at which the curve reaches L;
steps saved is that step minus c, as a fraction of the jump K - c: 0 is keeping the checkpoint at c,
1 the whole jump (at least: a loss below the curve's end counts as 1). The curve is evaluated at its
two ends and then only where the best candidates' losses need placing (`SparseCurve`), linear between
the checkpoints evaluated. A loss worse than at c is placed on the run's earlier checkpoints for a
negative figure, down to -1 (one jump back): they are scored as far back as the best forecast needs,
and a worse candidate is placed by extending the curve's trend, and marked extrapolated.

The candidate with the lowest loss is chosen if it beats keeping the checkpoint by more than the run's
own jitter: the typical wobble of its loss from one checkpoint to the next (`curve_noise`); else the
checkpoint is kept. Where the win is within NOISE_CHECK jitters, or the jitter cannot be told from the
points evaluated, the whole curve is evaluated before choosing. The choice is made on the same
backtest that scores it, so the chosen figure is the best of all those tried there: optimistic, and
the report says so.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch
from safetensors.torch import load_file

from farcast_cli.evaluate.evaluator import Scorer, checkpoint_fingerprint, raise_first_failure
from farcast_cli.forecast.candidates import CANDIDATES, FORECAST, REFERENCE, Combination, baselines, candidates, line_tested
from farcast_cli.forecast.write import combination_key, write_forecast
from farcast_cli.io.engine import EngineSettings
from farcast_cli.io.run import Checkpoint, Run
from farcast_cli.model.fit import FitSettings
from farcast_cli.model.forecaster import Forecaster, held_out_cut, held_out_trial
from farcast_cli.model.history import History

SHRINK_STEP = 0.125
SHRINK_MAX = 2.0
FIRST_SHRINKS = (0.5, 1.0)
MAX_SHRINKS_PER_ANCHOR = 8
ANCHORS = (1, 5)
NOISE_CHECK = 3.0


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
    eval_wall_seconds: float = 0.0

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
    and removed as soon as its evaluation ends. An evaluator of tensors (evaluator.OnTensors) is given
    them in memory instead (`checkpoint_tensors`, `combination_tensors`): nothing is written."""

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
        source = (lambda: checkpoint_tensors(checkpoint)) if self.scorer.takes_tensors else checkpoint.path
        return self.scorer.submit(self.fingerprint(checkpoint), source, label)

    def combination(self, candidate: Combination, label: str) -> Future:
        self.scorer.raise_failure()
        kept = candidate.kept_input()
        if kept is not None:
            return self.checkpoint(kept, label)
        key = combination_key(candidate, [self.fingerprint(c) for c in candidate.inputs])
        if self.scorer.known(key):
            return self.scorer.submit(key, Path(), label)
        if self.scorer.takes_tensors:
            return self.scorer.submit(key, lambda: combination_tensors(candidate), label)
        self.count += 1
        folder = self.scratch / f"candidate-{self.count}"
        folder.mkdir()
        last = candidate.inputs[-1]
        write_forecast(candidate, last, folder, self.engine(), scratch=True)
        return self.scorer.submit(key, self.run.layout.evaluated(folder), label, done=lambda: shutil.rmtree(folder, ignore_errors=True))

    def written(self, content: str, path: Path, label: str) -> Future:
        """The loss of a checkpoint farcast wrote (a folder, or a .safetensors file), whose content key is `content`."""
        source = (lambda: written_tensors(path)) if self.scorer.takes_tensors else path
        return self.scorer.submit(content, source, label)

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)


def checkpoint_tensors(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, read into memory on the CPU."""
    tensors: dict[str, torch.Tensor] = {}
    for file in checkpoint.files.values():
        tensors.update(load_file(file.path))
    return tensors


def written_tensors(path: Path) -> dict[str, torch.Tensor]:
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    return {name: tensor for file in files for name, tensor in load_file(file).items()}


def combination_tensors(candidate: Combination) -> dict[str, torch.Tensor]:
    """A candidate's checkpoint in memory (its last output), laid out like its last input: each forecast
    tensor combined in float32 (float64 for F64) and cast back to its dtype, the others copied."""
    inputs = [checkpoint_tensors(checkpoint) for checkpoint in candidate.inputs]
    last, output = candidate.inputs[-1], len(candidate.target_steps) - 1
    combined: dict[str, torch.Tensor] = {}
    for name, value in inputs[-1].items():
        if not last.tensor(name)[1].is_forecast:
            combined[name] = value
            continue
        compute = torch.float64 if value.dtype == torch.float64 else torch.float32
        values = [tensors[name].to(compute) for tensors in inputs]
        combined[name] = candidate.apply(values, output, name=name).to(value.dtype)
    return combined


def loss_backtest(
    run: Run,
    history: History,
    horizon: int,
    settings: FitSettings,
    scores: CandidateScores,
    anchors: Sequence[int] = ANCHORS,
    fitted: Mapping[int, Forecaster | None] = MappingProxyType({}),
) -> LossBacktest | None:
    """Search the candidates on the held-out jump by the evaluator and choose the best (module
    docstring). None when the run is too short to hold checkpoints out. `fitted`: held-out trials
    (model/forecaster.py, `held_out_trial`) already fitted with these settings, by anchor, which are
    not fitted again; the others are fitted while the curve's two ends are evaluated."""
    cut = held_out_cut(history, horizon)
    if cut is None:
        return None
    curve = SparseCurve(run, cut, scores)
    curve.at(0), curve.at(len(curve.checkpoints) - 1)
    trials = {anchor: fitted[anchor] if anchor in fitted else held_out_trial(history, horizon, settings, anchor) for anchor in anchors}
    trials = {anchor: trial for anchor, trial in trials.items() if trial is not None}
    if not trials:
        return None
    first = next(iter(trials.values()))
    steps = run.steps
    tested = line_tested(steps[cut - 1], steps[cut], steps[-1], horizon, steps[-1] - steps[-2])
    futures = _alternatives(run, first, scores, curve.at(0))
    for anchor, trial in trials.items():
        for alpha in FIRST_SHRINKS if settings.shrink is None else (settings.shrink,):
            futures[(FORECAST.key, anchor, alpha)] = _forecast_future(scores, run, trial, anchor, alpha)
    while True:
        settle([*curve.futures.values(), *futures.values()])
        asked = _next_shrinks(scores, run, trials, futures) if settings.shrink is None else {}
        points = curve.known()
        placing = {index for loss in _losses_to_place(futures, tested) if (index := curve.needed(points, loss)) is not None}
        if not asked and not placing:
            break
        futures.update(asked)
        for index in placing:
            curve.at(index)
    losses = {key: future.result().loss for key, future in futures.items()}
    if len(curve.futures) < 3 and _close_to_noise(curve, losses, tested):
        settle([curve.at(len(curve.checkpoints) // 2)])
    if _close_to_noise(curve, losses, tested):
        curve.complete()
    return _scored(run, cut, scores, sorted(curve.futures.items()), futures, tested)


class SparseCurve:
    """The run's loss from the cut to the target, evaluated only where asked: `at` one checkpoint;
    `needed`, the next checkpoint to evaluate to place a loss between two neighbouring checkpoints."""

    def __init__(self, run: Run, cut: int, scores: CandidateScores) -> None:
        self.checkpoints, self.scores = run.checkpoints[cut:], scores
        self.futures: dict[int, Future] = {}

    def at(self, index: int) -> Future:
        if index not in self.futures:
            checkpoint = self.checkpoints[index]
            self.futures[index] = self.scores.checkpoint(checkpoint, f"checkpoint {checkpoint.step}")
        return self.futures[index]

    def known(self) -> list[tuple[int, float]]:
        return sorted((index, future.result().loss) for index, future in self.futures.items())

    @staticmethod
    def needed(points: list[tuple[int, float]], loss: float) -> int | None:
        """Of the checkpoints between the two evaluated `points` that bracket `loss` (the first at or
        below it and the one before), the one where the line between them crosses it; None when they
        are neighbours, or the loss lies outside the curve (worse than at the cut, better than at its end)."""
        below = next((k for k, (_, value) in enumerate(points) if value <= loss), None)
        if below is None or below == 0:
            return None
        (upper, upper_loss), (lower, lower_loss) = points[below - 1], points[below]
        if lower - upper <= 1:
            return None
        crossing = upper + (lower - upper) * (upper_loss - loss) / (upper_loss - lower_loss)
        return min(lower - 1, max(upper + 1, round(crossing)))

    def complete(self) -> None:
        for index in range(len(self.checkpoints)):
            self.at(index)
        settle(self.futures.values())


def _competes(method: str, line_tested: bool) -> bool:
    """Whether a candidate may be chosen: an extrapolating one (the straight line) only where the backtest
    extrapolated it as far as the jump asks (forecast/candidates.py, line_tested)."""
    return line_tested or not (method in CANDIDATES and CANDIDATES[method].extrapolates)


def _losses_to_place(futures: dict[tuple, Future], line_ok: bool) -> list[float]:
    """The losses worth placing on the curve exactly: the best candidate that may be chosen, and the best forecast."""
    losses = {key: future.result().loss for key, future in futures.items()}
    eligible = [loss for (method, _, _), loss in losses.items() if _competes(method, line_ok)]
    forecasts = [loss for (method, _, _), loss in losses.items() if method == FORECAST.key]
    return [min(eligible), *([min(forecasts)] if forecasts else [])]


def _next_shrinks(scores: CandidateScores, run: Run, trials: dict[int, Forecaster], futures: dict[tuple, Future]) -> dict[tuple, Future]:
    """Each anchor's next shrink factor to evaluate, submitted (none for an anchor whose search is done)."""
    last_loss = futures[(REFERENCE, None, None)].result().loss
    tried = {
        anchor: {0.0: last_loss} | {a: f.result().loss for (method, k, a), f in futures.items() if method == FORECAST.key and k == anchor}
        for anchor in trials
    }
    best = min(loss for losses in tried.values() for alpha, loss in losses.items() if alpha > 0)
    asked = {}
    for anchor, trial in trials.items():
        alpha = next_shrink(tried[anchor], best)
        if alpha is not None:
            asked[(FORECAST.key, anchor, alpha)] = _forecast_future(scores, run, trial, anchor, alpha)
    return asked


def next_shrink(tried: dict[float, float], best_found: float) -> float | None:
    """The next shrink factor to evaluate for one anchor, given the losses `tried` by factor (0 is
    keeping the checkpoint), or None when its search is done. The factor is the lowest point of the
    parabola through the best factor tried and its neighbours, on steps of SHRINK_STEP up to
    SHRINK_MAX; where that is a factor tried already, the step beside the best towards it. The search
    is done when that step was tried too (the best is a minimum on the steps), when the parabola
    cannot go below `best_found` (the lowest forecast loss of any anchor), or after
    MAX_SHRINKS_PER_ANCHOR factors."""
    if len(tried) > MAX_SHRINKS_PER_ANCHOR or len(tried) < 3:
        return None
    factors = sorted(tried)
    best = min(factors, key=lambda a: (tried[a], a))
    at = factors.index(best)
    around = factors[max(0, min(at - 1, len(factors) - 3)) :][:3]
    vertex, lowest = _parabola_vertex([(a, tried[a]) for a in around])
    if lowest >= best_found:
        return None
    target = _on_steps(min(SHRINK_MAX, max(SHRINK_STEP, vertex)))
    if target in tried:
        if abs(vertex - best) < 1e-12:
            return None
        target = _on_steps(best + math.copysign(SHRINK_STEP, vertex - best))
    return target if 0 < target <= SHRINK_MAX and target not in tried else None


def _parabola_vertex(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Where the parabola through three points is lowest, and its value there. A parabola that opens
    downwards (or a line) has no lowest point: then the factor beyond the lowest of the points, one
    spacing further out, with minus infinity (it may go lower)."""
    (x1, y1), (x2, y2), (x3, y3) = points
    curvature = ((y3 - y2) / (x3 - x2) - (y2 - y1) / (x2 - x1)) / (x3 - x1)
    if curvature <= 0:
        lowest = min(points, key=lambda p: p[1])
        outward = x3 + (x3 - x2) if lowest[0] == x3 else (x1 - (x2 - x1) if lowest[0] == x1 else lowest[0])
        return outward, -math.inf
    slope = (y2 - y1) / (x2 - x1) - curvature * (x1 + x2)
    vertex = -slope / (2 * curvature)
    value = y1 + (vertex - x1) * ((y2 - y1) / (x2 - x1) + curvature * (vertex - x2))
    return vertex, value


def _on_steps(alpha: float) -> float:
    return round(alpha / SHRINK_STEP) * SHRINK_STEP


def _close_to_noise(curve: SparseCurve, losses: dict[tuple, float], line_ok: bool) -> bool:
    """Whether the best candidate's win over keeping the checkpoint is within NOISE_CHECK times the
    jitter seen on the points evaluated, or the jitter cannot be told from them (fewer than three:
    then the middle of the curve is evaluated first): then the choice waits for the whole curve."""
    last = losses[(REFERENCE, None, None)]
    best = min(loss for (method, _, _), loss in losses.items() if _competes(method, line_ok))
    if best >= last or len(curve.futures) == len(curve.checkpoints):
        return False
    points = curve.known()
    steps = [curve.checkpoints[index].step for index, _ in points]
    return len(points) < 3 or last - best <= NOISE_CHECK * curve_noise([loss for _, loss in points], steps)


def reference_loss_backtest(run: Run, forecaster: Forecaster, scores: CandidateScores) -> LossBacktest:
    """The reference forecaster and the alternatives, scored on the reference run up to the forecast's
    last target, where the truth is known."""
    cut = run.steps.index(forecaster.context_end)
    curve = SparseCurve(run, cut, scores)
    futures = _alternatives(run, forecaster, scores, curve.at(0))
    futures[(FORECAST.key, forecaster.anchor, forecaster.shrink)] = scores.combination(
        candidates(run, forecaster)[FORECAST.key], "reference forecast"
    )
    curve.complete()
    return _scored(run, cut, scores, sorted(curve.futures.items()), futures)


def _alternatives(run: Run, forecaster: Forecaster, scores: CandidateScores, kept: Future) -> dict[tuple, Future]:
    """The alternatives' scores: keeping the checkpoint at the context end (`kept`, the curve's first
    point), the straight line and the average of the last checkpoints."""
    options = candidates(run, forecaster)
    futures: dict[tuple, Future] = {(REFERENCE, None, None): kept}
    for candidate in baselines():
        if candidate.key != REFERENCE:
            futures[(candidate.key, None, None)] = scores.combination(options[candidate.key], options[candidate.key].method)
    return futures


def _scored(
    run: Run, cut: int, scores: CandidateScores, pending: list[tuple[int, Future]], futures: dict[tuple, Future], line_ok: bool = True
) -> LossBacktest:
    """Wait for every score, place each candidate on the run's loss curve (`pending`: the curve's
    checkpoints evaluated, by index from the cut), and choose."""
    settle([future for _, future in pending] + list(futures.values()))
    steps = run.steps[cut:]
    curve = [(steps[index], future.result().loss) for index, future in pending]
    losses = {key: future.result().loss for key, future in futures.items()}
    forecasts = [loss for (method, _, _), loss in losses.items() if method == FORECAST.key]
    earlier = _earlier_losses(run, cut, scores, curve, min(forecasts, default=losses[(REFERENCE, None, None)]))
    points = [
        LossPoint(method, anchor, alpha, loss, *steps_saved(curve, earlier, loss)) for (method, anchor, alpha), loss in losses.items()
    ]
    forecasts = [p for p in points if p.method == FORECAST.key]
    around = [*reversed(earlier), *curve]
    noise = curve_noise([value for _, value in around], [step for step, _ in around])
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
    competing = (p for p in points if _competes(p.method, line_tested))
    best = min(competing, key=lambda p: (p.loss, p.method != REFERENCE))
    return best if best.loss < last.loss - noise else last


def _forecast_future(scores: CandidateScores, run: Run, trial: Forecaster, anchor: int, alpha: float) -> Future:
    combination = candidates(run, trial.shrunk(alpha))[FORECAST.key]
    return scores.combination(combination, f"backtest forecast, anchor {anchor}, shrink {alpha:g}")


def settle(futures: Iterable[Future]) -> None:
    """Wait for every score, but raise the first failure as soon as it happens: a broken eval command
    must not wait for the others still running."""
    done, _ = wait(list(futures), return_when=FIRST_EXCEPTION)
    raise_first_failure(done)


def curve_noise(losses: Sequence[float], steps: Sequence[float] | None = None) -> float:
    """The jitter of the run's loss from checkpoint to checkpoint, as a standard deviation: for a smooth
    trend plus independent noise, each point's distance from the line through its two neighbours
    (at `steps`, evenly spaced if not given) has variance sigma^2 (1 + w1^2 + w2^2), w the neighbours'
    weights on that line (evenly spaced: a second difference, variance 6 sigma^2); the median of their
    sizes, robust to a turn in the trend. 0 with fewer than three points."""
    steps = range(len(losses)) if steps is None else steps
    scaled = []
    for (s1, y1), (s2, y2), (s3, y3) in zip(zip(steps, losses), zip(steps[1:], losses[1:]), zip(steps[2:], losses[2:])):
        w1, w3 = (s3 - s2) / (s3 - s1), (s2 - s1) / (s3 - s1)
        scaled.append(abs(y2 - w1 * y1 - w3 * y3) / math.sqrt(1 + w1 * w1 + w3 * w3))
    return 0.0 if not scaled else float(np.median(scaled) / 0.6745)


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

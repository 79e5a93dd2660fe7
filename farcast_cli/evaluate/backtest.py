"""Score a forecast against checkpoints the fit did not see, next to the obvious alternatives.

The baselines: keep the last checkpoint, extrapolate the line through the last two, and average
the last few checkpoints (LAWA). Skill = 1 - MAE(forecast) / MAE(baseline): above 0 beats it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from farcast_cli.io.engine import EngineSettings, Source, chunk_jobs, stream
from farcast_cli.forecast.write import Scratch, raise_for_non_finite_input
from farcast_cli.model.forecaster import Forecaster
from farcast_cli.io.run import Run
from farcast_cli.model.history import History
from farcast_cli.model.pairs import interpolate

METHODS = ("forecast", "last", "line", "lawa")
BASELINES = METHODS[1:]
LAWA_WINDOW = 5
INPUT_BYTES_PER_ELEMENT = 8 * 8
SCRATCH_BYTES_PER_ELEMENT = 6 * 8


@dataclass(frozen=True)
class BacktestPlan:
    """Forecast `target_step` from checkpoints (first, last); the line runs through (previous, last)."""

    first_index: int
    previous_index: int
    last_index: int
    target_step: float

    @property
    def lawa_indices(self) -> tuple[int, ...]:
        return tuple(range(max(0, self.last_index - LAWA_WINDOW + 1), self.last_index + 1))

    def inputs(self, steps: list[int]) -> list[int]:
        """Indices of every checkpoint the full backtest reads: the forecast's, the baselines' and the truth's."""
        truth = (i for i, _ in _truth_weights(steps, self.target_step))
        return sorted({self.first_index, self.previous_index, self.last_index, *self.lawa_indices, *truth})


def choose_cut(steps: list[int], rho: float) -> int | None:
    """The held-out cut whose jump ratio to the last step is closest to rho, among cuts that can be fitted."""
    s0, s1, sk = steps[0], steps[1], steps[-1]
    feasible = []
    for c in range(2, len(steps) - 1):
        rho_c = (sk - steps[c]) / (steps[c] - s0)
        if s1 + rho_c * (s1 - s0) <= steps[c] + 1e-9:
            feasible.append((abs(math.log(rho_c / rho)), -c, c))
    return min(feasible)[2] if feasible else None


SHRINK_GRID = np.linspace(0.0, 1.5, 31)


def best_shrink(last: np.ndarray, forecast: np.ndarray, truth: np.ndarray) -> float:
    """The alpha in [0, 1.5] for which last + alpha * (forecast - last) has the lowest MAE against the truth."""
    errors = [np.abs(last + alpha * (forecast - last) - truth).mean() for alpha in SHRINK_GRID]
    return float(SHRINK_GRID[int(np.argmin(errors))])


def skill(error: float, baseline_error: float) -> float | None:
    return None if baseline_error == 0 else 1.0 - error / baseline_error


class _Sums:
    def __init__(self) -> None:
        self.values = {method: [0.0, 0.0] for method in METHODS}
        self.count = 0

    def add(self, truth: torch.Tensor, predictions: dict[str, torch.Tensor], work: torch.Tensor | None = None) -> None:
        for method, predicted in predictions.items():
            error = torch.sub(predicted, truth, out=work)
            self.values[method][0] += float(error.abs_().sum())
            self.values[method][1] += float(torch.dot(error, error))
        self.count += truth.numel()

    def finite(self) -> bool:
        return all(math.isfinite(v) for pair in self.values.values() for v in pair)

    def merge(self, other: _Sums) -> None:
        for method in METHODS:
            self.values[method][0] += other.values[method][0]
            self.values[method][1] += other.values[method][1]
        self.count += other.count

    def summary(self) -> dict:
        n = max(self.count, 1)
        result: dict = {"numel": self.count}
        for method in METHODS:
            result[method] = {"mae": self.values[method][0] / n, "rmse": math.sqrt(self.values[method][1] / n)}
        for baseline in BASELINES:
            result[f"skill_vs_{baseline}"] = skill(result["forecast"]["mae"], result[baseline]["mae"])
        return result


def line_slopes(previous_step: float, last_step: float, target_steps: list[float]) -> list[float]:
    """How many (last - previous) steps the straight line travels to reach each target."""
    return [(target - last_step) / (last_step - previous_step) for target in target_steps]


def _predictions(forecaster: Forecaster, values: dict[int, torch.Tensor], plan: BacktestPlan, steps, scratch: Scratch | None, name: str) -> dict[str, torch.Tensor]:
    last, previous = values[plan.last_index], values[plan.previous_index]
    buffer = (lambda slot: scratch.get(last.numel(), last.dtype, last.device, slot=slot)) if scratch else (lambda slot: None)  # noqa: E731
    (slope,) = line_slopes(steps[plan.previous_index], steps[plan.last_index], [plan.target_step])
    first_lawa, *other_lawa = plan.lawa_indices
    lawa = torch.mul(values[first_lawa], 1.0 / len(plan.lawa_indices), out=buffer(3))
    for index in other_lawa:
        lawa.add_(values[index], alpha=1.0 / len(plan.lawa_indices))
    return {
        "forecast": forecaster.apply(values[plan.first_index], last, len(forecaster.offsets) - 1, out=buffer(2), name=name),
        "last": last,
        "line": torch.sub(last, previous, out=buffer(1)).mul_(slope).add_(last),
        "lawa": lawa,
    }


def _truth_weights(steps: list[int], target: float) -> list[tuple[int, float]]:
    if target in steps:
        return [(steps.index(target), 1.0)]
    i = int(np.searchsorted(steps, target)) - 1
    alpha = (target - steps[i]) / (steps[i + 1] - steps[i])
    return [(i, 1.0 - alpha), (i + 1, alpha)]


def _truth(values: dict[int, torch.Tensor], parts: list[tuple[int, float]], out: torch.Tensor) -> torch.Tensor:
    """The true weights at the target: a checkpoint's chunk itself, or interpolated between two into `out`."""
    if len(parts) == 1:
        return values[parts[0][0]]
    (i, a), (j, b) = parts
    return torch.mul(values[i], a, out=out).add_(values[j], alpha=b)


def backtest_streaming(run: Run, plan: BacktestPlan, forecaster: Forecaster, settings: EngineSettings) -> dict:
    """Evaluate over every coordinate of every float tensor, chunk by chunk."""
    truth_parts = _truth_weights(run.steps, plan.target_step)
    needed = plan.inputs(run.steps)
    jobs = [
        job
        for info in run.tensor_infos()
        if info.is_forecast and info.numel > 0
        for job in chunk_jobs(info.name, info.numel, settings.chunk_elements, tuple(Source(*run.checkpoints[i].tensor(info.name)) for i in needed))
    ]
    scratch = Scratch(settings.chunk_elements)
    per_tensor: dict[str, _Sums] = {}
    for job, data in stream(jobs, settings):
        values = dict(zip(needed, data))
        count, like = data[0].numel(), data[0]
        truth = _truth(values, truth_parts, scratch.get(count, like.dtype, like.device, slot=4))
        sums = per_tensor.setdefault(job.name, _Sums())
        sums.add(truth, _predictions(forecaster, values, plan, run.steps, scratch, job.name), scratch.get(count, like.dtype, like.device, slot=5))
        if not sums.finite():
            raise_for_non_finite_input(job, data)
    overall = _Sums()
    for sums in per_tensor.values():
        overall.merge(sums)
    return {"scope": "all coordinates", "tensors": {name: sums.summary() for name, sums in per_tensor.items()}, "overall": overall.summary()}


def backtest_sample(history: History, plan: BacktestPlan, forecaster: Forecaster) -> dict:
    """Evaluate on the sampled coordinates only: cheap, and close to the full figure for large samples."""
    columns = torch.from_numpy(history.values)
    truth = torch.from_numpy(interpolate(history, plan.target_step))
    per_tensor, overall = {}, _Sums()
    for index, name in enumerate(history.tensor_names):
        rows = torch.from_numpy(np.nonzero(history.tensor_index == index)[0])
        values = {i: columns[rows, i] for i in range(columns.shape[1])}
        sums = _Sums()
        sums.add(truth[rows], _predictions(forecaster, values, plan, list(history.steps), None, name))
        per_tensor[name] = sums.summary()
        overall.merge(sums)
    return {"scope": f"{columns.shape[0]} sampled coordinates", "tensors": per_tensor, "overall": overall.summary()}

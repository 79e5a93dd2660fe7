"""Score a forecast against checkpoints the fit did not see, next to the two obvious baselines.

The baselines: keep the last checkpoint, and extrapolate the line through the last two.
Skill = 1 - MAE(forecast) / MAE(baseline): above 0 beats the baseline, 1 is perfect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from farcast_cli.engine import EngineSettings, Source, chunk_jobs, stream
from farcast_cli.forecast import Scratch, raise_for_non_finite_input
from farcast_cli.forecaster import Forecaster
from farcast_cli.run import Run
from farcast_cli.sampling import History
from farcast_cli.training_data import interpolate

METHODS = ("forecast", "last", "line")
INPUT_BYTES_PER_ELEMENT = 5 * 8
SCRATCH_BYTES_PER_ELEMENT = 4 * 8


@dataclass(frozen=True)
class BacktestPlan:
    """Forecast `target_step` from (first, last); the line runs through (previous, last)."""

    first_index: int
    previous_index: int
    last_index: int
    target_step: float


def choose_cut(steps: list[int], rho: float) -> int | None:
    """The held-out cut whose jump ratio to the last step is closest to rho, among cuts that can be fitted."""
    s0, s1, sk = steps[0], steps[1], steps[-1]
    feasible = []
    for c in range(2, len(steps) - 1):
        rho_c = (sk - steps[c]) / (steps[c] - s0)
        if s1 + rho_c * (s1 - s0) <= steps[c] + 1e-9:
            feasible.append((abs(math.log(rho_c / rho)), -c, c))
    return min(feasible)[2] if feasible else None


class _Sums:
    def __init__(self) -> None:
        self.values = {method: [0.0, 0.0] for method in METHODS}
        self.count = 0

    def add(self, truth: torch.Tensor, predictions: dict[str, torch.Tensor], work: torch.Tensor | None = None) -> None:
        for method, predicted in predictions.items():
            error = torch.sub(predicted, truth, out=work)
            self.values[method][0] += float(error.abs_().sum(dtype=torch.float64))
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
        for baseline in ("last", "line"):
            result[f"skill_vs_{baseline}"] = skill(result["forecast"]["mae"], result[baseline]["mae"])
        return result


def skill(error: float, baseline_error: float) -> float | None:
    return None if baseline_error == 0 else 1.0 - error / baseline_error


def _predictions(forecaster: Forecaster, first, previous, last, previous_step, last_step, target_step, scratch: Scratch | None = None) -> dict[str, torch.Tensor]:
    slope = (target_step - last_step) / (last_step - previous_step)
    buffer = (lambda slot: scratch.get(last.numel(), last.dtype, last.device, slot=slot)) if scratch else (lambda slot: None)  # noqa: E731
    line = torch.sub(last, previous, out=buffer(1)).mul_(slope).add_(last)
    return {"forecast": forecaster.apply(first, last, len(forecaster.offsets) - 1, out=buffer(2)), "last": last, "line": line}


def _truth_weights(steps: list[int], target: float) -> list[tuple[int, float]]:
    if target in steps:
        return [(steps.index(target), 1.0)]
    i = int(np.searchsorted(steps, target)) - 1
    alpha = (target - steps[i]) / (steps[i + 1] - steps[i])
    return [(i, 1.0 - alpha), (i + 1, alpha)]


def backtest_streaming(run: Run, plan: BacktestPlan, forecaster: Forecaster, settings: EngineSettings) -> dict:
    """Evaluate over every coordinate of every float tensor, chunk by chunk."""
    checkpoints = run.checkpoints
    truth_parts = _truth_weights(run.steps, plan.target_step)
    inputs = [checkpoints[i] for i in (plan.first_index, plan.previous_index, plan.last_index)] + [checkpoints[i] for i, _ in truth_parts]
    previous_step, last_step = run.steps[plan.previous_index], run.steps[plan.last_index]
    jobs = [
        job
        for info in run.tensor_infos()
        if info.is_forecast and info.numel > 0
        for job in chunk_jobs(info.name, info.numel, settings.chunk_elements, tuple(Source(*c.tensor(info.name)) for c in inputs))
    ]
    scratch = Scratch(settings.chunk_elements)
    per_tensor: dict[str, _Sums] = {}
    for job, data in stream(jobs, settings):
        first, previous, last, *truths = data
        truth = truths[0] if len(truths) == 1 else torch.mul(truths[0], truth_parts[0][1], out=scratch.get(last.numel(), last.dtype, last.device, slot=3)).add_(truths[1], alpha=truth_parts[1][1])
        sums = per_tensor.setdefault(job.name, _Sums())
        sums.add(truth, _predictions(forecaster, first, previous, last, previous_step, last_step, plan.target_step, scratch), scratch.get(last.numel(), last.dtype, last.device, slot=4))
        if not sums.finite():
            raise_for_non_finite_input(job, data)
    overall = _Sums()
    for sums in per_tensor.values():
        overall.merge(sums)
    return {"scope": "all coordinates", "tensors": {name: sums.summary() for name, sums in per_tensor.items()}, "overall": overall.summary()}


def backtest_sample(history: History, plan: BacktestPlan, forecaster: Forecaster) -> dict:
    """Evaluate on the sampled coordinates only: cheap, and close to the full figure for large samples."""
    values = torch.from_numpy(history.values)
    steps = history.steps
    truth = torch.from_numpy(interpolate(history, plan.target_step))
    predictions = _predictions(
        forecaster, values[:, plan.first_index], values[:, plan.previous_index], values[:, plan.last_index],
        steps[plan.previous_index], steps[plan.last_index], plan.target_step,
    )
    per_tensor, overall = {}, _Sums()
    for index, name in enumerate(history.tensor_names):
        rows = torch.from_numpy(np.nonzero(history.tensor_index == index)[0])
        sums = _Sums()
        sums.add(truth[rows], {method: predicted[rows] for method, predicted in predictions.items()})
        per_tensor[name] = sums.summary()
        overall.merge(sums)
    return {"scope": f"{values.shape[0]} sampled coordinates", "tensors": per_tensor, "overall": overall.summary()}

"""What farcast can write, each a linear combination of the run's checkpoints (model/linear.py):
the forecast, and the three alternatives every report compares it with: keeping the last checkpoint,
the straight line through the last two, and the average of the last few (LAWA)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from farcast_cli.io.run import Checkpoint, Run
from farcast_cli.model.forecaster import Forecaster
from farcast_cli.model.linear import LinearMap

METHODS = ("forecast", "last", "line", "lawa")
LABELS = {"forecast": "forecast", "last": "keep last", "line": "straight line", "lawa": "average of the last checkpoints"}
BASELINES = METHODS[1:]
LAWA_WINDOW = 5


@dataclass(frozen=True)
class Combination:
    """Output j of tensor `name` is map_for(name) applied to the inputs' values of that tensor, computed
    in float32 (float64 for F64 tensors)."""

    method: str
    inputs: tuple[Checkpoint, ...]
    shared: LinearMap
    target_steps: tuple[int, ...]
    per_tensor: dict[str, LinearMap] = field(default_factory=dict)

    def map_for(self, name: str | None) -> LinearMap:
        return self.per_tensor.get(name, self.shared)

    def apply(self, values: Sequence[torch.Tensor], output: int, out: torch.Tensor | None = None, name: str | None = None) -> torch.Tensor:
        return self.map_for(name).apply(values, output, out)

    def kept_input(self) -> Checkpoint | None:
        """The input checkpoint that every output of every tensor equals unchanged, if there is one."""
        maps = [self.shared, *self.per_tensor.values()]
        kept = {linear.kept_input(j) for linear in maps for j in range(linear.outputs)}
        return self.inputs[kept.pop()] if len(kept) == 1 and None not in kept else None

    @property
    def from_steps(self) -> list[int]:
        return [checkpoint.step for checkpoint in self.inputs]


def candidate_inputs(run: Run, end: int, forecast_inputs: list[int] | None = None) -> dict[str, list[Checkpoint]]:
    """The checkpoints each candidate combines, forecasting from checkpoint number `end`; the forecast's
    are at `forecast_inputs` (default: the first and the last)."""
    previous, last = run.checkpoints[end - 1], run.checkpoints[end]
    return {
        "forecast": [run.checkpoints[i] for i in (forecast_inputs or [0, end])],
        "last": [last],
        "line": [previous, last],
        "lawa": run.checkpoints[max(0, end - LAWA_WINDOW + 1) : end + 1],
    }


def line_slopes(previous_step: float, last_step: float, target_steps: Sequence[float]) -> list[float]:
    """How many (last - previous) steps the straight line travels to reach each target."""
    return [(target - last_step) / (last_step - previous_step) for target in target_steps]


def line_tested(previous: float, last: float, target: float, horizon: float, spacing: float) -> bool:
    """Whether a backtest's straight line (previous, last -> target) extrapolated at least as many
    checkpoint spacings as the line asked for (`horizon` past the run's last `spacing`): the line's
    error grows with its extrapolation, so a win on a shorter one says nothing for a longer one."""
    return (target - last) / (last - previous) >= horizon / spacing - 1e-9


def candidates(run: Run, forecaster: Forecaster) -> dict[str, Combination]:
    """Everything predict can write for this run, forecasting from the forecaster's context end."""
    end = run.steps.index(forecaster.context_end)
    inputs = candidate_inputs(run, end, forecaster.input_indices(end))
    targets, outputs = tuple(forecaster.target_steps), len(forecaster.offsets)
    previous, last = inputs["line"]
    slopes = line_slopes(previous.step, last.step, targets)
    window = inputs["lawa"]
    zero = [0.0] * outputs
    maps = {
        "forecast": forecaster.shared,
        "last": LinearMap.keep(1, 0, outputs),
        "line": LinearMap.of([[-s for s in slopes], [1.0 + s for s in slopes]], zero),
        "lawa": LinearMap.of([[1.0 / len(window)] * outputs] * len(window), zero),
    }
    labels = {**LABELS, "forecast": "farcast", "lawa": f"average of the last {len(window)}"}
    return {
        method: Combination(
            labels[method], tuple(inputs[method]), maps[method], targets, forecaster.per_tensor if method == "forecast" else {}
        )
        for method in METHODS
    }

"""What farcast can write, each a linear combination of the run's checkpoints (model/linear.py): the
forecast, and the alternatives every report compares it with. They are all in one registry,
CANDIDATES: the weight backtest, the loss backtest, the report, the renderer, the plot and the dry-run
plan iterate over it, so adding a candidate is one `Candidate` definition and one `register` line
(README, "Adding a candidate")."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from farcast_cli.io.run import Checkpoint, Run
from farcast_cli.model.forecaster import Forecaster
from farcast_cli.model.linear import LinearMap

LAWA_WINDOW = 5

Inputs = Callable[[Sequence[Checkpoint], int], list[Checkpoint]]
"""The checkpoints a candidate combines, from the run's checkpoints and the index of the last one used."""
Combine = Callable[[Sequence[Checkpoint], tuple[int, ...]], LinearMap]
"""A candidate's map from its inputs to its outputs, one per target step."""


@dataclass(frozen=True)
class Combination:
    """Output j of tensor `name` is map_for(name) applied to the inputs' values of that tensor, computed
    in float32 (float64 for F64 tensors). `key` is the candidate's (CANDIDATES); `method` names it in the
    written files' metadata."""

    method: str
    inputs: tuple[Checkpoint, ...]
    shared: LinearMap
    target_steps: tuple[int, ...]
    per_tensor: dict[str, LinearMap] = field(default_factory=dict)
    key: str = "forecast"

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


@dataclass(frozen=True)
class Candidate:
    """One thing predict can write and every backtest scores.

    key: its name in the JSON report (`errors[key]`, `skill_vs_<key>`, `beats_<key>`) and table columns;
    label: short, for loss lines; name: in the verdict's prose; written: what the output is when written
    instead of the forecast; provenance: the `method` written in the files' metadata, from its inputs;
    inputs/combine: the checkpoints it combines and its map (the forecast's map is fitted instead, by the
    forecaster: `combine` None); most_inputs: the most checkpoints it reads at once, for the memory plan;
    extrapolates: it competes only where the backtest extrapolated it as far as the jump asked (line_tested).
    """

    key: str
    label: str
    name: str
    written: str
    provenance: Callable[[Sequence[Checkpoint]], str]
    inputs: Inputs
    combine: Combine | None
    most_inputs: int
    extrapolates: bool = False

    @property
    def fitted(self) -> bool:
        return self.combine is None

    def combination(self, checkpoints: Sequence[Checkpoint], end: int, forecaster: Forecaster) -> Combination:
        """This candidate forecasting the forecaster's target steps from checkpoint number `end`."""
        targets = tuple(forecaster.target_steps)
        if self.fitted:
            inputs = [checkpoints[i] for i in forecaster.input_indices(end)]
            return Combination(self.provenance(inputs), tuple(inputs), forecaster.shared, targets, forecaster.per_tensor, self.key)
        inputs = self.inputs(checkpoints, end)
        return Combination(self.provenance(inputs), tuple(inputs), self.combine(inputs, targets), targets, key=self.key)


def line_slopes(previous_step: float, last_step: float, target_steps: Sequence[float]) -> list[float]:
    """How many (last - previous) steps the straight line travels to reach each target."""
    return [(target - last_step) / (last_step - previous_step) for target in target_steps]


def line_tested(previous: float, last: float, target: float, horizon: float, spacing: float) -> bool:
    """Whether a backtest's straight line (previous, last -> target) extrapolated at least as many
    checkpoint spacings as the line asked for (`horizon` past the run's last `spacing`): the line's
    error grows with its extrapolation, so a win on a shorter one says nothing for a longer one."""
    return (target - last) / (last - previous) >= horizon / spacing - 1e-9


def _line(inputs: Sequence[Checkpoint], targets: tuple[int, ...]) -> LinearMap:
    previous, last = inputs
    slopes = line_slopes(previous.step, last.step, targets)
    return LinearMap.of([[-s for s in slopes], [1.0 + s for s in slopes]], [0.0] * len(targets))


def _average(inputs: Sequence[Checkpoint], targets: tuple[int, ...]) -> LinearMap:
    return LinearMap.of([[1.0 / len(inputs)] * len(targets)] * len(inputs), [0.0] * len(targets))


FORECAST = Candidate(
    key="forecast",
    label="forecast",
    name="the forecast",
    written="the forecast",
    provenance=lambda inputs: "farcast",
    inputs=lambda checkpoints, end: [checkpoints[0], checkpoints[end]],
    combine=None,
    most_inputs=2,
)
KEEP_LAST = Candidate(
    key="last",
    label="keep last",
    name="keeping the last checkpoint",
    written="the last checkpoint, unchanged",
    provenance=lambda inputs: "keep last",
    inputs=lambda checkpoints, end: [checkpoints[end]],
    combine=lambda inputs, targets: LinearMap.keep(1, 0, len(targets)),
    most_inputs=1,
)
STRAIGHT_LINE = Candidate(
    key="line",
    label="straight line",
    name="a straight line",
    written="the straight line through the last two checkpoints",
    provenance=lambda inputs: "straight line",
    inputs=lambda checkpoints, end: [checkpoints[end - 1], checkpoints[end]],
    combine=_line,
    most_inputs=2,
    extrapolates=True,
)
LAWA = Candidate(
    key="lawa",
    label="average of the last checkpoints",
    name="averaging the last checkpoints",
    written="the average of the last checkpoints",
    provenance=lambda inputs: f"average of the last {len(inputs)}",
    inputs=lambda checkpoints, end: list(checkpoints[max(0, end - LAWA_WINDOW + 1) : end + 1]),
    combine=_average,
    most_inputs=LAWA_WINDOW,
)

CANDIDATES: dict[str, Candidate] = {}
"""Every candidate by key, in the order of the report's columns: the forecast first, keeping the last
checkpoint (the reference of every skill) second."""
REFERENCE = KEEP_LAST.key


def register(candidate: Candidate) -> Candidate:
    """Add a candidate to every backtest, report and table from now on."""
    if candidate.key in CANDIDATES:
        raise ValueError(f"a candidate {candidate.key!r} is registered already")
    CANDIDATES[candidate.key] = candidate
    return candidate


def unregister(key: str) -> None:
    if key in (FORECAST.key, REFERENCE):
        raise ValueError(f"the candidate {key!r} is one every report needs")
    del CANDIDATES[key]


for _candidate in (FORECAST, KEEP_LAST, STRAIGHT_LINE, LAWA):
    register(_candidate)


def baselines() -> list[Candidate]:
    """The alternatives to the forecast, in the registry's order."""
    return [candidate for candidate in CANDIDATES.values() if not candidate.fitted]


def candidate_inputs(run: Run, end: int) -> dict[str, list[Checkpoint]]:
    """The checkpoints each candidate combines, forecasting from checkpoint number `end` (the forecast's:
    the first and the last, as an anchor of 1 has them)."""
    return {key: candidate.inputs(run.checkpoints, end) for key, candidate in CANDIDATES.items()}


def candidates(run: Run, forecaster: Forecaster) -> dict[str, Combination]:
    """Everything predict can write for this run, forecasting from the forecaster's context end."""
    end = run.steps.index(forecaster.context_end)
    return {key: candidate.combination(run.checkpoints, end, forecaster) for key, candidate in CANDIDATES.items()}

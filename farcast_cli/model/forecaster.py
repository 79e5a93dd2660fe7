"""The forecaster, and every way of fitting it: on the run itself or on a reference run, with one
shared map or one per tensor, shrunk towards the last checkpoint by a factor its own backtest picks.

A Forecaster holds linear maps (model/linear.py) over its input checkpoints: the first checkpoint, and
the last `anchor` checkpoints up to its context end (1: the last one alone, PAPER.md's two points);
one map shared by every tensor, and one for each tensor that had enough sampled coordinates to fit
its own. The fit learns y = A[0] first + A[1] mean(window) + b; spread over the window's checkpoints
that is one map over 1 + anchor inputs, and shrinking moves it towards the last of them.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from farcast_cli import __version__
from farcast_cli.errors import InputError, OutputError, UsageError, parameter, publishing
from farcast_cli.model.fit import (
    FitInfo,
    FitSettings,
    closed_form_info,
    coordinate_cells,
    fit_linear_map,
    fit_linear_maps,
    fit_pair_sums,
    from_known,
    map_of,
)
from farcast_cli.model.history import History
from farcast_cli.model.linear import LinearMap
from farcast_cli.model.pairs import ColumnSums, Pairs, reference_pairs, self_pair_sums, self_pairs

FORMAT = "farcast-forecaster/1"
MIN_TENSOR_SAMPLE = 64
SHRINK_GRID = np.linspace(0.0, 1.5, 31)


@dataclass
class Forecaster:
    """A fitted forecaster with everything needed to apply it again."""

    mode: str
    first_step: int
    context_end: int
    offsets: list[int]
    shared: LinearMap
    settings: FitSettings
    fit_info: FitInfo = FitInfo()
    report: dict | None = None
    version: str = __version__
    per_tensor: dict[str, LinearMap] = field(default_factory=dict)
    anchor: int = 1

    @property
    def horizon(self) -> int:
        return self.offsets[-1]

    @property
    def target_steps(self) -> list[int]:
        return [self.context_end + o for o in self.offsets]

    @property
    def shrink(self) -> float:
        return self.fit_info.shrink

    def input_indices(self, end: int) -> list[int]:
        """Positions of the input checkpoints among a run's, forecasting from checkpoint number `end`."""
        if end < self.anchor:
            raise UsageError(f"an anchor of {self.anchor} checkpoints needs {self.anchor} checkpoints after the first; there are {end}")
        return [0, *range(end - self.anchor + 1, end + 1)]

    def map_for(self, name: str) -> LinearMap:
        """The tensor's own map where it was fitted per tensor, else the shared one."""
        return self.per_tensor.get(name, self.shared)

    def shrunk(self, alpha: float) -> Forecaster:
        """The forecast moved towards the last checkpoint: last + alpha * (forecast - last), still linear."""
        last = self.anchor
        per_tensor = {name: linear.shrunk(alpha, last) for name, linear in self.per_tensor.items()}
        return replace(self, shared=self.shared.shrunk(alpha, last), per_tensor=per_tensor, fit_info=replace(self.fit_info, shrink=alpha))

    def on_history(self, history: History, end: int, output: int) -> np.ndarray:
        """The forecast of every sampled coordinate from history column `end` (and the columns before it)."""
        values = torch.from_numpy(history.values)
        columns = self.input_indices(end)
        result = torch.empty(values.shape[0], dtype=values.dtype)
        for index, rows in _tensor_rows(history.tensor_index, len(history.tensor_names)):
            out = result[rows] if isinstance(rows, slice) else None
            forecast = self.map_for(history.tensor_names[index]).apply([values[rows, k] for k in columns], output, out=out)
            if forecast is not out:
                result[rows] = forecast
        return result.numpy()

    def as_dict(self) -> dict:
        """The saved form, farcast-forecaster/1: maps as weight (1 + anchor inputs x m outputs) and bias (m) lists."""
        data = {key: value for key, value in asdict(self).items() if key not in ("shared", "per_tensor")}
        data["fit_info"] = self.fit_info.to_json()
        weight, bias = self.shared.as_lists()
        return {**data, "weight": weight, "bias": bias, "per_tensor": {name: linear.as_lists() for name, linear in self.per_tensor.items()}}

    def save(self, path: Path) -> None:
        temporary = Path(path).with_name(f".{Path(path).name}.tmp")
        try:
            temporary.write_text(json.dumps({"format": FORMAT, **self.as_dict()}, indent=1))
            with publishing(Path(path)):
                temporary.replace(path)
        except OSError as error:
            temporary.unlink(missing_ok=True)
            raise OutputError(f"{path}: cannot write: {error.strerror}") from None

    @classmethod
    def load(cls, path: Path) -> Forecaster:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise InputError(f"{path}: cannot read a forecaster: {error}") from None
        if not isinstance(data, dict) or data.pop("format", None) != FORMAT:
            raise InputError(f"{path}: not a farcast forecaster file (expected format {FORMAT})")
        try:
            outputs, inputs = len(data["offsets"]), 1 + data.get("anchor", 1)
            shared = _linear_map(data.pop("weight"), data.pop("bias"), inputs, outputs)
            per_tensor = {name: _linear_map(*pair, inputs, outputs) for name, pair in data.pop("per_tensor", {}).items()}
            settings, fit_info = from_known(FitSettings, data.pop("settings")), FitInfo.from_json(data.pop("fit_info", {}))
            return cls(shared=shared, per_tensor=per_tensor, settings=settings, fit_info=fit_info, **data)
        except (KeyError, TypeError, ValueError, UsageError) as error:
            raise InputError(f"{path}: forecaster file is incomplete or from another version ({error})") from None


def _tensor_rows(tensor_index: np.ndarray, tensors: int) -> list[tuple[int, slice | torch.Tensor]]:
    """Each sampled tensor's rows of a history: a slice where they are consecutive (as read or observed:
    a view of each column, no gather), else their indices."""
    breaks = np.flatnonzero(tensor_index[1:] != tensor_index[:-1]) + 1
    begins, ends = [0, *breaks.tolist()], [*breaks.tolist(), len(tensor_index)]
    owners = tensor_index[begins].tolist() if len(tensor_index) else []
    if len(set(owners)) == len(owners):
        return [(owner, slice(begin, end)) for owner, begin, end in zip(owners, begins, ends)]
    return [(index, torch.from_numpy(np.nonzero(tensor_index == index)[0])) for index in range(tensors) if index in owners]


def _linear_map(weight: list, bias: list, inputs: int, outputs: int) -> LinearMap:
    linear = LinearMap.of(weight, bias)
    if len(linear.weight) != inputs or any(len(row) != outputs for row in linear.weight) or linear.outputs != outputs:
        raise ValueError(f"expected {inputs} x {outputs} weights and {outputs} biases")
    if not all(math.isfinite(v) for v in (*linear.bias, *(w for row in linear.weight for w in row))):
        raise ValueError("coefficients must be finite numbers")
    return linear


@dataclass(frozen=True)
class SelfFit:
    """A fit on the run itself. `forecaster` is fitted on the whole history and shrunk; `trial` is the
    same fit, unshrunk, on the history up to a held-out cut (None when the run is too short to hold
    any checkpoints out); `scored` is the trial shrunk the way `forecaster` was, by a factor chosen
    without the held-out checkpoints: the backtest scores it, so its figures stay out of sample.
    `plain` is `forecaster` before its shrink, for a caller that shrinks it by a factor of its own
    (the loss decision) without fitting it again."""

    forecaster: Forecaster
    trial: Forecaster | None
    scored: Forecaster | None
    plain: Forecaster | None = None


def fit_on_run(
    history: History,
    horizon: int,
    offsets: list[int],
    settings: FitSettings,
    anchor: int = 1,
    scored: bool = True,
    sums: ColumnSums | None = None,
    scored_shrink: float | None = None,
    shrink_scratch: np.ndarray | None = None,
) -> SelfFit:
    """The default mode: learn the jump from the run's own history (model/pairs.py's time rule),
    then shrink towards the last checkpoint by settings.shrink, or (None) by the factor that did best
    in a backtest on this same history (benchmarks/RESULTS.md: the most robust variant). With
    scored=False the trial is not shrunk for the backtest (`scored` None): one fit fewer, for a caller
    that judges the forecast otherwise (the in-loop farcaster verified by the user's loss). `sums`: the
    closed form's column sums for this history (`column_sums`), kept by a caller that fits the same
    growing history again (the in-loop farcaster); the fits here share them in any case.
    `scored_shrink`: a factor for the scored trial chosen elsewhere without the history's last
    checkpoint (the in-loop farcaster's previous jump), instead of choosing one from another trial
    fitted on the history up to the scored trial's cut (settings.shrink, where given, is used either way).
    `shrink_scratch`: `best_shrink`'s working array, kept by a caller that fits again and again."""
    if settings.objective == "l2" and sums is None:
        sums = column_sums(history, settings)
    trial = held_out_trial(history, horizon, settings, anchor, sums)
    plain = fit_plain(history, horizon, offsets, settings, anchor, sums)
    forecaster = plain.shrunk(_shrink_factor(history, trial, settings, shrink_scratch))
    if trial is None or not scored:
        return SelfFit(forecaster, trial, None, plain)
    if scored_shrink is not None and settings.shrink is None:
        return SelfFit(forecaster, trial, trial.shrunk(scored_shrink), plain)
    held_out = history.truncated(history.column(trial.context_end))
    inner = held_out_trial(held_out, trial.horizon, settings, anchor, sums) if settings.shrink is None else None
    return SelfFit(forecaster, trial, trial.shrunk(_shrink_factor(held_out, inner, settings, shrink_scratch)), plain)


def fit_on_reference(
    history: History, context_end: int, offsets: list[int], settings: FitSettings, anchor: int = 1, validation: History | None = None
) -> Forecaster:
    """The paper's protocol: learn (w at s_0, w at E) -> w at E + H from a complete reference run,
    stopped early on a separate `validation` run's pairs where one is given (else on held-out
    coordinates of the reference run). Shrinks only by a number given in settings.shrink: here the fit
    already saw the truth."""
    pairs = reference_pairs(history, context_end, offsets, anchor)
    held = None if validation is None else _Held(validation, reference_pairs(validation, context_end, offsets, anchor))
    forecaster = _forecaster("reference", history, context_end, offsets, pairs, settings, anchor, held)
    return forecaster.shrunk(1.0 if settings.shrink is None else settings.shrink)


@dataclass(frozen=True)
class _Held:
    """A validation run's sampled history and its pairs, which decide when a fit has converged."""

    history: History
    pairs: Pairs

    def of_tensor(self, name: str) -> Pairs | None:
        """The pairs of one tensor's coordinates, or None when the validation run sampled none of it."""
        if name not in self.history.tensor_names:
            return None
        rows = np.isin(self.pairs.coordinate, self.history.rows_of(self.history.tensor_names.index(name)))
        return self.pairs.subset(rows) if rows.any() else None


def held_out_trial(
    history: History, horizon: int, settings: FitSettings, anchor: int = 1, sums: ColumnSums | None = None
) -> Forecaster | None:
    """The unshrunk fit on the history up to the backtest's cut, forecasting the last checkpoint,
    or None when no cut can be fitted (or the cut leaves too few checkpoints for the anchor)."""
    steps = list(history.steps)
    cut = held_out_cut(history, horizon)
    if cut is None or cut < anchor:
        return None
    jump = int(steps[-1] - steps[cut])
    return fit_plain(history.truncated(cut), jump, [jump], settings, anchor, sums)


def held_out_cut(history: History, horizon: int) -> int | None:
    """The checkpoint number at which `held_out_trial` cuts the history (None: no cut can be fitted)."""
    steps = list(history.steps)
    return choose_cut(steps, horizon / (steps[-1] - steps[0]))


def choose_cut(steps: list[int], rho: float) -> int | None:
    """The held-out cut whose jump ratio to the last step is closest to rho, among cuts that can be fitted."""
    s0, s1, sk = steps[0], steps[1], steps[-1]
    feasible = []
    for c in range(2, len(steps) - 1):
        rho_c = (sk - steps[c]) / (steps[c] - s0)
        if s1 + rho_c * (s1 - s0) <= steps[c] + 1e-9:
            feasible.append((abs(math.log(rho_c / rho)), -c, c))
    return min(feasible)[2] if feasible else None


def best_shrink(last: np.ndarray, forecast: np.ndarray, truth: np.ndarray, out: np.ndarray | None = None) -> float:
    """The alpha in SHRINK_GRID for which last + alpha * (forecast - last) has the lowest MAE against the truth.
    Every alpha's forecast is made in one (alphas x coordinates) array, in place: an array per operation and
    alpha was a fifth of a closed-form jump's time, a pass per alpha a tenth (each row the same bits).
    `out`: that array (float64, alphas x coordinates), kept by a caller that chooses again and again: a
    new one of 2 MB is mapped page by page, 0.2 ms of the 0.6 ms a choice took in the in-memory loop on
    the digits MLP (benchmarks/RESULTS.md, "A jump's own cost, sixth session")."""
    shrunk = np.multiply.outer(SHRINK_GRID, forecast - last, out=out)
    shrunk += last
    shrunk -= truth
    errors = np.abs(shrunk, out=shrunk).mean(axis=1)
    return float(SHRINK_GRID[int(np.argmin(errors))])


def _shrink_factor(history: History, trial: Forecaster | None, settings: FitSettings, scratch: np.ndarray | None = None) -> float:
    """settings.shrink, or the factor for which the held-out trial came closest to the last checkpoint."""
    if settings.shrink is not None:
        return settings.shrink
    if trial is None:
        return 1.0
    cut = history.column(trial.context_end)
    forecast = trial.on_history(history, cut, 0)
    return best_shrink(history.values[:, cut], forecast, history.values[:, -1], scratch)


def fit_plain(
    history: History, horizon: int, offsets: list[int], settings: FitSettings, anchor: int = 1, sums: ColumnSums | None = None
) -> Forecaster:
    """The unshrunk fit on the whole history, forecasting from its last checkpoint; the closed form from
    column sums (`column_sums`, of this history or of one it is a prefix of) without building the rows."""
    if len(history.steps) - 1 < anchor:
        raise UsageError(f"{parameter('anchor')} {anchor} needs {anchor + 1} checkpoints; the run has {len(history.steps)}")
    if settings.objective == "l2":
        return _closed_form_on_run(history, horizon, offsets, settings, anchor, sums or column_sums(history, settings))
    pairs = self_pairs(history, horizon, offsets, anchor)
    return _forecaster("self", history, int(history.steps[-1]), offsets, pairs, settings, anchor)


def column_sums(history: History, settings: FitSettings, measure: bool = True) -> ColumnSums:
    """Empty column sums for the closed-form fits of `history` and of its prefixes with these settings;
    without `measure`, the fits leave their held-out L1 unmeasured (None)."""
    cells = coordinate_cells(history.tensor_index, _own(history, settings), settings)
    return ColumnSums(cells, 4 * len(history.tensor_names), measure)


def kept_column_sums(store: dict[tuple, ColumnSums], history: History, settings: FitSettings) -> ColumnSums:
    """The column sums `store` keeps for a growing history, made on first use, without measuring the
    held-out L1: besides the history's sampled coordinates (the same as it grows), `column_sums` depends
    on the settings' held-out split and per_tensor alone, so those are the key."""
    key = (settings.validation_fraction, settings.seed, settings.per_tensor)
    if key not in store:
        store[key] = column_sums(history, settings, measure=False)
    return store[key]


def _own(history: History, settings: FitSettings) -> list[int]:
    """The tensors fitted a map of their own: with settings.per_tensor, those with MIN_TENSOR_SAMPLE coordinates."""
    if not settings.per_tensor:
        return []
    counts = np.bincount(history.tensor_index, minlength=len(history.tensor_names))
    return [index for index, count in enumerate(counts) if count >= MIN_TENSOR_SAMPLE]


def _closed_form_on_run(
    history: History, horizon: int, offsets: list[int], settings: FitSettings, anchor: int, sums: ColumnSums
) -> Forecaster:
    """`_forecaster`'s closed form on the run's own pairs from their sums; the held-out L1 from the rows of
    the coordinates the shared fit holds out alone."""
    own = _own(history, settings)
    summed = self_pair_sums(history, horizon, offsets, sums, anchor)
    shared, fitted = fit_pair_sums(summed, own)
    rows = int(summed.rows.sum())
    held_rows = int(summed.rows[np.arange(sums.count) % 4 < 2].sum())
    if held_rows in (0, rows):
        held_rows = rows
    if sums.measure:
        held = sums.cells % 4 < 2
        if not held.any():
            held[:] = True
        held_history = History(history.steps, history.values[held], history.tensor_index[held], history.tensor_names)
        info = closed_form_info(shared, self_pairs(held_history, horizon, offsets, anchor), rows, settings)
    else:
        info = closed_form_info(shared, None, rows, settings, held_rows)
    return Forecaster(
        "self",
        int(history.steps[0]),
        int(history.steps[-1]),
        offsets,
        _spread(map_of(shared), anchor),
        settings,
        info,
        per_tensor={history.tensor_names[index]: _spread(map_of(beta), anchor) for index, beta in fitted.items()},
        anchor=anchor,
    )


def _forecaster(
    mode: str,
    history: History,
    context_end: int,
    offsets: list[int],
    pairs: Pairs,
    settings: FitSettings,
    anchor: int,
    held: _Held | None = None,
) -> Forecaster:
    shared, info = fit_linear_map(pairs, settings, None if held is None else held.pairs)
    per_tensor = {name: _spread(linear, anchor) for name, linear in _fit_per_tensor(history, pairs, settings, held).items()}
    return Forecaster(
        mode,
        int(history.steps[0]),
        context_end,
        offsets,
        _spread(shared, anchor),
        settings,
        info,
        per_tensor=per_tensor,
        anchor=anchor,
    )


def _spread(linear: LinearMap, anchor: int) -> LinearMap:
    """The map over (first, mean of the window) as a map over (first, each checkpoint of the window)."""
    first, mean = linear.weight
    return LinearMap.of([first, *[[w / anchor for w in mean]] * anchor], linear.bias)


def _fit_per_tensor(history: History, pairs: Pairs, settings: FitSettings, held: _Held | None = None) -> dict[str, LinearMap]:
    """A map for each tensor `_own` picks, stopped early on the same tensor's pairs in `held` where it
    has any; the others keep the shared map."""
    owner = history.tensor_index[pairs.coordinate]
    names = {index: history.tensor_names[index] for index in _own(history, settings)}
    problems = [(pairs.subset(owner == index), None if held is None else held.of_tensor(name)) for index, name in names.items()]
    return {name: linear for name, (linear, _) in zip(names.values(), fit_linear_maps(problems, settings), strict=True)}

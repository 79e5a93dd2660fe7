"""Fit the forecaster's linear map to training pairs: PAPER.md's L1 loss plus its regulariser, by Adam.

The map is y = first * A[0] + last * A[1] + b (model/linear.py, K = 2 inputs, m outputs). Fitting
it as written is badly conditioned: first and last are nearly equal, so nearly collinear. It is
fitted in an equivalent form instead, each input scaled to unit size,

    y = last + s_out * (p * last / s_level + q * (last - first) / s_change + c)

(p, q, c) is a 3 x m array; at the end it is turned back into A and b (`_as_linear_map`): the same
3m-parameter map.

The fit starts from the exact least-squares solution over the training rows (`_least_squares`, normal
equations in float64, 3 x 3 per output step): objective "l2" stops there; "l1" (PAPER.md's loss, the
default) goes on by Adam from it. Adam's budget is counted in updates, not epochs, and the held-out
pairs (a share of the coordinates, or a validation run's) decide when it has converged (no gain in
`patience` checks, one check every CHECK_EVERY updates or every epoch when that is shorter), so that a
fit on 200 pairs and one on 20,000 both get there; the best held-out coefficients are kept, the start
included.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import numpy as np
import torch

from farcast_cli.errors import UsageError, parameter
from farcast_cli.model.linear import LinearMap
from farcast_cli.model.pairs import Pairs, PairSums

OBJECTIVES = ("l1", "l2")


@dataclass(frozen=True)
class FitSettings:
    sample: int = 20000
    seed: int = 0
    lam: float = 1e-5
    lr: float = 1e-2
    batch_size: int = 256
    max_updates: int = 2000
    patience: int = 5
    validation_fraction: float = 0.2
    shrink: float | None = None
    per_tensor: bool = True
    objective: str = "l1"

    def __post_init__(self) -> None:
        """Every value a user can get wrong, refused once, naming the parameter."""
        counts = (self.batch_size, self.max_updates, self.patience)
        if self.sample < 2 or min(counts) < 1 or not 0 < self.lr < math.inf or not 0 <= self.lam < math.inf or self.seed < 0:
            raise UsageError(
                f"{parameter('sample')} must be at least 2; {parameter('batch_size')}, {parameter('max_updates')}, "
                f"{parameter('patience')} and {parameter('lr')} positive and finite; {parameter('lam')} finite and not negative; "
                f"{parameter('seed')} not negative"
            )
        if self.objective not in OBJECTIVES:
            raise UsageError(f"{parameter('objective')} {self.objective!r}: expected {' or '.join(OBJECTIVES)}")
        if self.shrink is not None and not 0.0 <= self.shrink <= 10.0:
            raise UsageError(f"{parameter('shrink')} {self.shrink:g}: expected a factor between 0 and 10")


CHECK_EVERY = 20


@dataclass(frozen=True)
class FitInfo:
    """How a forecaster's shared map was fitted (`fit_linear_map`: the pairs, what was held out, how the
    fit stopped and its held-out L1), and how the forecaster was settled after it: the shrink factor
    towards the last checkpoint, and "validation loss" where the user's loss chose it. A forecaster
    file written by hand may hold none of the fit's measurements (None, left out of the JSON)."""

    pairs: int | None = None
    held_out_pairs: int | None = None
    held_out: str | None = None
    objective: str | None = None
    stopped: str | None = None
    updates: int | None = None
    best_update: int | None = None
    validation_l1: float | None = None
    shrink: float = 1.0
    chosen_by: str | None = None

    def to_json(self) -> dict:
        return {key: value for key, value in asdict(self).items() if value is not None}

    @classmethod
    def from_json(cls, data: dict) -> FitInfo:
        return from_known(cls, data)


def from_known(kind: type, data: dict):
    """A `kind` dataclass from the keys of `data` it knows: a file from another version may hold others."""
    known = {f.name for f in fields(kind)}
    return kind(**{key: value for key, value in data.items() if key in known})


def fit_linear_map(pairs: Pairs, settings: FitSettings, validation: Pairs | None = None) -> tuple[LinearMap, FitInfo]:
    """The least-squares start, then (objective "l1") Adam on L1 + lam * L_grad over the training
    coordinates, stopped early on held-out ones, returning the map with the best held-out loss and a
    summary of the fit: how it ended ("closed form", "converged" or "budget") and at which update.

    The held-out rows are `validation`'s pairs where given (a separate validation run, the paper's
    protocol), every pair then being fitted; else a share of the coordinates of `pairs` itself."""
    return fit_linear_maps([(pairs, validation)], settings)[0]


def fit_linear_maps(problems: list[tuple[Pairs, Pairs | None]], settings: FitSettings) -> list[tuple[LinearMap, FitInfo]]:
    """`fit_linear_map` of each (pairs, validation), bit for bit, with the fits' Adam updates taken
    together (`_adam_together`): a fit of a few hundred rows costs as much Python and numpy per update
    as one of 20,000, and a run's per-tensor fits are dozens of them."""
    fits = [_Fit.of(pairs, validation, settings) for pairs, validation in problems]
    starts = [_least_squares(fit.problem, fit.train) for fit in fits]
    if settings.objective == "l2":
        ends = [(start, "closed form", 0, 0) for start in starts]
    else:
        ends = _adam_together(fits, starts, settings)
    return [fit.outcome(*end, settings) for fit, end in zip(fits, ends, strict=True)]


@dataclass(frozen=True)
class _Fit:
    """One fit's problem, its training rows and its held-out rows (gathered once: every check reads them)."""

    problem: _Problem
    train: np.ndarray
    held: np.ndarray
    held_rows: _Rows
    validation_run: bool

    @classmethod
    def of(cls, pairs: Pairs, validation: Pairs | None, settings: FitSettings) -> _Fit:
        count = len(pairs.first)
        if validation is None:
            train, held = _split_coordinates(pairs, settings.validation_fraction, settings.seed)
        else:
            train, held = np.arange(count), np.arange(count, count + len(validation.first))
            pairs = pairs.joined(validation)
        problem = _Problem(pairs, settings.lam)
        return cls(problem, train, held, problem.rows(held), validation is not None)

    def held_loss(self, coefficients: np.ndarray) -> float:
        return _loss(self.held_rows, coefficients, self.problem.lam)

    def outcome(
        self, coefficients: np.ndarray, stopped: str, updates: int, best_update: int, settings: FitSettings
    ) -> tuple[LinearMap, FitInfo]:
        info = FitInfo(
            pairs=len(self.problem.inputs) - (len(self.held) if self.validation_run else 0),
            held_out_pairs=len(self.held),
            held_out="validation run" if self.validation_run else "coordinates",
            objective=settings.objective,
            stopped=stopped,
            updates=updates,
            best_update=best_update,
            validation_l1=self.held_loss(coefficients) * self.problem.s_out,
        )
        return self.problem.as_linear_map(coefficients), info


def coordinate_cells(tensor_index: np.ndarray, own: list[int], settings: FitSettings) -> np.ndarray:
    """Each coordinate's cell for `fit_pair_sums`: its tensor x 4 + 2 if the shared fit trains on it + 1 if
    its tensor's own fit does (`_split_coordinates` on self pairs, whose rows hold every coordinate)."""
    count = len(tensor_index)
    shared_train = _training_coordinates(np.arange(count), settings)
    own_train = np.zeros(count, dtype=bool)
    for group in own:
        own_train |= _training_coordinates(np.nonzero(tensor_index == group)[0], settings, count)
    return tensor_index * 4 + 2 * shared_train + own_train


def fit_pair_sums(sums: PairSums, own: list[int]) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """The closed form from sums of the rows per cell (model/pairs.py, `self_pair_sums`; cells as
    `coordinate_cells` numbers them): the shared fit's coefficients over its training cells, and each
    group's in `own` over its own; residual = beta[0] last + beta[1] change + beta[2] (3 x m each).

    The systems are those of `fit_linear_map`'s closed form (`_least_squares`) on `self_pairs`' rows,
    of all the rows and of each group's alone, but summed from products of the history's columns: the
    refinement (`_least_squares`' second solve) works on the same sums, and the output scale is the
    residual's root mean square rather than its mean absolute value (a scale of the right-hand side
    alone: the solution is the same up to rounding)."""
    groups = len(sums.rows) // 4

    def cells(values: np.ndarray) -> np.ndarray:
        return values.reshape(groups, 2, 2, *values.shape[1:])

    gram, moments, absolute, squares, rows = (cells(v) for v in (sums.gram, sums.moments, sums.absolute, sums.squares, sums.rows))
    scaling = np.concatenate(
        [absolute.sum(axis=(1, 2)), squares.sum(axis=(1, 2))[:, None] / moments.shape[-1], rows.sum(axis=(1, 2))[:, None]], 1
    )
    systems = np.concatenate([gram[:, 1].sum(axis=(0, 1))[None], gram[own, :, 1].sum(axis=1)])
    sides = np.concatenate([moments[:, 1].sum(axis=(0, 1))[None], moments[own, :, 1].sum(axis=1)])
    solved = _solved_twice(systems, sides, np.concatenate([scaling.sum(axis=0)[None], scaling[own]]))
    return solved[0], dict(zip(own, solved[1:]))


def _solved_twice(gram: np.ndarray, moments: np.ndarray, scaling: np.ndarray) -> np.ndarray:
    """Systems (stacked) scaled as `_Problem` scales its inputs, solved and refined once on their
    residual, returned unscaled. Scaling: per system, the sums of |last|, |change|, the residual's
    squares (per output) and the rows. Solved by pseudo-inverse with lstsq's cutoff for a small
    singular value (3 x machine epsilon of the largest), so that a singular system (a constant input)
    still has its minimum-norm solution, all systems at once."""
    counted = np.maximum(scaling[:, 3], 1.0)
    level, change, out = scaling[:, 0] / counted, scaling[:, 1] / counted, np.sqrt(scaling[:, 2] / counted)
    level, change, out = (np.where(scale > 0, scale, 1.0) for scale in (level, change, out))
    d = np.stack([1.0 / level, 1.0 / change, np.ones_like(level)], axis=1)
    system = gram * d[:, :, None] * d[:, None, :]
    rhs = moments * d[:, :, None] / out[:, None, None]
    inverse = np.linalg.pinv(system, rcond=3 * np.finfo(float).eps)
    solution = inverse @ rhs
    solution = solution + inverse @ (rhs - system @ solution)
    return solution * d[:, :, None] * out[:, None, None]


def closed_form_info(beta: np.ndarray, held: Pairs | None, pairs: int, settings: FitSettings, held_pairs: int = 0) -> FitInfo:
    """`fit_linear_map`'s summary of a closed-form fit of `pairs` rows whose held-out rows are `held`
    (None: `held_pairs` of them, their L1 not measured)."""
    loss = None
    if held is not None:
        held_pairs = len(held.first)
        loss = _raw_loss(beta, held, held.targets - held.last[:, None], np.arange(held_pairs), settings.lam)
    return FitInfo(
        pairs=pairs,
        held_out_pairs=held_pairs,
        held_out="coordinates",
        objective=settings.objective,
        stopped="closed form",
        updates=0,
        best_update=0,
        validation_l1=loss,
    )


def _training_coordinates(coordinate: np.ndarray, settings: FitSettings, size: int | None = None) -> np.ndarray:
    """A mask over coordinate numbers (`size` of them): those `_split_coordinates` trains on among rows of
    these coordinates (all of them where it holds every one out)."""
    held = _held_coordinates(coordinate, settings.validation_fraction, settings.seed)
    train = np.zeros(len(held) if size is None else size, dtype=bool)
    train[coordinate] = True
    if not held[coordinate].all():
        train[: len(held)] &= ~held
    return train


def _raw_loss(beta: np.ndarray, pairs: Pairs, residual: np.ndarray, rows: np.ndarray, lam: float) -> float:
    """`_Problem.loss` times s_out on `rows`: the held-out L1 plus the regulariser, in the weights' units."""
    last = pairs.last[rows]
    predicted = last[:, None] * beta[0] + (last - pairs.first[rows])[:, None] * beta[1] + beta[2]
    error = predicted - residual[rows]
    step = predicted[:, -1] - (predicted[:, -2] if predicted.shape[1] > 1 else 0.0)
    excess = np.abs(step) / pairs.last_dt[rows] - pairs.first_rate[rows]
    return float(np.abs(error).mean() + lam * np.maximum(excess, 0.0).mean())


def map_of(beta: np.ndarray) -> LinearMap:
    """residual = beta[0] last + beta[1] (last - first) + beta[2], as y = first * A[0] + last * A[1] + b."""
    return LinearMap.of([(-beta[1]).tolist(), (1.0 + beta[0] + beta[1]).tolist()], beta[2].tolist())


def _adam_together(fits: list[_Fit], starts: list[np.ndarray], settings: FitSettings) -> list[tuple[np.ndarray, str, int, int]]:
    """Adam from each fit's start: for each, the best held-out coefficients, how it stopped, its updates
    and the best one.

    The fits advance in lock step: update u of every fit still running is one set of array operations
    over all of them, their batches stacked (`_Batches`, padded with a row that adds nothing). Each
    keeps its own rows, its own permutations (a generator of its own, seeded as a fit alone), its own
    checks and its own stop, and every value is computed by the same operations as for that fit alone
    (elementwise, each row's matrix product by itself, the gradient's sum over rows accumulated row by
    row in order), so the coefficients are the same bits as fitting each alone. Fits with different
    numbers of outputs advance in separate groups."""
    ends: list = [None] * len(fits)
    for outputs in sorted({start.shape[1] for start in starts}):
        group = [index for index, start in enumerate(starts) if start.shape[1] == outputs]
        found = _adam_in_lock_step([fits[i] for i in group], [starts[i] for i in group], settings)
        for index, end in zip(group, found, strict=True):
            ends[index] = end
    return ends


def _adam_in_lock_step(fits: list[_Fit], starts: list[np.ndarray], settings: FitSettings) -> list[tuple[np.ndarray, str, int, int]]:
    """`_adam_together` of fits with the same number of outputs."""
    steps = _LockStep(fits, starts, settings)
    while steps.running:
        steps.advance()
    return steps.ends


class _LockStep:
    """Fits with the same number of outputs taken by Adam together (`_adam_together`): their rows in one
    table, a padding row last; `running` the fits not stopped, in their order, and the optimizer's,
    the held-out rows' and the check rhythms' first axis follow it; `ends` each stopped fit's outcome."""

    def __init__(self, fits: list[_Fit], starts: list[np.ndarray], settings: FitSettings) -> None:
        self.table = _Rows.joined([fit.problem.rows(slice(None)) for fit in fits])
        padding = len(self.table.inputs) - 1
        offsets = np.cumsum([0] + [len(fit.problem.inputs) for fit in fits])[:-1]
        self.batches = [_Batches(fit.train + offset, settings, padding) for fit, offset in zip(fits, offsets, strict=True)]
        self.held_counts = np.array([len(fit.held) for fit in fits])
        held_index = np.full((len(fits), self.held_counts.max()), padding)
        for place, (fit, offset) in enumerate(zip(fits, offsets, strict=True)):
            held_index[place, : len(fit.held)] = fit.held + offset
        self.held = self.table.take(held_index)
        self.check_every = np.array([batch.check_every for batch in self.batches])
        self.optimizer = _Adam(np.stack(starts), settings.lr)
        self.best_loss = [fit.held_loss(start) for fit, start in zip(fits, starts, strict=True)]
        self.best = [start.copy() for start in starts]
        self.best_update, self.stale = [0] * len(fits), [0] * len(fits)
        self.ends: list = [None] * len(fits)
        self.running = list(range(len(fits)))
        self.updates, self.outputs, self.settings = 0, starts[0].shape[1], settings

    def advance(self) -> None:
        """The next _WINDOW updates of every running fit, their batches gathered at once, checking each
        fit at its rhythm and ending those whose patience or the budget ran out (the window stops early
        where all have ended)."""
        settings = self.settings
        rows, counts = _Batches.stacked([self.batches[index] for index in self.running], _WINDOW)
        window = self.table.take(rows)
        sizes = (counts * self.outputs).astype(float)[..., None, None]
        scales = settings.lam / window.last_dt / counts[..., None]
        due = (self.updates + np.arange(1, _WINDOW + 1))[:, None] % self.check_every == 0
        checked = due.any(axis=1).tolist()
        alive = np.ones(len(self.running), dtype=bool)
        for taken in range(1, _WINDOW + 1):
            self.optimizer.step(_gradient(window.at(taken - 1), self.optimizer.parameters, sizes[taken - 1], scales[taken - 1]))
            self.updates += 1
            stopping = self._checked(np.nonzero(due[taken - 1] & alive)[0]) if checked[taken - 1] else np.zeros(0, dtype=np.int64)
            if self.updates >= settings.max_updates:
                stopping = np.nonzero(alive)[0]
            self._end(stopping)
            alive[stopping] = False
            if not alive.any():
                break
        self._keep(alive, taken)

    def _checked(self, places: np.ndarray) -> np.ndarray:
        """The held-out loss of the running fits at `places`, each fit's best kept; the places whose
        patience has run out."""
        part = self.held if len(places) == len(self.running) else self.held.take(places)
        losses = _losses(part, self.optimizer.parameters[places], self.held_counts[places], self.settings.lam)
        for place, loss in zip(places.tolist(), losses, strict=True):
            index = self.running[place]
            if loss < self.best_loss[index]:
                self.best_loss[index], self.best_update[index], self.stale[index] = loss, self.updates, 0
                self.best[index] = self.optimizer.parameters[place].copy()
            else:
                self.stale[index] += 1
        return places[[self.stale[self.running[place]] >= self.settings.patience for place in places.tolist()]]

    def _end(self, places: np.ndarray) -> None:
        """The outcome of the running fits at `places`: the best coefficients, how they stopped, the updates."""
        for place in places.tolist():
            index = self.running[place]
            stopped = "converged" if self.stale[index] >= self.settings.patience else "budget"
            self.ends[index] = (self.best[index], stopped, self.updates, self.best_update[index])

    def _keep(self, alive: np.ndarray, taken: int) -> None:
        """Past the `taken` updates of the window, only the fits still `alive` (a mask over `running`)."""
        for index in self.running:
            self.batches[index].advance(taken)
        self.running = [index for index, keep in zip(self.running, alive, strict=True) if keep]
        self.optimizer.keep(alive)
        self.check_every, self.held_counts = self.check_every[alive], self.held_counts[alive]
        self.held = self.held.take(np.nonzero(alive)[0])


_WINDOW = 8
"""Updates gathered at a time (a fit that stops inside a window is carried to its end, its results kept)."""


class _Batches:
    """One fit's batches, update by update: each epoch a permutation of its training rows drawn from
    its own generator (seeded as every fit is), cut into batches of settings.batch_size rows, the last
    one padded with `padding` (a row that adds nothing to a gradient) to the full size."""

    def __init__(self, train: np.ndarray, settings: FitSettings, padding: int) -> None:
        self.train, self.size, self.padding = train, settings.batch_size, padding
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.check_every = max(1, min(CHECK_EVERY, -(-len(train) // settings.batch_size)))
        self.rows, self.counts = np.empty((0, self.size), dtype=np.int64), np.empty(0, dtype=np.int64)

    def next(self, updates: int) -> tuple[np.ndarray, np.ndarray]:
        """The rows (updates x batch size) and the real rows' count of each of the next `updates` batches."""
        if len(self.train) == 0:
            raise UsageError("a fit needs at least one training pair")
        if len(self.counts) < updates:
            self._draw_epochs(-(-(updates - len(self.counts)) // -(-len(self.train) // self.size)))
        return self.rows[:updates], self.counts[:updates]

    def advance(self, updates: int) -> None:
        self.rows, self.counts = self.rows[updates:], self.counts[updates:]

    def _draw_epochs(self, epochs: int) -> None:
        """The next `epochs` permutations of the training rows, in batches, after those not yet taken."""
        orders = self.train[np.stack([torch.randperm(len(self.train), generator=self.generator).numpy() for _ in range(epochs)])]
        batches = -(-len(self.train) // self.size)
        padded = np.full((epochs, batches * self.size), self.padding, dtype=np.int64)
        padded[:, : len(self.train)] = orders
        counts = np.full(batches, self.size, dtype=np.int64)
        counts[-1] = len(self.train) - (batches - 1) * self.size
        self.rows = np.concatenate([self.rows, padded.reshape(epochs * batches, self.size)])
        self.counts = np.concatenate([self.counts, np.tile(counts, epochs)])

    @staticmethod
    def stacked(batches: list[_Batches], updates: int) -> tuple[np.ndarray, np.ndarray]:
        """The next `updates` batches of each, as (updates x fits x batch size) rows and (updates x fits) counts."""
        following = [batch.next(updates) for batch in batches]
        return np.stack([rows for rows, _ in following], axis=1), np.stack([counts for _, counts in following], axis=1)


def _least_squares(problem: _Problem, rows: np.ndarray) -> np.ndarray:
    """The exact least-squares coefficients over `rows`: the 3 x 3 normal equations in float64, solved
    once and refined once on their residual (which recovers the digits squaring the design loses), by
    lstsq so that a singular system (a constant input) still has its minimum-norm solution. The sums
    over rows are einsum's own loops, not BLAS, so that they do not depend on the thread count (torchrun
    gives each rank one thread, and its forecaster must be one process's, byte for byte)."""
    x, y = problem.inputs[rows], problem.residual[rows]
    gram = np.einsum("ri,rj->ij", x, x)
    coefficients = np.linalg.lstsq(gram, np.einsum("ri,rm->im", x, y), rcond=None)[0]
    return coefficients + np.linalg.lstsq(gram, np.einsum("ri,rm->im", x, y - x @ coefficients), rcond=None)[0]


class _Problem:
    """The loss and its gradient in the scaled form (module docstring), for rows of the pairs.

    The loss per row is  mean_j |r_j - d_j|  +  lam * ReLU(|y_m - y_{m-1}| / dt_m - |w_1 - w_0| / dt_1)
    with r = x @ coefficients the predicted change from `last` and d the true one, both / s_out.

    The regulariser is PAPER.md's first-order optimality condition (a forecast's last step may
    not be larger than the run's first step) compared as rates, change per training step, where
    PAPER.md compares raw steps: its checkpoints are equally spaced, ours are not (the first gap,
    the forecast's last gap and the jumps scaled to each anchor all differ), so raw differences
    would compare steps of different lengths.
    """

    def __init__(self, pairs: Pairs, lam: float) -> None:
        self.s_level = _scale(pairs.last)
        self.s_change = _scale(pairs.last - pairs.first)
        self.s_out = _scale(pairs.targets - pairs.last[:, None])
        self.inputs = np.stack([pairs.last / self.s_level, (pairs.last - pairs.first) / self.s_change, np.ones(len(pairs.last))], axis=1)
        self.residual = (pairs.targets - pairs.last[:, None]) / self.s_out
        self.rate_bound = pairs.first_rate / self.s_out
        self.last_dt = pairs.last_dt
        self.lam = lam

    def rows(self, rows: np.ndarray | slice) -> _Rows:
        return _Rows(self.inputs[rows], self.residual[rows], self.last_dt[rows], self.rate_bound[rows])

    def loss(self, coefficients: np.ndarray, rows: np.ndarray) -> float:
        return _loss(self.rows(rows), coefficients, self.lam)

    def gradient(self, coefficients: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """d loss / d coefficients on `rows` (`_gradient` of one fit)."""
        size = np.array(float(self.residual.shape[1] * len(rows)))
        scales = self.lam / self.last_dt[rows] / len(rows)
        return _gradient(self.rows(rows).stacked(), coefficients[None], size, scales[None])[0]

    def as_linear_map(self, coefficients: np.ndarray) -> LinearMap:
        """Back from (p, q, c) to y = first * A[0] + last * A[1] + b."""
        p, q, c = coefficients
        a_first = -self.s_out * q / self.s_change
        a_last = 1.0 + self.s_out * (p / self.s_level + q / self.s_change)
        return LinearMap.of([a_first.tolist(), a_last.tolist()], (self.s_out * c).tolist())


class _Rows(NamedTuple):
    """Rows of a `_Problem` (x, the residual d, the forecast's last gap and the bound on its rate), or
    of several fits' batches stacked along a first axis."""

    inputs: np.ndarray
    residual: np.ndarray
    last_dt: np.ndarray
    rate_bound: np.ndarray

    def stacked(self) -> _Rows:
        return _Rows(*(values[None] for values in self))

    def take(self, rows: np.ndarray) -> _Rows:
        """These rows (np.take: several times faster than indexing by an array of rows)."""
        return _Rows(*(np.take(values, rows, axis=0) for values in self))

    def at(self, index: int) -> _Rows:
        return _Rows(self.inputs[index], self.residual[index], self.last_dt[index], self.rate_bound[index])

    @staticmethod
    def joined(parts: list[_Rows]) -> _Rows:
        """The parts' rows one after the other, then a padding row: x = 0 and d = 0, so its error and
        its terms of the gradient are 0, and an infinite bound, so the regulariser never acts on it."""
        pad = _Rows(np.zeros((1, 3)), np.zeros((1, parts[0].residual.shape[1])), np.ones(1), np.full(1, np.inf))
        return _Rows(*(np.concatenate(values) for values in zip(*parts, pad, strict=True)))

    def terms(self, coefficients: np.ndarray):
        predicted = self.inputs @ coefficients
        error = predicted - self.residual
        step = predicted[..., -1] - predicted[..., -2] if predicted.shape[-1] > 1 else predicted[..., -1]
        excess = np.abs(step) / self.last_dt - self.rate_bound
        return error, step, excess


def _loss(rows: _Rows, coefficients: np.ndarray, lam: float) -> float:
    return _losses(rows.stacked(), coefficients[None], np.array([len(rows.inputs)]), lam)[0]


def _losses(rows: _Rows, coefficients: np.ndarray, counts: np.ndarray, lam: float) -> list[float]:
    """The loss (the mean |error| plus lam times the regulariser's mean) of stacked fits, each over its
    first `counts` rows (the rest padding): each mean a sum over that fit's rows alone, the same
    pairwise sum, in the same bits, as numpy's mean of them."""
    error, _, excess = rows.terms(coefficients)
    absolute, above = np.abs(error), np.maximum(excess, 0.0)
    outputs = error.shape[-1]
    return [
        float(np.add.reduce(absolute[place, :count], axis=None) / (count * outputs) + lam * (np.add.reduce(above[place, :count]) / count))
        for place, count in enumerate(counts.tolist())
    ]


def _gradient(rows: _Rows, coefficients: np.ndarray, sizes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """d loss / d coefficients of stacked fits (rows and coefficients with a first axis of fits), by hand:
    d|e|/de = sign(e), over the mean's count (`sizes`: each fit's real rows x outputs, shaped to
    broadcast); the regulariser acts on the last two outputs only, where ReLU is active, through
    d|step|/d step = sign(step), times lam / last_dt / rows (`scales`, per row).

    Bit for bit the same as computing it by itself for each fit, in the order of the expression
    lam * active * sign(step) / last_dt / rows (lam * sign(step) is exact, and so is a change of sign
    after a division). einsum sums over rows, fit by fit, in the order einsum's "ri,rm->im" does for
    one fit, whatever the padding rows after them (tests/test_fit.py pins both)."""
    error, step, excess = rows.terms(coefficients)
    d_predicted = np.sign(error) / sizes
    d_step = np.sign(step) * scales * (excess > 0)
    d_predicted[..., -1] += d_step
    if d_predicted.shape[-1] > 1:
        d_predicted[..., -2] -= d_step
    return np.einsum("fri,frm->fim", rows.inputs, d_predicted)


def _split_coordinates(pairs: Pairs, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out whole coordinates, so validation measures generalisation to unseen weights."""
    is_held = _held_coordinates(pairs.coordinate, fraction, seed)[pairs.coordinate]
    if is_held.all():
        return np.nonzero(is_held)[0], np.nonzero(is_held)[0]
    return np.nonzero(~is_held)[0], np.nonzero(is_held)[0]


def _held_coordinates(coordinate: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Which coordinate numbers (a mask over them) `_split_coordinates` holds out of rows of these
    coordinates. The coordinates are marked in a mask over their numbers (np.unique and np.isin hashed
    them: a quarter of a closed-form fit's time)."""
    present = np.zeros(int(coordinate.max()) + 1 if len(coordinate) else 0, dtype=bool)
    present[coordinate] = True
    coordinates = np.nonzero(present)[0]
    rng = np.random.default_rng(seed + 1)
    held = rng.permutation(coordinates)[: max(1, int(round(len(coordinates) * fraction)))]
    is_held = np.zeros_like(present)
    is_held[held] = True
    return is_held


def _scale(values: np.ndarray) -> float:
    scale = float(np.mean(np.abs(values)))
    return scale if scale > 0 else 1.0


class _Adam:
    """Adam (torch's defaults, betas 0.9/0.999, eps 1e-8) on the 3 x m coefficients.

    Written out because these are 3m numbers: torch.optim's first use imports torch._dynamo
    (1.3 s measured), more than the whole fit costs."""

    def __init__(self, parameters: np.ndarray, lr: float) -> None:
        self.parameters, self.lr, self.t = parameters, lr, 0
        self.m, self.v = np.zeros_like(parameters), np.zeros_like(parameters)

    def step(self, gradient: np.ndarray) -> None:
        self.t += 1
        self.m = 0.9 * self.m + 0.1 * gradient
        self.v = 0.999 * self.v + 0.001 * gradient * gradient
        denominator = np.sqrt(self.v) / math.sqrt(1 - 0.999**self.t) + 1e-8
        self.parameters -= (self.lr / (1 - 0.9**self.t)) * self.m / denominator

    def keep(self, which: np.ndarray) -> None:
        """Drop the stacked fits not in `which` (a mask over the first axis)."""
        self.parameters, self.m, self.v = self.parameters[which], self.m[which], self.v[which]

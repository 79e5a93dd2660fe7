"""Training pairs (first, last) -> future for the two fitting modes, and the time rule that makes them.

Fitting on the run itself (`self_pairs`), a forecast of H steps past the last checkpoint s_K is
learned from the run's own history by scaling the jump to each earlier checkpoint t:

    inputs (w at s_0, w at t)  ->  target w at t + rho * (t - s_0),   rho = H / (s_K - s_0)

so that every pair jumps the same fraction of its elapsed history as the forecast will; targets
between checkpoints are interpolated linearly. With `anchor` k > 1 the second input is the mean of
the last k checkpoints up to t instead of w at t (PAPER.md: averaging damps the recent noise). A reference run (`reference_pairs`) gives the
paper's protocol instead: (w at s_0, w at E) -> w at E + offset, the truth known for every offset.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from farcast_cli.errors import UsageError, parameter
from farcast_cli.model.history import History

MAX_STARTS = 16
"""At most this many checkpoints (spread evenly, the latest kept) start pairs: the fit's cost grows with
the pairs, and consecutive checkpoints of a long run add little that their neighbours do not."""


@dataclass
class Pairs:
    """One row per (sampled coordinate, checkpoint it starts from): first and last are the map's two inputs,
    targets its m outputs' truth; first_rate = |w_1 - w_0| / (s_1 - s_0), the run's first rate, and
    last_dt the steps between the last two outputs, for the regulariser; coordinate is the row's
    sampled coordinate, so that whole coordinates can be held out."""

    first: np.ndarray
    last: np.ndarray
    targets: np.ndarray
    first_rate: np.ndarray
    last_dt: np.ndarray
    coordinate: np.ndarray

    def subset(self, rows: np.ndarray) -> Pairs:
        return Pairs(
            self.first[rows], self.last[rows], self.targets[rows], self.first_rate[rows], self.last_dt[rows], self.coordinate[rows]
        )

    def joined(self, other: Pairs) -> Pairs:
        """These rows, then `other`'s (whose coordinates are numbered after these)."""
        shift = int(self.coordinate.max()) + 1 if len(self.coordinate) else 0
        fields = ("first", "last", "targets", "first_rate", "last_dt")
        joined = {name: np.concatenate([getattr(self, name), getattr(other, name)]) for name in fields}
        return Pairs(**joined, coordinate=np.concatenate([self.coordinate, other.coordinate + shift]))


def interpolate(history: History, time: float) -> np.ndarray:
    """Every sampled coordinate's value at `time`, linear between the two checkpoints around it."""
    i, alpha = _between(history.steps, time)
    return history.values[:, i] * (1 - alpha) + history.values[:, i + 1] * alpha


def _between(steps: np.ndarray, time: float) -> tuple[int, float]:
    """The checkpoint before `time` (the last but one at most) and how far `time` is towards the next."""
    i = min(max(int(np.searchsorted(steps, time, side="right")) - 1, 0), len(steps) - 2)
    return i, (time - steps[i]) / (steps[i + 1] - steps[i])


def max_self_horizon(steps: list[int] | np.ndarray) -> int:
    """The largest horizon a run supports: its second checkpoint must have a target inside the history."""
    s0, s1, sk = steps[0], steps[1], steps[-1]
    return int((sk - s0) * (sk - s1) // (s1 - s0))


def _first_rate(history: History) -> np.ndarray:
    steps = history.steps
    return np.abs(history.values[:, 1] - history.values[:, 0]) / (steps[1] - steps[0])


def _last_gap(offsets: list[float]) -> float:
    return offsets[-1] - (offsets[-2] if len(offsets) > 1 else 0.0)


def anchor_window(k: int, anchor: int) -> range:
    """The checkpoints whose mean is the map's second input at checkpoint k: the last `anchor` up to k
    (1: k itself), never reaching back to the first checkpoint, which is the map's other input."""
    return range(max(1, k - anchor + 1), k + 1)


def anchor_values(history: History, k: int, anchor: int) -> np.ndarray:
    """The map's second input at checkpoint k (`anchor_window`), a view of the history for anchor 1."""
    window = anchor_window(k, anchor)
    return history.values[:, window.start : window.stop].mean(axis=1) if anchor > 1 else history.values[:, k]


def self_pairs(history: History, horizon: int, offsets: list[int], anchor: int = 1) -> Pairs:
    """Pairs from the run itself: the jump from each checkpoint t is scaled as rho * (t - s_0)."""
    steps = history.steps
    s0 = steps[0]
    rho, starts = _starts(steps, horizon)
    fractions = [o / horizon for o in offsets]
    n = history.values.shape[0]
    jumps = [rho * (steps[k] - s0) for k in starts]
    targets = []
    for fraction in fractions:
        before, alpha = np.array([_between(steps, steps[k] + fraction * jump) for k, jump in zip(starts, jumps)]).T
        before = before.astype(int)
        between = history.values[:, before] * (1 - alpha) + history.values[:, before + 1] * alpha
        targets.append(between.T.reshape(-1))
    return Pairs(
        first=np.tile(history.values[:, 0], len(starts)),
        last=np.concatenate([anchor_values(history, k, anchor) for k in starts]),
        targets=np.stack(targets, axis=1),
        first_rate=np.tile(_first_rate(history), len(starts)),
        last_dt=np.repeat([jump * _last_gap(fractions) for jump in jumps], n),
        coordinate=np.tile(np.arange(n), len(starts)),
    )


def _starts(steps: np.ndarray, horizon: int) -> tuple[float, list[int]]:
    """rho, and the checkpoints pairs start from: those whose scaled jump ends inside the history, at most
    MAX_STARTS of them spread evenly."""
    s0, sk = steps[0], steps[-1]
    rho = horizon / (sk - s0)
    starts = [k for k in range(1, len(steps)) if steps[k] + rho * (steps[k] - s0) <= sk + 1e-9]
    if not starts:
        raise UsageError(f"horizon {horizon} is too far for this run: the largest it supports is {max_self_horizon(steps)} steps")
    if len(starts) > MAX_STARTS:
        starts = [starts[i] for i in sorted(set(np.linspace(0, len(starts) - 1, MAX_STARTS).round().astype(int)))]
    return rho, starts


@dataclass
class PairSums:
    """What the closed-form fit needs of `self_pairs`' rows, summed per cell of coordinates (`ColumnSums`):
    gram (cells x 3 x 3) of x = (last, change = last - first, 1); moments (cells x 3 x m), x times the
    residual (target - last); absolute (cells x 2), the sums of |last| and |change|; squares (cells),
    of the squared residuals; rows (cells), how many rows."""

    gram: np.ndarray
    moments: np.ndarray
    absolute: np.ndarray
    squares: np.ndarray
    rows: np.ndarray


class ColumnSums:
    """Sums over a history's sampled coordinates, per cell (`cells`: each coordinate's, below `count`),
    of its columns and of their products, kept as they are first asked for, so that the fits of a jump
    (the trial's and the forecast's) and the next jumps of a growing history (a prefix of the columns
    stays the same) share them. The columns are taken from the first, u_0 = w_0 and u_j = w_j - w_0:
    every row of `self_pairs` is a combination of a few of them, the residual one of the differences
    alone, so that its sums lose no digits to cancelling w_0. `measure`: whether the fits measure their
    held-out L1 (FitInfo.validation_l1: rows of the held-out coordinates, which a report shows and the
    in-loop farcaster does not read)."""

    def __init__(self, cells: np.ndarray, count: int, measure: bool = True) -> None:
        self.cells, self.count, self.measure = cells, count, measure
        self._order = np.argsort(cells, kind="stable")
        self._rows = np.bincount(cells, minlength=count)
        self._filled = np.nonzero(self._rows)[0]
        self._starts = np.concatenate([[0], np.cumsum(self._rows)[:-1]])[self._filled]
        self._columns: dict[int, np.ndarray] = {}
        self._products: dict[tuple[int, int], np.ndarray] = {}
        self._sums: dict[int, np.ndarray] = {}
        self._absolute: dict[tuple[int, int], np.ndarray] = {}

    def _per_cell(self, weights: np.ndarray) -> np.ndarray:
        """Per cell, the sum of `weights` given in cell order (the coordinates sorted by cell: np.add.reduceat
        over each cell's block, three times np.bincount's speed)."""
        total = np.zeros(self.count)
        if len(self._filled):
            total[self._filled] = np.add.reduceat(weights, self._starts)
        return total

    def rows(self) -> np.ndarray:
        return self._rows.astype(float)

    def column(self, values: np.ndarray, j: int) -> np.ndarray:
        """u_j over the coordinates in cell order."""
        if j not in self._columns:
            first = values[self._order, 0]
            self._columns[j] = first if j == 0 else values[self._order, j] - first
        return self._columns[j]

    def product(self, values: np.ndarray, a: int, b: int) -> np.ndarray:
        key = (a, b) if a <= b else (b, a)
        if key not in self._products:
            self._products[key] = self._per_cell(self.column(values, key[0]) * self.column(values, key[1]))
        return self._products[key]

    def sum(self, values: np.ndarray, j: int) -> np.ndarray:
        if j not in self._sums:
            self._sums[j] = self._per_cell(self.column(values, j))
        return self._sums[j]

    def absolute(self, history: History, k: int, anchor: int) -> np.ndarray:
        """The sums of |last| and |change| for pairs starting at checkpoint k (cells x 2)."""
        if (k, anchor) not in self._absolute:
            last = anchor_values(history, k, anchor)[self._order]
            change = last - history.values[self._order, 0]
            self._absolute[(k, anchor)] = np.stack([self._per_cell(np.abs(last)), self._per_cell(np.abs(change))], axis=1)
        return self._absolute[(k, anchor)]

    def combined(self, values: np.ndarray, quadratic: _Terms, linear: _Terms) -> tuple[dict, dict]:
        """Per slot, the per-cell sums of the quadratic terms (sums of u_a u_b) and of the linear ones
        (sums of u_a), each slot's from one product of its coefficients with the sums it needs."""
        products = quadratic.evaluate(lambda key: self.product(values, *key), self.count)
        sums = linear.evaluate(lambda key: self.sum(values, key), self.count)
        return products, sums


class _Terms:
    """Sums of coefficient x key per slot, gathered in Python (a few per pair start), evaluated at once."""

    def __init__(self) -> None:
        self.slots: dict[object, dict[object, float]] = {}

    def add(self, slot: object, left: dict[int, float], right: dict[int, float] | None = None) -> None:
        """slot += (sum_a left[a] u_a)(sum_b right[b] u_b), or sum_a left[a] u_a without `right`."""
        terms = self.slots.setdefault(slot, {})
        for a, x in left.items():
            if right is None:
                terms[a] = terms.get(a, 0.0) + x
                continue
            for b, y in right.items():
                key = (a, b) if a <= b else (b, a)
                terms[key] = terms.get(key, 0.0) + x * y

    def evaluate(self, fetch, count: int) -> dict[object, np.ndarray]:
        keys = list(dict.fromkeys(key for terms in self.slots.values() for key in terms))
        if not keys:
            return {slot: np.zeros(count) for slot in self.slots}
        index = {key: i for i, key in enumerate(keys)}
        coefficients = np.zeros((len(self.slots), len(keys)))
        for row, terms in enumerate(self.slots.values()):
            for key, x in terms.items():
                coefficients[row, index[key]] = x
        totals = np.einsum("sk,kc->sc", coefficients, np.stack([fetch(key) for key in keys]))
        return dict(zip(self.slots, totals))


def self_pair_sums(history: History, horizon: int, offsets: list[int], sums: ColumnSums, anchor: int = 1) -> PairSums:
    """`self_pairs`' rows as the closed-form fit needs them, from `sums` without building the rows: per
    start, last = u_0 + mean of the window's u_j, change = that mean, and each target the interpolation
    between two checkpoints, u_0 + (1 - alpha) u_i + alpha u_i+1."""
    steps = history.steps
    s0 = steps[0]
    rho, starts = _starts(steps, horizon)
    fractions = [o / horizon for o in offsets]
    quadratic, linear = _Terms(), _Terms()
    absolute = np.zeros((sums.count, 2))
    for k in starts:
        window = anchor_window(k, anchor)
        change = {j: 1.0 / len(window) for j in window}
        last = {0: 1.0, **change}
        quadratic.add("aa", last, last), quadratic.add("ac", last, change), quadratic.add("cc", change, change)
        linear.add("a", last), linear.add("c", change)
        jump = rho * (steps[k] - s0)
        for o, fraction in enumerate(fractions):
            before, alpha = _between(steps, steps[k] + fraction * jump)
            residual = {j: -x for j, x in change.items()}
            for j, x in ((before, 1.0 - alpha), (before + 1, alpha)):
                if j:
                    residual[j] = residual.get(j, 0.0) + x
            quadratic.add(("ay", o), last, residual), quadratic.add(("cy", o), change, residual)
            quadratic.add("yy", residual, residual), linear.add(("y", o), residual)
        absolute += sums.absolute(history, k, anchor)
    q, sums_of = sums.combined(history.values, quadratic, linear)
    rows = sums.rows()
    a, c, count = sums_of["a"], sums_of["c"], rows * len(starts)
    gram = np.stack([np.stack([q["aa"], q["ac"], a], -1), np.stack([q["ac"], q["cc"], c], -1), np.stack([a, c, count], -1)], -2)
    moments = np.stack([np.stack([q[("ay", o)], q[("cy", o)], sums_of[("y", o)]], -1) for o in range(len(fractions))], -1)
    return PairSums(gram, moments, absolute, q["yy"], rows * len(starts))


def reference_pairs(history: History, context_end: int, offsets: list[int], anchor: int = 1) -> Pairs:
    """Pairs from a complete reference run: (w at s_0, w at E) -> w at E + offset."""
    steps = history.steps
    if context_end not in steps:
        raise UsageError(f"{parameter('context_end')} {context_end} is not a checkpoint step of the reference run")
    if context_end + offsets[-1] > steps[-1]:
        raise UsageError(
            f"{parameter('context_end')} {context_end} plus horizon {offsets[-1]} is past the reference run's last step {int(steps[-1])}"
        )
    if context_end <= steps[0]:
        raise UsageError(f"{parameter('context_end')} {context_end} must come after the run's first step {int(steps[0])}")
    k = int(np.searchsorted(steps, context_end))
    n = history.values.shape[0]
    return Pairs(
        first=history.values[:, 0],
        last=anchor_values(history, k, anchor),
        targets=np.stack([interpolate(history, context_end + o) for o in offsets], axis=1),
        first_rate=_first_rate(history),
        last_dt=np.full(n, _last_gap([float(o) for o in offsets])),
        coordinate=np.arange(n),
    )

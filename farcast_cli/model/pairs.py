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
from functools import lru_cache

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
    later = np.asarray(steps[1:], dtype=float)
    starts = (np.flatnonzero(later + rho * (later - s0) <= sk + 1e-9) + 1).tolist()
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
        self._products = _Table(count)
        self._sums = _Table(count)
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
        if 0 not in self._columns:
            self._columns[0] = values[self._order, 0]
        if j not in self._columns:
            self._columns[j] = values[self._order, j] - self._columns[0]
        return self._columns[j]

    def products(self, values: np.ndarray, keys: list[tuple[int, int]]) -> np.ndarray:
        """Per key (a, b), a <= b, the per-cell sums of u_a u_b (keys x cells)."""
        return self._products.take(keys, lambda key: self._per_cell(self.column(values, key[0]) * self.column(values, key[1])))

    def sums(self, values: np.ndarray, keys: list[int]) -> np.ndarray:
        """Per key j, the per-cell sums of u_j (keys x cells)."""
        return self._sums.take(keys, lambda j: self._per_cell(self.column(values, j)))

    def absolute(self, history: History, k: int, anchor: int) -> np.ndarray:
        """The sums of |last| and |change| for pairs starting at checkpoint k (cells x 2)."""
        if (k, anchor) not in self._absolute:
            last = anchor_values(history, k, anchor)[self._order]
            change = last - self.column(history.values, 0)
            self._absolute[(k, anchor)] = np.stack([self._per_cell(np.abs(last)), self._per_cell(np.abs(change))], axis=1)
        return self._absolute[(k, anchor)]


class _Table:
    """Per-cell sums kept by key, in one array, so that the sums of many keys are taken at once."""

    def __init__(self, count: int) -> None:
        self.values = np.empty((64, count))
        self.row: dict[object, int] = {}

    def take(self, keys: list, make) -> np.ndarray:
        """The sums of `keys` (keys x cells), each made by make(key) the first time it is asked for."""
        for key in keys:
            if key not in self.row:
                if len(self.row) == len(self.values):
                    self.values = np.concatenate([self.values, np.empty_like(self.values)])
                self.values[len(self.row)] = make(key)
                self.row[key] = len(self.row)
        return self.values[[self.row[key] for key in keys]]


@dataclass
class _StartTerms:
    """Per kind of combination (0: last, 1: change, 2 + o: output o's residual), pair start and term, a
    column u_j of the history and its coefficient: kinds x starts x terms."""

    columns: np.ndarray
    values: np.ndarray
    valid: np.ndarray


def _start_terms(starts: np.ndarray, anchor: int, before: np.ndarray, alpha: np.ndarray) -> _StartTerms:
    """Each start's last = u_0 + the mean of its `anchor_window`'s u_j, change = that mean, and per output
    the residual, target - last, for the target (1 - alpha) w_before + alpha w_before+1 (starts x outputs):
    -change, then the two checkpoints' u_j, the first merged into the window's term where it is one of
    its columns (w_0 cancels: the target never reaches back to it), in the order `self_pairs`' rows sum them.
    The arrays hold MAX_STARTS starts, those past the last not valid, so that one `_layout` serves any count."""
    outputs, terms = before.shape[1], anchor + 2
    lows = np.maximum(1, starts - anchor + 1)
    window = lows[:, None] + np.arange(anchor)
    in_window = window <= starts[:, None]
    share = np.broadcast_to((1.0 / (starts - lows + 1))[:, None], window.shape)
    shape = (2 + outputs, MAX_STARTS, terms)
    padded = np.zeros(shape, dtype=np.int64), np.zeros(shape), np.zeros(shape, dtype=bool)
    columns, values, valid = (array[:, : len(starts)] for array in padded)
    columns[0, :, 1 : anchor + 1], values[0, :, 0], values[0, :, 1 : anchor + 1] = window, 1.0, share
    valid[0, :, 0], valid[0, :, 1 : anchor + 1] = True, in_window
    columns[1, :, :anchor], values[1, :, :anchor], valid[1, :, :anchor] = window, share, in_window
    before, alpha = before.T, alpha.T
    merged = in_window & (window == before[..., None])
    residual = slice(2, 2 + outputs)
    columns[residual, :, :anchor], valid[residual, :, :anchor] = window, in_window
    values[residual, :, :anchor] = np.where(merged, -share + (1.0 - alpha)[..., None], -share)
    columns[residual, :, anchor], values[residual, :, anchor] = before, 1.0 - alpha
    valid[residual, :, anchor] = ~merged.any(-1) & (before != 0)
    columns[residual, :, anchor + 1], values[residual, :, anchor + 1], valid[residual, :, anchor + 1] = before + 1, alpha, True
    return _StartTerms(*padded)


@dataclass(frozen=True)
class _Layout:
    """Where each term of the slots' sums comes from, for a number of outputs (and MAX_STARTS starts): per
    product term u_a u_b of a quadratic slot, the flat positions of its two factors in the `_StartTerms`
    arrays (`left`, `right`) and its slot (`pair_slot`); per term u_a of a linear slot, `single` and
    `single_slot`; each in order of slot, start, group and term."""

    quadratic: tuple
    linear: tuple
    left: np.ndarray
    right: np.ndarray
    pair_slot: np.ndarray
    single: np.ndarray
    single_slot: np.ndarray


@lru_cache(maxsize=16)
def _layout(anchor: int, outputs: int) -> _Layout:
    """The slots self_pair_sums needs: (last, last), (last, change), (change, change), per output
    (last, residual) and (change, residual), and (residual, residual) over every output (one slot, after
    the first output's); linear: last, change and each residual. Kinds are `_StartTerms`'."""
    terms, starts = anchor + 2, MAX_STARTS
    quadratic: dict[object, list[tuple[int, int]]] = {"aa": [(0, 0)], "ac": [(0, 1)], "cc": [(1, 1)]}
    for o in range(outputs):
        quadratic.update({("ay", o): [(0, 2 + o)], ("cy", o): [(1, 2 + o)]})
        if o == 0:
            quadratic["yy"] = [(2 + r, 2 + r) for r in range(outputs)]
    linear = {"a": [0], "c": [1], **{("y", o): [2 + o] for o in range(outputs)}}

    def flat(kinds: np.ndarray) -> np.ndarray:
        """Positions of (start, group, term) of these kinds (one per group) in the kinds x starts x terms arrays."""
        return (kinds[None, :, None] * starts + np.arange(starts)[:, None, None]) * terms + np.arange(terms)

    left, right, pair_slot, single, single_slot = [], [], [], [], []
    for slot, groups in enumerate(quadratic.values()):
        a, b = flat(np.array([k for k, _ in groups])), flat(np.array([k for _, k in groups]))
        a, b = np.broadcast_arrays(a[..., :, None], b[..., None, :])
        left.append(a.ravel()), right.append(b.ravel()), pair_slot.append(np.full(a.size, slot))
    for slot, kinds in enumerate(linear.values()):
        positions = flat(np.array(kinds)).ravel()
        single.append(positions), single_slot.append(np.full(positions.size, slot))
    arrays = (np.concatenate(x) for x in (left, right, pair_slot, single, single_slot))
    return _Layout(tuple(quadratic), tuple(linear), *arrays)


def _slot_sums(terms: _StartTerms, layout: _Layout, columns: int, products, sums) -> tuple[dict, dict]:
    """Per slot, the per-cell sums of its groups' combinations summed over the starts: a quadratic group
    (k, l) is (sum_a left_a u_a)(sum_b right_b u_b) of kinds k and l, a linear one sum_a left_a u_a. The
    coefficient of each key, u_a u_b (a <= b, of `columns`) or u_a, is summed in order of start, group and
    term (as adding the terms start by start would: the same bits), and each kind's slots are evaluated
    from one product of their coefficients with the sums `products` (`sums`) gives for their keys (keys x
    cells), in order of first use."""
    column, value, valid = terms.columns.ravel(), terms.values.ravel(), terms.valid.ravel()
    left, right = column[layout.left], column[layout.right]
    code = np.concatenate([np.minimum(left, right) * columns + np.maximum(left, right), -1 - column[layout.single]])
    weight = np.concatenate([value[layout.left] * value[layout.right], value[layout.single]])
    kept = np.concatenate([valid[layout.left] & valid[layout.right], valid[layout.single]])
    slot = np.concatenate([layout.pair_slot, len(layout.quadratic) + layout.single_slot])[kept]
    code, weight = code[kept], weight[kept]
    unique, first, inverse = np.unique(code, return_index=True, return_inverse=True)
    order = np.argsort(first)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    slots = len(layout.quadratic) + len(layout.linear)
    coefficients = np.bincount(slot * len(unique) + rank[inverse], weights=weight, minlength=slots * len(unique))
    coefficients = coefficients.reshape(slots, len(unique))
    codes = unique[order].tolist()
    pairs = sum(c >= 0 for c in codes)
    quadratic = np.ascontiguousarray(coefficients[: len(layout.quadratic), :pairs])
    linear = np.ascontiguousarray(coefficients[len(layout.quadratic) :, pairs:])
    q = np.einsum("sk,kc->sc", quadratic, products([divmod(c, columns) for c in codes[:pairs]]))
    s = np.einsum("sk,kc->sc", linear, sums([-1 - c for c in codes[pairs:]]))
    return dict(zip(layout.quadratic, q)), dict(zip(layout.linear, s))


def self_pair_sums(history: History, horizon: int, offsets: list[int], sums: ColumnSums, anchor: int = 1) -> PairSums:
    """`self_pairs`' rows as the closed-form fit needs them, from `sums` without building the rows: per
    start, last = u_0 + mean of the window's u_j, change = that mean, and each target the interpolation
    between two checkpoints, u_0 + (1 - alpha) u_i + alpha u_i+1 (`_start_terms`, every start at once)."""
    steps = history.steps
    rho, starts = _starts(steps, horizon)
    at = np.array(starts)
    jumps = rho * (steps[at] - steps[0])
    ends = np.stack([steps[at] + (o / horizon) * jumps for o in offsets], 1)
    before = np.clip(np.searchsorted(steps, ends, side="right") - 1, 0, len(steps) - 2)
    alpha = (ends - steps[before]) / (steps[before + 1] - steps[before])
    terms = _start_terms(at, anchor, before, alpha)
    outputs = range(len(offsets))
    q, sums_of = _slot_sums(
        terms, _layout(anchor, len(offsets)), len(steps),
        lambda keys: sums.products(history.values, keys), lambda keys: sums.sums(history.values, keys),
    )  # fmt: skip
    absolute = np.sum([sums.absolute(history, k, anchor) for k in starts], axis=0)
    rows = sums.rows()
    a, c, count = sums_of["a"], sums_of["c"], rows * len(starts)
    gram = np.stack([np.stack([q["aa"], q["ac"], a], -1), np.stack([q["ac"], q["cc"], c], -1), np.stack([a, c, count], -1)], -2)
    moments = np.stack([np.stack([q[("ay", o)], q[("cy", o)], sums_of[("y", o)]], -1) for o in outputs], -1)
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

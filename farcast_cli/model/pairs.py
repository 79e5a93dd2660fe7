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
    steps = history.steps
    i = int(np.clip(np.searchsorted(steps, time, side="right") - 1, 0, len(steps) - 2))
    alpha = (time - steps[i]) / (steps[i + 1] - steps[i])
    return history.values[:, i] * (1 - alpha) + history.values[:, i + 1] * alpha


def max_self_horizon(steps: list[int] | np.ndarray) -> int:
    """The largest horizon a run supports: its second checkpoint must have a target inside the history."""
    s0, s1, sk = steps[0], steps[1], steps[-1]
    return int((sk - s0) * (sk - s1) // (s1 - s0))


def _first_rate(history: History) -> np.ndarray:
    steps = history.steps
    return np.abs(history.values[:, 1] - history.values[:, 0]) / (steps[1] - steps[0])


def _last_gap(offsets: list[float]) -> float:
    return offsets[-1] - (offsets[-2] if len(offsets) > 1 else 0.0)


def anchor_values(history: History, k: int, anchor: int) -> np.ndarray:
    """The map's second input at checkpoint k: the mean of the last `anchor` checkpoints up to k (1: k
    itself), never reaching back to the first checkpoint, which is the map's other input."""
    return history.values[:, max(1, k - anchor + 1) : k + 1].mean(axis=1) if anchor > 1 else history.values[:, k]


def self_pairs(history: History, horizon: int, offsets: list[int], anchor: int = 1) -> Pairs:
    """Pairs from the run itself: the jump from each checkpoint t is scaled as rho * (t - s_0)."""
    steps = history.steps
    s0, sk = steps[0], steps[-1]
    rho = horizon / (sk - s0)
    fractions = [o / horizon for o in offsets]
    starts = [k for k in range(1, len(steps)) if steps[k] + rho * (steps[k] - s0) <= sk + 1e-9]
    if not starts:
        raise UsageError(f"horizon {horizon} is too far for this run: the largest it supports is {max_self_horizon(steps)} steps")
    if len(starts) > MAX_STARTS:
        starts = [starts[i] for i in sorted(set(np.linspace(0, len(starts) - 1, MAX_STARTS).round().astype(int)))]
    n = history.values.shape[0]
    rows = []
    for k in starts:
        jump = rho * (steps[k] - s0)
        targets = np.stack([interpolate(history, steps[k] + f * jump) for f in fractions], axis=1)
        rows.append((anchor_values(history, k, anchor), targets, np.full(n, jump * _last_gap(fractions))))
    return Pairs(
        first=np.tile(history.values[:, 0], len(starts)),
        last=np.concatenate([r[0] for r in rows]),
        targets=np.concatenate([r[1] for r in rows]),
        first_rate=np.tile(_first_rate(history), len(starts)),
        last_dt=np.concatenate([r[2] for r in rows]),
        coordinate=np.tile(np.arange(n), len(starts)),
    )


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

"""The one linear map: every checkpoint farcast can write is one, over a few of the run's checkpoints.

    y[j] = sum_i weight[i][j] * x[i] + bias[j]

    x: the values of one weight coordinate at K input checkpoints   (K = 2 for the forecaster:
       the first checkpoint and the last one, as in PAPER.md)
    weight: K x m, bias: m
    y: that coordinate's m outputs, one per forecast step

The forecaster's map is fitted (model/fit.py); keeping the last checkpoint, the straight line
through the last two and the average of the last few (LAWA) are fixed maps; shrinking a forecast
towards the last checkpoint is a map of maps. The same map is applied to streamed chunks, to
sampled coordinates and to whole vectors, as torch tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LinearMap:
    weight: tuple[tuple[float, ...], ...]
    bias: tuple[float, ...]

    @classmethod
    def of(cls, weight: Sequence[Sequence[float]], bias: Sequence[float]) -> LinearMap:
        return cls(tuple(tuple(float(w) for w in row) for row in weight), tuple(float(b) for b in bias))

    @classmethod
    def keep(cls, inputs: int, index: int, outputs: int) -> LinearMap:
        """Output every step as input `index`, unchanged."""
        return cls.of([[float(i == index)] * outputs for i in range(inputs)], [0.0] * outputs)

    @property
    def outputs(self) -> int:
        return len(self.bias)

    def apply(self, values: Sequence[torch.Tensor], output: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Output `output` from the inputs' values (same shapes), into `out` if given.

        A map that keeps one input unchanged returns that input itself, not a copy."""
        kept = self.kept_input(output)
        if kept is not None:
            return values[kept]
        out = torch.mul(values[0], self.weight[0][output], out=out)
        for value, row in zip(values[1:], self.weight[1:], strict=True):
            out.add_(value, alpha=row[output])
        return out.add_(self.bias[output]) if self.bias[output] else out

    def kept_input(self, output: int) -> int | None:
        """The input that output `output` equals exactly, if it is one input times 1 and nothing else."""
        column = [row[output] for row in self.weight]
        if self.bias[output] == 0.0 and sorted(column) == [0.0] * (len(column) - 1) + [1.0]:
            return column.index(1.0)
        return None

    def shrunk(self, alpha: float, towards: int) -> LinearMap:
        """x[towards] + alpha * (y - x[towards]): alpha 0 keeps that input, 1 leaves the map as it is."""
        weight = [[alpha * w + (1.0 - alpha) if i == towards else alpha * w for w in row] for i, row in enumerate(self.weight)]
        return LinearMap.of(weight, [alpha * b for b in self.bias])

    def as_lists(self) -> list[list]:
        """[weight, bias] as plain lists, the form saved in forecaster files and reports."""
        return [[list(row) for row in self.weight], list(self.bias)]

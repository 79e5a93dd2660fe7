"""Score candidates against checkpoints the fit did not see, in weight error.

The candidates (forecast/candidates.py) forecast a checkpoint whose truth is known: the run's last
checkpoint from a held-out cut, or a reference run's checkpoint at E + H. For each tensor and
overall: MAE and RMSE of every candidate, and skill = 1 - MAE(forecast) / MAE(baseline), above 0
beats the baseline. Weight error is what this measures, not the user's loss (evaluate/loss.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
import torch

from farcast_cli.distributed import ONE_PROCESS, Piece, World, tensor_pieces
from farcast_cli.evaluate.report import Backtest, BacktestPlan, ErrorTable, MethodError
from farcast_cli.forecast.candidates import CANDIDATES, FORECAST, STRAIGHT_LINE, Combination
from farcast_cli.io.engine import (
    ChunkJob,
    EngineSettings,
    Scratch,
    Source,
    chunk_jobs,
    matrix_blocks,
    raise_for_non_finite_input,
    stream,
)
from farcast_cli.io.reader import TensorInfo
from farcast_cli.io.run import Checkpoint, Run
from farcast_cli.model.history import History
from farcast_cli.model.pairs import interpolate

INPUT_BYTES_PER_ELEMENT = 8 * 8
SUM_BLOCK = 1 << 14


def scratch_bytes_per_element() -> int:
    """A float64 scratch slot per candidate (their errors), and two to spare (on the CPU the sources'
    block matrix is block-sized; a GPU computes on the staged chunk itself)."""
    return (len(CANDIDATES) + 2) * 8


def plan_of(candidates: Mapping[str, Combination]) -> BacktestPlan:
    forecast, line = candidates[FORECAST.key], candidates[STRAIGHT_LINE.key]
    return BacktestPlan(forecast.inputs[0].step, line.inputs[0].step, forecast.inputs[-1].step, float(forecast.target_steps[-1]))


def checkpoints_read(steps: list[int], candidates: Mapping[str, Combination]) -> list[int]:
    """Indices of every checkpoint the full backtest reads: the candidates' inputs and the truth's."""
    inputs = {steps.index(c.step) for candidate in candidates.values() for c in candidate.inputs}
    truth = (i for i, _ in _truth_weights(steps, candidates[FORECAST.key].target_steps[-1]))
    return sorted(inputs.union(truth))


def backtest_checkpoints(run: Run, candidates: Mapping[str, Combination]) -> list[Checkpoint]:
    """The checkpoints the full backtest reads, in step order."""
    return [run.checkpoints[i] for i in checkpoints_read(run.steps, candidates)]


def blockwise_sum(values: torch.Tensor) -> float:
    """The sum of a 1-d tensor, the same whatever the number of threads (torchrun starts each rank
    with one; a plain process uses every core): rows of SUM_BLOCK elements are each summed by one
    thread, then the row sums in float64, in order."""
    whole = values.numel() // SUM_BLOCK * SUM_BLOCK
    rows = float(values[:whole].view(-1, SUM_BLOCK).sum(dim=1).sum(dtype=torch.float64)) if whole else 0.0
    return rows + float(values[whole:].sum())


def skill(error: float, baseline_error: float) -> float | None:
    return None if baseline_error == 0 else 1.0 - error / baseline_error


class _Sums:
    """Each candidate's sums of absolute and squared errors, by key, over `count` coordinates."""

    def __init__(self, keys: Iterable[str]) -> None:
        self.values = {key: [0.0, 0.0] for key in keys}
        self.count = 0

    def add(self, truth: torch.Tensor, predictions: dict[str, torch.Tensor], work: torch.Tensor | None = None) -> None:
        for method, predicted in predictions.items():
            error = torch.sub(predicted, truth, out=work)
            self.values[method][0] += blockwise_sum(error.abs_())
            self.values[method][1] += blockwise_sum(error.square_())
        self.count += truth.numel()

    def finite(self) -> bool:
        return all(math.isfinite(v) for pair in self.values.values() for v in pair)

    def merge(self, other: _Sums) -> None:
        for key, (absolute, squared) in other.values.items():
            self.values[key][0] += absolute
            self.values[key][1] += squared
        self.count += other.count

    def table(self) -> ErrorTable:
        n = max(self.count, 1)
        errors = {key: MethodError(absolute / n, math.sqrt(squared / n)) for key, (absolute, squared) in self.values.items()}
        forecast = errors[FORECAST.key].mae
        skills = {key: skill(forecast, error.mae) for key, error in errors.items() if key != FORECAST.key}
        return ErrorTable(self.count, errors, skills)


def _predicted(candidate: Combination, values: dict[int, torch.Tensor], name: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """The candidate's forecast of the target (its last output) from the values by step, into `out` where given."""
    return candidate.apply([values[c.step] for c in candidate.inputs], len(candidate.target_steps) - 1, out=out, name=name)


def _truth_weights(steps: list[int], target: float) -> list[tuple[int, float]]:
    if target in steps:
        return [(steps.index(target), 1.0)]
    i = int(np.searchsorted(steps, target)) - 1
    alpha = (target - steps[i]) / (steps[i + 1] - steps[i])
    return [(i, 1.0 - alpha), (i + 1, alpha)]


def backtest_streaming(run: Run, candidates: Mapping[str, Combination], settings: EngineSettings, world: World = ONE_PROCESS) -> Backtest:
    """Evaluate over every coordinate of every float tensor, chunk by chunk; under torchrun each rank
    sums its share of the tensors' pieces (tensor_pieces), chunk by chunk, and the chunks' sums are
    added up in the tensors' order, as one process adds them."""
    infos = scored_tensors(run)
    pieces = tensor_pieces(run.last, [info.name for info in infos], world.size, settings.chunk_elements)

    def share(mine: list[int]) -> dict[int, list[_Sums]]:
        return _chunk_sums(run, candidates, settings, infos, {i: pieces[i] for i in mine})

    per_tensor = {info.name: _Sums(candidates) for info in infos}
    for piece, chunk_sums in zip(pieces, world.divided([piece.weight for piece in pieces], share)):
        for sums in chunk_sums:
            per_tensor[infos[piece.item].name].merge(sums)
    return _backtest("all coordinates", candidates, per_tensor)


def scored_tensors(run: Run) -> list[TensorInfo]:
    """The tensors the full backtest reads, in the run's order."""
    return [info for info in run.tensor_infos() if info.is_forecast and info.numel > 0]


def streamed_bytes(run: Run, candidates: Mapping[str, Combination], grain: int, world: World = ONE_PROCESS) -> int:
    """Bytes the full backtest reads on this rank, in chunks of `grain` elements."""
    pieces = tensor_pieces(run.last, [info.name for info in scored_tensors(run)], world.size, grain)
    return len(checkpoints_read(run.steps, candidates)) * sum(pieces[i].weight for i in world.share([piece.weight for piece in pieces]))


def _chunk_sums(
    run: Run, candidates: Mapping[str, Combination], settings: EngineSettings, infos: list[TensorInfo], pieces: dict[int, Piece]
) -> dict[int, list[_Sums]]:
    """Each piece's sums, one per chunk (so that they add up as one process adds them, whatever the pieces)."""
    scoring = _Scoring(run, candidates, settings.block_elements)
    columns = tuple(checkpoint.step for checkpoint in scoring.checkpoints)
    jobs, owners = [], []
    for index, piece in pieces.items():
        name = infos[piece.item].name
        sources = tuple(Source(*checkpoint.tensor(name)) for checkpoint in scoring.checkpoints)
        for job in chunk_jobs(name, piece.stop, settings.chunk_elements, sources, first=piece.start):
            jobs.append(job)
            owners.append(index)
    matrices = Scratch(len(columns) * settings.block_elements)
    found: dict[int, list[_Sums]] = {index: [] for index in pieces}
    for owner, (job, data) in zip(owners, stream(jobs, settings)):
        errors = scoring.chunk(data)
        for start, _, values in matrix_blocks(data, settings, matrices):
            scoring.add(errors, job.name, columns, start, values)
        found[owner].append(scoring.sums(errors, job, data))
    return found


class _Scoring:
    """The full backtest's arithmetic on streamed chunks: every candidate's errors of a block (the
    block's sources as one matrix, a row per checkpoint read) as one matrix product, summed by
    _ChunkErrors, checked finite chunk by chunk."""

    def __init__(self, run: Run, candidates: Mapping[str, Combination], block_elements: int) -> None:
        self.candidates = candidates
        self.checkpoints = backtest_checkpoints(run, candidates)
        self.truth = [(run.steps[i], part) for i, part in _truth_weights(run.steps, candidates[FORECAST.key].target_steps[-1])]
        self.errors = Scratch(len(candidates) * block_elements)
        self.maps: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def chunk(self, data: list[torch.Tensor]) -> _ChunkErrors:
        return _ChunkErrors(self.candidates, data[0].numel(), data[0].device)

    def add(
        self,
        errors: _ChunkErrors,
        name: str,
        columns: tuple[int, ...],
        start: int,
        values: torch.Tensor,
        written: Combination | None = None,
    ) -> torch.Tensor:
        """Add the errors of a block of tensor `name`: `values` holds a row per checkpoint read, by
        step (`columns`, which hold every checkpoint this backtest reads), the block's elements from
        `start`. With `written` (a candidate reading only those checkpoints), its outputs of the block
        come from the same product, one row each, returned (else no rows)."""
        key = (name, columns, values.dtype, written is not None)
        if key not in self.maps:
            self.maps[key] = _error_map(self.candidates, list(columns), self.truth, name, values, written)
        weight, bias = self.maps[key]
        count = values.shape[1]
        out = self.errors.get(weight.shape[0] * count, values.dtype, values.device).view(weight.shape[0], count)
        product = torch.mm(weight, values, out=out) if bias is None else torch.addmm(bias, weight, values, out=out)
        errors.add(start, product[: len(self.candidates)])
        return product[len(self.candidates) :]

    def sums(self, errors: _ChunkErrors, job: ChunkJob, data: list[torch.Tensor]) -> _Sums:
        """The chunk's sums; a chunk whose errors are not finite names the source holding NaN or Inf."""
        sums = _Sums(self.candidates)
        errors.add_to(sums)
        if not sums.finite():
            raise_for_non_finite_input(job, data)
        return sums


class StreamedBacktest:
    """The full backtest from the chunks a forecast's write reads (one process, forecast/write.py; safetensors or DCP):
    the write reads `checkpoints` besides its inputs and hands every block of a scored tensor to `add`,
    every chunk's start and end to `start` and `done`; `result` is then what backtest_streaming returns, the candidates'
    figures summed chunk by chunk as it sums them (so chunks of another size move only the last digits)."""

    def __init__(self, run: Run, candidates: Mapping[str, Combination], block_elements: int) -> None:
        self.scoring = _Scoring(run, candidates, block_elements)
        self.checkpoints = self.scoring.checkpoints
        self.per_tensor = {info.name: _Sums(candidates) for info in scored_tensors(run)}
        self.open: _ChunkErrors

    def start(self, data: list[torch.Tensor]) -> None:
        """A chunk of a scored tensor begins: its sources' data as streamed."""
        self.open = self.scoring.chunk(data)

    def add(
        self, name: str, columns: tuple[int, ...], start: int, values: torch.Tensor, written: Combination | None = None
    ) -> torch.Tensor:
        """A block of the chunk: a row per checkpoint read, by step (`columns`), its elements from `start`;
        with `written`, that candidate's outputs of the block, a row each (_Scoring.add)."""
        return self.scoring.add(self.open, name, columns, start, values, written)

    def done(self, job: ChunkJob, data: list[torch.Tensor]) -> None:
        """The chunk's end, once every block of it was added."""
        self.per_tensor[job.name].merge(self.scoring.sums(self.open, job, data))
        self.open = None

    def result(self) -> Backtest:
        return _backtest("all coordinates", self.scoring.candidates, self.per_tensor)


def _error_map(
    candidates: Mapping[str, Combination],
    columns: list[int],
    truth: list[tuple[int, float]],
    name: str,
    like: torch.Tensor,
    written: Combination | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each candidate's error at the target as one linear map of the checkpoints read (`columns`, by
    step): its forecast's weights (candidates' last output) less the truth's, one row each, then with
    `written` each of that candidate's outputs, a row each; and the rows' biases (None where all are
    0), so that all errors (and outputs) of a block are one matrix product."""
    weight, bias = [], []
    for candidate in candidates.values():
        row, offset = _map_row(candidate, name, len(candidate.target_steps) - 1, columns)
        for step, part in truth:
            row[columns.index(step)] -= part
        weight.append(row)
        bias.append(offset)
    for output in range(len(written.target_steps) if written is not None else 0):
        row, offset = _map_row(written, name, output, columns)
        weight.append(row)
        bias.append(offset)
    weights = torch.tensor(weight, dtype=like.dtype, device=like.device)
    return weights, torch.tensor(bias, dtype=like.dtype, device=like.device).view(-1, 1) if any(bias) else None


def _map_row(candidate: Combination, name: str, output: int, columns: list[int]) -> tuple[list[float], float]:
    """The candidate's output `output` of tensor `name` as weights of the checkpoints read (`columns`, by step), and its bias."""
    linear, row = candidate.map_for(name), [0.0] * len(columns)
    for checkpoint, weights in zip(candidate.inputs, linear.weight, strict=True):
        row[columns.index(checkpoint.step)] += weights[output]
    return row, linear.bias[output]


class _ChunkErrors:
    """A chunk's absolute and squared errors by candidate, summed block by block as blockwise_sum sums
    the whole chunk: each row of SUM_BLOCK elements by itself, the rows' sums in float64 once the chunk
    is done, so the figures do not depend on the block size. All candidates' errors of a block are
    one tensor, so each kind of sum is one operation over all of them."""

    def __init__(self, keys: Iterable[str], count: int, device: torch.device) -> None:
        self.keys = list(keys)
        self.whole = count // SUM_BLOCK * SUM_BLOCK
        self.rows = torch.zeros(2, len(self.keys), self.whole // SUM_BLOCK, device=device)
        self.tails = {key: [0.0, 0.0] for key in self.keys}
        self.count = count

    def add(self, start: int, errors: torch.Tensor) -> None:
        """The errors (candidates x elements) of elements [start, start + errors.shape[1]) of the chunk
        (start a multiple of SUM_BLOCK); they are overwritten."""
        full = max(0, min(errors.shape[1], self.whole - start))
        rows = slice(start // SUM_BLOCK, (start + full) // SUM_BLOCK)
        self._add_rows(0, errors.abs_(), full, rows)
        self._add_rows(1, errors.square_(), full, rows)

    def _add_rows(self, k: int, values: torch.Tensor, full: int, rows: slice) -> None:
        if full:
            torch.sum(values[:, :full].view(len(self.keys), -1, SUM_BLOCK), dim=2, out=self.rows[k, :, rows])
        if full < values.shape[1]:
            for key, row in zip(self.keys, values):
                self.tails[key][k] = float(row[full:].sum())

    def add_to(self, sums: _Sums) -> None:
        for i, key in enumerate(self.keys):
            for k in range(2):
                total = float(self.rows[k, i].sum(dtype=torch.float64)) if self.whole else 0.0
                sums.values[key][k] += total + self.tails[key][k]
        sums.count += self.count


def backtest_sample(history: History, candidates: Mapping[str, Combination]) -> Backtest:
    """Evaluate on the sampled coordinates only: cheap, and close to the full figure for large samples."""
    columns = torch.from_numpy(history.values)
    truth = torch.from_numpy(interpolate(history, candidates[FORECAST.key].target_steps[-1]))
    per_tensor = {}
    for index, name in enumerate(history.tensor_names):
        rows = torch.from_numpy(history.rows_of(index))
        values = {int(step): columns[rows, k] for k, step in enumerate(history.steps)}
        sums = per_tensor[name] = _Sums(candidates)
        sums.add(truth[rows], {key: _predicted(candidate, values, name) for key, candidate in candidates.items()})
    return _backtest(f"{columns.shape[0]} sampled coordinates", candidates, per_tensor)


def _backtest(scope: str, candidates: Mapping[str, Combination], per_tensor: dict[str, _Sums]) -> Backtest:
    overall = _Sums(candidates)
    for sums in per_tensor.values():
        overall.merge(sums)
    return Backtest(scope, plan_of(candidates), {name: sums.table() for name, sums in per_tensor.items()}, overall.table())

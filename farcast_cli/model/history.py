"""Read the history of a random sample of coordinates, so fitting cost does not grow with the model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from farcast_cli.distributed import ONE_PROCESS, Piece, World, cut_in_pieces
from farcast_cli.errors import InputError
from farcast_cli.io.engine import OpenFiles
from farcast_cli.io.reader import TORCH_DTYPES, SafetensorsFile, TensorInfo
from farcast_cli.io.run import Checkpoint, Run

MERGE_GAP_BYTES = 64 * 1024
BATCH_BYTES = 16 * 1024 * 1024


@dataclass
class History:
    """values[i, k] is sampled coordinate i at steps[k]; it is element indices[i] of tensor
    tensor_names[tensor_index[i]]."""

    steps: np.ndarray
    values: np.ndarray
    tensor_index: np.ndarray
    tensor_names: list[str]
    indices: np.ndarray | None = None

    def column(self, step: float) -> int:
        """The column of a checkpoint step."""
        return int(np.searchsorted(self.steps, step))

    def rows_of(self, tensor: int) -> np.ndarray:
        return np.nonzero(self.tensor_index == tensor)[0]

    def truncated(self, last_index: int) -> History:
        return History(self.steps[: last_index + 1], self.values[:, : last_index + 1], self.tensor_index, self.tensor_names, self.indices)


def sample_coordinates(infos: list[TensorInfo], size: int, seed: int) -> list[tuple[TensorInfo, np.ndarray]]:
    """Draw `size` distinct coordinates of the forecast tensors, uniformly, so in proportion to tensor sizes."""
    infos = [info for info in infos if info.is_forecast and info.numel > 0]
    sizes = np.array([info.numel for info in infos], dtype=np.int64)
    total = int(sizes.sum())
    if total == 0:
        return []
    rng = np.random.default_rng(seed)
    flat = np.arange(total) if size >= total else np.sort(rng.choice(total, size=size, replace=False, shuffle=False))
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    owner = np.searchsorted(bounds, flat, side="right") - 1
    return [(info, flat[owner == i] - bounds[i]) for i, info in enumerate(infos) if np.any(owner == i)]


def _contiguous_runs(indices: np.ndarray, max_gap: int, max_length: int) -> list[tuple[int, int]]:
    """Group sorted element indices into [start, stop) ranges, reading through gaps up to max_gap,
    each range at most max_length elements long (plus one index)."""
    chunk_of = (indices - indices[0]) // max_length
    breaks = np.nonzero((np.diff(indices) > max_gap) | (np.diff(chunk_of) != 0))[0]
    starts = np.concatenate([[0], breaks + 1])
    stops = np.concatenate([breaks + 1, [len(indices)]])
    return [(int(indices[a]), int(indices[b - 1]) + 1) for a, b in zip(starts, stops)]


def _batches(ranges: list[tuple[int, int]], itemsize: int) -> list[list[tuple[int, int]]]:
    """Consecutive ranges grouped so that each group reads at most BATCH_BYTES (or one range)."""
    groups: list[list[tuple[int, int]]] = [[]]
    size = 0
    for start, stop in ranges:
        if groups[-1] and size + (stop - start) * itemsize > BATCH_BYTES:
            groups.append([])
            size = 0
        groups[-1].append((start, stop))
        size += (stop - start) * itemsize
    return groups


class _BatchReads:
    """Batches of byte ranges, each read back to back into one reused buffer, through files kept open:
    no buffer per range and no joined copy of them (a dense sample reads nearly every byte of the run)."""

    def __init__(self) -> None:
        self.files = OpenFiles(use_mmap=False)
        self.buffer = bytearray(BATCH_BYTES)

    def read(self, file: SafetensorsFile, ranges: list[tuple[int, int]]) -> memoryview:
        total = sum(end - begin for begin, end in ranges)
        if len(self.buffer) < total:
            self.buffer = bytearray(total)
        view, at = memoryview(self.buffer), 0
        for begin, end in ranges:
            self.files.read_into(file, begin, view[at : at + end - begin])
            at += end - begin
        return view[:total]

    def close(self) -> None:
        """Close the files read so far; a later read opens them again (a run may have thousands)."""
        self.files.close()
        self.files = OpenFiles(use_mmap=False)


def read_sampled_values(checkpoint: Checkpoint, info: TensorInfo, indices: np.ndarray, reads: _BatchReads | None = None) -> np.ndarray:
    """One tensor's values at the given sorted element indices, read as a few contiguous ranges."""
    if reads is None:
        reads = _BatchReads()
        try:
            return read_sampled_values(checkpoint, info, indices, reads)
        finally:
            reads.close()
    file, local = checkpoint.tensor(info.name)
    size = local.itemsize
    values = np.empty(len(indices), dtype=np.float64)
    done = 0
    ranges = _contiguous_runs(indices, max(1, MERGE_GAP_BYTES // size), max(1, BATCH_BYTES // size))
    for group in _batches(ranges, size):
        raw = reads.read(file, [(local.begin + a * size, local.begin + b * size) for a, b in group])
        data = torch.frombuffer(raw, dtype=TORCH_DTYPES[local.dtype])
        starts = np.array([a for a, _ in group])
        offsets = np.concatenate([[0], np.cumsum([b - a for a, b in group])[:-1]])
        count = int(np.searchsorted(indices, group[-1][1], side="left")) - done
        wanted = indices[done : done + count]
        run_of = np.searchsorted(starts, wanted, side="right") - 1
        values[done : done + count] = data[torch.from_numpy(offsets[run_of] + wanted - starts[run_of])].to(torch.float64).numpy()
        done += count
    bad = np.nonzero(~np.isfinite(values))[0]
    if len(bad):
        raise InputError(
            f"{file.path}: tensor {info.name!r} holds {values[bad[0]]} at element {int(indices[bad[0]])}; "
            "refusing to forecast from non-finite weights"
        )
    return values


def read_history(run: Run, size: int, seed: int, world: World = ONE_PROCESS) -> History:
    """The sampled coordinates' values at every checkpoint of the run; under torchrun each rank reads
    its share of the sampled coordinates (sample_pieces) and every rank gets the whole sample."""
    picks = sample_coordinates(run.tensor_infos(), size, seed)
    if not picks:
        raise InputError(f"{run.path}: no floating-point tensors to forecast")
    pieces = sample_pieces(picks, world.size)

    def read(mine: list[int]) -> dict[int, np.ndarray]:
        return _read_rows(run, [(i, (picks[pieces[i].item][0], picks[pieces[i].item][1][pieces[i].start : pieces[i].stop])) for i in mine])

    rows = world.divided([piece.weight for piece in pieces], read)
    tensor_index = np.concatenate([np.full(len(indices), i) for i, (_, indices) in enumerate(picks)])
    names, indices = [info.name for info, _ in picks], np.concatenate([indices for _, indices in picks])
    return History(np.array(run.steps, dtype=np.float64), np.concatenate(rows), tensor_index, names, indices)


def sample_pieces(picks: list[tuple[TensorInfo, np.ndarray]], parts: int) -> list[Piece]:
    """The sampled coordinates divided for `parts` ranks: by tensor, a tensor holding more than a rank's
    share of them in ranges of its coordinates."""
    return cut_in_pieces([len(indices) for _, indices in picks], [len(indices) for _, indices in picks], parts, grain=1)


def _read_rows(run: Run, picks: list[tuple[int, tuple[TensorInfo, np.ndarray]]]) -> dict[int, np.ndarray]:
    """Each pick's values, one row per sampled coordinate and one column per checkpoint, read
    checkpoint by checkpoint."""
    columns: dict[int, list[np.ndarray]] = {index: [] for index, _ in picks}
    reads = _BatchReads()
    for checkpoint in run.checkpoints:
        try:
            for index, (info, indices) in picks:
                columns[index].append(read_sampled_values(checkpoint, info, indices, reads))
        finally:
            reads.close()
    return {index: np.stack(values, axis=1) for index, values in columns.items()}

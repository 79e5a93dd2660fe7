"""The run's history observed in memory while it trains, for the in-loop farcaster (integrations/).

At each observation it keeps the sampled coordinates' values (bounded by the sample size, not the
model's) and, at the first, the model's floating-point tensors whole: the forecaster's first input.
The sample is drawn as `read_history` draws it from a checkpoint saved by safetensors (the same
tensors in the same order, model/history.py's `sample_coordinates`), so the History it gives is the one
`farcast predict` would read from the same checkpoints.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from farcast_cli.errors import InputError, UsageError
from farcast_cli.io.reader import SAFETENSORS_NAMES, TensorInfo
from farcast_cli.model.history import History, sample_coordinates
from farcast_cli.model.pairs import ColumnSums

log = logging.getLogger("farcast")
FILE_ORDER = {"F64": 0, "F32": 1, "BF16": 2, "F16": 3}
"""safetensors writes a file's tensors by dtype (these, widest first) and then by name; the sample
follows the file's order."""
KEEP_ON = ("cpu", "device")


def forecast_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state's floating-point tensors farcast forecasts, in the order safetensors writes them."""
    kept = {name: tensor for name, tensor in state.items() if SAFETENSORS_NAMES.get(tensor.dtype) in FILE_ORDER}
    return dict(sorted(kept.items(), key=lambda item: (FILE_ORDER[SAFETENSORS_NAMES[item[1].dtype]], item[0])))


def distinct(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One name per storage: a tensor tied under two names (shared embeddings) is changed once."""
    seen: set[tuple] = set()
    result = {}
    for name, tensor in tensors.items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if key not in seen:
            seen.add(key)
            result[name] = tensor
    return result


class ObservedRun:
    """The sampled history and the first weights of a model observed at increasing steps; `sums`, the
    closed-form fit's column sums of that history, kept from one jump to the next by fit settings (the
    history only grows, so what was summed of its columns stays true); `shrink`, the shrink factor the
    last fit with a trial chose and the observations it saw (None before the first; integrations/memory.py);
    `shrink_scratch`, the array the fits choose a shrink factor in, kept from one jump to the next."""

    def __init__(self, sample: int, seed: int, keep_first_on: str = "cpu") -> None:
        if keep_first_on not in KEEP_ON:
            raise UsageError(f"keep_first_on must be one of {', '.join(KEEP_ON)}, not {keep_first_on!r}")
        self.sample, self.seed, self.keep_first_on = sample, seed, keep_first_on
        self.steps: list[float] = []
        self._values = np.empty((0, 0))
        self._staged = torch.empty(0, dtype=torch.float64)
        self._copies: list[tuple[str, torch.Tensor | None, torch.Tensor]] = []
        self.first: dict[str, torch.Tensor] = {}
        self.names: list[str] = []
        self.sums: dict[tuple, ColumnSums] = {}
        self.shrink: tuple[float, int] | None = None
        self.shrink_scratch: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def first_bytes(self) -> int:
        return sum(tensor.numel() * tensor.element_size() for tensor in self.first.values())

    def observe(self, state: dict[str, torch.Tensor], step: float) -> None:
        """Record the sampled coordinates at `step` (on the run's time axis); the first call also keeps
        the whole weights. A step not after the last observed one is ignored."""
        if self.steps and step <= self.steps[-1]:
            return
        if not self.steps:
            self._start(forecast_tensors(state))
        self._sample(state)
        if not math.isfinite(self._staged.sum()):
            staged = self._staged.numpy()
            bad = staged[~np.isfinite(staged)]
            if len(bad):
                raise InputError(f"the model holds {bad[0]} in a sampled weight at step {step:g}; refusing to forecast from it")
        torch.from_numpy(self._next_row()).copy_(self._staged)
        self.steps.append(float(step))

    def _next_row(self) -> np.ndarray:
        """The values' next row, the buffer grown by doubling: a History is a view of the rows it holds
        (`history`), not a copy of the whole history at every jump. The buffer holds an observation per
        row, so that each of the History's columns is contiguous (the fit reads the history by columns);
        the row counts once its step is appended."""
        count = len(self.steps)
        if count == len(self._values):
            grown = np.empty((max(8, 2 * count), self._values.shape[1]))
            grown[:count] = self._values[:count]
            self._values = grown
        return self._values[count]

    def _start(self, tensors: dict[str, torch.Tensor]) -> None:
        infos = [TensorInfo(name, SAFETENSORS_NAMES[t.dtype], tuple(t.shape), 0, t.nbytes) for name, t in tensors.items()]
        picks = sample_coordinates(infos, self.sample, self.seed)
        if not picks:
            raise InputError("the model has no floating-point tensors to forecast")
        self.names = [info.name for info, _ in picks]
        bounds = np.cumsum([0] + [len(indices) for _, indices in picks])
        staging = torch.empty(int(bounds[-1]), dtype=torch.float64)
        self._staged = staging
        self._copies = [
            (info.name, None, staging[begin:end].view(info.shape))
            if len(indices) == info.numel
            else (info.name, torch.from_numpy(indices).to(tensors[info.name].device), staging[begin:end])
            for (info, indices), begin, end in zip(picks, bounds[:-1].tolist(), bounds[1:].tolist())
        ]
        self._values = np.empty((0, int(bounds[-1])))
        self._tensor_index = np.concatenate([np.full(len(indices), i) for i, (_, indices) in enumerate(picks)])
        self._indices = np.concatenate([indices for _, indices in picks])
        with torch.no_grad():
            for name, tensor in distinct(tensors).items():
                device = "cpu" if self.keep_first_on == "cpu" else tensor.device
                self.first[name] = tensor.detach().to(device, copy=True)
        log.info(
            "farcast keeps the first observed weights on %s (%.1f MB) and %d sampled coordinates per observation",
            self.keep_first_on, self.first_bytes / 1e6, len(self._staged),
        )  # fmt: skip

    def _sample(self, state: dict[str, torch.Tensor]) -> None:
        """The sampled coordinates into the staging row (float64), one copy per tensor into a view of it made
        at the first observation: the whole tensor where every coordinate of it is sampled, else its picks
        gathered (each torch call here costs several microseconds right after a training step). The row is
        checked and copied into the values by torch too: right after a training step the first call of
        each library, numpy's as torch's, costs 15-25 us more than the next (RESULTS.md, "A jump's own
        cost, sixth session")."""
        with torch.no_grad():
            for name, indices, view in self._copies:
                view.copy_(state[name] if indices is None else state[name].reshape(-1)[indices])

    def history(self) -> History:
        """The observations as the History `read_history` gives for a run's checkpoints."""
        return History(np.array(self.steps), self._values[: len(self.steps)].T, self._tensor_index, list(self.names), self._indices)

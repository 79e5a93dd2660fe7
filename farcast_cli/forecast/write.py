"""Stream the forecast: read a chunk of each tensor from its input checkpoints, combine, write it.

Every candidate farcast can write is a linear combination of checkpoints: the fitted forecaster
(first and last), keeping the last checkpoint, the straight line through the last two, and the
average of the last few (LAWA).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection

import torch

from farcast_cli import __version__
from farcast_cli.io.output import copy_aux_files, write_index
from farcast_cli.io.engine import ChunkJob, EngineSettings, Source, chunk_jobs, stream
from farcast_cli.errors import InputError
from farcast_cli.io.run import Checkpoint
from farcast_cli.io.reader import TORCH_DTYPES, TensorInfo, tensor_nbytes
from farcast_cli.io.writer import SafetensorsWriter

SINGLE_OUTPUT_FILE = "model.safetensors"
RAW_CHUNK_BYTES_PER_ELEMENT = 4


class Scratch:
    """Reused work buffers, one per (dtype, device, pinned), each of `size` elements."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.buffers: dict[tuple, torch.Tensor] = {}

    def get(self, count: int, dtype: torch.dtype, device: torch.device, pinned: bool = False, slot: int = 0) -> torch.Tensor:
        key = (dtype, str(device), pinned, slot)
        if key not in self.buffers:
            self.buffers[key] = torch.empty(self.size, dtype=dtype, device=device, pin_memory=pinned)
        return self.buffers[key][:count]


def to_host(values: torch.Tensor, scratch: Scratch) -> torch.Tensor:
    """A CPU tensor with the values; from a GPU through a reused pinned buffer."""
    if values.device.type == "cpu":
        return values
    host = scratch.get(values.numel(), values.dtype, torch.device("cpu"), pinned=True)
    host.copy_(values, non_blocking=True)
    torch.cuda.current_stream(values.device).synchronize()
    return host


def first_non_finite(values: torch.Tensor) -> int | None:
    """Index of the first NaN or Inf, or None. A single sum rules them out in the common case: in
    the tensor's own dtype (a bfloat16 sum with a float32 result is 15x slower on CPU), except
    float16, whose own sums overflow at 65504."""
    if math.isfinite(float(values.sum(dtype=torch.float32 if values.dtype == torch.float16 else values.dtype))):
        return None
    finite = torch.isfinite(values)
    return None if bool(finite.all()) else int((~finite).nonzero()[0])


def raise_for_non_finite_input(job: ChunkJob, data: list[torch.Tensor]) -> None:
    """Name the first source holding NaN or Inf in this chunk, and where."""
    for source, values in zip(job.sources, data):
        where = first_non_finite(values)
        if where is not None:
            raise InputError(
                f"{source.file.path}: tensor {job.name!r} holds {float(values[where])} at element {job.start + where}; "
                "refusing to forecast from non-finite weights"
            )


@dataclass(frozen=True)
class Combination:
    """Output j is sum_i weights[i][j] * inputs[i] + bias[j], computed in float32 (float64 for F64)."""

    method: str
    inputs: tuple[Checkpoint, ...]
    weights: tuple[tuple[float, ...], ...]
    bias: tuple[float, ...]
    target_steps: tuple[int, ...]
    per_tensor: dict = field(default_factory=dict)

    def apply(self, values: list[torch.Tensor], output: int, out: torch.Tensor | None = None, name: str | None = None) -> torch.Tensor:
        """Output `output` for tensor `name`: with its own weights where it has them (per-tensor fits)."""
        weights, bias = self.per_tensor.get(name, (self.weights, self.bias))
        out = torch.mul(values[0], weights[0][output], out=out)
        for value, weight in zip(values[1:], weights[1:]):
            out.add_(value, alpha=weight[output])
        return out.add_(bias[output]) if bias[output] else out


def combination(
    method: str, inputs: list[Checkpoint], weights: list[list[float]], bias: list[float], target_steps: list[int], per_tensor: dict | None = None
) -> Combination:
    return Combination(method, tuple(inputs), tuple(tuple(w) for w in weights), tuple(bias), tuple(target_steps), dict(per_tensor or {}))


def output_folders(folder: Path, target_steps: tuple[int, ...]) -> list[Path]:
    """One output is the folder itself; several go to checkpoint-<step>/ folders inside it."""
    if len(target_steps) == 1:
        return [folder]
    return [folder / f"checkpoint-{step}" for step in target_steps]


def output_info(info: TensorInfo, dtype: str | None) -> TensorInfo:
    if dtype is None or not info.is_forecast:
        return info
    return TensorInfo(info.name, dtype, info.shape, 0, tensor_nbytes(dtype, info.shape))


def forecast_jobs(inputs: tuple[Checkpoint, ...], last: Checkpoint, shard: str, chunk: int, only: Collection[str] | None = None) -> list[ChunkJob]:
    """One shard's tensors (or those of them in `only`) in file order: forecast chunks read every
    input, others copy the last's bytes."""
    file = last.files[shard]
    jobs: list[ChunkJob] = []
    for info in sorted(file.tensors.values(), key=lambda t: t.begin):
        if only is not None and info.name not in only:
            continue
        if info.is_forecast:
            jobs += chunk_jobs(info.name, info.numel, chunk, tuple(Source(*c.tensor(info.name)) for c in inputs))
        else:
            jobs += chunk_jobs(info.name, info.nbytes, chunk * RAW_CHUNK_BYTES_PER_ELEMENT, (Source(file, info),), raw=True)
    return jobs


def write_forecast(
    candidate: Combination, last: Checkpoint, folder: Path, settings: EngineSettings, dtype: str | None = None
) -> list[Path]:
    """Write the candidate's checkpoint(s) into `folder`, laid out like `last`; return their folders."""
    write_tensors(candidate, last, folder, settings, dtype)
    return finish_forecast(candidate, last, folder, dtype)


def split_work(last: Checkpoint, parts: int) -> list[frozenset[str]]:
    """The checkpoint's tensors divided among `parts` processes with about equal bytes each (the
    largest tensor first, to the lightest part), the same on every process: each gives its share to
    write_tensors, then one calls finish_forecast once all are done."""
    loads, shares = [0] * parts, [set() for _ in range(parts)]
    for name in sorted(last.shard_of, key=lambda n: (-last.tensor(n)[1].nbytes, n)):
        lightest = loads.index(min(loads))
        shares[lightest].add(name)
        loads[lightest] += last.tensor(name)[1].nbytes
    return [frozenset(share) for share in shares]


def write_tensors(
    candidate: Combination, last: Checkpoint, folder: Path, settings: EngineSettings, dtype: str | None = None, only: Collection[str] | None = None
) -> None:
    """Write the tensor files of the candidate's checkpoint(s), shard by shard: all tensors into new
    files, or with `only`, those tensors into files that other processes write the rest of."""
    folders = output_folders(folder, candidate.target_steps)
    for place in folders:
        place.mkdir(exist_ok=True)
    scratch = Scratch(settings.chunk_elements)
    for shard_name, file in last.files.items():
        out_name = shard_name if last.index_name else SINGLE_OUTPUT_FILE
        out_infos = {info.name: output_info(info, dtype) for info in file.tensors.values()}
        ordered = [out_infos[info.name] for info in sorted(file.tensors.values(), key=lambda t: t.begin)]
        writers: list[SafetensorsWriter] = []
        try:
            for place, target in zip(folders, candidate.target_steps):
                metadata = {**file.metadata, "format": "pt", "farcast": _provenance(candidate, target)}
                writers.append(SafetensorsWriter(place / out_name, ordered, metadata, only))
            for job, data in stream(forecast_jobs(candidate.inputs, last, shard_name, settings.chunk_elements, only), settings):
                if job.raw:
                    for writer in writers:
                        writer.write_bytes(data[0].numpy())
                    continue
                out_dtype = TORCH_DTYPES[out_infos[job.name].dtype]
                for index, writer in enumerate(writers):
                    writer.write(_forecast_chunk(job, data, candidate, index, out_dtype, scratch))
            for writer in writers:
                writer.close()
        except BaseException:
            for writer in writers:
                writer.abort()
            raise


def finish_forecast(candidate: Combination, last: Checkpoint, folder: Path, dtype: str | None = None) -> list[Path]:
    """The shard index and the config and tokenizer files, once every tensor is written."""
    folders = output_folders(folder, candidate.target_steps)
    sizes = {name: output_info(last.tensor(name)[1], dtype).nbytes for name in last.shard_of}
    for place in folders:
        write_index(place, last, sizes)
        copy_aux_files(place, last)
    return folders


def _forecast_chunk(job: ChunkJob, data: list[torch.Tensor], candidate: Combination, index: int, out_dtype: torch.dtype, scratch: Scratch) -> torch.Tensor:
    count = data[0].numel()
    forecast = candidate.apply(data, index, out=scratch.get(count, data[0].dtype, data[0].device), name=job.name)
    if out_dtype != forecast.dtype:
        forecast = scratch.get(count, out_dtype, forecast.device).copy_(forecast)
    if first_non_finite(forecast) is not None:
        raise_for_non_finite_input(job, data)
        where = first_non_finite(forecast)
        raise InputError(f"{job.sources[-1].file.path}: the forecast of tensor {job.name!r} overflows {out_dtype} at element {job.start + where}")
    return to_host(forecast, scratch)


def _provenance(candidate: Combination, target: int) -> str:
    return json.dumps({"version": __version__, "method": candidate.method, "forecast_step": target, "from_steps": [c.step for c in candidate.inputs]})

"""Stream the forecast: read a chunk of each tensor from two checkpoints, forecast it, write it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from farcast_cli import __version__
from farcast_cli.checkpoint_writer import copy_aux_files, write_index
from farcast_cli.errors import InputError
from farcast_cli.forecaster import Forecaster
from farcast_cli.progress import Advance
from farcast_cli.run import Checkpoint
from farcast_cli.safetensors_reader import ITEM_SIZES, TORCH_DTYPES, TensorInfo
from farcast_cli.safetensors_writer import SafetensorsWriter

SINGLE_OUTPUT_FILE = "model.safetensors"


@dataclass(frozen=True)
class Streaming:
    device: torch.device
    chunk_elements: int
    advance: Advance = lambda n: None


def compute_dtype(dtype: str) -> torch.dtype:
    """Float32 for 16- and 32-bit weights, float64 for float64 ones."""
    return torch.float64 if dtype == "F64" else torch.float32


def read_chunk(checkpoint: Checkpoint, name: str, start: int, stop: int, streaming: Streaming) -> torch.Tensor:
    """Elements [start, stop) of a float tensor on the compute device; non-finite values are an error."""
    file, info = checkpoint.tensor(name)
    values = file.read_elements(info, start, stop)
    streaming.advance(values.numel() * info.itemsize)
    values = values.to(streaming.device, non_blocking=True).to(compute_dtype(info.dtype))
    where = first_non_finite(values)
    if where is not None:
        raise InputError(f"{file.path}: tensor {name!r} holds {float(values[where])} at element {start + where}; refusing to forecast from non-finite weights")
    return values


def first_non_finite(values: torch.Tensor) -> int | None:
    finite = torch.isfinite(values)
    return None if bool(finite.all()) else int((~finite).nonzero()[0])


def chunk_ranges(numel: int, chunk: int) -> Iterator[tuple[int, int]]:
    for start in range(0, numel, chunk):
        yield start, min(numel, start + chunk)


def output_folders(folder: Path, forecaster: Forecaster, context_end: int) -> list[Path]:
    """One output is the folder itself; several go to checkpoint-<step>/ folders inside it."""
    if len(forecaster.offsets) == 1:
        return [folder]
    return [folder / f"checkpoint-{context_end + offset}" for offset in forecaster.offsets]


def write_forecast(
    first: Checkpoint, last: Checkpoint, forecaster: Forecaster, folder: Path, streaming: Streaming, dtype: str | None = None
) -> list[Path]:
    """Write the forecast checkpoint(s) into `folder`, laid out like `last`; return their folders."""
    folders = output_folders(folder, forecaster, last.step)
    for place in folders:
        place.mkdir(exist_ok=True)
    for shard_name, file in last.files.items():
        out_name = shard_name if last.index_name else SINGLE_OUTPUT_FILE
        infos = sorted(file.tensors.values(), key=lambda t: t.begin)
        out_infos = [_output_info(info, dtype) for info in infos]
        writers = []
        try:
            for place, target in zip(folders, forecaster.target_steps):
                metadata = {**file.metadata, "format": "pt", "farcast": _provenance(first, last, target)}
                writers.append(SafetensorsWriter(place / out_name, out_infos, metadata))
            for info, out_info in zip(infos, out_infos):
                _stream_tensor(first, last, file, info, out_info, forecaster, writers, streaming)
            for writer in writers:
                writer.close()
        except BaseException:
            for writer in writers:
                writer.abort()
            raise
    sizes = {info.name: info.numel * ITEM_SIZES[_output_info(info, dtype).dtype] for info in (last.tensor(n)[1] for n in last.shard_of)}
    for place in folders:
        write_index(place, last, sizes)
        copy_aux_files(place, last)
    return folders


def _output_info(info: TensorInfo, dtype: str | None) -> TensorInfo:
    if dtype is None or not info.is_forecast:
        return info
    return TensorInfo(info.name, dtype, info.shape, 0, info.numel * ITEM_SIZES[dtype])


def _stream_tensor(first, last, file, info, out_info, forecaster, writers, streaming) -> None:
    if not info.is_forecast:
        for start, stop in chunk_ranges(info.nbytes, streaming.chunk_elements):
            data = file.read_bytes(info.begin + start, info.begin + stop)
            streaming.advance(len(data))
            for writer in writers:
                writer.write_bytes(data)
        return
    out_dtype = TORCH_DTYPES[out_info.dtype]
    for start, stop in chunk_ranges(info.numel, streaming.chunk_elements):
        first_values = read_chunk(first, info.name, start, stop, streaming)
        last_values = read_chunk(last, info.name, start, stop, streaming)
        for index, writer in enumerate(writers):
            forecast = forecaster.apply(first_values, last_values, index).to(out_dtype)
            where = first_non_finite(forecast)
            if where is not None:
                raise InputError(f"{last.path}: the forecast of tensor {info.name!r} overflows {out_info.dtype} at element {start + where}")
            writer.write(forecast)


def _provenance(first: Checkpoint, last: Checkpoint, target: int) -> str:
    return json.dumps({"version": __version__, "forecast_step": target, "from_steps": [first.step, last.step]})

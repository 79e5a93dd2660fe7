"""Write a candidate's checkpoint: read a chunk of each tensor from its input checkpoints, combine it
(forecast/candidates.py), check it, write it; laid out like the last checkpoint, shard for shard.

The work divides by tensor among processes, a large tensor by range: split_work gives each a share,
write_tensors(only=share) writes it at its offsets into the shared output files, and finish_forecast
adds the index.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from farcast_cli import __version__
from farcast_cli.distributed import Piece, balanced_shares, tensor_pieces
from farcast_cli.errors import InputError, InternalError
from farcast_cli.forecast.candidates import FORECAST, Combination
from farcast_cli.io.dcp_writer import (
    ConsolidatedWriter,
    DcpWriter,
    check_dcp_output,
    write_consolidated_index,
    write_dcp_metadata,
)
from farcast_cli.io.engine import (
    ChunkJob,
    EngineSettings,
    Scratch,
    Source,
    chunk_jobs,
    first_non_finite,
    matrix_blocks,
    raise_for_non_finite_input,
    stream,
    to_host,
)
from farcast_cli.io.output import copy_aux_files, link_or_copy, write_index
from farcast_cli.io.reader import TORCH_DTYPES, TensorInfo, tensor_nbytes
from farcast_cli.io.run import SINGLE_FILE, TRAINER, Checkpoint
from farcast_cli.io.writer import SafetensorsWriter, output_failure

if TYPE_CHECKING:
    from farcast_cli.evaluate.backtest import StreamedBacktest

RAW_CHUNK_BYTES_PER_ELEMENT = 4
Share = Mapping[str, tuple[tuple[int, int], ...]]
"""A process's part of the writing: the element ranges it writes of each tensor it writes."""


def output_folders(folder: Path, target_steps: tuple[int, ...]) -> list[Path]:
    """One output is the folder itself; several go to Trainer checkpoint folders inside it, whatever the
    run's layout."""
    if len(target_steps) == 1:
        return [folder]
    return [folder / TRAINER.folder_name(step) for step in target_steps]


def output_info(info: TensorInfo, dtype: str | None) -> TensorInfo:
    if dtype is None or not info.is_forecast:
        return info
    return TensorInfo(info.name, dtype, info.shape, 0, tensor_nbytes(dtype, info.shape))


def forecast_jobs(inputs: Sequence[Checkpoint], last: Checkpoint, shard: str, chunk: int, only: Share | None = None) -> list[ChunkJob]:
    """One shard's tensors (or the ranges of them in `only`) in file order: forecast chunks read every
    input (the checkpoints read), others copy the last's bytes."""
    file = last.files[shard]
    jobs: list[ChunkJob] = []
    for info in sorted(file.tensors.values(), key=lambda t: t.begin):
        for start, stop in ((0, info.numel),) if only is None else only.get(info.name, ()):
            if info.is_forecast:
                jobs += chunk_jobs(info.name, stop, chunk, tuple(Source(*c.tensor(info.name)) for c in inputs), first=start)
            else:
                jobs += chunk_jobs(info.name, info.nbytes, chunk * RAW_CHUNK_BYTES_PER_ELEMENT, (Source(file, info),), raw=True)
    return jobs


def write_forecast(
    candidate: Combination, last: Checkpoint, folder: Path, settings: EngineSettings, dtype: str | None = None, scratch: bool = False
) -> list[Path]:
    """Write the candidate's checkpoint(s) into `folder`, laid out like `last`; return their folders.

    A `scratch` copy, written only to be scored and removed, skips fsync, and links (rather than
    copies) the config files and any shard that holds no tensor the candidate changes."""
    write_tensors(candidate, last, folder, settings, dtype, scratch=scratch)
    return finish_forecast(candidate, last, folder, dtype, scratch=scratch)


def combination_key(candidate: Combination, input_keys: list[str], dtype: str | None = None) -> str:
    """A key for the content write_forecast writes: the inputs' content keys and the maps."""
    recipe = {
        "farcast": __version__,
        "inputs": input_keys,
        "shared": candidate.shared.as_lists(),
        "per_tensor": {name: linear.as_lists() for name, linear in sorted(candidate.per_tensor.items())},
        "dtype": dtype,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def split_work(last: Checkpoint, parts: int, grain: int) -> list[Share]:
    """The checkpoint's tensors divided among `parts` processes with about equal bytes each (the
    largest first, to the lightest part; a tensor larger than a part's share in pieces cut at
    multiples of `grain` elements, distributed.tensor_pieces), the same on every process: each gives
    its share to write_tensors, then one calls finish_forecast once all are done."""
    names = sorted(last.shard_of)
    pieces = tensor_pieces(last, names, parts, grain)
    shares = balanced_shares([piece.weight for piece in pieces], parts)
    return [_share_of(names, [pieces[i] for i in share]) for share in shares]


def _share_of(names: list[str], pieces: list[Piece]) -> Share:
    """The pieces (in item order) as element ranges by tensor name, adjacent ranges joined."""
    ranges: dict[str, list[tuple[int, int]]] = {}
    for piece in pieces:
        held = ranges.setdefault(names[piece.item], [])
        if held and held[-1][1] == piece.start:
            held[-1] = (held[-1][0], piece.stop)
        else:
            held.append((piece.start, piece.stop))
    return {name: tuple(held) for name, held in ranges.items()}


def split_files(last: Checkpoint, parts: int) -> list[Share]:
    """Like split_work, but whole files to each process, so that no two write into one file (for file
    systems that cannot take writes to one file from several nodes); a single file goes to one."""
    shards = sorted(last.files)
    shares = balanced_shares([last.files[shard].size for shard in shards], parts)
    return [{name: ((0, info.numel),) for i in share for name, info in last.files[shards[i]].tensors.items()} for share in shares]


def share_nbytes(last: Checkpoint, share: Share | None) -> int:
    """The input bytes of the last checkpoint a share covers (all of them for None)."""
    if share is None:
        return last.nbytes
    total = 0
    for name, ranges in share.items():
        info = last.tensor(name)[1]
        total += sum(info.nbytes if (a, b) == (0, info.numel) else (b - a) * info.itemsize for a, b in ranges)
    return total


def write_tensors(
    candidate: Combination,
    last: Checkpoint,
    folder: Path,
    settings: EngineSettings,
    dtype: str | None = None,
    only: Share | None = None,
    scratch: bool = False,
    consolidate: bool = False,
    backtest: StreamedBacktest | None = None,
) -> None:
    """Write the tensor files of the candidate's checkpoint(s), shard by shard: all tensors into new
    files, or with `only`, those ranges of tensors into files that other processes write the rest of
    (files holding none of them are left to the others). With `backtest` (one process), the chunks
    read also feed the full backtest, which reads its checkpoints along with the inputs."""
    folders = output_folders(folder, candidate.target_steps)
    for place in folders:
        try:
            place.mkdir(exist_ok=True)
        except OSError as error:
            raise output_failure(place, error) from None
    read = checkpoints_to_read(candidate, [] if backtest is None else backtest.checkpoints)
    blocks = _Blocks(candidate, read, settings, backtest)
    if last.dcp is not None:
        _write_dcp_tensors(candidate, last, folders, settings, blocks, dtype, only, durable=not scratch, consolidate=consolidate)
        return
    for shard_name, file in last.files.items():
        out_name = shard_name if last.index_name else SINGLE_FILE
        if only is not None and file.tensors and only.keys().isdisjoint(file.tensors):
            continue
        if scratch and dtype is None and not any(info.is_forecast for info in file.tensors.values()):
            for place in folders:
                link_or_copy(file.path, place / out_name)
            continue
        out_infos = {info.name: output_info(info, dtype) for info in file.tensors.values()}
        ordered = [out_infos[info.name] for info in sorted(file.tensors.values(), key=lambda t: t.begin)]
        writers: list[SafetensorsWriter] = []
        try:
            for place, target in zip(folders, candidate.target_steps):
                metadata = {**file.metadata, "format": "pt", "farcast": _provenance(candidate, target)}
                writers.append(SafetensorsWriter(place / out_name, ordered, metadata, only, flush_behind=not scratch))
            for job, data in stream(forecast_jobs(read, last, shard_name, settings.chunk_elements, only), settings):
                if job.raw:
                    for writer in writers:
                        writer.write_bytes(data[0].numpy())
                    continue
                for index, _, forecast in blocks.forecast(job, data, TORCH_DTYPES[out_infos[job.name].dtype]):
                    writers[index].write(forecast)
            for writer in writers:
                writer.close(durable=not scratch)
        except BaseException:
            for writer in writers:
                writer.abort()
            raise


def _dcp_place(place: Path, last: Checkpoint) -> Path:
    """Where an output keeps its DCP folder: where the input checkpoint keeps it (pytorch_model_fsdp_0/ or itself)."""
    return place / last.dcp.path.relative_to(last.path)


def _output_dtypes(last: Checkpoint, dtype: str | None) -> dict[str, str]:
    return {name: output_info(last.tensor(name)[1], dtype).dtype for name in last.shard_of}


def _write_dcp_tensors(
    candidate: Combination,
    last: Checkpoint,
    folders: list[Path],
    settings: EngineSettings,
    blocks: _Blocks,
    dtype: str | None,
    only: Share | None,
    durable: bool,
    consolidate: bool,
) -> None:
    """The DCP form of write_tensors: one writer per output, a DCP folder like the input's or (`consolidate`)
    whole tensors in safetensors files, the tensors (or those in `only`) streamed into it."""
    dtypes = _output_dtypes(last, dtype)
    writers: list[DcpWriter | ConsolidatedWriter] = []
    try:
        for place, target in zip(folders, candidate.target_steps):
            if consolidate:
                metadata = {"format": "pt", "farcast": _provenance(candidate, target)}
                writers.append(ConsolidatedWriter(place, last.dcp, dtypes, metadata, only, flush_behind=durable))
            else:
                writers.append(DcpWriter(_dcp_place(place, last), last.dcp, dtypes, only, flush_behind=durable))
        jobs = [job for name in last.dcp.tensors for job in forecast_jobs(blocks.read, last, name, settings.chunk_elements, only)]
        for job, data in stream(jobs, settings):
            if job.raw:
                for writer in writers:
                    writer.write_bytes(job.name, job.start, data[0].numpy())
                continue
            for index, start, forecast in blocks.forecast(job, data, TORCH_DTYPES[dtypes[job.name]]):
                writers[index].write(job.name, job.start + start, forecast)
        for writer in writers:
            writer.close(durable)
    except BaseException:
        for writer in writers:
            writer.abort()
        raise


def _finish_dcp(
    candidate: Combination, last: Checkpoint, folders: list[Path], dtype: str | None, scratch: bool, consolidate: bool
) -> list[Path]:
    """The `.metadata` of each output (its layout is found again by writing the same archive headers
    in place, which leaves the data alone), its config files, and a check that it reads back; or for
    a consolidated output, the shard index, the config files and a check by the safetensors library."""
    dtypes = _output_dtypes(last, dtype)
    for place, target in zip(folders, candidate.target_steps):
        if consolidate:
            layout = write_consolidated_index(place, last.dcp, dtypes)
            copy_aux_files(place, last, link=scratch)
            _check_with_safetensors(place, {shard: {i.name: (i.dtype, list(i.shape)) for i in infos} for shard, infos in layout.items()})
            continue
        layout = DcpWriter(_dcp_place(place, last), last.dcp, dtypes, only=())
        layout.abort()
        write_dcp_metadata(layout, _provenance(candidate, target))
        copy_aux_files(place, last, link=scratch)
        check_dcp_output(_dcp_place(place, last), last.dcp, dtypes)
    return folders


def finish_forecast(
    candidate: Combination, last: Checkpoint, folder: Path, dtype: str | None = None, scratch: bool = False, consolidate: bool = False
) -> list[Path]:
    """The shard index and the config and tokenizer files, once every tensor is written."""
    folders = output_folders(folder, candidate.target_steps)
    if last.dcp is not None:
        return _finish_dcp(candidate, last, folders, dtype, scratch, consolidate)
    sizes = {name: output_info(last.tensor(name)[1], dtype).nbytes for name in last.shard_of}
    for place in folders:
        write_index(place, last, sizes)
        copy_aux_files(place, last, link=scratch)
        check_readable_by_safetensors(place, last, dtype)
    return folders


def check_readable_by_safetensors(folder: Path, last: Checkpoint, dtype: str | None) -> None:
    """Open every written file with the safetensors library itself (its header only): the output must
    be what the user's own loader reads, with the last checkpoint's names, shapes and dtypes."""
    _check_with_safetensors(
        folder,
        {
            shard_name if last.index_name else SINGLE_FILE: {
                name: (output_info(info, dtype).dtype, list(info.shape)) for name, info in file.tensors.items()
            }
            for shard_name, file in last.files.items()
        },
    )


def _check_with_safetensors(folder: Path, expected: dict[str, dict[str, tuple[str, list[int]]]]) -> None:
    """Each file, opened by the safetensors library, holds the expected tensors (name: dtype, shape)."""
    for file_name, tensors in expected.items():
        path = folder / file_name
        try:
            with safe_open(path, framework="pt") as handle:
                found = {name: (handle.get_slice(name).get_dtype(), handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118 (safe_open is not iterable)
        except Exception as error:
            raise InternalError(f"{path}: the safetensors library cannot read the written file ({error}); please report this") from None
        if found != tensors:
            raise InternalError(f"{path}: the safetensors library reads other tensors than were written; please report this")


def checkpoints_to_read(candidate: Combination, also: Sequence[Checkpoint] = ()) -> list[Checkpoint]:
    """The candidate's inputs; with checkpoints `also` to read (a backtest's alongside), all of them in step order."""
    if not also:
        return list(candidate.inputs)
    return sorted({checkpoint.step: checkpoint for checkpoint in (*candidate.inputs, *also)}.values(), key=lambda c: c.step)


class _Blocks:
    """A streamed chunk of a forecast tensor (the `read` checkpoints' data) in cache-sized blocks
    (engine.matrix_blocks): each output of the candidate, computed from its inputs' rows, in the output
    dtype, checked finite, on the host; and every block handed to the backtest alongside, if any."""

    def __init__(
        self, candidate: Combination, read: Sequence[Checkpoint], settings: EngineSettings, backtest: StreamedBacktest | None = None
    ) -> None:
        self.candidate, self.settings, self.backtest = candidate, settings, backtest
        self.read = list(read)
        self.columns = tuple(checkpoint.step for checkpoint in read)
        self.rows = [self.columns.index(checkpoint.step) for checkpoint in candidate.inputs]
        self.matrices = Scratch(len(read) * settings.block_elements)
        self.scratch = Scratch(settings.block_elements)

    def forecast(self, job: ChunkJob, data: list[torch.Tensor], out_dtype: torch.dtype) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(output, start in the chunk, values) of each block of the chunk's forecast, for each of the
        candidate's outputs in turn. The values live in reused buffers: write them before asking for the next."""
        if self.backtest is None:
            for start, _, values in matrix_blocks(data, self.settings, self.matrices):
                for index in range(len(self.candidate.target_steps)):
                    yield index, start, self._output(job, data, self._apply(job, values, index), start, out_dtype)
            return
        self.backtest.start(data)
        in_product = self._in_product(job, out_dtype)
        for start, _, values in matrix_blocks(data, self.settings, self.matrices):
            outputs = self.backtest.add(job.name, self.columns, start, values, self.candidate if in_product else None)
            for index in range(len(self.candidate.target_steps)):
                forecast = outputs[index] if in_product else self._apply(job, values, index)
                yield index, start, self._output(job, data, forecast, start, out_dtype)
        self.backtest.done(job, data)

    def _in_product(self, job: ChunkJob, out_dtype: torch.dtype) -> bool:
        """Whether the outputs come from the backtest's matrix product (a row each) rather than from
        their own multiply-adds: for 16-bit outputs, which round the float32 result, where no output
        is an input unchanged. The product sums in another order than apply does, so an output may differ
        from apply's by one unit in its last place (where the float32 results round to neighbouring
        16-bit values); float32 and float64 outputs are always apply's, bit for bit."""
        linear = self.candidate.map_for(job.name)
        return out_dtype.itemsize == 2 and all(linear.kept_input(j) is None for j in range(linear.outputs))

    def _apply(self, job: ChunkJob, values: torch.Tensor, index: int) -> torch.Tensor:
        inputs = [values[row] for row in self.rows]
        return self.candidate.apply(
            inputs, index, out=self.scratch.get(inputs[0].numel(), inputs[0].dtype, inputs[0].device), name=job.name
        )

    def _output(self, job: ChunkJob, data: list[torch.Tensor], forecast: torch.Tensor, start: int, out_dtype: torch.dtype) -> torch.Tensor:
        count = forecast.numel()
        if out_dtype != forecast.dtype:
            forecast = self.scratch.get(count, out_dtype, forecast.device).copy_(forecast)
        where = first_non_finite(forecast)
        if where is not None:
            raise_for_non_finite_input(job, data)
            where += job.start + start
            raise InputError(f"{job.sources[-1].file.path}: the forecast of tensor {job.name!r} overflows {out_dtype} at element {where}")
        return to_host(forecast, self.scratch)


def _provenance(candidate: Combination, target: int) -> str:
    """The `farcast` metadata entry: what the file is, truthfully. The forecast is a forecast of step
    `target`; an alternative written instead (by --fallback) is named for what it is, and stands in
    for step `target` without claiming to forecast it."""
    entry = {"version": __version__, "method": candidate.method, "from_steps": candidate.from_steps}
    kept = candidate.kept_input()
    if candidate.key == FORECAST.key:
        entry["forecast_step"] = target
    else:
        entry["stands_for_step"] = target
    if kept is not None:
        entry["copy_of_step"] = kept.step
    return json.dumps(entry)

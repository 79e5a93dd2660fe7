"""Helpers shared by the benchmarks: generated runs, raw I/O baselines, timing and peak memory."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

TENSOR_ELEMENTS = 16 * 1024 * 1024


def drifting_weights(checkpoints: int, bytes_per_checkpoint: float, dtype: torch.dtype, steps_apart: int) -> Iterator[tuple[int, dict]]:
    """(step, tensors) of a run whose weights drift linearly from seeded random bases; tensors of 16M elements."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    count = max(1, round(bytes_per_checkpoint / (TENSOR_ELEMENTS * itemsize)))
    generator = torch.Generator().manual_seed(0)
    bases = [torch.randn(TENSOR_ELEMENTS, generator=generator) * 0.02 for _ in range(count)]
    drifts = [torch.randn(TENSOR_ELEMENTS, generator=generator) * 1e-4 for _ in range(count)]
    for k in range(checkpoints):
        yield (k + 1) * steps_apart, {f"layers.{i}.weight": (bases[i] + drifts[i] * (k + 1)).to(dtype) for i in range(count)}


def make_run(folder: Path, checkpoints: int, bytes_per_checkpoint: float, dtype: torch.dtype, steps_apart: int = 100) -> Path:
    """A Trainer-layout run whose weights drift linearly plus noise; tensors of 16M elements."""
    if folder.exists():
        return folder
    for step, tensors in drifting_weights(checkpoints, bytes_per_checkpoint, dtype, steps_apart):
        target = folder / f"checkpoint-{step}"
        target.mkdir(parents=True)
        save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return folder


def make_dcp_run(folder: Path, checkpoints: int, bytes_per_checkpoint: float, dtype: torch.dtype, steps_apart: int = 100) -> Path:
    """make_run's weights saved by torch.distributed.checkpoint.save from one process, as accelerate
    saves an FSDP model: checkpoint-N/pytorch_model_fsdp_0/ holding {"model": state_dict}."""
    import warnings

    import torch.distributed.checkpoint as dcp

    if folder.exists():
        return folder
    for step, tensors in drifting_weights(checkpoints, bytes_per_checkpoint, dtype, steps_apart):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save({"model": tensors}, checkpoint_id=folder / f"checkpoint-{step}" / "pytorch_model_fsdp_0")
    return folder


def make_run_elsewhere(folder: Path, checkpoints: int, bytes_per_checkpoint: float, dtype: str, maker: str = "make_run") -> Path:
    """make_run in a child process, so this process stays small: Linux carries a process's peak
    resident size across fork and exec, so a large parent would inflate every child's figure."""
    code = (
        f"import torch, common; "
        f"common.{maker}(__import__('pathlib').Path({str(folder)!r}), {checkpoints}, {bytes_per_checkpoint}, torch.{dtype})"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent)
    return folder


def warm_cache(paths: list[Path]) -> None:
    for path in paths:
        with open(path, "rb") as handle:
            while handle.read(64 << 20):
                pass


def raw_io_seconds(read_paths: list[Path], write_bytes: int, out: Path, block: int = 64 << 20) -> float:
    """Plain file I/O: read every input byte, write the output bytes (fsynced), in 64 MiB blocks."""
    buffer = bytearray(block)
    started = time.perf_counter()
    for path in read_paths:
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass
    with open(out, "wb", buffering=0) as handle:
        remaining = write_bytes
        while remaining > 0:
            remaining -= handle.write(memoryview(buffer)[: min(block, remaining)])
        os.fsync(handle.fileno())
    elapsed = time.perf_counter() - started
    out.unlink()
    return elapsed


def timed_farcast(*args: object) -> tuple[float, float, str]:
    """Wall seconds and peak resident MB of one `farcast` process (its own rusage, via wait4)."""
    return timed_command([sys.executable, "-m", "farcast_cli", *map(str, args)])


def timed_command(command: list[str]) -> tuple[float, float, str]:
    """Wall seconds and peak resident MB of one process (its own rusage, via wait4)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = process.stdout.read(), process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {stderr}")
    return elapsed, usage.ru_maxrss / 1024, stdout


def python_startup_seconds() -> float:
    """What importing farcast (and torch) costs a fresh process, to separate it from the work."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import farcast_cli.cli"], check=True)
    return time.perf_counter() - started

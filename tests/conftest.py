"""Small real checkpoint runs, written with the safetensors library into temporary folders."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from farcast_cli.cli import app

torch.set_num_threads(1)

SHAPES = {"encoder.weight": (24, 16), "encoder.bias": (24,), "head.weight": (4, 24), "head.bias": (4,)}


def trajectories(steps: list[int], seed: int = 0, noise: float = 0.0) -> dict[int, dict[str, torch.Tensor]]:
    """Weights that relax exponentially towards a fixed point, each coordinate at its own rate,
    as gradient descent on a quadratic does: w(t) = w* + (w0 - w*) * exp(-r t)."""
    generator = torch.Generator().manual_seed(seed)
    params = {}
    for name, shape in SHAPES.items():
        start = torch.randn(shape, generator=generator) * 0.5
        end = torch.randn(shape, generator=generator) * 0.5
        rate = torch.rand(shape, generator=generator) * 0.01 + 0.002
        params[name] = (start, end, rate)
    result = {}
    for step in steps:
        result[step] = {}
        for name, (start, end, rate) in params.items():
            value = end + (start - end) * torch.exp(-rate * step)
            if noise:
                value = value + noise * torch.randn(value.shape, generator=generator)
            result[step][name] = value
    return result


def write_run(
    root: Path,
    steps: list[int] | None = None,
    layout: str = "trainer",
    dtype: torch.dtype = torch.float32,
    shards: int = 1,
    extras: bool = True,
    seed: int = 0,
    noise: float = 0.0,
    weights: dict[int, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """A run in the Trainer layout (checkpoint-<step>/ folders) or as plain step_<step>.safetensors files."""
    steps = steps or list(range(0, 201, 20))
    weights = weights or trajectories(steps, seed, noise)
    root.mkdir(parents=True, exist_ok=True)
    for step in steps:
        tensors = {name: value.to(dtype) for name, value in weights[step].items()}
        if extras:
            tensors["position_ids"] = torch.arange(12, dtype=torch.int64).reshape(1, 12)
            tensors["mask"] = torch.tensor([True, False, True])
        if layout == "files":
            save_file(tensors, root / f"step_{step}.safetensors", metadata={"format": "pt"})
            continue
        folder = root / f"checkpoint-{step}"
        folder.mkdir()
        if shards == 1:
            save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        else:
            _save_sharded(folder, tensors, shards)
        (folder / "config.json").write_text(json.dumps({"model_type": "toy", "hidden_size": 24}))
        (folder / "tokenizer.json").write_text("{}")
        (folder / "optimizer.pt").write_bytes(b"not a pickle farcast may load")
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    return root


def _save_sharded(folder: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    names = sorted(tensors)
    per_shard = math.ceil(len(names) / shards)
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: tensors[name] for name in names[i * per_shard : (i + 1) * per_shard]}
        save_file(part, folder / shard, metadata={"format": "pt"})
        weight_map.update({name: shard for name in part})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.fixture(autouse=True)
def own_loss_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test has its own cache of losses, never the user's."""
    folder = tmp_path_factory.mktemp("loss-cache")
    monkeypatch.setenv("FARCAST_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return write_run(tmp_path / "run")


class Farcast:
    """Invoke the CLI in-process and keep stdout and stderr apart."""

    def __init__(self) -> None:
        self.runner = CliRunner()

    def __call__(self, *args: object, expect: int | None = 0):
        result = self.runner.invoke(app, [str(a) for a in args])
        if expect is not None:
            assert result.exit_code == expect, (
                f"exit {result.exit_code}, stderr: {result.stderr}, stdout: {result.stdout[-2000:]}, exception: {result.exception!r}"
            )
        return result


@pytest.fixture
def farcast() -> Farcast:
    return Farcast()


FAST = ["--sample", "2000", "--max-updates", "100", "--quiet"]
PROGRESS_LINE = re.compile(r"farcast: (sampling|fitting|backtest|writing|forecast): ")


def without_progress(stderr: str) -> str:
    """stderr without farcast's progress lines (one as each phase starts; in batch logs, one every few
    seconds while tensors stream): what is left are its messages."""
    return "".join(line for line in stderr.splitlines(keepends=True) if not PROGRESS_LINE.match(line))

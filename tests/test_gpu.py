"""The CUDA path, end to end. Skipped without a GPU (CI has none); benchmarks/gpu_check.sh runs it."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAST, write_run

from farcast_cli.io.engine import EngineSettings, Source, chunk_jobs, stream
from farcast_cli.io.run import find_run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_forecast_is_identical_to_the_cpu_forecast(tmp_path, farcast, dtype):
    run = write_run(tmp_path / "run", dtype=dtype)
    cpu = json.loads(farcast("predict", run, "-H", 100, "-o", tmp_path / "cpu", "--device", "cpu", "--json", *FAST).stdout)
    gpu = json.loads(farcast("predict", run, "-H", 100, "-o", tmp_path / "gpu", "--device", "cuda", "--json", *FAST).stdout)
    assert (tmp_path / "cpu" / "model.safetensors").read_bytes() == (tmp_path / "gpu" / "model.safetensors").read_bytes()
    assert gpu["skill_vs_last"] == pytest.approx(cpu["skill_vs_last"], rel=1e-5)


def test_staged_stream_delivers_device_tensors_from_pinned_buffers(run_dir):
    run = find_run(run_dir)
    info = next(i for i in run.tensor_infos() if i.name == "encoder.weight")
    jobs = list(chunk_jobs(info.name, info.numel, 50, (Source(*run.last.tensor(info.name)),)))
    settings = EngineSettings(torch.device("cuda"), chunk_elements=50)
    assert settings.staged and settings.pinned
    pieces = [data[0].clone() for _, data in stream(jobs, settings)]
    assert all(p.is_cuda for p in pieces)
    expected = run.last.files["model.safetensors"].read_elements(info, 0, info.numel)
    assert torch.equal(torch.cat(pieces).cpu(), expected)

"""The streaming engine: chunking, buffer reuse, the reader thread, mmap and the GPU path's logic on the CPU."""

from __future__ import annotations

import json
import os
import threading

import pytest
import torch
from conftest import FAST
from safetensors.torch import load_file

from farcast_cli.errors import InputError
from farcast_cli.io.engine import EngineSettings, Source, chunk_jobs, plan_chunk_elements, stream, streaming_threads
from farcast_cli.io.run import find_run


def jobs_for(run_dir, chunk):
    run = find_run(run_dir)
    jobs = []
    for info in run.tensor_infos():
        sources = tuple(Source(*c.tensor(info.name)) for c in (run.checkpoints[0], run.last))
        jobs += chunk_jobs(info.name, info.numel if info.is_forecast else info.nbytes, chunk, sources, raw=not info.is_forecast)
    return run, jobs


@pytest.mark.parametrize("stage", [False, True])
@pytest.mark.parametrize("use_mmap", [False, True])
def test_stream_yields_every_chunk_in_order_with_the_right_values(run_dir, stage, use_mmap):
    run, jobs = jobs_for(run_dir, chunk=7)
    settings = EngineSettings(torch.device("cpu"), chunk_elements=7, depth=2, use_mmap=use_mmap, stage=stage)
    pieces: dict[str, list[torch.Tensor]] = {}
    for job, data in stream(jobs, settings):
        pieces.setdefault(job.name, []).append(data[1].clone())
    last = load_file(run.last.path / "model.safetensors")
    assert torch.equal(torch.cat(pieces["encoder.weight"]), last["encoder.weight"].reshape(-1))
    assert torch.cat(pieces["position_ids"]).view(torch.int64).tolist() == list(range(12))
    assert list(pieces) == [info.name for info in run.tensor_infos()]


def test_read_buffers_are_reused_not_reallocated(run_dir):
    _, jobs = jobs_for(run_dir, chunk=16)
    pointers = set()
    for _, data in stream(jobs, EngineSettings(torch.device("cpu"), chunk_elements=16, depth=1)):
        pointers.add(data[0].data_ptr())
    assert 1 <= len(pointers) <= 2


def test_a_read_error_in_the_reader_thread_reaches_the_caller(run_dir):
    _, jobs = jobs_for(run_dir, chunk=64)
    victim = run_dir / "checkpoint-200" / "model.safetensors"
    victim.write_bytes(victim.read_bytes()[:200])
    with pytest.raises(InputError, match="file ended early"):
        for _ in stream(jobs, EngineSettings(torch.device("cpu"), chunk_elements=64)):
            pass
    assert not [t for t in threading.enumerate() if t.name == "farcast-reader"]


def test_stopping_early_ends_the_reader_thread(run_dir):
    _, jobs = jobs_for(run_dir, chunk=4)
    for _ in stream(jobs, EngineSettings(torch.device("cpu"), chunk_elements=4, depth=1)):
        break
    assert not [t for t in threading.enumerate() if t.name == "farcast-reader"]


@pytest.mark.parametrize("stop_early", [False, True])
def test_torch_leaves_the_reader_a_core_while_streaming_on_the_cpu_and_computes_as_before_after(run_dir, stop_early):
    _, jobs = jobs_for(run_dir, chunk=16)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = set()
        for _ in stream(jobs, EngineSettings(torch.device("cpu"), chunk_elements=16)):
            seen.add(torch.get_num_threads())
            if stop_early:
                break
        assert seen == {streaming_threads(2, len(os.sched_getaffinity(0)))}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_chunk_plan_respects_the_memory_budget():
    assert plan_chunk_elements(1 << 30, 16, 32) == 4 * 1024 * 1024
    chunk = plan_chunk_elements(10_000_000, 16, 32, depth=2)
    assert (2 + 1) * 16 * chunk + 32 * chunk <= 10_000_000
    assert plan_chunk_elements(10, 16, 32) == 1024


def test_mmap_and_tiny_memory_give_identical_forecasts(run_dir, farcast, tmp_path):
    farcast("predict", run_dir, "-H", 100, "-o", tmp_path / "a", *FAST)
    farcast("predict", run_dir, "-H", 100, "-o", tmp_path / "b", "--mmap", "--max-memory", "2KB", *FAST)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_dry_run_reports_the_plan_and_writes_nothing(run_dir, farcast, tmp_path):
    result = farcast("predict", run_dir, "-H", 100, "-o", tmp_path / "out", "--dry-run", "--json", "--max-memory", "1MB")
    plan = json.loads(result.stdout)
    assert plan["reads"]["forecast"] == {
        "checkpoints": [0, 200],
        "bytes": 2 * (run_dir / "checkpoint-0" / "model.safetensors").stat().st_size,
    }
    assert plan["reads"]["sample"] == {"coordinates": 508, "checkpoints": 11}
    assert plan["reads"]["backtest"]["checkpoints"] == [0, 60, 80, 100, 120, 140, 200]
    report = json.loads(farcast("predict", run_dir, "-H", 100, "-o", tmp_path / "real", "--json", *FAST).stdout)
    used = report["backtest"]["plan"]
    assert {used["first_step"], used["line_from_step"], used["last_step"], used["target_step"]} <= set(
        plan["reads"]["backtest"]["checkpoints"]
    )
    assert plan["writes"]["checkpoints"] == [300]
    memory = plan["memory"]
    assert memory["read_buffers_bytes"] + memory["scratch_bytes"] <= 1_000_000
    assert not (tmp_path / "out").exists()
    text = farcast("predict", run_dir, "-H", 100, "-o", tmp_path / "out", "--dry-run").stdout
    assert "read for the forecast: checkpoints [0, 200]" in text and "memory: chunks of" in text
    earlier = json.loads(farcast("predict", run_dir, "-H", 100, "-o", tmp_path / "out", "--dry-run", "--json", "--last-step", 120).stdout)
    assert earlier["reads"]["forecast"]["checkpoints"] == [0, 120] and earlier["writes"]["checkpoints"] == [220]


def test_a_missing_gpu_is_a_usage_error(run_dir, farcast, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    result = farcast("predict", run_dir, "-H", 100, "-o", tmp_path / "out", "--device", "cuda", *FAST, expect=2)
    assert "no CUDA GPU is visible" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_progress_lines_in_batch_logs(run_dir, tmp_path, monkeypatch):
    """stderr is not a terminal under pytest: progress comes as plain lines, and none with --quiet."""
    import subprocess
    import sys

    env = {"FARCAST_PROGRESS_SECONDS": "0"}
    command = [sys.executable, "-m", "farcast_cli", "predict", str(run_dir), "-H", "100", "--sample", "500"]
    loud = subprocess.run([*command, "-o", str(tmp_path / "a")], capture_output=True, text=True, env={**__import__("os").environ, **env})
    quiet = subprocess.run(
        [*command, "-o", str(tmp_path / "b"), "--quiet"], capture_output=True, text=True, env={**__import__("os").environ, **env}
    )
    assert loud.returncode == quiet.returncode == 0
    assert "farcast: forecast:" in loud.stderr and "MB/s" in loud.stderr
    assert quiet.stderr == ""


def test_sampled_reads_agree_with_the_library_across_batches(tmp_path, monkeypatch):
    """Small batches force many groups of ranges; values must still match safetensors' own reader."""
    import numpy as np
    from conftest import write_run

    from farcast_cli.model import history as sampling

    run = find_run(write_run(tmp_path / "run", dtype=torch.bfloat16))
    monkeypatch.setattr(sampling, "BATCH_BYTES", 40)
    monkeypatch.setattr(sampling, "MERGE_GAP_BYTES", 6)
    info = next(i for i in run.tensor_infos() if i.name == "encoder.weight")
    indices = np.array([0, 1, 2, 7, 8, 100, 101, 250, 383])
    values = sampling.read_sampled_values(run.last, info, indices)
    expected = load_file(run.last.path / "model.safetensors")["encoder.weight"].reshape(-1)[indices].double().numpy()
    assert np.array_equal(values, expected)


def test_the_stream_leaves_one_core_to_the_reader_and_never_asks_for_more_threads_than_set():
    assert [streaming_threads(8, cores) for cores in (1, 2, 3, 16)] == [1, 1, 2, 8]
    assert streaming_threads(1, 16) == 1

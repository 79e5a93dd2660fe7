"""Failures from the system around farcast: permissions, full disks, signals, files still being written.

These run the real `farcast` in a subprocess, since they involve signals, privileges and mounts.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST, without_progress, write_run

BIG = 12_000_000


def farcast_process(*args: object, prefix: list[str] = (), **kwargs) -> subprocess.Popen:
    command = [*prefix, sys.executable, "-m", "farcast_cli", *map(str, args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def finish(process: subprocess.Popen) -> tuple[int, str]:
    _, stderr = process.communicate(timeout=300)
    return process.returncode, without_progress(stderr)


def without_root_override() -> list[str]:
    """Root ignores file modes; dropping the DAC override capabilities makes it honour them."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: file modes cannot be enforced")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


@pytest.fixture(scope="module")
def big_run(tmp_path_factory) -> Path:
    """Three checkpoints of one 48 MB tensor: streaming it in tiny chunks takes a few seconds."""
    steps = [0, 10, 20]
    base = torch.randn(BIG, generator=torch.Generator().manual_seed(0))
    weights = {s: {"big": base * (1 + s / 100)} for s in steps}
    return write_run(tmp_path_factory.mktemp("big") / "run", steps=steps, weights=weights, extras=False)


def start_slow_predict(run: Path, out: Path, **kwargs) -> subprocess.Popen:
    return farcast_process("predict", run, "-H", 5, "-o", out, "--max-memory", "16KB", "--sample", "500", "--max-updates", "10", **kwargs)


def wait_for_temporary_folder(out: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while not list(out.parent.glob(f".{out.name}.farcast-tmp-*")):
        assert process.poll() is None, f"finished before it started writing: {process.communicate()}"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(0.2)


def assert_nothing_left(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.farcast-*"))


@pytest.mark.slow
def test_unreadable_checkpoint(run_dir, tmp_path):
    prefix = without_root_override()
    path = run_dir / "checkpoint-100" / "model.safetensors"
    path.chmod(0)
    out = tmp_path / "out"
    code, stderr = finish(farcast_process("predict", run_dir, "-H", 40, "-o", out, prefix=prefix))
    assert code == 3, stderr
    where = "checkpoint-100 lies between complete checkpoints; --skip-damaged skips it"
    assert stderr.strip() == f"farcast: error: {path}: permission denied; {where}"
    assert_nothing_left(out)


@pytest.mark.slow
def test_output_folder_not_writable(run_dir, tmp_path):
    prefix = without_root_override()
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    out = locked / "out"
    code, stderr = finish(farcast_process("predict", run_dir, "-H", 40, "-o", out, prefix=prefix))
    assert code == 5, stderr
    assert "farcast: error:" in stderr and "Permission denied" in stderr and len(stderr.strip().splitlines()) == 1
    assert list(locked.iterdir()) == []


@pytest.mark.slow
def test_disk_full_while_writing(big_run, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        out = small / "out"
        code, stderr = finish(farcast_process("predict", big_run, "-H", 5, "-o", out, "--sample", "500", "--max-updates", "10"))
        assert code == 5, stderr
        assert stderr.strip().endswith("disk full while writing; nothing was kept")
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


@pytest.mark.slow
def test_file_size_limit_while_writing(big_run, tmp_path):
    out = tmp_path / "out"
    process = farcast_process("predict", big_run, "-H", 5, "-o", out, "--sample", "500", "--max-updates", "10", preexec_fn=_limit_file_size)
    code, stderr = finish(process)
    assert code == 5, stderr
    assert "cannot write: File too large" in stderr
    assert_nothing_left(out)


@pytest.mark.slow
@pytest.mark.parametrize("signum, code, name", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")])
def test_interrupt_removes_temporary_files(big_run, tmp_path, signum, code, name):
    out = tmp_path / "out"
    process = start_slow_predict(big_run, out)
    wait_for_temporary_folder(out, process)
    process.send_signal(signum)
    returncode, stderr = finish(process)
    assert returncode == code, stderr
    assert stderr.strip().splitlines()[-1] == f"farcast: error: interrupted by {name}; temporary files removed"
    assert "Traceback" not in stderr
    assert_nothing_left(out)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_start_up_prints_the_same_line(run_dir, signum):
    process = farcast_process("inspect", run_dir)
    time.sleep(0.5)  # importing torch
    process.send_signal(signum)
    returncode, stderr = finish(process)
    assert returncode == 128 + signum
    assert stderr.strip() == f"farcast: error: interrupted by {signal.Signals(signum).name}; temporary files removed"


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_after_the_output_is_published_exits_0_and_says_so(run_dir, tmp_path, signum):
    out = tmp_path / "out"
    process = farcast_process("predict", run_dir, "-H", 40, "-o", out, "--plot", tmp_path / "plot.png", *FAST)
    while not out.exists():
        assert process.poll() is None, process.communicate()
        time.sleep(0.01)
    process.send_signal(signum)  # while the plot is drawn, after publication
    returncode, stderr = finish(process)
    assert returncode == 0, stderr
    name = signal.Signals(signum).name
    assert stderr.strip().splitlines()[-1] == f"farcast: interrupted by {name} after {out} was published; it is complete"
    assert (out / "farcast_report.json").exists()


@pytest.mark.slow
def test_checkpoint_that_changes_while_read(big_run, tmp_path):
    out = tmp_path / "out"
    victim = big_run / "checkpoint-0" / "model.safetensors"
    original = victim.read_bytes()
    try:
        process = start_slow_predict(big_run, out)
        wait_for_temporary_folder(out, process)
        with open(victim, "ab") as handle:
            handle.write(b"still writing")
        returncode, stderr = finish(process)
        assert returncode == 3, stderr
        assert stderr.strip() == f"farcast: error: {victim}: changed while being read; is a training job still writing it?"
        assert_nothing_left(out)
    finally:
        victim.write_bytes(original)

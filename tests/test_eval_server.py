"""--eval-server end to end: real server scripts as subprocesses of farcast (the happy path, one that
dies, one that prints garbage, one that hangs past the timeout, SIGTERM while servers run), the
Python API's evaluator of tensors, and the shrink search against the grid it replaced."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAST, trajectories, write_run
from test_loss import DISTANCE, distance_command

from farcast_cli import commands
from farcast_cli.evaluate.evaluator import EvalOptions, OnTensors
from farcast_cli.evaluate.loss import SHRINK_MAX, SHRINK_STEP, next_shrink

SERVER = (
    DISTANCE.split("weights, target =")[0]
    + """
import os
Path(sys.argv[2]).joinpath(f"server-{os.getpid()}").write_text("started")
target = tensors(sys.argv[1])
{before}
for line in sys.stdin:
    {each}
    weights = tensors(line.rstrip("\\n"))
    print("loss", sum(float(np.abs(weights[n] - t).sum()) for n, t in target.items()), flush=True)
"""
)


def server_command(folder: Path, before: str = "", each: str = "pass") -> str:
    """A server whose loss is the L1 distance to the heading target (as test_loss's eval command); it
    leaves server-<pid> in `folder`/pids when it starts."""
    distance_command(folder, trajectories([2000])[2000])
    (folder / "pids").mkdir(exist_ok=True)
    script = folder / "server.py"
    script.write_text(SERVER.replace("{before}", before).replace("{each}", each))
    return f"{sys.executable} {script} {folder / 'target.safetensors'} {folder / 'pids'}"


def server_pids(folder: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in (folder / "pids").glob("server-*")]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


def farcast_process(*args: object) -> subprocess.Popen:
    command = [sys.executable, "-m", "farcast_cli", *map(str, args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.slow
def test_a_server_gives_the_same_losses_as_the_eval_command_from_one_process_per_job(tmp_path, farcast):
    run = write_run(tmp_path / "run")
    server = server_command(tmp_path)
    by_server = farcast("predict", run, "-H", 100, "-o", tmp_path / "a", "--json", "--eval-server", server, "--eval-jobs", 2, *FAST)
    command = f"{sys.executable} {tmp_path / 'distance.py'} {{checkpoint}} {tmp_path / 'target.safetensors'}"
    by_command = farcast("predict", run, "-H", 100, "-o", tmp_path / "b", "--json", "--eval-cmd", command, *FAST)
    served, commanded = json.loads(by_server.stdout), json.loads(by_command.stdout)
    assert served["loss"]["evaluator"] == server and served["loss"]["evaluations"] > 5
    assert {(p["method"], p["anchor"], p["shrink"]) for p in served["loss"]["points"]} == {
        (p["method"], p["anchor"], p["shrink"]) for p in commanded["loss"]["points"]
    }
    assert served["loss"]["chosen"] == commanded["loss"]["chosen"] and served["written_loss"] == commanded["written_loss"]
    pids = server_pids(tmp_path)
    assert 1 <= len(pids) <= 2 and not any(alive(pid) for pid in pids)


@pytest.mark.slow
def test_progress_lines_count_the_evaluations_in_order(tmp_path, farcast):
    run = write_run(tmp_path / "run")
    server = server_command(tmp_path)
    quiet_free = [option for option in FAST if option != "--quiet"]
    result = farcast("predict", run, "-H", 100, "-o", tmp_path / "out", "--json", "--eval-server", server, "--eval-jobs", 2, *quiet_free)
    counts = [tuple(map(int, found)) for found in re.findall(r"^farcast: eval (\d+) of (\d+): ", result.stderr, re.MULTILINE)]
    evaluations = json.loads(result.stdout)["loss"]["evaluations"]
    assert [k for k, _ in counts] == list(range(1, evaluations + 1))
    assert all(k <= n for k, n in counts) and [n for _, n in counts] == sorted(n for _, n in counts)


@pytest.mark.slow
@pytest.mark.parametrize(
    "each, options, message",
    [
        ("sys.exit('model broke')", [], "the server exited (exit 1): model broke"),
        ("print('hello'); continue", [], "answered 'hello'"),
        ("import time; time.sleep(60)", ["--eval-timeout", 1], "no answer within 1 s"),
    ],
    ids=["dies", "garbage", "hangs"],
)
def test_a_failing_server_ends_farcast_naming_command_and_checkpoint(tmp_path, farcast, each, options, message):
    run = write_run(tmp_path / "run")
    server = server_command(tmp_path, each=each)
    started = time.monotonic()
    result = farcast("predict", run, "-H", 100, "-o", tmp_path / "out", "--eval-server", server, *options, *FAST, expect=2)
    error = result.stderr.strip().splitlines()[-1]
    assert message in error and server in error and str(run / "checkpoint-") in error
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".farcast-*"))
    assert time.monotonic() - started < 30
    assert server_pids(tmp_path) and not any(alive(pid) for pid in server_pids(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_a_signal_while_servers_run_ends_them_and_publishes_nothing(tmp_path, signum, code):
    """Ctrl-C reaches farcast's process group, as from a terminal (the servers run in groups of their own)."""
    run = write_run(tmp_path / "run")
    server = server_command(tmp_path, each="import time; time.sleep(60)")
    process = farcast_process("predict", run, "-H", 100, "-o", tmp_path / "out", "--eval-server", server, "--eval-jobs", 2, *FAST)
    deadline = time.monotonic() + 60
    while len(server_pids(tmp_path)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(server_pids(tmp_path)) == 2
    os.killpg(process.pid, signum)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == code, stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".farcast-*"))
    assert not any(alive(pid) for pid in server_pids(tmp_path))


def test_an_evaluator_of_tensors_decides_as_the_same_loss_from_files(tmp_path):
    """OnTensors gets candidates in memory: the same choice and losses as the same loss reading folders."""
    run = write_run(tmp_path / "run")
    target = trajectories([2000])[2000]

    def distance(tensors) -> float:
        return sum(float((tensors[n].float() - t).abs().sum()) for n, t in target.items())

    def from_folder(path: Path) -> float:
        from safetensors.torch import load_file

        return distance(load_file(path / "model.safetensors"))

    settings = commands.StreamOptions(quiet=True)
    fast = commands.FitSettings(sample=2000, max_updates=100)
    in_memory = commands.predict(
        run, tmp_path / "a", horizon=100, settings=fast, options=settings, evaluation=EvalOptions(OnTensors(distance))
    )
    on_disk = commands.predict(run, tmp_path / "b", horizon=100, settings=fast, options=settings, evaluation=EvalOptions(from_folder))
    assert in_memory.loss.chosen == on_disk.loss.chosen
    assert [(p.method, p.anchor, p.shrink) for p in in_memory.loss.points] == [(p.method, p.anchor, p.shrink) for p in on_disk.loss.points]
    for ours, theirs in zip(in_memory.loss.points, on_disk.loss.points):
        assert ours.loss == pytest.approx(theirs.loss, rel=1e-6)
    assert in_memory.written_loss == pytest.approx(on_disk.written_loss, rel=1e-6)
    assert not list(tmp_path.glob(".farcast-eval-*/candidate-*"))


GRID = [SHRINK_STEP * k for k in range(1, round(SHRINK_MAX / SHRINK_STEP) + 1)]
SURFACES = {
    "parabola at 0.7": lambda a: (a - 0.7) ** 2,
    "parabola at 1.6": lambda a: 3 * (a - 1.6) ** 2 + 1,
    "steep on the left (the sample run's shape)": lambda a: 0.18 + 0.02 * (1 - a / 0.9) ** 2 * (1 if a < 0.9 else 0.4),
    "quartic at 1.25": lambda a: (a - 1.25) ** 4 + 0.1 * (a - 1.25) ** 2,
    "decreasing to 2": lambda a: -a,
    "increasing from 0": lambda a: a * a + a,
}


@pytest.mark.parametrize("surface", SURFACES)
def test_the_shrink_search_finds_the_grids_optimum(surface):
    loss = SURFACES[surface]
    tried = {0.0: loss(0.0), 0.5: loss(0.5), 1.0: loss(1.0)}
    while (alpha := next_shrink(tried, min(v for a, v in tried.items() if a > 0))) is not None:
        tried[alpha] = loss(alpha)
    best_on_grid = min(GRID, key=loss)
    found = min((a for a in tried if a > 0), key=tried.get)
    assert found == best_on_grid or loss(found) <= loss(best_on_grid) + 1e-12
    assert len(tried) - 1 <= 7 < len(GRID)


def test_the_search_over_two_anchors_finds_the_grids_best_forecast():
    """Each anchor's search stops once its parabola cannot beat the best forecast of either anchor
    (loss.py, _next_shrinks): the best forecast found is still the grid's, over both anchors."""
    pairs = [("parabola at 0.7", "parabola at 1.6"), ("steep on the left (the sample run's shape)", "quartic at 1.25")]
    for first, second in [*pairs, *[(b, a) for a, b in pairs]]:
        one, other = SURFACES[first], SURFACES[second]
        losses = {1: one, 5: lambda a, f=one, g=other: g(a) - g(0.0) + f(0.0)}  # keeping the checkpoint (0) is either anchor's
        tried = {anchor: {0.0: loss(0.0), 0.5: loss(0.5), 1.0: loss(1.0)} for anchor, loss in losses.items()}
        while True:
            best = min(v for found in tried.values() for a, v in found.items() if a > 0)
            asked = {anchor: next_shrink(found, best) for anchor, found in tried.items()}
            if all(alpha is None for alpha in asked.values()):
                break
            for anchor, alpha in asked.items():
                if alpha is not None:
                    tried[anchor][alpha] = losses[anchor](alpha)
        grid_best = min(loss(a) for loss in losses.values() for a in GRID)
        assert min(v for found in tried.values() for a, v in found.items() if a > 0) == pytest.approx(grid_best, abs=1e-12)


SAMPLE = Path(__file__).resolve().parent.parent / "sample_checkpoints"


@pytest.mark.slow
def test_the_sample_eval_server_answers_as_its_eval_command(tmp_path):
    checkpoints = [SAMPLE / "digits-mlp" / f"checkpoint-{step}" for step in (30, 600)]
    served = subprocess.run(
        [sys.executable, SAMPLE / "eval_digits.py", "--serve"], input="".join(f"{c}\n" for c in checkpoints), capture_output=True, text=True
    )
    one_shot = [subprocess.run([sys.executable, SAMPLE / "eval_digits.py", c], capture_output=True, text=True).stdout for c in checkpoints]
    assert served.stdout.split() == [line.strip() for line in one_shot] and len(set(one_shot)) == 2


@pytest.mark.slow
def test_readmes_main_command_decides_with_at_most_twelve_evaluations(tmp_path, farcast):
    """README's main command (the sample run, its eval server): the choice the full grid made before the
    search (anchor 1, shrink 0.875) with 12 evaluations instead of 31."""
    server = f"{sys.executable} {SAMPLE / 'eval_digits.py'} --serve"
    os.environ["FARCAST_CACHE_DIR"] = str(tmp_path / "cache")
    try:
        out = tmp_path / "out"
        result = farcast("predict", SAMPLE / "digits-mlp", "-H", 300, "-o", out, "--json", "--eval-server", server, "--eval-jobs", 2)
    finally:
        del os.environ["FARCAST_CACHE_DIR"]
    report = json.loads(result.stdout)
    chosen = report["loss"]["chosen"]
    assert (chosen["method"], chosen["anchor"], chosen["shrink"]) == ("forecast", 1, 0.875)
    assert report["loss"]["evaluations"] <= 12 and report["steps_saved"] == pytest.approx(0.288, abs=0.02)


@pytest.mark.parametrize(
    "options, message",
    [
        (["--eval-cmd", "true", "--eval-server", "true"], "--eval-cmd and --eval-server: give one of them"),
        (["--eval-server", "true", "--eval-timeout", 0], "--eval-timeout 0: must be above 0 seconds"),
    ],
)
def test_eval_server_options_are_checked_before_anything_runs(tmp_path, farcast, options, message):
    run = write_run(tmp_path / "run")
    result = farcast("predict", run, "-H", 100, "-o", tmp_path / "out", *options, *FAST, expect=2)
    assert message in result.stderr and not (tmp_path / "out").exists()

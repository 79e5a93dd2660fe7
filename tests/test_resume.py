"""Train, farcast, resume: a resumable forecast written into a real transformers.Trainer run (a tiny GPT-2
built from a config), resumed by the Trainer itself."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST
from safetensors import safe_open

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "trainer"))
import train as example  # noqa: E402

from farcast_cli.errors import OutputError  # noqa: E402
from farcast_cli.io.resume import check_still_newest  # noqa: E402
from farcast_cli.io.run import find_run  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Twenty Trainer steps, a checkpoint every five."""
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("trainer") / "run"
    example.trainer(run, max_steps=20, save_steps=5).train()
    return run


@pytest.fixture
def run(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def test_the_trainer_resumes_from_a_resumable_forecast(run, farcast):
    out = run / "checkpoint-30"
    report = json.loads(farcast("predict", run, "-H", 10, "-o", out, "--resumable", "--schedule", "keep", "--json", *FAST).stdout)
    last = run / "checkpoint-20"
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
        assert (out / name).read_bytes() == (last / name).read_bytes(), name
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 30 and state["epoch"] == pytest.approx(
        json.loads((last / "trainer_state.json").read_text())["epoch"] * 1.5
    )
    assert state["log_history"][-1] == {
        "step": 30,
        "farcast": {"method": "forecast", "from_steps": [5, 20], "horizon": 10, "schedule": "keep"},
    }
    resume = report["resume"]
    assert resume["global_step"] == 30 and resume["skipped_batches"] == 10 and resume["missing"] == []
    assert any("ignore_data_skip=True" in line for line in resume["advice"])
    with safe_open(out / "model.safetensors", "pt") as handle:
        assert json.loads(handle.metadata()["farcast"])["method"] == "farcast"

    resumed = example.trainer(run, max_steps=40, save_steps=5)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 40
    assert [e["step"] for e in resumed.state.log_history if "loss" in e and e["step"] > 20] == [35, 40]
    found = find_run(run)
    assert found.steps == [5, 10, 15, 20, 35, 40] and [c.path.name for c in found.forecasts] == ["checkpoint-30"]
    inspected = farcast("inspect", run)
    assert "checkpoint-30: a forecast farcast wrote; not used as history" in inspected.stderr


def test_advancing_the_schedule_moves_its_counter_by_the_horizon(run, farcast):
    farcast("predict", run, "-H", 10, "-o", run / "checkpoint-30", "--resumable", "--schedule", "advance", *FAST)
    before = torch.load(run / "checkpoint-20" / "scheduler.pt", weights_only=True)
    after = torch.load(run / "checkpoint-30" / "scheduler.pt", weights_only=True)
    assert after["last_epoch"] == before["last_epoch"] + 10 and after["_step_count"] == before["_step_count"] + 10
    assert after["base_lrs"] == before["base_lrs"] and after["lr_lambdas"] == before["lr_lambdas"]


def test_a_schedule_farcast_cannot_advance_is_refused(run, farcast):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    torch.save(torch.optim.lr_scheduler.StepLR(optimizer, step_size=5).state_dict(), run / "checkpoint-20" / "scheduler.pt")
    out = run / "checkpoint-30"
    result = farcast("predict", run, "-H", 10, "-o", out, "--resumable", "--schedule", "advance", *FAST, expect=3)
    assert "--schedule advance moves LambdaLR schedules" in result.stderr and result.stderr.count("\n") == 1
    assert not out.exists() and not list(run.glob(".checkpoint-30*"))


class _Sentinel:
    """Unpickling it creates a file: proof that a pickle was loaded."""

    path = ""

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_the_weights_only_loader_refuses_is_never_loaded(run, farcast, tmp_path):
    import pickle

    sentinel = tmp_path / "unpickled"
    _Sentinel.path = str(sentinel)
    (run / "checkpoint-20" / "scheduler.pt").write_bytes(pickle.dumps(_Sentinel()))
    result = farcast("predict", run, "-H", 10, "-o", run / "checkpoint-30", "--resumable", "--schedule", "advance", *FAST, expect=3)
    assert "weights-only loader refuses it" in result.stderr and not sentinel.exists()
    kept = farcast("predict", run, "-H", 10, "-o", run / "checkpoint-30", "--resumable", "--schedule", "keep", *FAST)
    assert kept.exit_code == 0 and not sentinel.exists()
    assert (run / "checkpoint-30" / "scheduler.pt").read_bytes() == (run / "checkpoint-20" / "scheduler.pt").read_bytes()


@pytest.mark.parametrize(
    "args, code, problem",
    [
        (["--resumable"], 2, "--resumable needs --schedule keep or --schedule advance"),
        (["--resumable", "--schedule", "keep", "--emit", "5"], 2, "takes neither --last-step nor --emit"),
        ([], 5, "would look like a checkpoint of the run itself"),
        (["--schedule", "keep"], 2, "--schedule keep applies only to a --resumable output"),
        (["--resumable", "--schedule", "keep", "--eval-cmd", "echo {checkpoint} loss 1"], 4, "would only move the trainer on"),
    ],
)
def test_resumable_outputs_are_refused_where_the_trainer_could_not_use_them(run, farcast, args, code, problem):
    result = farcast("predict", run, "-H", 10, "-o", run / "checkpoint-30", *args, *FAST, expect=code)
    assert problem in result.stderr and not (run / "checkpoint-30").exists()


def test_only_the_trainers_own_name_is_allowed_inside_the_run(run, farcast):
    result = farcast("predict", run, "-H", 10, "-o", run / "checkpoint-25", "--resumable", "--schedule", "keep", *FAST, expect=5)
    assert f"a resumable forecast goes in {run.resolve() / 'checkpoint-30'}" in result.stderr
    result = farcast("predict", run, "-H", 5, "-o", run / "checkpoint-20", "--resumable", "--schedule", "keep", "--force", *FAST, expect=5)
    assert "checkpoint-20" in result.stderr and (run / "checkpoint-20" / "model.safetensors").exists()


def test_nothing_is_published_when_the_run_went_on_meanwhile(run):
    found = find_run(run)
    check_still_newest(found, found.last)
    (run / "checkpoint-25").mkdir()
    with pytest.raises(OutputError, match="checkpoint-25: appeared while farcast was working"):
        check_still_newest(found, found.last)

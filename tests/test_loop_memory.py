"""The in-memory loop: jumps fitted from what the farcaster observed, applied and verified in the
process, checked against `farcast predict` on the same checkpoints, and under DDP (2 processes, gloo)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_loop import FAST_FIT, regression_data, save, train_with

from farcast_cli.errors import InputError, OutputError, UsageError
from farcast_cli.evaluate.report import REPORT_FILE
from farcast_cli.integrations import Farcaster, memory
from farcast_cli.io.run import find_run
from farcast_cli.model.forecaster import fit_on_run
from farcast_cli.model.history import read_history
from farcast_cli.model.observed import ObservedRun

FAST = ["--sample", "2000", "--max-updates", "100", "--quiet"]


def two_layers() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def sgd_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    optimizer.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()


def test_the_jump_in_memory_is_what_farcast_predict_writes_from_the_same_checkpoints(tmp_path, farcast):
    run, x, y = tmp_path / "run", *regression_data()
    model = two_layers()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    unshrunk = replace(FAST_FIT, shrink=1.0)
    farcaster = Farcaster(run, every=30, jump=0.5, settings=unshrunk, gate=False)
    for step in range(0, 31):
        if step:
            sgd_steps(model, optimizer, x, y)
        if step % 5 == 0:
            save(run, model, step)
            if step == 30:
                farcast(
                    "predict", run, "-H", 15, "-o", tmp_path / "forecast", "--backtest", "sample", "--no-fallback", "--shrink", "1", *FAST
                )
            result = farcaster.step(model, step)
    assert result.applied and result.horizon == 15
    written = load_file(tmp_path / "forecast" / "model.safetensors")
    last = load_file(run / "checkpoint-30" / "model.safetensors")
    for name, tensor in model.state_dict().items():
        assert torch.allclose(tensor, written[name], rtol=1e-6, atol=1e-7), name
        assert not torch.allclose(tensor, last[name], rtol=1e-4, atol=1e-5), name
    report = json.loads((tmp_path / "forecast" / REPORT_FILE).read_text())
    verdict = memory.weight_verdict(farcaster.observed, memory.fit_in_memory(farcaster.observed, 15, unshrunk), 15)
    assert verdict.skill == pytest.approx(report["skill_vs_last"], rel=1e-9) and verdict.tested == report["tested"]
    assert farcaster.observed.history().values.shape == (sum(p.numel() for p in model.parameters()), 7)


def test_a_jump_verified_by_your_loss_skips_only_the_backtests_scored_fit(tmp_path):
    run = tmp_path / "run"
    farcaster = Farcaster(run, every=100, jump=0.5, settings=FAST_FIT)
    train_with(farcaster, run, steps=40)
    scored, unscored = (memory.fit_in_memory(farcaster.observed, 20, FAST_FIT, scored=flag) for flag in (True, False))
    assert scored.scored is not None and unscored.scored is None
    assert unscored.forecaster.shared == scored.forecaster.shared and unscored.forecaster.shrink == scored.forecaster.shrink


def test_the_weight_verdict_scores_the_trial_shrunk_by_the_last_fits_factor_while_the_history_grew_little(tmp_path):
    """Before any fit, or after the history grew by more than a third, as `farcast predict` scores it (the
    factor from another trial); else by the last fit's factor."""
    run = tmp_path / "run"
    farcaster = Farcaster(run, every=100, jump=0.5, settings=FAST_FIT)
    train_with(farcaster, run, steps=40)
    observed = farcaster.observed
    assert observed.shrink is None and len(observed) == 9
    first = memory.fit_in_memory(observed, 20, FAST_FIT)
    as_predict = fit_on_run(observed.history(), 20, [20], FAST_FIT)
    assert first.scored.shared == as_predict.scored.shared and first.forecaster.shared == as_predict.forecaster.shared
    assert observed.shrink == (first.forecaster.shrink, 9)
    scratch = observed.shrink_scratch
    assert scratch.shape == (31, 9)
    observed.shrink = (0.35, 7)
    second = memory.fit_in_memory(observed, 20, FAST_FIT)
    assert second.scored.shared == second.trial.shrunk(0.35).shared != as_predict.scored.shared
    assert second.forecaster.shared == first.forecaster.shared and observed.shrink == (first.forecaster.shrink, 9)
    assert observed.shrink_scratch is scratch, "the shrink choice's array is kept from one jump to the next"
    observed.shrink = (0.35, 6)
    assert memory.fit_in_memory(observed, 20, FAST_FIT).scored.shared == as_predict.scored.shared


def reused(result) -> bool:
    return "reused" in result.why


def test_where_a_fit_costs_more_than_fit_share_a_fit_and_its_verdict_kept_or_refused_serve_until_the_history_grows_fourfold(tmp_path):
    """Here a fit costs more than the training between attempts (microseconds of SGD; `fit_share` 1e-6
    keeps that true however loaded the machine): the weight gate's verdict on a fit, kept or refused,
    stands with its map for the next attempts until the observations have grown fourfold since the fit
    (REFIT_GROWTH); a reused jump is that map applied to the weights as they are then, a reused refusal
    leaves them as they are; a history too short to test a jump gives no verdict, and lends nothing."""
    run, x, y = tmp_path / "run", *regression_data()
    model = two_layers()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    run.mkdir()
    farcaster = Farcaster(run, every=10, jump=0.2, settings=FAST_FIT, fit_share=1e-6)
    results = []
    for step in range(0, 161):
        if step:
            sgd_steps(model, optimizer, x, y)
        if step % 5 == 0:
            kept, before = farcaster.kept_fit, {name: t.clone() for name, t in model.state_dict().items()}
            result = farcaster.step(model, step)
            if result is not None:
                results.append(result)
            if result is not None and reused(result):
                for name, tensor in model.state_dict().items():
                    expected = kept.forecaster.map_for(name).apply([farcaster.observed.first[name], before[name]], 0)
                    assert torch.equal(tensor, expected if result.applied else before[name]), name
    assert [result.applied for result in results] == [False] * 9 + [True] * 7
    assert [reused(result) for result in results] == [False, False] + [True] * 7 + [False] + [True] * 6
    assert "too short" in results[0].why
    assert "did not beat" in results[8].why and "the fit of 5 observations reused with its verdict, not tested again" in results[8].why
    assert "the fit of 21 observations reused" in results[15].why and farcaster.kept_fit.observations == 21
    farcaster.flush()
    recorded = json.loads((run / "farcast_jumps.json").read_text())["jumps"]
    assert [jump["at_step"] for jump in recorded] == [result.step for result in results if result.applied]
    assert farcaster.jumped == sum(result.horizon for result in results if result.applied)


def test_without_fit_share_every_attempt_fits_anew_and_with_loss_fn_a_refused_fit_is_tried_again(tmp_path):
    run = tmp_path / "run"
    _, results = train_with(Farcaster(run, every=10, jump=0.2, settings=FAST_FIT, fit_share=None), run, steps=40)
    attempts = [result for result in results if result]
    assert [result.applied for result in attempts] == [False, True, True, True] and not any(reused(r) for r in attempts)
    losses = iter([1.0, 2.0] + [2.0, 1.0] * 5)
    farcaster = Farcaster(tmp_path / "gated", every=10, jump=0.2, settings=FAST_FIT, fit_share=1e-6, loss_fn=lambda model: next(losses))
    _, results = train_with(farcaster, tmp_path / "gated", steps=60)
    attempts = [(result.applied, reused(result)) for result in results if result]
    assert attempts == [(False, False)] + [(True, True)] * 4 + [(True, False)]


def test_where_training_between_attempts_dwarfs_the_fit_every_attempt_fits_anew(tmp_path):
    """As on a model whose steps take far longer than a fit: 0.2 s of training between attempts, of
    which a fit would have to cost half to be reused."""
    run, model = tmp_path / "run", two_layers()
    run.mkdir()
    farcaster = Farcaster(run, every=5, jump=0.2, gate=False, fit_share=0.5)
    results = []
    for step in range(0, 26, 5):
        with torch.no_grad():
            model[0].weight.add_(0.01)
        time.sleep(0.2)
        results.append(farcaster.step(model, step))
    attempts = [result for result in results if result]
    assert len(attempts) == 4 and all(result.applied and not reused(result) for result in attempts)


def test_jumps_are_added_to_the_runs_record_as_json_writes_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    earlier = {"jumps": [{"at_step": 3, "horizon": 2}]}
    (run / "farcast_jumps.json").write_text(json.dumps(earlier, indent=1) + "\n")
    farcaster = Farcaster(run, every=20, jump=0.5, settings=FAST_FIT, gate=False)
    train_with(farcaster, run, steps=40)
    farcaster.flush()
    jumps = earlier["jumps"] + [{"at_step": 20, "horizon": 10}, {"at_step": 40, "horizon": 25}]
    assert (run / "farcast_jumps.json").read_text() == json.dumps({"jumps": jumps}, indent=1) + "\n"
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith("checkpoint-")) == ["farcast_jumps.json"]


def jumps_json(*jumps: tuple[int, int]) -> str:
    return json.dumps({"jumps": [{"at_step": at, "horizon": horizon} for at, horizon in jumps]}, indent=1) + "\n"


def record_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("farcast-record")]


@pytest.mark.parametrize("waited_by", ["flush", "close", "the next step", "the with block"])
def test_the_record_is_written_off_the_training_thread_and_on_disk_after_the_next_call(tmp_path, waited_by):
    run, earlier = tmp_path / "run", set(record_threads())
    farcaster = Farcaster(run, every=20, jump=0.5, settings=FAST_FIT, gate=False)
    with farcaster:
        model, results = train_with(farcaster, run, steps=20)
        writing = set(record_threads()) - earlier
        assert results[-1].applied and writing
        if waited_by == "flush":
            farcaster.flush()
        elif waited_by == "close":
            farcaster.close()
        elif waited_by == "the next step":
            assert farcaster.step(model, 21) is None
    assert (run / "farcast_jumps.json").read_text() == jumps_json((20, 10))
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith("checkpoint-")) == ["farcast_jumps.json"]
    if waited_by in ("close", "the with block"):
        assert not any(thread.is_alive() for thread in writing)


@pytest.mark.parametrize("waited_by", ["flush", "the next step"])
def test_a_record_that_cannot_be_written_raises_at_the_next_call_naming_the_file(tmp_path, waited_by):
    run = tmp_path / "run"
    farcaster = Farcaster(run, every=20, jump=0.5, settings=FAST_FIT, gate=False)
    model, _ = train_with(farcaster, run, steps=20)
    farcaster.flush()
    (run / "farcast_jumps.json").unlink()
    (run / "farcast_jumps.json").mkdir()
    for step in (30, 35, 40):
        result = farcaster.step(model, step)
    assert result.applied and result.step == 40
    with pytest.raises(OutputError, match=r"farcast_jumps\.json: cannot write the jump record: Is a directory"):
        farcaster.flush() if waited_by == "flush" else farcaster.step(model, 45)
    farcaster.flush()


EXITS_AFTER_A_JUMP = """
import sys, torch
from farcast_cli.integrations import Farcaster
from farcast_cli.model.fit import FitSettings
model = torch.nn.Linear(4, 1)
farcaster = Farcaster(sys.argv[1], every=20, jump=0.5, gate=False, settings=FitSettings(objective="l2", sample=100))
for step in range(0, 25, 5):
    with torch.no_grad():
        model.weight.add_(0.1)
    result = farcaster.step(model, step)
assert result.applied
"""


@pytest.mark.slow
@pytest.mark.parametrize("writable", [True, False])
def test_the_last_record_is_written_at_the_interpreters_exit_or_its_error_printed(tmp_path, writable):
    run = tmp_path / "run"
    run.mkdir()
    if not writable:
        (run / ".farcast_jumps.json.tmp").mkdir()
    done = subprocess.run([sys.executable, "-c", EXITS_AFTER_A_JUMP, str(run)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    if writable:
        assert (run / "farcast_jumps.json").read_text() == jumps_json((20, 10)) and not done.stderr
    else:
        assert "farcast_jumps.json: cannot write the jump record: Is a directory" in done.stderr


def test_only_the_jump_record_is_written_and_the_history_is_bounded_by_the_sample(tmp_path):
    run = tmp_path / "run"
    farcaster = Farcaster(run, every=20, jump=0.5, settings=FAST_FIT.__class__(sample=5, max_updates=300), gate=False)
    train_with(farcaster, run, steps=40)
    farcaster.flush()
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith("checkpoint-")) == ["farcast_jumps.json"]
    assert farcaster.observed.history().values.shape == (5, 9) and farcaster.observed.first_bytes == 9 * 4


def test_a_jump_your_loss_rejects_is_undone_bit_for_bit_and_not_recorded(tmp_path):
    run = tmp_path / "run"
    calls = []

    def never_better(model: torch.nn.Module) -> float:
        calls.append(model.weight.detach().clone())
        return 1.0

    farcaster = Farcaster(run, every=20, jump=0.5, settings=FAST_FIT, loss_fn=never_better)
    torch.manual_seed(0)
    model, results = train_with(farcaster, run, steps=20)
    result = results[-1]
    assert not result.applied and result.loss_before == result.loss_after == 1.0 and "weights restored" in result.why
    before, during = calls
    assert not torch.equal(before, during), "the loss saw the jumped model"
    saved = load_file(run / "checkpoint-20" / "model.safetensors")["weight"]
    assert torch.equal(model.weight.detach(), before) and torch.equal(model.weight.detach(), saved)
    farcaster.flush()
    assert not (run / "farcast_jumps.json").exists()


def test_a_jump_that_lowers_your_loss_stays(tmp_path):
    x, y = regression_data()

    def loss(model: torch.nn.Module) -> float:
        with torch.no_grad():
            return float(torch.nn.functional.mse_loss(model(x), y))

    run = tmp_path / "run"
    farcaster = Farcaster(run, every=30, jump=0.5, settings=FAST_FIT, loss_fn=loss)
    model, results = train_with(farcaster, run, steps=30)
    result = results[-1]
    assert result.applied and result.loss_after < result.loss_before and loss(model) == pytest.approx(result.loss_after)
    assert result.loss_seconds > 0 and result.seconds > 0
    farcaster.flush()
    assert json.loads((run / "farcast_jumps.json").read_text()) == {"jumps": [{"at_step": 30, "horizon": 15}]}


def test_each_decision_is_logged_with_what_it_cost_and_farcasts_share_of_the_loop(tmp_path, caplog):
    def slow_loss(model: torch.nn.Module) -> float:
        time.sleep(0.02)
        return 1.0

    with caplog.at_level("INFO", logger="farcast"):
        for name, loss_fn in (("verified", slow_loss), ("weighed", None)):
            train_with(Farcaster(tmp_path / name, every=30, jump=0.5, settings=FAST_FIT, loss_fn=loss_fn), tmp_path / name, steps=30)
    decided = [record.getMessage() for record in caplog.records if record.getMessage().startswith("farcast at step 30:")]
    pattern = r"\[farcast ([\d.]+) ms(?:, loss_fn ([\d.]+) ms)?; ([\d.]+)% of the loop's time since the first call\]$"
    verified, weighed = (re.search(pattern, message) for message in decided)
    assert float(verified[2]) >= 40 and weighed[2] is None
    assert float(weighed[1]) > 0 and all(0 < float(match[3]) <= 100 for match in (verified, weighed))


def test_a_jump_that_lowers_your_loss_by_no_more_than_the_margin_is_undone(tmp_path):
    x, y = regression_data()

    def loss(model: torch.nn.Module) -> float:
        return float(torch.nn.functional.mse_loss(model(x), y))

    gains = []
    for margin in (0.0, 1e6):
        run = tmp_path / f"run-{margin:g}"
        model, results = train_with(Farcaster(run, every=30, jump=0.5, settings=FAST_FIT, loss_fn=loss, margin=margin), run, steps=30)
        result = results[-1]
        gains.append(result.loss_before - result.loss_after)
        assert result.applied == (margin == 0.0)
        assert result.applied or torch.equal(model.weight.detach(), load_file(run / "checkpoint-30" / "model.safetensors")["weight"])
    assert gains[0] == gains[1] > 0
    assert "by more than 1e+06" in result.why


def test_no_jump_at_the_last_step(tmp_path):
    run = tmp_path / "run"
    farcaster = Farcaster(run, every=20, jump=0.5, settings=FAST_FIT, gate=False, max_steps=20)
    model, results = train_with(farcaster, run, steps=20)
    assert results[-1] is None
    assert torch.equal(model.weight.detach(), load_file(run / "checkpoint-20" / "model.safetensors")["weight"])


@pytest.mark.parametrize(
    "options, message",
    [
        ({"evaluatr": "x"}, "unexpected keyword argument 'evaluatr'"),
        ({"schedule": "advanced"}, "schedule must be keep or advance"),
        ({"source": "disk"}, "source must be memory or run"),
        ({"evaluator": "python eval.py {checkpoint}"}, "evaluator scores checkpoint folders on disk"),
        ({"source": "run", "loss_fn": len}, "loss_fn scores the model in memory"),
        ({"loss_fn": 3}, "loss_fn must be a callable"),
        ({"keep_first_on": "gpu"}, "keep_first_on must be one of cpu, device"),
        ({"max_overhead": 0}, "max_overhead must be a share"),
        ({"max_overhead": 1.5}, "max_overhead must be a share"),
        ({"fit_share": 0}, "fit_share must be a share of the training"),
    ],
)
def test_options_are_checked_when_the_farcaster_is_built(tmp_path, options, message):
    with pytest.raises((TypeError, UsageError), match=message):
        Farcaster(tmp_path, **options)


def test_the_trainer_callback_checks_its_options_when_built():
    pytest.importorskip("transformers")
    from farcast_cli.integrations import FarcastCallback

    with pytest.raises(TypeError, match="evaluatr"):
        FarcastCallback(every=10, evaluatr="python eval.py {checkpoint}")
    with pytest.raises(UsageError, match="eval_batches takes"):
        FarcastCallback(every=10, eval_batches=2)


def test_a_due_jump_waits_while_it_would_take_farcast_past_max_overhead(tmp_path):
    """Each attempt costs two 20 ms calls of the loss; saves come at once, then after 300 ms of
    "training": the jump due at step 15 would make farcast half the loop's time, the one at 25 not."""
    run = tmp_path / "run"
    model = two_layers()

    def slow_loss(module: torch.nn.Module) -> float:
        time.sleep(0.02)
        return 1.0

    farcaster = Farcaster(run, every=5, jump=0.5, settings=FAST_FIT, loss_fn=slow_loss, gate=False, max_overhead=0.5)
    attempts = []
    for step in range(0, 30, 5):
        if step == 25:
            time.sleep(0.3)
        with torch.no_grad():
            model[0].weight.add_(0.01)
        save(run, model, step)
        if farcaster.step(model, step) is not None:
            attempts.append(step)
    assert attempts == [10, 25] and farcaster.postponed == 2
    farcaster.flush()
    assert [jump["at_step"] for jump in json.loads((run / "farcast_jumps.json").read_text())["jumps"]] == [10, 25]


def test_the_run_source_leaves_no_scratch_folder(tmp_path):
    run = tmp_path / "run"
    farcaster = Farcaster(run, every=20, jump=0.5, settings=FAST_FIT, source="run")
    _, results = train_with(farcaster, run, steps=20)
    assert results[-1].applied and results[-1].report is not None
    assert not (run / ".farcast").exists()


def _ddp_rank(rank: int, port: int, run: str, out: str) -> None:
    """One rank of a DDP run (gloo, CPU): each rank trains on its own half of the data and farcasts."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    x, y = regression_data()
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(two_layers())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    called_on = []

    def loss(module: torch.nn.Module) -> float:
        called_on.append(rank)
        return float(torch.nn.functional.mse_loss(module(x), y))

    farcaster = Farcaster(run, every=15, jump=0.5, settings=FAST_FIT, loss_fn=loss, gate=False)
    applied = []
    for step in range(0, 46):
        if step:
            sgd_steps(model, optimizer, x[rank::2], y[rank::2])
        if step % 5 == 0:
            if rank == 0:
                save(Path(run), model.module, step)
            result = farcaster.step(model.module, step)
            if result is not None:
                applied.append(result.applied)
    torch.save(
        {"state": model.module.state_dict(), "applied": applied, "called_on": called_on, "observed": len(farcaster.observed)},
        Path(out) / f"rank{rank}.pt",
    )
    torch.distributed.barrier()
    # Ending the rank here: tearing down DDP's gloo group at interpreter exit can deadlock in torch
    # (the group's destructor joins its worker thread while holding the GIL the worker needs).
    os._exit(0)


@pytest.mark.slow
def test_under_ddp_every_rank_ends_with_rank_zeros_weights(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sys.path.insert(0, str(Path(__file__).parent))
    torch.multiprocessing.spawn(_ddp_rank, args=(port, str(tmp_path / "run"), str(tmp_path)), nprocs=2)
    zero, one = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert zero["applied"] == one["applied"] == [True, True, True]
    assert set(zero["called_on"]) == {0} and one["called_on"] == [] and one["observed"] == 0 and zero["observed"] == 10
    for name, tensor in zero["state"].items():
        assert torch.equal(tensor, one["state"][name]), name


@pytest.mark.slow
def test_the_trainer_callback_verifies_jumps_by_the_trainers_eval_set(tmp_path):
    pytest.importorskip("transformers")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "trainer"))
    import train as example

    from farcast_cli.integrations import FarcastCallback

    torch.set_num_threads(1)
    run = tmp_path / "run"
    trainer = example.trainer(run, max_steps=20, save_steps=5, schedule="constant")
    trainer.eval_dataset = example.StandardLibraryText(64)
    callback = FarcastCallback(every=10, jump=0.5, settings=FAST_FIT, eval_batches=2, trainer=trainer)
    trainer.add_callback(callback)
    trainer.train()
    (result,) = callback.farcaster.history
    assert result.step == 15 and result.loss_before is not None and result.loss_after is not None and "loss" in result.why
    assert trainer.model.training
    loss = callback.farcaster.loss_fn
    assert len(loss.kept) == 2 and min(loss(trainer.model)) > 0
    assert [e["step"] for e in trainer.state.log_history if "farcast_why" in e] == [15]


def test_first_weights_kept_on_the_device_are_a_copy_the_jumps_leave_alone(tmp_path):
    run = tmp_path / "run"
    farcaster = Farcaster(run, every=20, jump=0.5, settings=FAST_FIT, gate=False, keep_first_on="device")
    model, results = train_with(farcaster, run, steps=40)
    first = load_file(run / "checkpoint-0" / "model.safetensors")
    assert [r.applied for r in results if r is not None] == [True, True]
    for name, kept in farcaster.observed.first.items():
        assert torch.equal(kept, first[name]) and kept.data_ptr() != model.state_dict()[name].data_ptr()


@pytest.mark.parametrize("sample", [10**6, 37])
def test_the_observed_history_is_what_read_history_reads_from_the_checkpoints_bit_for_bit(tmp_path, sample):
    """Whole tensors copied where every coordinate is sampled, picks gathered where not: the same History."""
    run, x, y = tmp_path / "run", *regression_data()
    model = two_layers().to(torch.float64 if sample == 37 else torch.float32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    observed = ObservedRun(sample, seed=3)
    for step in range(0, 25, 5):
        for _ in range(5 if step else 0):
            sgd_steps(model, optimizer, x.to(model[0].weight.dtype), y.to(model[0].weight.dtype))
        save(run, model, step)
        observed.observe(model.state_dict(), step)
    read, seen = read_history(find_run(run), sample, 3), observed.history()
    assert seen.values.shape == read.values.shape == (min(sample, 161), 5)
    assert np.array_equal(seen.values, read.values) and np.array_equal(seen.steps, read.steps)
    assert np.array_equal(seen.indices, read.indices) and np.array_equal(seen.tensor_index, read.tensor_index)
    assert seen.tensor_names == read.tensor_names


def test_a_weight_that_is_not_finite_is_refused_and_leaves_the_history_as_it_was(tmp_path):
    model = two_layers()
    observed = ObservedRun(1000, seed=0)
    observed.observe(model.state_dict(), 0)
    before = observed.history().values.copy()
    with torch.no_grad():
        model[2].weight[0, 3] = float("inf")
    with pytest.raises(InputError, match="holds inf in a sampled weight at step 5"):
        observed.observe(model.state_dict(), 5)
    with torch.no_grad():
        model[2].weight[0, 3] = 0.25
    observed.observe(model.state_dict(), 10)
    assert len(observed) == 2 and observed.steps == [0.0, 10.0]
    assert np.array_equal(observed.history().values[:, 0], before[:, 0]) and 0.25 in observed.history().values[:, 1]

"""farcast inside the training loop: the Farcaster hook for a plain PyTorch loop and the Trainer callback."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from farcast_cli.errors import UsageError
from farcast_cli.integrations import Farcaster
from farcast_cli.io.run import find_run
from farcast_cli.model.fit import FitSettings

FAST_FIT = FitSettings(sample=2000, max_updates=100)


def regression_data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=generator)
    return x, x @ torch.randn(8, 1, generator=generator)


def save(run: Path, model: torch.nn.Module, step: int) -> None:
    folder = run / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    save_file({name: value.detach().clone() for name, value in model.state_dict().items()}, folder / "model.safetensors")


def train_with(farcaster: Farcaster | None, run: Path, steps: int = 60, save_every: int = 5) -> tuple[torch.nn.Module, list]:
    """A linear model fitted by SGD, saved every few steps, the farcaster called after each save; the
    parameters must keep their storage throughout."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    storage = [p.data_ptr() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02)
    x, y = regression_data()
    results = []
    save(run, model, 0)
    if farcaster is not None:
        farcaster.step(model, 0)
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        if step % save_every == 0:
            save(run, model, step)
            if farcaster is not None:
                results.append(farcaster.step(model, step))
    assert [p.data_ptr() for p in model.parameters()] == storage
    return model, results


def test_the_hook_copies_a_winning_forecast_into_the_model_in_place(tmp_path):
    run = tmp_path / "run"
    farcaster = Farcaster(run, every=20, jump=0.5, settings=FAST_FIT)
    model, results = train_with(farcaster, run, steps=20)
    jumped = results[-1]
    assert jumped is not None and jumped.step == 20 and jumped.horizon == 10 and jumped.applied
    saved = load_file(run / "checkpoint-20" / "model.safetensors")
    assert not torch.equal(model.weight.detach(), saved["weight"])
    farcaster.flush()  # the record is written on a thread of its own: it may lag step() by one write
    assert json.loads((run / "farcast_jumps.json").read_text()) == {"jumps": [{"at_step": 20, "horizon": 10}]}
    assert not (run / ".farcast" / "forecast-20").exists()


def test_parameters_keep_their_storage_and_later_checkpoints_their_forecast_time(tmp_path):
    run = tmp_path / "run"
    farcaster = Farcaster(run, every=20, jump=0.5, settings=FAST_FIT, gate=False)
    _, results = train_with(farcaster, run, steps=45)
    assert [r.step for r in results if r is not None] == [20, 40]
    found = find_run(run)
    horizons = [r.horizon for r in results if r is not None]
    assert horizons == [10, round(0.5 * (40 + horizons[0]))]
    by_name = {c.path.name: c.step for c in found.checkpoints}
    assert by_name["checkpoint-20"] == 20 and by_name["checkpoint-25"] == 35 and by_name["checkpoint-45"] == 45 + sum(horizons)


def test_a_losing_forecast_is_skipped_and_nothing_recorded(tmp_path):
    """Weights that oscillate: the trend a forecast follows is gone by the next checkpoint."""
    run = tmp_path / "run"
    model = torch.nn.Linear(8, 1)
    farcaster = Farcaster(run, every=40, jump=1.0, settings=FAST_FIT)
    for step in range(0, 45, 5):
        with torch.no_grad():
            model.weight.fill_((-1) ** (step // 5) * (1 + step / 100))
        save(run, model, step)
        result = farcaster.step(model, step)
    before = model.weight.detach().clone()
    assert result is not None and not result.applied and "did not beat keeping the last checkpoint" in result.why
    farcaster.flush()
    assert torch.equal(model.weight.detach(), before) and not (run / "farcast_jumps.json").exists()
    assert sorted(p.name for p in run.iterdir()) == [f"checkpoint-{step}" for step in sorted(range(0, 45, 5), key=str)]


def test_the_loss_gates_the_jump_when_given(tmp_path):
    x, y = regression_data()

    def loss(checkpoint: Path) -> float:
        weights = load_file(checkpoint / "model.safetensors")
        return float(torch.nn.functional.mse_loss(x @ weights["weight"].T + weights["bias"], y))

    run = tmp_path / "run"
    farcaster = Farcaster(run, every=30, jump=0.5, evaluator=loss, settings=FAST_FIT, source="run")
    model, results = train_with(farcaster, run, steps=30)
    jumped = results[-1]
    assert jumped.report.criterion == "validation loss" and jumped.report.beats["last"] is True and jumped.applied
    assert loss_of(model, x, y) == pytest.approx(jumped.report.written_loss, rel=1e-5)
    assert jumped.report.written_loss < jumped.report.last_checkpoint_loss


def loss_of(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model(x), y))


def test_the_trainer_callback_jumps_and_later_checkpoints_carry_it(tmp_path):
    pytest.importorskip("transformers")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "trainer"))
    import train as example

    from farcast_cli.integrations import FarcastCallback

    torch.set_num_threads(1)
    run = tmp_path / "run"
    callback = FarcastCallback(every=10, jump=0.5, gate=False, settings=FAST_FIT, schedule="advance")
    trainer = example.trainer(run, max_steps=30, save_steps=5, callbacks=[callback], schedule="constant")
    trainer.train()
    made = [entry for entry in trainer.state.log_history if "farcast_jump" in entry]
    assert [entry["step"] for entry in made] == [15, 25] and made[0]["farcast_jump"] == 5
    later = json.loads((run / "checkpoint-30" / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in later if "farcast_jump" in entry] == [15, 25]
    found = {c.path.name: c.step for c in find_run(run).checkpoints}
    first, second = (entry["farcast_jump"] for entry in made)
    assert found["checkpoint-15"] == 15 and found["checkpoint-20"] == 20 + first and found["checkpoint-30"] == 30 + first + second
    assert second == round(0.5 * (25 + first - 5))
    assert trainer.lr_scheduler.last_epoch == 30 + first + second


def test_a_run_farcast_cannot_read_is_a_warning_and_training_goes_on(tmp_path, caplog):
    run = tmp_path / "run"
    model = torch.nn.Linear(8, 1)
    for step in (0, 5, 10):
        save(run, model, step)
    (run / "checkpoint-10" / "model.safetensors").write_bytes(b"\x0f\x00\x00\x00\x00\x00\x00\x00{broken header}")
    before = model.weight.detach().clone()
    with caplog.at_level("INFO", logger="farcast"):
        result = Farcaster(run, every=10, jump=0.5, settings=FAST_FIT, source="run").step(model, 10)
    assert result is not None and not result.applied and result.why.startswith("farcast failed, training goes on")
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "checkpoint-10" in caplog.records[0].getMessage()
    assert torch.equal(model.weight.detach(), before)


def per_example_loss(model: torch.nn.Module) -> torch.Tensor:
    x, y = regression_data()
    with torch.no_grad():
        return ((model(x) - y) ** 2).mean(dim=1)


def jump_verified_by(tmp_path: Path, loss_fn, **options):
    """The linear model's run with one jump at step 30, verified by `loss_fn`: the model, the jump's
    result, the checkpoint saved just before it and the run folder."""
    run = tmp_path / f"run-{len(list(tmp_path.iterdir()))}"
    model, results = train_with(Farcaster(run, every=30, jump=0.5, settings=FAST_FIT, loss_fn=loss_fn, **options), run, steps=30)
    return model, results[-1], load_file(run / "checkpoint-30" / "model.safetensors"), run


def test_a_jump_gaining_less_than_k_standard_errors_of_the_per_batch_losses_is_undone_bit_for_bit(tmp_path):
    model, kept, saved, _ = jump_verified_by(tmp_path, per_example_loss, standard_errors=0.0)
    assert kept.applied and kept.loss_error > 0 and f"standard error {kept.loss_error:.2g} over 256 batches" in kept.why
    assert kept.loss_before > kept.loss_after == pytest.approx(float(per_example_loss(model).mean()), rel=1e-6)
    jumped = model.weight.detach().clone()
    assert not torch.equal(jumped, saved["weight"])
    errors = (kept.loss_before - kept.loss_after) / kept.loss_error
    model, below, _, _ = jump_verified_by(tmp_path, per_example_loss, standard_errors=0.99 * errors)
    assert below.applied and torch.equal(model.weight.detach(), jumped)
    model, refused, saved, run = jump_verified_by(tmp_path, per_example_loss, standard_errors=1.01 * errors)
    assert not refused.applied and "weights restored" in refused.why and refused.loss_error == kept.loss_error
    assert all(torch.equal(value, saved[name]) for name, value in model.state_dict().items())
    assert not (run / "farcast_jumps.json").exists()


def test_a_float_loss_fn_gates_by_the_margin_alone_as_per_batch_losses_with_no_standard_errors_do(tmp_path):
    def mean_loss(model: torch.nn.Module) -> float:
        return float(per_example_loss(model).mean())

    by_float, float_result, _, _ = jump_verified_by(tmp_path, mean_loss, standard_errors=1e9)
    by_batches, batches_result, _, _ = jump_verified_by(tmp_path, per_example_loss, standard_errors=0.0)
    assert float_result.applied and float_result.loss_error is None and "standard error" not in float_result.why
    assert batches_result.applied and torch.equal(by_float.weight.detach(), by_batches.weight.detach())
    assert float_result.loss_after == pytest.approx(batches_result.loss_after, rel=1e-6)


@pytest.mark.parametrize("returned", [None, "0.5", True, {"loss": 0.5}, [[0.5, 0.4]], [0.5], torch.ones(2, 2)])
def test_a_loss_fn_returning_neither_a_loss_nor_per_batch_losses_stops_at_its_first_call(tmp_path, returned):
    run = tmp_path / "run"
    farcaster = Farcaster(run, every=30, jump=0.5, settings=FAST_FIT, loss_fn=lambda model: returned)
    with pytest.raises(UsageError, match="loss_fn must return a float or a 1-D sequence"):
        train_with(farcaster, run, steps=30)
    assert not (run / "farcast_jumps.json").exists()


def test_per_batch_losses_of_another_length_after_the_jump_undo_it_and_training_goes_on(tmp_path):
    calls = []

    def shrinking(model: torch.nn.Module) -> torch.Tensor:
        calls.append(None)
        return per_example_loss(model)[: 257 - len(calls)]

    model, result, saved, run = jump_verified_by(tmp_path, shrinking)
    assert not result.applied and "256 losses before the jump and 255 after" in result.why
    assert result.why.startswith("farcast failed, training goes on")
    assert torch.equal(model.weight.detach(), saved["weight"]) and not (run / "farcast_jumps.json").exists()


@pytest.mark.parametrize("value", [-1.0, float("inf"), float("nan"), "2"])
def test_standard_errors_are_checked_when_the_farcaster_is_built(tmp_path, value):
    with pytest.raises(UsageError, match="standard_errors must be a number of standard errors"):
        Farcaster(tmp_path, loss_fn=per_example_loss, standard_errors=value)


def mean_loss(model: torch.nn.Module) -> float:
    return float(per_example_loss(model).mean())


def two_jumps(tmp_path: Path, **options):
    """The linear model's run with jumps tried at steps 20 and 40, verified by one loss: the model, both
    results, and the checkpoint saved just before the second."""
    run = tmp_path / f"run-{len(list(tmp_path.iterdir()))}"
    farcaster = Farcaster(run, every=20, jump=0.5, settings=FAST_FIT, loss_fn=mean_loss, fit_share=None, **options)
    model, results = train_with(farcaster, run, steps=40)
    first, second = (result for result in results if result is not None)
    return model, first, second, load_file(run / "checkpoint-40" / "model.safetensors")


def test_one_loss_must_beat_a_share_of_its_own_move_since_the_last_attempt(tmp_path):
    _, first, second, _ = two_jumps(tmp_path, movement=0.0)
    assert first.applied and second.applied and Farcaster(tmp_path, loss_fn=mean_loss).movement == 0.05
    moved = abs(first.loss_after - second.loss_before)
    share = (second.loss_before - second.loss_after) / moved
    model, first_below, below, _ = two_jumps(tmp_path, movement=0.99 * share)
    assert first_below.applied and below.applied and below.loss_after == second.loss_after
    model, first_above, refused, saved = two_jumps(tmp_path, movement=1.01 * share)
    assert first_above.applied and first_above.loss_after == first.loss_after
    assert not refused.applied and "x the loss's move" in refused.why and "weights restored" in refused.why
    assert all(torch.equal(value, saved[name]) for name, value in model.state_dict().items())


def test_movement_leaves_per_batch_losses_to_their_standard_errors(tmp_path):
    model, kept, _, _ = jump_verified_by(tmp_path, per_example_loss, standard_errors=0.0, movement=1e9)
    assert kept.applied and "loss's move" not in kept.why


@pytest.mark.parametrize("value", [-0.1, float("inf"), float("nan"), "0.1"])
def test_movement_is_checked_when_the_farcaster_is_built(tmp_path, value):
    with pytest.raises(UsageError, match="movement must be a share of the loss's move"):
        Farcaster(tmp_path, loss_fn=mean_loss, movement=value)

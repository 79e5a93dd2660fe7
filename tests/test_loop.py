"""farcast inside the training loop: the Farcaster hook for a plain PyTorch loop and the Trainer callback."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

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

"""FarcastCallback verified by the Trainer's own eval dataset: per-batch losses, so the per-batch gate."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest
import torch
from test_loop import FAST_FIT

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "trainer"))
import train as example  # noqa: E402

from farcast_cli.errors import OutputError  # noqa: E402
from farcast_cli.integrations import FarcastCallback  # noqa: E402


def trained(run: Path, max_steps: int = 20, **options):
    """The example's tiny GPT-2 trained `max_steps` steps, saved every 5, with its eval set of 64 windows (4 batches of
    16) and, given `options`, a FarcastCallback verified by its first 4 eval batches: (trainer, callback)."""
    torch.set_num_threads(1)
    trainer = example.trainer(run, max_steps=max_steps, save_steps=5, schedule="constant")
    trainer.eval_dataset = example.StandardLibraryText(64)
    trainer.args.per_device_eval_batch_size = 16
    callback = None
    if options:
        callback = FarcastCallback(every=10, jump=0.5, settings=FAST_FIT, eval_batches=4, trainer=trainer, **options)
        trainer.add_callback(callback)
    trainer.train()
    return trainer, callback


@pytest.mark.slow
def test_the_trainers_eval_batches_give_the_per_batch_gate(tmp_path):
    trainer, callback = trained(tmp_path / "run", standard_errors=0.0)
    (result,) = callback.farcaster.history
    assert result.step == 15 and result.loss_error is not None and result.loss_error > 0
    assert f"standard error {result.loss_error:.2g} over 4 batches" in result.why
    losses = callback.farcaster.loss_fn(trainer.model)
    assert len(losses) == 4 and min(losses) > 0 and trainer.model.training


@pytest.mark.slow
def test_a_jump_the_per_batch_gate_refuses_leaves_training_as_without_farcast_bit_for_bit(tmp_path):
    refused, callback = trained(tmp_path / "refused", standard_errors=1e6)
    (result,) = callback.farcaster.history
    assert not result.applied and "1e+06 standard errors" in result.why and "weights restored" in result.why
    assert [e["farcast_skipped"] for e in refused.state.log_history if "farcast_skipped" in e] == [result.horizon]
    plain, _ = trained(tmp_path / "plain")
    for name, tensor in plain.model.state_dict().items():
        assert torch.equal(tensor, refused.model.state_dict()[name]), name


@pytest.mark.slow
def test_the_jump_record_is_on_disk_and_its_writing_thread_ended_when_training_ends(tmp_path):
    earlier = {thread for thread in threading.enumerate() if thread.name.startswith("farcast-record")}
    trainer, callback = trained(tmp_path / "run", gate=False)
    (jump,) = [e for e in trainer.state.log_history if "farcast_jump" in e]
    expected = {"jumps": [{"at_step": 15, "horizon": jump["farcast_jump"]}]}
    assert (tmp_path / "run" / "farcast_jumps.json").read_text() == json.dumps(expected, indent=1) + "\n"
    writing = {thread for thread in threading.enumerate() if thread.name.startswith("farcast-record")} - earlier
    assert not writing, "on_train_end closes the farcaster"


@pytest.mark.slow
def test_a_jump_record_that_cannot_be_written_stops_the_trainer_by_the_end_of_training(tmp_path):
    run = tmp_path / "run"
    (run / ".farcast_jumps.json.tmp").mkdir(parents=True)
    with pytest.raises(OutputError, match=r"farcast_jumps\.json: cannot write the jump record"):
        trained(run, max_steps=17, gate=False)
    assert not (run / "farcast_jumps.json").exists()

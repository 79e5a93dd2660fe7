"""`FarcastCallback`: farcast inside transformers.Trainer, after each chosen checkpoint save.

    trainer = Trainer(..., callbacks=[FarcastCallback(every=200, jump=0.5)])

On `on_save` (the checkpoint folder is complete by then) it runs a Farcaster (loop.py) on the Trainer's
output_dir with the model, keeps the optimizer state, and notes each jump in the trainer state's
log_history ({"step": s, "farcast_jump": H}), which every later checkpoint's trainer_state.json carries:
farcast reads it to put those checkpoints at their forecast-time step. No jump is made at the run's
last step (its checkpoint is saved already). The run folder's farcast_jumps.json is written on a
thread of its own (loop.py): each save waits for the write before it, and `on_train_end` for the
last. Under DDP it runs on every rank: rank 0 decides and jumps, and every rank gets its weights.

A jump can be verified by a `loss_fn(model)`, or by the Trainer's own eval dataset: `eval_batches=N`
with `trainer=` the Trainer (added with `trainer.add_callback`), the model's loss on each of the first N
batches of its eval dataloader (on rank 0, the same batches every time). Per-batch losses give the
Farcaster's per-batch gate: a jump must lower their mean by more than `standard_errors` x the standard
error of the mean paired difference, so that a gain these batches' own spread could explain is refused
(with few batches that error is itself rough: 8 or more make it steadier). One batch gives one loss,
gated by `margin` and `movement` (loop.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import TrainerCallback

from farcast_cli.errors import UsageError
from farcast_cli.integrations.loop import Farcaster


class FarcastCallback(TrainerCallback):
    """A TrainerCallback; the arguments are Farcaster's (every, jump, loss_fn, schedule, gate, ...), and
    `eval_batches` with `trainer` (module docstring). They are checked here, when it is built."""

    def __init__(self, eval_batches: int | None = None, trainer=None, **farcaster_options) -> None:
        if eval_batches is not None:
            if eval_batches < 1 or trainer is None or farcaster_options.get("loss_fn") is not None:
                raise UsageError("eval_batches takes a positive number of batches and trainer= the Trainer, and no loss_fn")
            farcaster_options["loss_fn"] = TrainerEvalLoss(trainer, eval_batches)
        self.farcaster = Farcaster(None, **farcaster_options)

    def on_train_begin(self, args, state, control, **kwargs):
        self.farcaster.run_dir = Path(args.output_dir)
        if self.farcaster.max_steps is None:
            self.farcaster.max_steps = state.max_steps

    def on_save(self, args, state, control, model=None, lr_scheduler=None, **kwargs):
        result = self.farcaster.step(model, state.global_step, lr_scheduler)
        if result is not None:
            key = "farcast_jump" if result.applied else "farcast_skipped"
            state.log_history.append({"step": state.global_step, key: result.horizon, "farcast_why": result.why})

    def on_train_end(self, args, state, control, **kwargs):
        self.farcaster.close()


class TrainerEvalLoss:
    """The model's loss on each of the first `batches` batches of the Trainer's eval dataloader, in eval
    mode: per-batch losses for the Farcaster's per-batch gate, one float where the loader gives one batch.
    The batches are taken once, without drawing from the training's random stream (a DataLoader draws
    its seed from torch's global generator, which the training's dropout draws from too)."""

    def __init__(self, trainer, batches: int) -> None:
        self.trainer, self.batches = trainer, batches
        self.kept: list | None = None

    def __call__(self, model: torch.nn.Module) -> float | list[float]:
        if self.kept is None:
            with torch.random.fork_rng(devices=[]):
                loader = iter(self.trainer.get_eval_dataloader())
                self.kept = [batch for _, batch in zip(range(self.batches), loader)]
        device = next(model.parameters()).device
        training = model.training
        model.eval()
        try:
            with torch.no_grad():
                losses = [float(model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}).loss) for b in self.kept]
        finally:
            model.train(training)
        return losses if len(losses) > 1 else losses[0]

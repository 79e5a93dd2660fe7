"""`FarcastCallback`: farcast inside transformers.Trainer, after each chosen checkpoint save.

    trainer = Trainer(..., callbacks=[FarcastCallback(every=200, jump=0.5)])

On `on_save` (the checkpoint folder is complete by then) it runs a Farcaster (loop.py) on the Trainer's
output_dir with the model, keeps the optimizer state, and notes each jump in the trainer state's
log_history ({"step": s, "farcast_jump": H}), which every later checkpoint's trainer_state.json carries:
farcast reads it to put those checkpoints at their forecast-time step. One process: under several
(DDP), every rank would forecast on its own.
"""

from __future__ import annotations

from transformers import TrainerCallback

from farcast_cli.integrations.loop import Farcaster


class FarcastCallback(TrainerCallback):
    """A TrainerCallback; the arguments are Farcaster's (every, jump, evaluator, schedule, gate, ...)."""

    def __init__(self, **farcaster_options) -> None:
        self.options = farcaster_options
        self.farcaster: Farcaster | None = None

    def on_save(self, args, state, control, model=None, lr_scheduler=None, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.farcaster is None:
            self.farcaster = Farcaster(args.output_dir, **self.options)
        result = self.farcaster.step(model, state.global_step, lr_scheduler)
        if result is not None:
            key = "farcast_jump" if result.applied else "farcast_skipped"
            state.log_history.append({"step": state.global_step, key: result.horizon, "farcast_why": result.why})

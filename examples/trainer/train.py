"""Train a small GPT-2 language model with transformers' Trainer on Python's own standard library, saving
a checkpoint every --save-steps and resuming from the newest one in --run (a forecast farcast wrote there
with --resumable included). Built from a config: nothing is downloaded.

    python examples/trainer/train.py --run runs/gpt2 --stop-at 200          # train (or resume) up to step 200
    python examples/trainer/train.py --run runs/gpt2 --stop-at 400 --farcast-every 100   # farcast in-process

The learning rate decays linearly over --total-steps whatever step a job stops at, so that a job
that resumes continues the same schedule. With --farcast-every, FarcastCallback farcasts inside the
loop (`farcast_cli.integrations`).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import torch

CONTEXT = 32


class StandardLibraryText(torch.utils.data.Dataset):
    """Windows of CONTEXT bytes of the standard library's source: a byte-level language modelling task."""

    def __init__(self, count: int = 4096) -> None:
        files = sorted(Path(os.__file__).parent.glob("*.py"))[:40]
        data = torch.tensor(list(b"".join(path.read_bytes() for path in files)), dtype=torch.long)
        self.windows = data[: count * CONTEXT].reshape(count, CONTEXT)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.windows[index], "labels": self.windows[index]}


def build_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_positions=CONTEXT, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def stop_at(step: int):
    """A callback that ends training at global step `step`, the schedule still planned for max_steps."""
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= step:
                control.should_training_stop = control.should_save = True

    return StopAt()


def trainer(run: Path, max_steps: int, save_steps: int, seed: int = 0, callbacks: list | None = None, schedule: str = "linear"):
    """A Trainer for the model: the learning rate decays over max_steps, a checkpoint every save_steps."""
    from transformers import Trainer, TrainingArguments

    arguments = TrainingArguments(
        output_dir=str(run), max_steps=max_steps, per_device_train_batch_size=16, learning_rate=3e-3, lr_scheduler_type=schedule,
        save_strategy="steps", save_steps=save_steps, logging_steps=save_steps, report_to="none", use_cpu=True, seed=seed,
        disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    return Trainer(model=build_model(), args=arguments, train_dataset=StandardLibraryText(), callbacks=callbacks)


def resume_or_start(run: Path) -> bool:
    """Resume (from the newest checkpoint-<step> folder, as Trainer picks it) when the run has one."""
    return run.exists() and any(run.glob("checkpoint-*"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--stop-at", type=int, required=True, help="global step to stop at")
    parser.add_argument("--total-steps", type=int, default=1000, help="steps the learning-rate schedule is planned for")
    parser.add_argument("--save-steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--farcast-every", type=int, help="farcast in-process every this many steps")
    args = parser.parse_args()
    torch.set_num_threads(1)
    callbacks = [stop_at(args.stop_at)]
    if args.farcast_every:
        from farcast_cli.integrations import FarcastCallback

        callbacks.append(FarcastCallback(every=args.farcast_every, jump=0.5))
        logging.basicConfig(format="%(message)s")
        logging.getLogger("farcast").setLevel(logging.INFO)
    trainer(args.run, args.total_steps, args.save_steps, args.seed, callbacks).train(resume_from_checkpoint=resume_or_start(args.run))


if __name__ == "__main__":
    main()

"""Training workloads that write their own runs of checkpoints and score any weights by validation loss.

Each workload module defines NAME, STEPS (the nominal run length L; runs go on to 1.5 L so that a
cut at 0.75 L can jump 1x its elapsed steps), SAVE_EVERY, build() -> model, and
train(out_dir) / validation_loss(model). All run on one CPU thread in minutes, one at a time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

DEVICE = torch.device(os.environ.get("FARCAST_BENCH_DEVICE", "cpu"))


def save_checkpoint(run_dir: Path, model: torch.nn.Module, step: int, log_history: list[dict], max_steps: int) -> None:
    """A Trainer-style checkpoint folder: model.safetensors and trainer_state.json."""
    folder = run_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: value.detach().to("cpu", copy=True).contiguous() for name, value in model.state_dict().items()}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    trainer_state = {"global_step": step, "max_steps": max_steps, "log_history": list(log_history)}
    (folder / "trainer_state.json").write_text(json.dumps(trainer_state))


def train_loop(run_dir: Path, model: torch.nn.Module, optimizer, loss_on_batch, steps: int, save_every: int, scheduler=None) -> None:
    """Train for `steps`, saving step 0 and every `save_every` steps; log loss and learning rate."""
    torch.set_num_threads(1)
    log_history: list[dict] = []
    save_checkpoint(run_dir, model, 0, log_history, steps)
    for step in range(1, steps + 1):
        loss = loss_on_batch(step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        log_history.append({"step": step, "loss": round(loss.item(), 6), "learning_rate": optimizer.param_groups[0]["lr"]})
        if scheduler is not None:
            scheduler.step()
        if step % save_every == 0:
            save_checkpoint(run_dir, model, step, log_history, steps)


def minibatch_cross_entropy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int):
    """loss_on_batch for train_loop: cross-entropy on a random minibatch, from a seeded generator."""
    generator = torch.Generator().manual_seed(0)

    def loss_on_batch(step: int) -> torch.Tensor:
        rows = torch.randint(len(x), (batch,), generator=generator)
        return torch.nn.functional.cross_entropy(model(x[rows]), y[rows])

    return loss_on_batch

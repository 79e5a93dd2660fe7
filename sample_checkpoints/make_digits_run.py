"""Train a small MLP on scikit-learn's bundled digits with Adam and save a Trainer-style run.

    python sample_checkpoints/make_digits_run.py make sample_checkpoints/digits-mlp

Needs scikit-learn. The run's evaluator, which does not, is eval_digits.py beside this file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from eval_digits import HIDDEN, build_model, validation_loss
from safetensors.torch import save_file

STEPS = 600
SAVE_EVERY = 30
LOG_EVERY = 10
BATCH = 32
LR = 1e-3
SEED = 0


def load_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits scaled to [0, 1], split 1400 train / 397 validation with a fixed permutation."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(SEED))
    x, y = x[order], y[order]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def make_run(out: Path) -> None:
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    x, y, _, _ = load_data()
    model = build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    generator = torch.Generator().manual_seed(SEED)
    log_history = []
    for step in range(1, STEPS + 1):
        batch = torch.randint(len(x), (BATCH,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % LOG_EVERY == 0:
            log_history.append({"step": step, "epoch": step * BATCH / len(x), "loss": round(loss.item(), 6), "learning_rate": LR})
        if step % SAVE_EVERY == 0:
            eval_loss = validation_loss(model)
            log_history.append({"step": step, "epoch": step * BATCH / len(x), "eval_loss": round(eval_loss, 6)})
            _save_checkpoint(out / f"checkpoint-{step}", model, step, log_history)


def _save_checkpoint(folder: Path, model: torch.nn.Module, step: int, log_history: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    weights = {name: value.detach().clone().contiguous() for name, value in model.state_dict().items()}
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    config = {"architectures": ["DigitsMLP"], "model_type": "digits-mlp", "input_size": 64, "hidden_size": HIDDEN, "num_labels": 10}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {
        "global_step": step,
        "max_steps": STEPS,
        "save_steps": SAVE_EVERY,
        "logging_steps": LOG_EVERY,
        "epoch": step * BATCH / 1400,
        "log_history": list(log_history),
    }
    (folder / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "make":
        raise SystemExit(f"usage: {sys.argv[0]} make OUT_DIR")
    make_run(Path(sys.argv[2]))

"""Print the validation loss of a checkpoint of the sample run: the eval command for `farcast --eval-cmd`.

    python sample_checkpoints/eval_digits.py sample_checkpoints/digits-mlp/checkpoint-600
    farcast predict sample_checkpoints/digits-mlp -H 300 -o forecast --eval-cmd "python sample_checkpoints/eval_digits.py {checkpoint}"

It follows farcast's eval protocol: one checkpoint in (a folder holding model.safetensors, or the
.safetensors file itself), one number out, the last one on stdout. The validation set ships beside
it (digits-validation.safetensors: scikit-learn's digits, the rows the run never trained on), so it
needs only torch and safetensors.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

HIDDEN = 64
VALIDATION = Path(__file__).with_name("digits-validation.safetensors")


def build_model() -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.Linear(64, HIDDEN), torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, 10),
    )  # fmt: skip


def validation_loss(model: torch.nn.Module) -> float:
    data = load_file(VALIDATION)
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(data["pixels"].float() / 16.0), data["labels"].long()))


def evaluate(checkpoint: Path) -> float:
    checkpoint = Path(checkpoint)
    model = build_model()
    model.load_state_dict(load_file(checkpoint / "model.safetensors" if checkpoint.is_dir() else checkpoint))
    return validation_loss(model)


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(f"{evaluate(Path(sys.argv[1])):.6f}")

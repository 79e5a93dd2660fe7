"""Print the validation loss of a checkpoint of the sample run: the eval command for `farcast --eval-cmd`.

    python sample_checkpoints/eval_digits.py sample_checkpoints/digits-mlp/checkpoint-600
    farcast predict sample_checkpoints/digits-mlp -H 300 -o forecast --eval-cmd "python sample_checkpoints/eval_digits.py {checkpoint}"

With --serve it speaks farcast's server protocol instead (`farcast --eval-server`): it loads torch and
the validation set once, then reads checkpoint paths, one per line, on stdin and prints each one's loss
on a line of its own:

    farcast predict sample_checkpoints/digits-mlp -H 300 -o forecast --eval-server "python sample_checkpoints/eval_digits.py --serve"

Without it, it follows farcast's eval protocol: one checkpoint in (a folder holding model.safetensors, or the
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


def validation_loss(model: torch.nn.Module, data: dict[str, torch.Tensor] | None = None) -> float:
    data = load_file(VALIDATION) if data is None else data
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(data["pixels"].float() / 16.0), data["labels"].long()))


def evaluate(checkpoint: Path, model: torch.nn.Module | None = None, data: dict[str, torch.Tensor] | None = None) -> float:
    checkpoint = Path(checkpoint)
    model = build_model() if model is None else model
    model.load_state_dict(load_file(checkpoint / "model.safetensors" if checkpoint.is_dir() else checkpoint))
    return validation_loss(model, data)


def serve() -> None:
    """One checkpoint path per line in, its loss on a line out, until stdin ends."""
    model, data = build_model(), load_file(VALIDATION)
    for line in sys.stdin:
        print(f"{evaluate(Path(line.rstrip(chr(10))), model, data):.6f}", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        print(f"{evaluate(Path(sys.argv[1])):.6f}")

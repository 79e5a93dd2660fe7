"""A small 1-d convolutional network on MNIST-1D, generated procedurally by the mnist1d package."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from workloads import minibatch_cross_entropy, train_loop

NAME = "mnist1d-cnn-adam"
STEPS, SAVE_EVERY, BATCH = 1000, 25, 64


@lru_cache(maxsize=1)
def _data() -> tuple[torch.Tensor, ...]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = 5000
    data = make_dataset(args)
    x = torch.tensor(data["x"], dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data["y"], dtype=torch.long)
    x_test = torch.tensor(data["x_test"], dtype=torch.float32).unsqueeze(1)
    y_test = torch.tensor(data["y_test"], dtype=torch.long)
    return x, y, x_test, y_test


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv1d(1, 16, 5, padding=2),
        torch.nn.ReLU(),
        torch.nn.Conv1d(16, 16, 5, padding=2, stride=2),
        torch.nn.ReLU(),
        torch.nn.Conv1d(16, 16, 5, padding=2, stride=2),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 10, 10),
    )


def validation_loss(model: torch.nn.Module) -> float:
    _, _, x, y = _data()
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(x), y))


def train(run_dir: Path) -> None:
    x, y, _, _ = _data()
    model = build()
    train_loop(
        run_dir,
        model,
        torch.optim.Adam(model.parameters(), lr=1e-3),
        minibatch_cross_entropy(model, x, y, BATCH),
        int(STEPS * 1.5),
        SAVE_EVERY,
    )

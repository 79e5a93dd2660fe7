"""An MLP on scikit-learn's bundled digits, with Adam or with SGD and momentum."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from workloads import minibatch_cross_entropy, train_loop

STEPS, SAVE_EVERY, BATCH = 600, 20, 32


@lru_cache(maxsize=1)
def _data() -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[order][:1400], y[order][:1400], x[order][1400:], y[order][1400:]


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def validation_loss(model: torch.nn.Module) -> float:
    _, _, x, y = _data()
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(x), y))


def train_with(run_dir: Path, make_optimizer) -> None:
    x, y, _, _ = _data()
    model = build()
    train_loop(
        run_dir, model, make_optimizer(model.parameters()), minibatch_cross_entropy(model, x, y, BATCH), int(STEPS * 1.5), SAVE_EVERY
    )


class Adam:
    NAME, STEPS, SAVE_EVERY = "digits-mlp-adam", STEPS, SAVE_EVERY
    build, validation_loss = staticmethod(build), staticmethod(validation_loss)

    @staticmethod
    def train(run_dir: Path) -> None:
        train_with(run_dir, lambda params: torch.optim.Adam(params, lr=1e-3))


class SGDMomentum:
    NAME, STEPS, SAVE_EVERY = "digits-mlp-sgdm", STEPS, SAVE_EVERY
    build, validation_loss = staticmethod(build), staticmethod(validation_loss)

    @staticmethod
    def train(run_dir: Path) -> None:
        train_with(run_dir, lambda params: torch.optim.SGD(params, lr=0.02, momentum=0.9))

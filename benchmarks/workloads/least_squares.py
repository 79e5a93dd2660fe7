"""Least squares in 100 dimensions by full-batch gradient descent: the paper's setting, one bigger problem."""

from __future__ import annotations

from pathlib import Path

import torch

from workloads import train_loop

NAME = "least-squares-gd"
STEPS, SAVE_EVERY, LR = 400, 10, 0.02


def _data() -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    scales = torch.logspace(-1.5, 0, 100)
    x = torch.randn(600, 100, generator=generator) * scales
    w_true = torch.randn(100, 1, generator=generator)
    y = x @ w_true + 0.1 * torch.randn(600, 1, generator=generator)
    return x[:500], y[:500], x[500:], y[500:]


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(100, 1, bias=False)


def validation_loss(model: torch.nn.Module) -> float:
    _, _, x, y = _data()
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model(x), y))


def train(run_dir: Path) -> None:
    x, y, _, _ = _data()
    model = build()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    train_loop(run_dir, model, optimizer, lambda step: torch.nn.functional.mse_loss(model(x), y), int(STEPS * 1.5), SAVE_EVERY)

"""The harness's workloads as steppable training loops for benchmarks/loop.py.

`parts(name, seed, schedule)` builds a fresh model, its optimizer and (for "linear") a linearly decaying
LambdaLR schedule, and `batch_loss(index)`: the loss on batch number `index` of a data order fixed by
the seed, so that a loop can skip batches as a resumed Trainer does. Validation splits in two
disjoint halves: `gate` (what a loss gate may look at) and `measure` (what the benchmark reports);
`gate_batches` is the gate half's loss per example (per window of text for the language model), whose
mean is `gate`'s loss.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

STEPS = {"digits-mlp-adam": 1000, "digits-mlp-sgdm": 1000, "mnist1d-cnn-adam": 1500, "tiny-lm-adamw": 900, "minilm-finetune-adamw": 600}
SAVE_EVERY = {"digits-mlp-adam": 10, "digits-mlp-sgdm": 10, "mnist1d-cnn-adam": 25, "tiny-lm-adamw": 20, "minilm-finetune-adamw": 20}


@dataclass
class Parts:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    batch_loss: Callable[[int], torch.Tensor]
    gate: Callable[[torch.nn.Module], float]
    measure: Callable[[torch.nn.Module], float]
    gate_batches: Callable[[torch.nn.Module], torch.Tensor]

    def train_step(self, batch: int) -> None:
        """One optimizer step on batch number `batch` of the data order, the schedule stepped with it."""
        loss = self.batch_loss(batch)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()


def _batches(seed: int, count: int, size: int) -> Callable[[int], torch.Tensor]:
    return lambda index: torch.randint(count, (size,), generator=torch.Generator().manual_seed(seed * 1_000_003 + index))


def _halves(loss: Callable[[torch.nn.Module, slice], float]) -> tuple[Callable, Callable]:
    return (lambda model: loss(model, slice(0, None, 2))), (lambda model: loss(model, slice(1, None, 2)))


def _initialised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """The workload's model with every layer initialised anew from `seed` (seed 0: as the workload builds it)."""
    if seed:
        torch.manual_seed(seed)
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return model


def _schedule(optimizer: torch.optim.Optimizer, schedule: str, total: int):
    if schedule == "constant":
        return None
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total))


def _classifier(x, y, x_valid, y_valid, model, optimizer, batch: int, seed: int, schedule: str, total: int) -> Parts:
    rows = _batches(seed, len(x), batch)

    def batch_loss(index: int) -> torch.Tensor:
        picked = rows(index)
        return torch.nn.functional.cross_entropy(model(x[picked]), y[picked])

    def loss(model: torch.nn.Module, part: slice) -> float:
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(model(x_valid[part]), y_valid[part]))

    def per_example(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(model(x_valid[::2]), y_valid[::2], reduction="none")

    gate, measure = _halves(loss)
    return Parts(model, optimizer, _schedule(optimizer, schedule, total), batch_loss, gate, measure, per_example)


def parts(name: str, seed: int, schedule: str = "constant") -> Parts:
    torch.manual_seed(seed)
    total = STEPS[name]
    if name.startswith("digits"):
        module = importlib.import_module("workloads.digits_mlp")
        x, y, x_valid, y_valid = module._data()
        model = _initialised(module.build(), seed)
        make = (lambda p: torch.optim.Adam(p, lr=1e-3)) if name.endswith("adam") else (lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9))
        return _classifier(x, y, x_valid, y_valid, model, make(model.parameters()), module.BATCH, seed, schedule, total)
    if name == "mnist1d-cnn-adam":
        module = importlib.import_module("workloads.mnist1d_cnn")
        x, y, x_valid, y_valid = module._data()
        model = _initialised(module.build(), seed)
        return _classifier(
            x, y, x_valid, y_valid, model, torch.optim.Adam(model.parameters(), lr=1e-3), module.BATCH, seed, schedule, total
        )
    if name == "tiny-lm-adamw":
        return _language_model(seed, schedule, total)
    if name == "minilm-finetune-adamw":
        return _minilm(seed, schedule, total)
    raise KeyError(name)


def _language_model(seed: int, schedule: str, total: int) -> Parts:
    module = importlib.import_module("workloads.tiny_lm")
    spec = module.SMALL
    train_bytes, valid = module._bytes()
    model = _initialised(spec.build(), seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01)
    starts = _batches(seed, len(train_bytes) - spec.context, spec.batch)
    windows = valid[: (len(valid) // spec.context) * spec.context].reshape(-1, spec.context)[:128]

    def batch_loss(index: int) -> torch.Tensor:
        batch = torch.stack([train_bytes[s : s + spec.context] for s in starts(index)])
        return model(input_ids=batch, labels=batch).loss

    def loss(model: torch.nn.Module, part: slice) -> float:
        with torch.no_grad():
            return float(model(input_ids=windows[part], labels=windows[part]).loss)

    def per_window(model: torch.nn.Module) -> torch.Tensor:
        ids = windows[::2]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, :-1]
            losses = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        return losses.view(len(ids), -1).mean(dim=1)

    gate, measure = _halves(loss)
    return Parts(model, optimizer, _schedule(optimizer, schedule, total), batch_loss, gate, measure, per_window)


def _minilm(seed: int, schedule: str, total: int) -> Parts:
    module = importlib.import_module("workloads.minilm_finetune")
    encoded, labels, valid, valid_labels = module._data()
    model = module.build()
    if seed:
        torch.manual_seed(seed)
        model.classifier.reset_parameters()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-5, weight_decay=0.01)
    rows = _batches(seed, len(labels), module.BATCH)

    def batch_loss(index: int) -> torch.Tensor:
        picked = rows(index)
        return model(**{k: v[picked] for k, v in encoded.items()}, labels=labels[picked]).loss

    def loss(model: torch.nn.Module, part: slice) -> float:
        with torch.no_grad():
            return float(model(**{k: v[part] for k, v in valid.items()}, labels=valid_labels[part]).loss)

    def per_example(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            logits = model(**{k: v[::2] for k, v in valid.items()}).logits
            return torch.nn.functional.cross_entropy(logits, valid_labels[::2], reduction="none")

    gate, measure = _halves(loss)
    return Parts(model, optimizer, _schedule(optimizer, schedule, total), batch_loss, gate, measure, per_example)

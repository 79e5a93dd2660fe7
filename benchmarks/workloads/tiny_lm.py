"""Causal transformer language models (transformers' GPT-2 classes, random init) trained on the bytes
of Python's own standard library with AdamW and linear decay: a small one for the CPU (seconds), and
a DistilBERT-base-sized one (6 layers, width 768, 12 heads, 43M parameters) for a GPU machine,
trained on FARCAST_BENCH_DEVICE (default cpu)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from workloads import DEVICE, train_loop


@lru_cache(maxsize=1)
def _bytes() -> tuple[torch.Tensor, torch.Tensor]:
    """About 2 MB of standard-library source for training, the next 64 KB for validation."""
    files = sorted(Path(os.__file__).parent.glob("*.py"))
    data = b"".join(f.read_bytes() for f in files)[: 2 * 1024 * 1024 + 65536]
    tokens = torch.tensor(list(data), dtype=torch.long)
    return tokens[: 2 * 1024 * 1024], tokens[2 * 1024 * 1024 :]


@dataclass(frozen=True)
class LanguageModel:
    NAME: str
    STEPS: int
    SAVE_EVERY: int
    batch: int
    context: int
    width: int
    layers: int
    heads: int
    lr: float

    def build(self) -> torch.nn.Module:
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        config = GPT2Config(
            vocab_size=256,
            n_positions=self.context,
            n_embd=self.width,
            n_layer=self.layers,
            n_head=self.heads,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
        return GPT2LMHeadModel(config)

    def validation_loss(self, model: torch.nn.Module) -> float:
        _, valid = _bytes()
        windows = valid[: (len(valid) // self.context) * self.context].reshape(-1, self.context)[:64]
        device = next(model.parameters()).device
        with torch.no_grad():
            return float(model(input_ids=windows.to(device), labels=windows.to(device)).loss)

    def train(self, run_dir: Path) -> None:
        train_bytes, _ = _bytes()
        model = self.build().to(DEVICE)
        generator = torch.Generator().manual_seed(0)
        total = int(self.STEPS * 1.5)
        optimizer = torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=0.01)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total)

        def loss_on_batch(step: int) -> torch.Tensor:
            starts = torch.randint(len(train_bytes) - self.context, (self.batch,), generator=generator)
            windows = torch.stack([train_bytes[s : s + self.context] for s in starts]).to(DEVICE)
            return model(input_ids=windows, labels=windows).loss

        train_loop(run_dir, model, optimizer, loss_on_batch, total, self.SAVE_EVERY, scheduler)


SMALL = LanguageModel("tiny-lm-adamw", 600, 20, batch=16, context=64, width=64, layers=2, heads=4, lr=2e-3)
DISTILBERT_SIZE = LanguageModel("distilbert-size-lm-adamw", 2000, 50, batch=32, context=128, width=768, layers=6, heads=12, lr=5e-4)

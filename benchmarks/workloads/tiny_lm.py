"""A small causal transformer language model (transformers' GPT-2 classes, random init) on the bytes
of Python's own standard library, AdamW with linear decay."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch

from workloads import train_loop

NAME = "tiny-lm-adamw"
STEPS, SAVE_EVERY, BATCH, CONTEXT = 600, 20, 16, 64


@lru_cache(maxsize=1)
def _bytes() -> tuple[torch.Tensor, torch.Tensor]:
    """About 2 MB of standard-library source for training, the next 64 KB for validation."""
    files = sorted(Path(os.__file__).parent.glob("*.py"))
    data = b"".join(f.read_bytes() for f in files)[: 2 * 1024 * 1024 + 65536]
    tokens = torch.tensor(list(data), dtype=torch.long)
    return tokens[: 2 * 1024 * 1024], tokens[2 * 1024 * 1024 :]


def build() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_positions=CONTEXT, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0, loss_type="ForCausalLM")
    return GPT2LMHeadModel(config)


def _loss(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    return model(input_ids=windows, labels=windows).loss


def validation_loss(model: torch.nn.Module) -> float:
    _, valid = _bytes()
    windows = valid[: (len(valid) // CONTEXT) * CONTEXT].reshape(-1, CONTEXT)[:64]
    with torch.no_grad():
        return float(_loss(model, windows))


def train(run_dir: Path) -> None:
    train_bytes, _ = _bytes()
    model = build()
    generator = torch.Generator().manual_seed(0)
    total = int(STEPS * 1.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total)

    def loss_on_batch(step: int) -> torch.Tensor:
        starts = torch.randint(len(train_bytes) - CONTEXT, (BATCH,), generator=generator)
        return _loss(model, torch.stack([train_bytes[s : s + CONTEXT] for s in starts]))

    train_loop(run_dir, model, optimizer, loss_on_batch, total, SAVE_EVERY, scheduler)

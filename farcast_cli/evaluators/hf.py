"""The Hugging Face eval commands (see the package docstring). transformers is imported here only."""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

LABEL_COLUMNS = ("label", "labels")
TEXT_COLUMNS = ("text", "sentence")


def _tokenizer(checkpoint: Path, tokenizer: Path | None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer or checkpoint)


def _device(name: str) -> torch.device:
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


def causal_lm_loss(
    checkpoint: Path, text: Path, tokenizer: Path | None = None, context: int = 512, batch: int = 8, device: str = "auto"
) -> float:
    """Mean cross-entropy per predicted token of the text, cut into windows of `context` tokens (at most
    the model's positions): every token but each window's first is predicted once (transformers' own loss averages the same way per
    window; here the average is over all predicted tokens together)."""
    from transformers import AutoModelForCausalLM

    place = _device(device)
    model = AutoModelForCausalLM.from_pretrained(checkpoint).to(place).eval()
    context = min(context, getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None) or context)
    ids = torch.tensor(_tokenizer(checkpoint, tokenizer)(text.read_text(encoding="utf-8"))["input_ids"], dtype=torch.long)
    windows = [ids[start : start + context] for start in range(0, len(ids) - 1, context)]
    windows = [w for w in windows if len(w) > 1]
    if not windows:
        raise SystemExit(f"{text}: fewer than two tokens")
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(windows), batch):
            group = windows[start : start + batch]
            width = max(len(w) for w in group)
            inputs = torch.zeros(len(group), width, dtype=torch.long)
            mask = torch.zeros(len(group), width, dtype=torch.long)
            for row, window in enumerate(group):
                inputs[row, : len(window)], mask[row, : len(window)] = window, 1
            logits = model(input_ids=inputs.to(place), attention_mask=mask.to(place)).logits.float()
            predicted = mask[:, 1:].bool().to(place)
            losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), inputs[:, 1:].to(place), reduction="none")
            total += float(losses[predicted].sum())
            count += int(predicted.sum())
    return total / count


def sequence_classification_loss(
    checkpoint: Path, table: Path, tokenizer: Path | None = None, max_length: int = 512, batch: int = 16, device: str = "auto"
) -> float:
    """Mean cross-entropy over the rows of a CSV with a text column (text or sentence) and an integer
    label column (label or labels)."""
    from transformers import AutoModelForSequenceClassification

    with open(table, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise SystemExit(f"{table}: no rows")
    text_column = next((c for c in TEXT_COLUMNS if c in rows[0]), None)
    label_column = next((c for c in LABEL_COLUMNS if c in rows[0]), None)
    if text_column is None or label_column is None:
        raise SystemExit(f"{table}: needs a text column ({' or '.join(TEXT_COLUMNS)}) and a label column ({' or '.join(LABEL_COLUMNS)})")
    place = _device(device)
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint).to(place).eval()
    encode = _tokenizer(checkpoint, tokenizer)
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(rows), batch):
            group = rows[start : start + batch]
            inputs = encode([r[text_column] for r in group], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            labels = torch.tensor([int(r[label_column]) for r in group])
            logits = model(**{k: v.to(place) for k, v in inputs.items()}).logits.float()
            total += float(torch.nn.functional.cross_entropy(logits, labels.to(place), reduction="sum"))
    return total / len(rows)


def _arguments(description: str, data: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("checkpoint", type=Path, help="checkpoint folder (config, weights, tokenizer)")
    parser.add_argument(data, type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder, when the checkpoint has none")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="auto")
    return parser


def causal_lm_main() -> None:
    parser = _arguments("Print a causal LM checkpoint's mean loss per predicted token on a text file.", "--text")
    parser.add_argument("--context", type=int, default=512)
    args = parser.parse_args()
    print(f"{causal_lm_loss(args.checkpoint, args.text, args.tokenizer, args.context, args.batch, args.device):.6f}")


def sequence_classification_main() -> None:
    parser = _arguments("Print a sequence-classification checkpoint's mean cross-entropy on a CSV (text, label).", "--csv")
    parser.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args()
    print(f"{sequence_classification_loss(args.checkpoint, args.csv, args.tokenizer, args.max_length, args.batch, args.device):.6f}")


if __name__ == "__main__":
    sys.exit("use the farcast-eval-causal-lm or farcast-eval-seq-cls commands")

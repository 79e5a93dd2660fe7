"""The Hugging Face eval commands (see the package docstring). transformers is imported here only."""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Callable
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
    return CausalLM(checkpoint, text, tokenizer, context, batch, device).loss()


class CausalLM:
    """A causal LM and its text, tokenized into windows once: `loss` of the weights loaded, `load` another checkpoint's."""

    def __init__(self, checkpoint: Path, text: Path, tokenizer: Path | None, context: int, batch: int, device: str) -> None:
        from transformers import AutoModelForCausalLM

        self.place, self.batch = _device(device), batch
        self.model = AutoModelForCausalLM.from_pretrained(checkpoint).to(self.place).eval()
        config = self.model.config
        context = min(context, getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None) or context)
        ids = torch.tensor(_tokenizer(checkpoint, tokenizer)(text.read_text(encoding="utf-8"))["input_ids"], dtype=torch.long)
        windows = [ids[start : start + context] for start in range(0, len(ids) - 1, context)]
        self.windows = [w for w in windows if len(w) > 1]
        if not self.windows:
            raise SystemExit(f"{text}: fewer than two tokens")

    def load(self, checkpoint: Path) -> None:
        copy_weights(self.model, checkpoint)

    def loss(self) -> float:
        total, count = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(self.windows), self.batch):
                group = self.windows[start : start + self.batch]
                width = max(len(w) for w in group)
                inputs = torch.zeros(len(group), width, dtype=torch.long)
                mask = torch.zeros(len(group), width, dtype=torch.long)
                for row, window in enumerate(group):
                    inputs[row, : len(window)], mask[row, : len(window)] = window, 1
                logits = self.model(input_ids=inputs.to(self.place), attention_mask=mask.to(self.place)).logits.float()
                predicted = mask[:, 1:].bool().to(self.place)
                losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), inputs[:, 1:].to(self.place), reduction="none")
                total += float(losses[predicted].sum())
                count += int(predicted.sum())
        return total / count


def sequence_classification_loss(
    checkpoint: Path, table: Path, tokenizer: Path | None = None, max_length: int = 512, batch: int = 16, device: str = "auto"
) -> float:
    """Mean cross-entropy over the rows of a CSV with a text column (text or sentence) and an integer
    label column (label or labels)."""
    return SequenceClassifier(checkpoint, table, tokenizer, max_length, batch, device).loss()


class SequenceClassifier:
    """A sequence classifier and its rows, tokenized in batches once: `loss` of the weights loaded, `load` another checkpoint's."""

    def __init__(self, checkpoint: Path, table: Path, tokenizer: Path | None, max_length: int, batch: int, device: str) -> None:
        from transformers import AutoModelForSequenceClassification

        with open(table, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        if not rows:
            raise SystemExit(f"{table}: no rows")
        text_column = next((c for c in TEXT_COLUMNS if c in rows[0]), None)
        label_column = next((c for c in LABEL_COLUMNS if c in rows[0]), None)
        if text_column is None or label_column is None:
            columns = f"a text column ({' or '.join(TEXT_COLUMNS)}) and a label column ({' or '.join(LABEL_COLUMNS)})"
            raise SystemExit(f"{table}: needs {columns}")
        self.place, self.rows = _device(device), len(rows)
        self.model = AutoModelForSequenceClassification.from_pretrained(checkpoint).to(self.place).eval()
        encode = _tokenizer(checkpoint, tokenizer)
        self.batches = []
        for start in range(0, len(rows), batch):
            group = rows[start : start + batch]
            inputs = encode([r[text_column] for r in group], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            labels = torch.tensor([int(r[label_column]) for r in group])
            self.batches.append(({k: v.to(self.place) for k, v in inputs.items()}, labels.to(self.place)))

    def load(self, checkpoint: Path) -> None:
        copy_weights(self.model, checkpoint)

    def loss(self) -> float:
        total = 0.0
        with torch.no_grad():
            for inputs, labels in self.batches:
                logits = self.model(**inputs).logits.float()
                total += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        return total / self.rows


def copy_weights(model: torch.nn.Module, checkpoint: Path) -> None:
    """Copy a checkpoint's tensors into the loaded model's parameters and buffers, one tensor at a time
    from its safetensors files onto the model's device; every tensor of the model must be found (a
    weight tied to one found counts)."""
    from safetensors import safe_open

    state = model.state_dict()
    files = sorted(Path(checkpoint).glob("*.safetensors")) if Path(checkpoint).is_dir() else [Path(checkpoint)]
    if not files:
        raise SystemExit(f"{checkpoint}: no .safetensors file")
    copied: set[int] = set()
    with torch.no_grad():
        for file in files:
            with safe_open(file, "pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    if name not in state:
                        raise SystemExit(f"{file}: tensor {name} is not in the model loaded first")
                    state[name].copy_(handle.get_tensor(name))
                    copied.add(state[name].data_ptr())
    missing = [name for name, tensor in state.items() if tensor.data_ptr() not in copied]
    if missing:
        raise SystemExit(f"{checkpoint}: lacks {missing[0]} (and {len(missing) - 1} more tensors of the model)")


def serve(first: Callable[[Path], CausalLM | SequenceClassifier]) -> None:
    """farcast's server protocol (`--eval-server`): one checkpoint path per line on stdin, its loss on a
    line of stdout. The first path's model, tokenizer and data are loaded once; each later checkpoint's
    tensors are copied into that model."""
    evaluator = None
    for line in sys.stdin:
        checkpoint = Path(line.rstrip("\n"))
        if evaluator is None:
            evaluator = first(checkpoint)
        else:
            evaluator.load(checkpoint)
        print(f"{evaluator.loss():.6f}", flush=True)


def _arguments(description: str, data: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("checkpoint", type=Path, nargs="?", help="checkpoint folder (config, weights, tokenizer); none with --serve")
    parser.add_argument(data, type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder, when the checkpoint has none")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--serve", action="store_true", help="read checkpoint paths on stdin, one per line, and print each one's loss")
    return parser


def _parsed(parser: argparse.ArgumentParser) -> argparse.Namespace:
    args = parser.parse_args()
    if (args.checkpoint is None) != args.serve:
        parser.error("give a checkpoint, or --serve to read checkpoint paths on stdin")
    return args


def _serve_or_print(evaluator, args: argparse.Namespace) -> None:
    """With --serve, losses of the checkpoint paths read on stdin; else the one checkpoint's loss."""
    if args.serve:
        serve(evaluator)
    else:
        print(f"{evaluator(args.checkpoint).loss():.6f}")


def causal_lm_main() -> None:
    parser = _arguments("Print a causal LM checkpoint's mean loss per predicted token on a text file.", "--text")
    parser.add_argument("--context", type=int, default=512)
    args = _parsed(parser)
    evaluator = lambda checkpoint: CausalLM(checkpoint, args.text, args.tokenizer, args.context, args.batch, args.device)  # noqa: E731
    _serve_or_print(evaluator, args)


def sequence_classification_main() -> None:
    parser = _arguments("Print a sequence-classification checkpoint's mean cross-entropy on a CSV (text, label).", "--csv")
    parser.add_argument("--max-length", type=int, default=512)
    args = _parsed(parser)
    evaluator = lambda checkpoint: SequenceClassifier(checkpoint, args.csv, args.tokenizer, args.max_length, args.batch, args.device)  # noqa: E731
    _serve_or_print(evaluator, args)


if __name__ == "__main__":
    sys.exit("use the farcast-eval-causal-lm or farcast-eval-seq-cls commands")

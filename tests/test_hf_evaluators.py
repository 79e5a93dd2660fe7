"""The Hugging Face eval commands, on tiny randomly initialised models and a character tokenizer built in
code (nothing downloaded), run as the console scripts users call."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
CHARACTERS = "abcdefghijklmnopqrstuvwxyz .,\n"


def character_tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{c: i + 2 for i, c in enumerate(CHARACTERS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]")


def script(name: str) -> str:
    return str(Path(sys.executable).with_name(name)) if Path(sys.executable).with_name(name).exists() else shutil.which(name)


def run_script(*args: object) -> float:
    done = subprocess.run([*map(str, args)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return float(done.stdout.split()[-1])


@pytest.fixture(scope="module")
def causal_checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=len(CHARACTERS) + 2, n_positions=256, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0
    )
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    character_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_causal_lm_loss_is_the_mean_loss_per_predicted_token(causal_checkpoint, tmp_path):
    text = tmp_path / "valid.txt"
    text.write_text("the quick brown fox jumps over the lazy dog.\n" * 3)
    loss = run_script(script("farcast-eval-causal-lm"), causal_checkpoint, "--text", text, "--context", 200)
    model = transformers.GPT2LMHeadModel.from_pretrained(causal_checkpoint)
    ids = torch.tensor([character_tokenizer()(text.read_text())["input_ids"]])
    assert ids.shape[1] <= 200
    with torch.no_grad():
        assert loss == pytest.approx(float(model(input_ids=ids, labels=ids).loss), rel=1e-4)


def test_causal_lm_windows_average_over_every_predicted_token(causal_checkpoint, tmp_path):
    text = tmp_path / "valid.txt"
    text.write_text("abcdefghij" * 5)
    from farcast_cli.evaluators.hf import causal_lm_loss

    whole, windows = causal_lm_loss(causal_checkpoint, text, context=50), causal_lm_loss(causal_checkpoint, text, context=20, batch=2)
    model = transformers.GPT2LMHeadModel.from_pretrained(causal_checkpoint)
    ids = torch.tensor(character_tokenizer()(text.read_text())["input_ids"])
    with torch.no_grad():
        per_window = [float(model(input_ids=w[None], labels=w[None]).loss) * (len(w) - 1) for w in ids.split(20)]
    assert windows == pytest.approx(sum(per_window) / (len(ids) - 3), rel=1e-4)
    assert whole != pytest.approx(windows, rel=1e-6)


def test_sequence_classification_loss_is_the_mean_cross_entropy_over_the_rows(tmp_path):
    folder = tmp_path / "bert"
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(CHARACTERS) + 2, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=3
    )
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    character_tokenizer().save_pretrained(folder)
    rows = [("a cat sat", 0), ("the dog ran far", 1), ("birds", 2), ("a fish swam, slowly", 1)]
    table = tmp_path / "valid.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    loss = run_script(script("farcast-eval-seq-cls"), folder, "--csv", table, "--batch", 3)
    model = transformers.BertForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = character_tokenizer()
    with torch.no_grad():
        expected = [float(model(**tokenizer([t], return_tensors="pt"), labels=torch.tensor([y])).loss) for t, y in rows]
    assert loss == pytest.approx(sum(expected) / len(expected), rel=1e-4)


def perturbed_copy(checkpoint: Path, folder: Path, model_class, seed: int) -> Path:
    """The checkpoint with every weight moved by a little noise: another step of the same run."""
    shutil.copytree(checkpoint, folder)
    model = model_class.from_pretrained(checkpoint)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    model.save_pretrained(folder)
    return folder


def served_losses(command: list[object], checkpoints: list[Path]) -> list[float]:
    """The losses a --serve process prints for the checkpoints, one line each, from one process."""
    done = subprocess.run([*map(str, command)], input="".join(f"{c}\n" for c in checkpoints), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == len(checkpoints)
    return [float(line) for line in lines]


@pytest.mark.slow
def test_causal_lm_serve_gives_the_one_shot_loss_of_each_checkpoint(causal_checkpoint, tmp_path):
    text = tmp_path / "valid.txt"
    text.write_text("the quick brown fox jumps over the lazy dog.\n" * 3)
    later = perturbed_copy(causal_checkpoint, tmp_path / "later", transformers.GPT2LMHeadModel, 1)
    checkpoints = [causal_checkpoint, later, causal_checkpoint]
    served = served_losses([script("farcast-eval-causal-lm"), "--serve", "--text", text, "--context", 20], checkpoints)
    one_shot = [run_script(script("farcast-eval-causal-lm"), c, "--text", text, "--context", 20) for c in checkpoints[:2]]
    assert served == pytest.approx([*one_shot, one_shot[0]], abs=1e-6) and served[0] != served[1]


@pytest.mark.slow
def test_seq_cls_serve_gives_the_one_shot_loss_and_refuses_another_model(tmp_path, causal_checkpoint):
    folder = tmp_path / "bert"
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(CHARACTERS) + 2, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=3
    )
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    character_tokenizer().save_pretrained(folder)
    table = tmp_path / "valid.csv"
    table.write_text("text,label\na cat sat,0\nthe dog ran far,1\nbirds,2\n")
    later = perturbed_copy(folder, tmp_path / "later", transformers.BertForSequenceClassification, 2)
    command = [script("farcast-eval-seq-cls"), "--serve", "--csv", table, "--batch", 2]
    served = served_losses(command, [folder, later])
    one_shot = [run_script(script("farcast-eval-seq-cls"), c, "--csv", table, "--batch", 2) for c in (folder, later)]
    assert served == pytest.approx(one_shot, abs=1e-6) and served[0] != served[1]
    wrong = subprocess.run([*map(str, command)], input=f"{folder}\n{causal_checkpoint}\n", capture_output=True, text=True, timeout=300)
    assert wrong.returncode != 0 and len(wrong.stdout.splitlines()) == 1 and "is not in the model loaded first" in wrong.stderr

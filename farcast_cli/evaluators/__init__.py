"""Eval commands for Hugging Face models, for `--eval-cmd` (the `hf` extra: pip install 'farcast-cli[hf]').

Each follows farcast's eval protocol: one checkpoint folder in, the loss printed as the last number on
stdout. The model and its tokenizer are loaded from the checkpoint folder itself (farcast copies config
and tokenizer files into every output), or the tokenizer from --tokenizer.

    farcast-eval-causal-lm CHECKPOINT --text valid.txt          # mean loss per predicted token
    farcast-eval-seq-cls CHECKPOINT --csv valid.csv             # mean cross-entropy over the rows
"""

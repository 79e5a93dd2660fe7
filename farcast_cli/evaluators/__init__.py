"""Eval commands for Hugging Face models, for `--eval-cmd` and `--eval-server` (the `hf` extra: pip install 'farcast-cli[hf]').

Each follows farcast's eval protocol: one checkpoint folder in, the loss printed as the last number on
stdout. The model and its tokenizer are loaded from the checkpoint folder itself (farcast copies config
and tokenizer files into every output), or the tokenizer from --tokenizer.

    farcast-eval-causal-lm CHECKPOINT --text valid.txt          # mean loss per predicted token
    farcast-eval-seq-cls CHECKPOINT --csv valid.csv             # mean cross-entropy over the rows

With --serve instead of a checkpoint, each speaks farcast's server protocol (`--eval-server`): the
first checkpoint path read on stdin loads the model, tokenizer and data; each later one's tensors are
copied into that model, and each loss is printed on a line of its own.
"""

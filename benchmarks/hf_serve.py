"""The Hugging Face evaluator as a server against one process per checkpoint, on a GPT-2 Trainer run.

    python benchmarks/hf_serve.py [--work /var/tmp/farcast-hf-serve] [--baseline-src DIR] [--jobs 2]

Trains examples/trainer/train.py's config-built 2-layer GPT-2 (byte-level, nothing downloaded) for
--steps steps, a checkpoint every --save-steps, once (kept under --work). A character tokenizer whose
ids are the bytes' values is saved beside it, and the validation text is standard-library source the
run never trained on (ASCII lines only). Then times `farcast predict RUN -H --horizon` with an empty
cache, as whole processes: `--eval-cmd "farcast-eval-causal-lm {checkpoint} ..."` (a Python process
importing torch and transformers per evaluation), `--eval-server "farcast-eval-causal-lm --serve ..."`,
and with --baseline-src an earlier farcast's `--eval-cmd` (its grid of evaluations). Prints wall
seconds, evaluations and the choice of each.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import timed_farcast

ROOT = Path(__file__).resolve().parent.parent
EVAL = str(Path(sys.executable).with_name("farcast-eval-causal-lm"))


def train(run: Path, steps: int, save_steps: int) -> None:
    if any(run.glob(f"checkpoint-{steps}")):
        return
    command = [sys.executable, str(ROOT / "examples" / "trainer" / "train.py"), "--run", str(run), "--stop-at", str(steps)]
    subprocess.run([*command, "--total-steps", str(steps * 2), "--save-steps", str(save_steps)], check=True, capture_output=True)


def byte_tokenizer(folder: Path) -> Path:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({chr(b): b for b in range(1, 128)} | {"[UNK]": 0}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(folder)
    return folder


def validation_text(path: Path, characters: int) -> Path:
    files = sorted(Path(os.__file__).parent.glob("*.py"))[60:80]
    lines = [line for file in files for line in file.read_text(errors="replace").splitlines(keepends=True) if line.isascii()]
    path.write_text("".join(lines)[:characters])
    return path


def predict(run: Path, out: Path, horizon: int, extra: list[str], source: Path | None) -> tuple[float, dict]:
    """farcast predict as a process, from `source` when given (first on the path; `python -m` puts the
    working directory first, so it runs there)."""
    shutil.rmtree(out, ignore_errors=True)
    if source is not None:
        os.environ["PYTHONPATH"] = str(source)
        os.chdir(source)
    try:
        seconds, _, stdout = timed_farcast("predict", run, "-H", horizon, "-o", out, "--quiet", "--json", *extra)
    finally:
        os.environ.pop("PYTHONPATH", None)
        os.chdir(ROOT)
    return seconds, json.loads(stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=lambda text: Path(text).resolve(), default=Path("/var/tmp/farcast-hf-serve"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--save-steps", type=int, default=20)
    parser.add_argument("--horizon", type=int, default=100)
    parser.add_argument("--characters", type=int, default=8000, help="validation text length")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--baseline-src", type=lambda text: Path(text).resolve(), help="a checkout of an earlier farcast (farcast_cli/)")
    args = parser.parse_args()
    run = args.work / "gpt2"
    train(run, args.steps, args.save_steps)
    tokenizer, text = byte_tokenizer(args.work / "tokenizer"), validation_text(args.work / "valid.txt", args.characters)
    data = f"--text {text} --tokenizer {tokenizer} --context 32 --device cpu"
    jobs = ["--eval-jobs", str(args.jobs)]
    ways = {
        "eval command": (["--eval-cmd", f"{EVAL} {{checkpoint}} {data}", *jobs], None),
        "eval server": (["--eval-server", f"{EVAL} --serve {data}", *jobs], None),
    }
    if args.baseline_src:
        ways = {"before (grid, eval command)": (ways["eval command"][0], args.baseline_src), **ways}
    walls = {}
    with tempfile.TemporaryDirectory(prefix="farcast-hf-serve-") as scratch:
        for name, (extra, source) in ways.items():
            os.environ["FARCAST_CACHE_DIR"] = str(Path(scratch) / f"cache-{len(walls)}")
            seconds, report = predict(run, Path(scratch) / "out", args.horizon, extra, source)
            loss, walls[name] = report["loss"], seconds
            chosen = loss["chosen"]
            print(
                f"{name}: {seconds:.1f} s, {loss['evaluations']} evaluations ({loss.get('eval_wall_seconds', 0):.1f} s wall, "
                f"{loss['eval_seconds']:.1f} s summed, {args.jobs} at a time); chose {chosen['method']} (anchor {chosen['anchor']}, "
                f"shrink {chosen['shrink']}), steps saved {report['steps_saved']:+.3f}",
                flush=True,
            )
    first = next(iter(walls))
    for name, seconds in walls.items():
        print(f"{name}: {walls[first] / seconds:.1f}x faster than {first}")


if __name__ == "__main__":
    main()

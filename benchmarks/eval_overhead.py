"""What letting the loss decide costs beyond the eval commands' own time, on the sample run.

    python benchmarks/eval_overhead.py [--repeats 3]

Times `farcast predict sample_checkpoints/digits-mlp -H 300` three ways, as whole processes: without an
eval command; with `--eval-cmd "python sample_checkpoints/eval_digits.py {checkpoint}"` and an empty
cache (every candidate and checkpoint evaluated once, one at a time); and again with the cache filled.
The eval commands' own time is the sum the report gives (loss.eval_seconds). Overhead = (time with the
eval command - time without - the eval commands' time) / the eval commands' time: what writing,
scoring and placing the candidates adds (target: under 25%).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from common import timed_farcast

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "sample_checkpoints" / "digits-mlp"
EVAL = f"{sys.executable} {ROOT / 'sample_checkpoints' / 'eval_digits.py'} {{checkpoint}}"


def predict(out: Path, *extra: str) -> tuple[float, dict]:
    shutil.rmtree(out, ignore_errors=True)
    seconds, _, stdout = timed_farcast("predict", RUN, "-H", 300, "-o", out, "--quiet", "--json", *extra)
    return seconds, json.loads(stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="farcast-overhead-") as scratch:
        work = Path(scratch)
        for repeat in range(args.repeats):
            cache = work / f"cache-{repeat}"
            plain, _ = predict(work / "out")
            extra = ["--eval-cmd", EVAL, "--eval-jobs", str(args.jobs)]
            os.environ["FARCAST_CACHE_DIR"] = str(cache)
            cold, report = predict(work / "out", *extra)
            warm, again = predict(work / "out", *extra)
            del os.environ["FARCAST_CACHE_DIR"]
            evals = report["loss"]["eval_seconds"]
            count = report["loss"]["evaluations"]
            overhead = (cold - plain - evals / args.jobs) / (evals / args.jobs)
            rows.append((plain, cold, warm, evals, count, overhead, again["loss"]["cache_hits"]))
            print(
                f"repeat {repeat}: without eval {plain:.1f} s; with eval {cold:.1f} s ({count} evaluations, {evals:.1f} s in the eval "
                f"command, {args.jobs} at a time), overhead {overhead:+.0%}; again with the cache {warm:.1f} s "
                f"({again['loss']['cache_hits']} from the cache)",
                flush=True,
            )
    best = min(rows, key=lambda r: r[5])
    print(f"\nbest of {args.repeats}: overhead {best[5]:+.0%} of the eval commands' {best[3]:.1f} s; median "
          f"{sorted(r[5] for r in rows)[len(rows) // 2]:+.0%}")  # fmt: skip


if __name__ == "__main__":
    main()

"""What letting the loss decide costs, on the sample run: the eval command against the eval server.

    python benchmarks/eval_overhead.py [--repeats 1] [--jobs 2] [--baseline-src DIR]

Times README's main command, `farcast predict sample_checkpoints/digits-mlp -H 300`, as whole processes,
each with an empty cache: without a loss; with `--eval-cmd "python sample_checkpoints/eval_digits.py
{checkpoint}"` (a Python process per evaluation); with `--eval-server "python
sample_checkpoints/eval_digits.py --serve"` (one per job, kept); and, with --baseline-src (a checkout
of an earlier farcast, e.g. `git archive 6f2846a | tar -x -C DIR`), that farcast's `--eval-cmd`, run
from DIR with its own eval script: the grid it evaluated before the search. Then again with the cache
filled. For each: wall seconds, evaluations (loss.evaluations), the evaluations' wall seconds and
summed seconds (loss.eval_wall_seconds, loss.eval_seconds), and farcast's own time beyond the
evaluations, as a share of their summed seconds, measured two ways: from outside, (wall - plain -
evaluations' wall), a difference of two processes' times, so it carries their noise; and from
inside, the time of the loss decision (the report's seconds.loss_backtest, with the search's trial
fits, scratch writes, waits between rounds and the final fit, and seconds.eval_written) during which
no evaluation ran.
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


def predict(out: Path, *extra: str, source: Path = ROOT) -> tuple[float, dict]:
    shutil.rmtree(out, ignore_errors=True)
    run = source / "sample_checkpoints" / "digits-mlp"
    seconds, _, stdout = timed_farcast("predict", run, "-H", 300, "-o", out, "--quiet", "--json", *extra)
    return seconds, json.loads(stdout)


def ways(jobs: int, baseline: Path | None) -> dict[str, tuple[Path, list[str]]]:
    script = lambda source: f"{sys.executable} {source / 'sample_checkpoints' / 'eval_digits.py'}"  # noqa: E731
    found = {
        "eval command": (ROOT, ["--eval-cmd", f"{script(ROOT)} {{checkpoint}}", "--eval-jobs", str(jobs)]),
        "eval server": (ROOT, ["--eval-server", f"{script(ROOT)} --serve", "--eval-jobs", str(jobs)]),
    }
    if baseline is not None:
        before = ["--eval-cmd", f"{script(baseline)} {{checkpoint}}", "--eval-jobs", str(jobs)]
        found = {"before (grid, eval command)": (baseline, before), **found}
    return found


def run_from(source: Path) -> None:
    """Run farcast (and its eval scripts) from `source`: its package comes first on the path (`python -m`
    puts the working directory first, so it moves there too)."""
    os.chdir(source)
    if source == ROOT:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = str(source)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument(
        "--baseline-src", type=lambda text: Path(text).resolve(), help="an earlier farcast (farcast_cli/, sample_checkpoints/)"
    )
    args = parser.parse_args()
    rows: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="farcast-overhead-") as scratch:
        work = Path(scratch)
        for repeat in range(args.repeats):
            run_from(ROOT)
            plain, _ = predict(work / "out")
            print(f"repeat {repeat}: without a loss {plain:.1f} s", flush=True)
            for name, (source, extra) in ways(args.jobs, args.baseline_src).items():
                run_from(source)
                os.environ["FARCAST_CACHE_DIR"] = str(work / f"cache-{repeat}-{len(rows)}-{name.replace(' ', '-')}")
                cold, report = predict(work / "out", *extra, source=source)
                warm, again = predict(work / "out", *extra, source=source)
                del os.environ["FARCAST_CACHE_DIR"]
                loss = report["loss"]
                summed, count = loss["eval_seconds"], loss["evaluations"]
                evals_wall = loss.get("eval_wall_seconds", summed / args.jobs)
                own = (cold - plain - evals_wall) / summed
                phases = report.get("seconds", {})
                inside = phases.get("loss_backtest", 0.0) + phases.get("eval_written", 0.0) - evals_wall
                row = {
                    "wall": cold,
                    "evaluations": count,
                    "eval_wall": evals_wall,
                    "eval_summed": summed,
                    "own": own,
                    "own_inside": inside / summed,
                    "warm": warm,
                    "hits": again["loss"]["cache_hits"],
                    "chosen": loss["chosen"],
                    "steps_saved": report["steps_saved"],
                }
                rows.setdefault(name, []).append(row)
                print(
                    f"  {name}: {cold:.1f} s, {count} evaluations ({evals_wall:.1f} s wall, {summed:.1f} s summed, {args.jobs} at a time), "
                    f"farcast's own time beyond them and a plain predict {own:+.1%} of theirs, inside the loss decision "
                    f"{inside:.3f} s ({inside / summed:+.1%}); chose {loss['chosen']['method']} "
                    f"(anchor {loss['chosen']['anchor']}, shrink {loss['chosen']['shrink']}), steps saved {report['steps_saved']:+.3f}; "
                    f"again with the cache {warm:.1f} s ({again['loss']['cache_hits']} from the cache)",
                    flush=True,
                )
    run_from(ROOT)
    median = lambda name, key: sorted(r[key] for r in rows[name])[len(rows[name]) // 2]  # noqa: E731
    reference = "before (grid, eval command)" if args.baseline_src else "eval command"
    print(f"\nmedian of {args.repeats}, wall time against {reference}:")
    for name in rows:
        wall = median(name, "wall")
        print(
            f"  {name}: {wall:.1f} s ({wall / median(reference, 'wall'):.2f}x), {median(name, 'evaluations')} evaluations, "
            f"farcast's own time {median(name, 'own'):+.1%} of the evaluations' summed seconds from outside, "
            f"{median(name, 'own_inside'):+.1%} inside the loss decision"
        )


if __name__ == "__main__":
    main()

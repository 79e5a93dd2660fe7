"""Peak memory of predict and fit, and fit time, against model size.

    python benchmarks/memory_and_scaling.py --work /var/tmp/farcast-bench [--sizes 0.5,2,8]

Runs of 4 f32 checkpoints totalling 0.5, 2 and 8 GB. For each: peak resident memory (the process's
own, from wait4) of `predict` (full backtest) and `fit --backtest sample`, with the default
--max-memory of 1 GiB and with 256MB; fit's time split into reading the sample and fitting.
Targets: peak flat across sizes (within 10%) and under --max-memory + 400 MB; fit time flat except
for the reads.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from common import make_run_elsewhere, timed_farcast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/farcast-bench"))
    parser.add_argument("--sizes", default="0.5,2,8")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--fit-only", action="store_true", help="only `fit`, at the default --max-memory (fit time on a big run)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in [float(s) for s in args.sizes.split(",")]:
        run = make_run_elsewhere(args.work / f"scale-{size:g}GB", 4, size * 1e9 / 4, "float32")
        for max_memory in ("1GiB",) if args.fit_only else ("1GiB", "256MB"):
            out, forecaster = args.work / "scale-out", args.work / "scale-forecaster.json"
            shutil.rmtree(out, ignore_errors=True)
            predict_s, predict_mb = 0.0, 0.0
            if not args.fit_only:
                predict_s, predict_mb, _ = timed_farcast(
                    "predict", run, "-H", 100, "-o", out, "--max-memory", max_memory, "--device", "cpu", "--quiet", "--json"
                )
            fit_s, fit_mb, stdout = timed_farcast(
                "fit", run, "-H", 100, "-o", forecaster, "--force", "--backtest", "sample", "--max-memory", max_memory, "--quiet", "--json"
            )
            seconds, fit_info = json.loads(stdout)["seconds"], json.loads(stdout)["forecaster"]["fit"]
            shutil.rmtree(out, ignore_errors=True)
            row = {
                "run_gb": size,
                "max_memory": max_memory,
                "predict_seconds": predict_s,
                "predict_peak_mb": predict_mb,
                "fit_seconds": fit_s,
                "fit_peak_mb": fit_mb,
                "fit_read_sample_seconds": seconds["read_sample"],
                "fit_fit_seconds": seconds["fit"],
                "fit_backtest_seconds": seconds["backtest"],
                "fit_stopped": fit_info["stopped"],
                "fit_updates": fit_info["updates"],
            }
            rows.append(row)
            print(
                f"run {size:4g} GB, --max-memory {max_memory:5s}: predict {predict_s:6.1f} s, peak {predict_mb:5.0f} MB | "
                f"fit {fit_s:5.1f} s (sample read {seconds['read_sample']:.2f} s, fitting {seconds['fit']:.2f} s, "
                f"sample backtest {seconds['backtest']:.2f} s), peak {fit_mb:5.0f} MB; shared fit {fit_info['stopped']} "
                f"after {fit_info['updates']} updates",
                flush=True,
            )
    for max_memory in () if args.fit_only else ("1GiB", "256MB"):
        peaks = [r["predict_peak_mb"] for r in rows if r["max_memory"] == max_memory]
        print(f"--max-memory {max_memory}: predict peak max/min across sizes = {max(peaks) / min(peaks):.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

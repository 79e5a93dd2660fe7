"""predict's wall time against the raw cost of the same file I/O, on a generated run of >= 4 GB.

    python benchmarks/throughput.py --work /var/tmp/farcast-bench [--device cpu]

For each dtype (f32, bf16): a 4-checkpoint run of about 1 GB per checkpoint (4 GB in all for f32),
the page cache warmed, then (1) plain reads of the two checkpoints predict streams plus a plain
fsynced write of the output's size, (2) `farcast predict --backtest sample`, (3) `farcast predict`
with the full backtest, whose raw baseline also reads the checkpoints the backtest reads. Prints
the best of 4 timings each (page-cache writeback makes single timings vary up to 3x here):
seconds, GB/s and the ratio predict / raw I/O (target: at most 1.25), both for the whole process
(Python and torch start-up, sampling and fitting included) and for the streaming phases alone
(writing the forecast, plus the fit and full backtest where there is one: the fits take about 0.15 s
of it), from the report's `seconds`.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from common import make_run_elsewhere, python_startup_seconds, raw_io_seconds, timed_farcast, warm_cache

REPEATS = 4


def measure(run: Path, work: Path, device: str, backtest: str) -> dict:
    files = sorted(run.glob("checkpoint-*/model.safetensors"), key=lambda p: int(p.parent.name.split("-")[1]))
    streamed = [files[0], files[-1]] if backtest == "sample" else [files[0], files[-1], files[0], files[1], files[2], files[3]]
    out_bytes = files[-1].stat().st_size
    warm_cache(files)
    raw = min(raw_io_seconds(streamed, out_bytes, work / "raw.bin") for _ in range(REPEATS))
    out = work / "forecast"
    seconds, streaming = [], []
    for _ in range(REPEATS):
        shutil.rmtree(out, ignore_errors=True)
        elapsed, peak_mb, stdout = timed_farcast(
            "predict", run, "-H", 100, "-o", out, "--backtest", backtest, "--device", device, "--quiet", "--json"
        )
        phases = json.loads(stdout)["seconds"]
        seconds.append(elapsed)
        streaming.append(phases["write_forecast"] + (phases["fit"] + phases["backtest"] if backtest == "full" else 0.0))
    shutil.rmtree(out, ignore_errors=True)
    moved = sum(p.stat().st_size for p in streamed) + out_bytes
    return {
        "backtest": backtest,
        "bytes_moved": moved,
        "raw_seconds": raw,
        "farcast_seconds": min(seconds),
        "peak_mb": peak_mb,
        "raw_gb_s": moved / raw / 1e9,
        "farcast_gb_s": moved / min(seconds) / 1e9,
        "ratio": min(seconds) / raw,
        "streaming_seconds": min(streaming),
        "streaming_ratio": min(streaming) / raw,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/farcast-bench"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--gb-per-checkpoint", type=float, default=1.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    startup = python_startup_seconds()
    print(f"python + torch start-up: {startup:.2f} s (inside every farcast time below)")
    results = []
    for name, dtype in (("f32", "float32"), ("bf16", "bfloat16")):
        run = make_run_elsewhere(args.work / f"run-{name}", 4, args.gb_per_checkpoint * 1e9, dtype)
        total = sum(p.stat().st_size for p in run.glob("checkpoint-*/model.safetensors"))
        for backtest in ("sample", "full"):
            row = {"dtype": name, "run_gb": total / 1e9, "device": args.device, **measure(run, args.work, args.device, backtest)}
            results.append(row)
            print(
                f"{name:4s} run {row['run_gb']:.1f} GB, backtest {backtest:6s}: "
                f"raw I/O {row['raw_seconds']:.2f} s ({row['raw_gb_s']:.2f} GB/s), "
                f"farcast {row['farcast_seconds']:.2f} s ({row['farcast_gb_s']:.2f} GB/s), ratio {row['ratio']:.2f}; "
                f"streaming phases {row['streaming_seconds']:.2f} s, ratio {row['streaming_ratio']:.2f}; peak {row['peak_mb']:.0f} MB",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps({"startup_seconds": startup, "results": results}, indent=1))


if __name__ == "__main__":
    main()

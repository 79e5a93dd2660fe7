"""predict's wall time against the raw cost of the same file I/O, on a generated run of >= 4 GB.

    python benchmarks/throughput.py --work /var/tmp/farcast-bench [--device cpu]

For each dtype (f32, bf16): a 4-checkpoint run of about 1 GB per checkpoint (4 GB in all for f32),
the page cache warmed, then (1) plain reads of the two checkpoints predict streams plus a plain
fsynced write of the output's size, (2) `farcast predict --backtest sample`, (3) `farcast predict`
with the full backtest, whose raw baseline also reads the checkpoints the backtest reads. The raw
I/O and predict are timed in turns (raw, predict, raw, predict, ...; 4 of each, --repeats). Prints
the best of each (page-cache writeback makes single timings vary up to 3x here): seconds, GB/s and
the ratio best predict / best raw I/O, both for the whole process (Python and torch start-up,
sampling and fitting included) and for the streaming phases alone (writing the forecast, plus the fit
and full backtest where there is one), from the report's `seconds`; then the median and range of the
paired ratios, each predict over the raw I/O timed just before it, which the raw baseline's drift
between minutes (1.43-1.96 s for one and the same bf16 row) moves far less than best over best.

    python benchmarks/throughput.py --format dcp --dtypes f32 [--gb-per-checkpoint 1]

The same with the run saved by torch.distributed.checkpoint.save (accelerate's FSDP layout, one
.distcp file a checkpoint), the raw I/O being plain reads of the same .distcp bytes; then the path a
user takes without DCP support, side by side: each checkpoint consolidated by `dcp_to_torch_save`,
loaded and saved as safetensors (one process for all, as a conversion script would), then
`farcast predict` on the converted run; time and peak memory of each.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

from common import make_run_elsewhere, python_startup_seconds, raw_io_seconds, timed_command, timed_farcast, warm_cache

REPEATS = 4


def measure(run: Path, work: Path, device: str, backtest: str, repeats: int = REPEATS) -> dict:
    """Raw I/O and predict timed in turns (raw, predict, raw, predict, ...), so that each predict has a
    raw baseline taken under the same page-cache and writeback conditions a few seconds before it; the
    forecast is deleted as soon as it is timed, so that both start with no output on disk."""
    files = data_files(run)
    streamed = [files[0], files[-1]] if backtest == "sample" else [files[0], files[-1], files[0], files[1], files[2], files[3]]
    out_bytes = files[-1].stat().st_size
    warm_cache(files)
    out = work / "forecast"
    raws, seconds, streaming, peaks = [], [], [], []
    shutil.rmtree(out, ignore_errors=True)
    for _ in range(repeats):
        raws.append(raw_io_seconds(streamed, out_bytes, work / "raw.bin"))
        elapsed, peak_mb, stdout = timed_farcast(
            "predict", run, "-H", 100, "-o", out, "--backtest", backtest, "--device", device, "--quiet", "--json"
        )
        shutil.rmtree(out)
        phases = json.loads(stdout)["seconds"]
        seconds.append(elapsed)
        peaks.append(peak_mb)
        streaming.append(phases["write_forecast"] + (phases["fit"] + phases["backtest"] if backtest == "full" else 0.0))
    moved = sum(p.stat().st_size for p in streamed) + out_bytes
    raw = min(raws)
    return {
        "backtest": backtest,
        "bytes_moved": moved,
        "raw_seconds": raw,
        "raw_all": raws,
        "farcast_seconds": min(seconds),
        "farcast_all": seconds,
        "peak_mb": max(peaks),
        "raw_gb_s": moved / raw / 1e9,
        "farcast_gb_s": moved / min(seconds) / 1e9,
        "ratio": min(seconds) / raw,
        "streaming_seconds": min(streaming),
        "streaming_all": streaming,
        "streaming_ratio": min(streaming) / raw,
        "paired_ratios": paired(seconds, raws),
        "paired_streaming_ratios": paired(streaming, raws),
    }


def paired(timings: list[float], raws: list[float]) -> dict:
    """Each timing over the raw I/O measured just before it: median, least and most."""
    ratios = sorted(t / r for t, r in zip(timings, raws, strict=True))
    return {"median": statistics.median(ratios), "min": ratios[0], "max": ratios[-1]}


def data_files(run: Path) -> list[Path]:
    """Each checkpoint's data file, by step: model.safetensors, or the .distcp of a one-process DCP save."""
    found = list(run.glob("checkpoint-*/model.safetensors")) or list(run.glob("checkpoint-*/pytorch_model_fsdp_0/*.distcp"))
    return sorted(found, key=lambda p: int(next(q for q in p.parents if q.name.startswith("checkpoint-")).name.split("-")[1]))


CONSOLIDATE = """
import sys, torch
from pathlib import Path
from safetensors.torch import save_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
run, out = Path(sys.argv[1]), Path(sys.argv[2])
for folder in sorted(run.glob("checkpoint-*")):
    (out / folder.name).mkdir(parents=True)
    dcp_to_torch_save(folder / "pytorch_model_fsdp_0", out / "model.pt")
    state = torch.load(out / "model.pt", weights_only=True)["model"]
    save_file(state, out / folder.name / "model.safetensors", metadata={"format": "pt"})
    (out / "model.pt").unlink()
    del state
"""


def consolidation_path(run: Path, work: Path, device: str) -> dict:
    """dcp_to_torch_save and a safetensors save of every checkpoint, then farcast predict on the result."""
    converted = work / "consolidated"
    shutil.rmtree(converted, ignore_errors=True)
    warm_cache(data_files(run))
    convert_seconds, convert_peak, _ = timed_command([sys.executable, "-c", CONSOLIDATE, str(run), str(converted)])
    out = work / "forecast"
    shutil.rmtree(out, ignore_errors=True)
    predict_seconds, predict_peak, _ = timed_farcast(
        "predict", converted, "-H", 100, "-o", out, "--backtest", "sample", "--device", device, "--quiet", "--json"
    )
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(converted, ignore_errors=True)
    return {
        "convert_seconds": convert_seconds,
        "convert_peak_mb": convert_peak,
        "predict_seconds": predict_seconds,
        "predict_peak_mb": predict_peak,
    }


def _spread(ratios: dict) -> str:
    return f"{ratios['median']:.2f} [{ratios['min']:.2f}-{ratios['max']:.2f}]"


def _seconds(timings: list[float]) -> str:
    return "/".join(f"{t:.2f}" for t in timings) + " s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/farcast-bench"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--gb-per-checkpoint", type=float, default=1.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--format", choices=["safetensors", "dcp"], default="safetensors")
    parser.add_argument("--dtypes", default="f32,bf16")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="timings of each row, the best is kept")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    startup = python_startup_seconds()
    print(f"python + torch start-up: {startup:.2f} s (inside every farcast time below)")
    results = []
    dtypes = {"f32": "float32", "bf16": "bfloat16"}
    for name in args.dtypes.split(","):
        maker = "make_dcp_run" if args.format == "dcp" else "make_run"
        run = make_run_elsewhere(args.work / f"run-{args.format}-{name}", 4, args.gb_per_checkpoint * 1e9, dtypes[name], maker)
        total = sum(p.stat().st_size for p in data_files(run))
        for backtest in ("sample", "full"):
            timings = measure(run, args.work, args.device, backtest, args.repeats)
            row = {"dtype": name, "run_gb": total / 1e9, "device": args.device, **timings}
            results.append(row)
            print(
                f"{name:4s} run {row['run_gb']:.1f} GB, backtest {backtest:6s}: "
                f"raw I/O {row['raw_seconds']:.2f} s ({row['raw_gb_s']:.2f} GB/s), "
                f"farcast {row['farcast_seconds']:.2f} s ({row['farcast_gb_s']:.2f} GB/s), ratio {row['ratio']:.2f}; "
                f"streaming phases {row['streaming_seconds']:.2f} s, ratio {row['streaming_ratio']:.2f}; peak {row['peak_mb']:.0f} MB",
                flush=True,
            )
            print(
                f"{'':4s} paired (each predict over the raw I/O just before it), median [range]: "
                f"whole {_spread(row['paired_ratios'])}, streaming {_spread(row['paired_streaming_ratios'])}; "
                f"raw I/O {_seconds(row['raw_all'])}, streaming {_seconds(row['streaming_all'])}",
                flush=True,
            )
        if args.format == "dcp":
            row = {"dtype": name, "run_gb": total / 1e9, "consolidation": consolidation_path(run, args.work, args.device)}
            results.append(row)
            c = row["consolidation"]
            print(
                f"{name:4s} run {row['run_gb']:.1f} GB, consolidating first: dcp_to_torch_save + safetensors "
                f"{c['convert_seconds']:.1f} s (peak {c['convert_peak_mb']:.0f} MB), "
                f"then predict --backtest sample {c['predict_seconds']:.2f} s (peak {c['predict_peak_mb']:.0f} MB)",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps({"startup_seconds": startup, "results": results}, indent=1))


if __name__ == "__main__":
    main()

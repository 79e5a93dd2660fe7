"""farcast predict under torchrun: wall time and bytes read per rank for 1, 2 and 4 processes.

    python benchmarks/distributed.py --work /var/tmp/farcast-bench [--ranks 1 2 4] [--device cpu]
        [--gb-per-checkpoint 1] [--dominant 0.8] [--format safetensors|dcp]

On a generated 4-checkpoint run of about 1 GB per checkpoint (f32, 16M-element tensors, the run
throughput.py uses; with --dominant F, one `embed.weight` holding F of the bytes and four equal
tensors the rest; with --format dcp, saved by torch.distributed.checkpoint.save as accelerate saves
an FSDP model), page cache warmed: `farcast predict RUN -H 100` (full backtest, the default) as
one plain process, then under `torchrun --standalone --nproc-per-node N`. Each rank runs through
this file (`--as-rank`), which records the rank's /proc/self/io when it exits: `rchar` (bytes its
read calls returned, from the page cache or the disk) less what start-up alone reads (`farcast
--version` through the same wrapper), and `read_bytes` (what reached the block device: near 0 with a
warm cache). Prints the best of REPEATS wall times for each N, rank 0's phase seconds from the report,
each rank's bytes read, and the busiest rank's share of what one process reads; checks that every
output file is byte for byte the one-process output.
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import json
import os
import runpy
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPEATS = 3
IO_FOLDER = "FARCAST_BENCH_IO_FOLDER"


def record_io_at_exit() -> None:
    """In a rank: write /proc/self/io to IO_FOLDER/rank-<RANK>.json when the process exits."""
    folder = Path(os.environ[IO_FOLDER])

    def dump() -> None:
        fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
        (folder / f"rank-{os.environ.get('RANK', '0')}.json").write_text(json.dumps({k: int(v) for k, v in fields.items()}))

    atexit.register(dump)


def as_rank(args: list[str]) -> None:
    record_io_at_exit()
    sys.argv = ["farcast", *args]
    runpy.run_module("farcast_cli", run_name="__main__")


def launch(ranks: int, args: list[object], io_folder: Path, device: str) -> tuple[float, str]:
    """Wall seconds and stdout of farcast with ARGS on RANKS processes (a plain process for 1)."""
    me = [str(Path(__file__).resolve()), "--as-rank"]
    if ranks == 1:
        command = [sys.executable, *me]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), *me]
    env = {**os.environ, IO_FOLDER: str(io_folder), "FARCAST_DIST_TIMEOUT": "600"}
    if ranks > 1:
        env.setdefault("OMP_NUM_THREADS", "1")
    shutil.rmtree(io_folder, ignore_errors=True)
    io_folder.mkdir(parents=True)
    started = time.perf_counter()
    done = subprocess.run([*command, *map(str, args), "--device", device], capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}): {done.stderr[-3000:]}")
    return elapsed, done.stdout


def per_rank_io(io_folder: Path, ranks: int) -> list[dict]:
    return [json.loads((io_folder / f"rank-{rank}.json").read_text()) for rank in range(ranks)]


def startup_rchar(io_folder: Path) -> int:
    """Bytes start-up alone reads (Python files, torch's libraries read by read calls)."""
    shutil.rmtree(io_folder, ignore_errors=True)
    io_folder.mkdir(parents=True)
    env = {**os.environ, IO_FOLDER: str(io_folder)}
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--as-rank", "--version"], check=True, capture_output=True, env=env)
    return per_rank_io(io_folder, 1)[0]["rchar"]


def output_files(folder: Path) -> dict[str, str]:
    """Each output file's sha256 (the report, whose seconds differ, left out)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "farcast_report.json"
    }


def measure(run: Path, work: Path, ranks: int, device: str, baseline_rchar: int, reference: dict[str, str] | None) -> dict:
    out, io_folder = work / f"forecast-{ranks}", work / f"io-{ranks}"
    best = None
    for _ in range(REPEATS):
        shutil.rmtree(out, ignore_errors=True)
        elapsed, stdout = launch(ranks, ["predict", run, "-H", 100, "-o", out, "--quiet", "--json"], io_folder, device)
        if best is None or elapsed < best["seconds"]:
            io = per_rank_io(io_folder, ranks)
            best = {
                "ranks": ranks,
                "seconds": elapsed,
                "phases": json.loads(stdout)["seconds"],
                "read_gb": [(rank["rchar"] - baseline_rchar) / 1e9 for rank in io],
                "disk_read_gb": [rank["read_bytes"] / 1e9 for rank in io],
                "written_gb": [rank["wchar"] / 1e9 for rank in io],
            }
    files = output_files(out)
    best["identical_to_one_process"] = reference is None or files == reference
    best["files"] = files
    return best


def make_dominated_run(folder: Path, checkpoints: int, bytes_per_checkpoint: float, dominant: float, format: str) -> Path:
    """A run whose `embed.weight` holds `dominant` of each checkpoint's f32 bytes, four equal tensors
    the rest, drifting linearly; safetensors (Trainer layout) or DCP (checkpoint-N/pytorch_model_fsdp_0/)."""
    import warnings

    import torch
    from safetensors.torch import save_file

    if folder.exists():
        return folder
    elements = bytes_per_checkpoint / 4
    sizes = {"embed.weight": int(elements * dominant), **{f"layers.{i}.weight": int(elements * (1 - dominant) / 4) for i in range(4)}}
    generator = torch.Generator().manual_seed(0)
    bases = {name: torch.randn(size, generator=generator) * 0.02 for name, size in sizes.items()}
    drifts = {name: torch.randn(size, generator=generator) * 1e-4 for name, size in sizes.items()}
    for k in range(checkpoints):
        step = (k + 1) * 100
        tensors = {name: bases[name] + drifts[name] * (k + 1) for name in sizes}
        if format == "dcp":
            import torch.distributed.checkpoint as dcp

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dcp.save({"model": tensors}, checkpoint_id=folder / f"checkpoint-{step}" / "pytorch_model_fsdp_0")
        else:
            (folder / f"checkpoint-{step}").mkdir(parents=True)
            save_file(tensors, folder / f"checkpoint-{step}" / "model.safetensors", metadata={"format": "pt"})
    return folder


def make_run(work: Path, gb: float, dominant: float | None, format: str) -> tuple[Path, list[Path]]:
    """The run (made in a child process, to keep this one small) and its tensor files."""
    sys.path.insert(0, str(Path(__file__).parent))
    from common import make_run_elsewhere

    if dominant is None:
        maker = "make_dcp_run" if format == "dcp" else "make_run"
        name = f"run-{'dcp-' if format == 'dcp' else ''}f32" + ("" if gb == 1.0 else f"-{gb:g}")
        run = make_run_elsewhere(work / name, 4, gb * 1e9, "float32", maker)
    else:
        run = work / f"run-{format}-f32-{gb:g}gb-dominant-{dominant:g}"
        made = f"distributed.make_dominated_run(pathlib.Path({str(run)!r}), 4, {gb * 1e9}, {dominant}, {format!r})"
        code = f"import distributed, pathlib; {made}"
        subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent)
    files = sorted(run.glob("checkpoint-*/model.safetensors")) + sorted(run.glob("checkpoint-*/pytorch_model_fsdp_0/*.distcp"))
    return run, files


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--as-rank":
        as_rank(sys.argv[2:])
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from common import warm_cache

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/farcast-bench"))
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--gb-per-checkpoint", type=float, default=1.0)
    parser.add_argument("--dominant", type=float, help="the fraction of each checkpoint's bytes in one tensor")
    parser.add_argument("--format", choices=["safetensors", "dcp"], default="safetensors")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    run, files = make_run(args.work, args.gb_per_checkpoint, args.dominant, args.format)
    print(f"run: {run}, {sum(p.stat().st_size for p in files) / 1e9:.1f} GB in {len(files)} files; {os.cpu_count()} CPUs; "
          f"device {args.device}")  # fmt: skip
    baseline = startup_rchar(args.work / "io-startup")
    print(f"start-up alone reads {baseline / 1e6:.0f} MB (rchar), subtracted below")
    rows, reference = [], None
    for ranks in args.ranks:
        warm_cache(files)
        row = measure(run, args.work, ranks, args.device, baseline, reference)
        reference = reference or row.pop("files")
        row.pop("files", None)
        rows.append(row)
        one = rows[0]["read_gb"][0] if rows[0]["ranks"] == 1 else None
        busiest = max(row["read_gb"])
        phases = ", ".join(f"{k} {v:.2f}" for k, v in row["phases"].items())
        print(
            f"{ranks} rank(s): {row['seconds']:.2f} s wall (best of {REPEATS}); rank 0's phases: {phases}; "
            f"read per rank {', '.join(f'{g:.2f}' for g in row['read_gb'])} GB"
            + (f" (busiest {busiest / one:.2f} of one process)" if one else "")
            + f"; from disk {sum(row['disk_read_gb']):.2f} GB; written per rank {', '.join(f'{g:.2f}' for g in row['written_gb'])} GB; "
            f"output identical to one process: {row['identical_to_one_process']}"
        )
    for ranks in args.ranks:
        shutil.rmtree(args.work / f"forecast-{ranks}", ignore_errors=True)
        shutil.rmtree(args.work / f"io-{ranks}", ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

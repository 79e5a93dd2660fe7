"""How long finding a DCP run takes, against the number of chunks its checkpoints hold.

    python benchmarks/dcp_discovery.py --work /var/tmp/farcast-bench [--checkpoints 20] [--tensors 2320]

A run of CHECKPOINTS DCP checkpoints, each of TENSORS small f32 tensors saved by dcp.save from one
process (one chunk per tensor: 8 ranks x 290 tensors of a 7B model make 2320 chunks a checkpoint),
then `find_run` in a fresh process (best of 3, page cache warm), and `farcast inspect` wall time.

    python benchmarks/dcp_discovery.py --run RUN

The DCP-specific costs of reading RUN, each in a fresh process (best of 3): unpickling every
checkpoint's `.metadata`, finding the run (metadata, file sizes, tiling checks), and opening every
chunk's archive with torch.load to the meta device to locate its data (what predict does lazily, on
each chunk's first read).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPEATS = 3


def make_run(folder: Path, checkpoints: int, tensors: int) -> Path:
    import torch
    import torch.distributed.checkpoint as dcp

    if folder.exists():
        return folder
    generator = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.weight": torch.randn(64, generator=generator) for i in range(tensors)}
    for k in range(checkpoints):
        state = {name: value + 0.01 * k for name, value in base.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save({"model": state}, checkpoint_id=folder / f"checkpoint-{(k + 1) * 10}" / "pytorch_model_fsdp_0")
    return folder


FIND = """
import sys, time, pathlib
started = time.perf_counter()
from farcast_cli.io.run import find_run
imported = time.perf_counter()
run = find_run(pathlib.Path(sys.argv[1]))
done = time.perf_counter()
chunks = sum(len(t.chunks) for c in run.checkpoints for t in c.dcp.tensors.values())
print(done - imported, chunks)
"""


PARTS = """
import sys, time, pathlib
from farcast_cli.io.dcp import load_metadata
from farcast_cli.io.run import find_run
run = find_run(pathlib.Path(sys.argv[1]))
started = time.perf_counter()
for checkpoint in run.checkpoints:
    load_metadata(checkpoint.dcp.path)
unpickled = time.perf_counter()
run = find_run(pathlib.Path(sys.argv[1]))
found = time.perf_counter()
chunks = [chunk for c in run.checkpoints for t in c.dcp.tensors.values() for chunk in t.chunks]
for chunk in chunks:
    chunk.begin
located = time.perf_counter()
print(unpickled - started, found - unpickled, located - found, len(chunks), len(run.checkpoints))
"""


def profile_run(run: Path) -> None:
    found = []
    for _ in range(REPEATS):
        output = subprocess.run([sys.executable, "-c", PARTS, str(run)], check=True, capture_output=True, text=True).stdout.split()
        found.append([float(x) for x in output[:3]] + [int(output[3]), int(output[4])])
    unpickle, discover, locate = (min(row[k] for row in found) for k in range(3))
    chunks, checkpoints = found[0][3], found[0][4]
    print(
        f"{run}: {checkpoints} checkpoints, {chunks} chunks (best of {REPEATS}): .metadata unpickled {unpickle:.3f} s, "
        f"find_run {discover:.3f} s (the unpickling included), every chunk located {locate:.3f} s ({locate / chunks * 1e3:.3f} ms a chunk)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/farcast-bench"))
    parser.add_argument("--checkpoints", type=int, default=20)
    parser.add_argument("--tensors", type=int, default=2320)
    parser.add_argument("--run", type=Path, help="profile the DCP-specific costs of reading this run instead")
    args = parser.parse_args()
    if args.run:
        profile_run(args.run)
        return
    run = make_run(args.work / f"run-dcp-discovery-{args.checkpoints}x{args.tensors}", args.checkpoints, args.tensors)
    found = []
    for _ in range(REPEATS):
        output = subprocess.run([sys.executable, "-c", FIND, str(run)], check=True, capture_output=True, text=True).stdout.split()
        found.append((float(output[0]), int(output[1])))
    seconds, chunks = min(found)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "farcast_cli", "inspect", str(run)], check=True, capture_output=True)
    inspect_seconds = time.perf_counter() - started
    print(
        f"{args.checkpoints} checkpoints, {chunks} chunks: find_run {seconds:.2f} s (best of {REPEATS}), "
        f"{seconds / chunks * 1e3:.3f} ms a chunk; farcast inspect {inspect_seconds:.2f} s wall"
    )


if __name__ == "__main__":
    main()

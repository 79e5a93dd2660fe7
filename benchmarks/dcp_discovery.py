"""How long finding a DCP run takes, against the number of chunks its checkpoints hold.

    python benchmarks/dcp_discovery.py --work /var/tmp/farcast-bench [--checkpoints 20] [--tensors 2320]

A run of CHECKPOINTS DCP checkpoints, each of TENSORS small f32 tensors saved by dcp.save from one
process (one chunk per tensor: 8 ranks x 290 tensors of a 7B model make 2320 chunks a checkpoint),
then `find_run` in a fresh process (best of 3, page cache warm), and `farcast inspect` wall time.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/farcast-bench"))
    parser.add_argument("--checkpoints", type=int, default=20)
    parser.add_argument("--tensors", type=int, default=2320)
    args = parser.parse_args()
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

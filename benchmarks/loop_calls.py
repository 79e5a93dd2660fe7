"""Where the in-memory loop's time goes, call by call: each `Farcaster.step` timed inside a training loop.

    python benchmarks/loop_calls.py --workload digits-mlp-adam --rhythm 50:0.1 --seeds 3

Trains the workload as loop.py's memory variant does (a checkpoint saved every few steps, the Farcaster
called after each save, the weight gate, the default `fit_share`), and splits farcast's own time into the
calls that only observe, the attempts that fit anew and those that reuse a kept fit's jump or refusal. Each figure is
printed beside the training time of the same run (its optimizer steps alone), as a share of it. loop.py
measures what the jumps save; this says what they cost, where the cost is spread too thin for a profiler.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from loop import _save
from workloads.loops import SAVE_EVERY, STEPS, parts

from farcast_cli.integrations import Farcaster

KINDS = ("observe", "fit", "reuse", "refusal")
"""Calls that only observe, attempts that fit anew, and those that reuse a kept fit's jump or (under the
weight gate) its refusal."""


def timed_run(workload: str, seed: int, every: int, jump: float, fit_share: float | None) -> dict[str, list[float]]:
    """Seconds of training, and of each `step` call by kind: observe, fit (a new fit) and reuse."""
    torch.manual_seed(seed)
    p = parts(workload, seed, "constant")
    times: dict[str, list[float]] = {"train": [], **{kind: [] for kind in KINDS}}
    with tempfile.TemporaryDirectory() as work:
        run = Path(work) / "run"
        _save(run, p.model, 0)
        farcaster = Farcaster(run, every=every, jump=jump, max_steps=STEPS[workload], fit_share=fit_share)
        farcaster.step(p.model, 0)
        for real in range(1, STEPS[workload] + 1):
            started = time.perf_counter()
            p.train_step(real - 1)
            times["train"].append(time.perf_counter() - started)
            if real % SAVE_EVERY[workload]:
                continue
            _save(run, p.model, real)
            started = time.perf_counter()
            result = farcaster.step(p.model, real)
            seconds = time.perf_counter() - started
            kind = "observe" if result is None else "fit" if "reused" not in result.why else "reuse" if result.applied else "refusal"
            times[kind].append(seconds)
        farcaster.close()
        shutil.rmtree(run, ignore_errors=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", required=True, choices=sorted(STEPS))
    parser.add_argument("--rhythm", default="50:0.1", help="every:jump (every a multiple of the workload's save interval)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--fit-share", type=float, default=0.05, help="the Farcaster's fit_share; 0 for None (fit at every attempt)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    every, jump = (float(value) for value in args.rhythm.split(":"))
    print(f"{args.workload}, every {int(every)} steps, jump {jump:g}, fit_share {args.fit_share or None}")
    for seed in range(args.seeds):
        times = timed_run(args.workload, seed, int(every), jump, args.fit_share or None)
        train = sum(times["train"])
        own = sum(sum(times[kind]) for kind in KINDS)
        step = np.mean(times["train"])
        line = [f"seed {seed}: training {1e3 * train:.0f} ms ({1e3 * step:.3f} ms a step), farcast {1e3 * own:.1f} ms ({own / train:.1%})"]
        for kind in KINDS:
            calls = times[kind]
            if calls:
                line.append(
                    f"{kind} {len(calls)} calls: median {1e3 * np.median(calls):.3f} ms, mean {1e3 * np.mean(calls):.3f}, "
                    f"max {1e3 * max(calls):.2f}, in all {1e3 * sum(calls):.1f} ms ({sum(calls) / train:.1%})"
                )
        print("\n  ".join(line))


if __name__ == "__main__":
    main()

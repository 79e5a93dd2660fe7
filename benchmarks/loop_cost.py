"""What a jump in memory costs against an optimizer step: the in-memory Farcaster's own time (observe at
each save + fit + apply + verify, the user's loss excluded) beside the workload's step time.

    python benchmarks/loop_cost.py --workload minilm-finetune-adamw --saves 8 --save-every 2 --jumps 2 --fits default,l1

Trains the workload (benchmarks/workloads/loops.py) from seed 0, observing the model every `save-every`
steps (no checkpoint is written: the in-memory path reads none), and after `saves` observations jumps,
verified by the loss on the gate half of the validation set; `jumps` times. The fit's cost grows with
the observations (up to 16 of them start training pairs), not with their spacing, so a short spacing
measures a long run's jump in a fraction of its time. `--fits` times the Farcaster's default fit
settings ("default") and loop.py's named ones (FITS: l1, l2, cheap) one after the other; each jump's
time is split into its phases (fit, apply, restore: the rest is the decision and the jump record).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from loop import FITS
from workloads.loops import STEPS, parts

from farcast_cli.integrations import Farcaster, memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", required=True, choices=sorted(STEPS))
    parser.add_argument("--saves", type=int, default=8)
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--jumps", type=int, default=2)
    parser.add_argument("--fits", default="default", help=f"fit settings to time one after the other: default, {', '.join(FITS)}")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for fit in args.fits.split(","):
        measure(args, fit)


@contextmanager
def phases_timed(seconds: dict[str, list[float]]):
    """memory.py's fit, apply and restore timed into `seconds` while inside."""
    originals = {name: getattr(memory, name) for name in ("fit_in_memory", "apply_jump", "restore")}

    def timed(name, function):
        def call(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[name].append(time.perf_counter() - started)

        return call

    for name, function in originals.items():
        setattr(memory, name, timed(name, function))
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(memory, name, function)


def measure(args: argparse.Namespace, fit: str) -> None:
    """Train from seed 0 with a farcaster whose fit settings are `fit`, and print a jump's own cost."""
    p = parts(args.workload, 0)
    every = args.saves * args.save_every
    phases: dict[str, list[float]] = defaultdict(list)
    options = {} if fit == "default" else {"settings": FITS[fit]}
    with tempfile.TemporaryDirectory(prefix="farcast-cost-") as run, phases_timed(phases):
        farcaster = Farcaster(Path(run), every=every, jump=0.5, loss_fn=p.gate, **options)
        farcaster.step(p.model, 0)
        step_seconds, results = [], []
        for step in range(1, every * args.jumps + 1):
            started = time.perf_counter()
            p.train_step(step)
            step_seconds.append(time.perf_counter() - started)
            if step % args.save_every == 0:
                result = farcaster.step(p.model, step)
                if result is not None:
                    results.append(result)
        farcaster.close()
        observations = len(farcaster.observed)
        step = float(np.median(step_seconds))
        observe = farcaster.observe_seconds / observations
        parameters = sum(t.numel() for t in p.model.parameters())
        print(f"{args.workload}, fit {fit} ({farcaster.settings}): {parameters:,} parameters, optimizer step {1000 * step:.1f} ms (median)")
        print(f"observing at a save: {1000 * observe:.2f} ms; first weights kept: {farcaster.observed.first_bytes / 1e6:.1f} MB on the CPU")
        for index, result in enumerate(results):
            own = result.seconds + observe * args.saves
            split = ", ".join(f"{name} {1000 * times[index]:.1f} ms" for name, times in phases.items() if index < len(times))
            print(
                f"jump at step {result.step} ({args.saves} saves since the last): fit + apply + verify {1000 * result.seconds:.0f} ms, "
                f"with the {args.saves} observations {1000 * own:.0f} ms = {own / step:.1f} optimizer steps; "
                f"loss_fn {1000 * result.loss_seconds:.0f} ms (2 calls); {'kept' if result.applied else 'undone'}\n  ({split})"
            )


if __name__ == "__main__":
    main()

"""Would a fit on a background thread take its cost off a training loop? The digits MLP's 1000 steps
trained three ways in turns: plain; with a fit every 50 steps on the training thread; with the same
fits each on a thread of its own (joined at the end).

    python benchmarks/background_fit.py --rounds 3

Each fit is the in-loop farcaster's (`memory.fit_in_memory`, the loop's default settings) on a copy of
a history observed from 400 steps of the same workload, from scratch (no column sums kept). The wall
times are printed beside the plain run's, as ratios: where the background run is not faster than the
inline one, Python's GIL (or the cores) hands the fit's time back to the training thread.
"""

from __future__ import annotations

import argparse
import copy
import threading
import time

import torch
from workloads.loops import parts

from farcast_cli.integrations import memory
from farcast_cli.integrations.loop import LOOP_FIT
from farcast_cli.model.observed import ObservedRun

WORKLOAD, STEPS, EVERY = "digits-mlp-adam", 1000, 50


def observed_history() -> ObservedRun:
    """The history the fits start from: the workload observed every 10 steps for 400 steps (seed 0)."""
    p = parts(WORKLOAD, 0, "constant")
    observed = ObservedRun(LOOP_FIT.sample, LOOP_FIT.seed)
    for step in range(401):
        if step:
            p.train_step(step)
        if step % 10 == 0:
            observed.observe(p.model.state_dict(), step)
    return observed


def one_fit(observed: ObservedRun) -> None:
    fresh = copy.deepcopy(observed)
    fresh.sums, fresh.shrink = {}, None
    memory.fit_in_memory(fresh, 20, LOOP_FIT)


def train(mode: str, observed: ObservedRun) -> float:
    """Seconds to train the workload (seed 1) with the fits `mode` says: plain, inline or background."""
    torch.manual_seed(1)
    p = parts(WORKLOAD, 1, "constant")
    threads = []
    started = time.perf_counter()
    for step in range(1, STEPS + 1):
        p.train_step(step)
        if step % EVERY == 0 and mode == "inline":
            one_fit(observed)
        elif step % EVERY == 0 and mode == "background":
            threads.append(threading.Thread(target=one_fit, args=(observed,)))
            threads[-1].start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    observed = observed_history()
    started = time.perf_counter()
    one_fit(observed)
    print(f"one fit alone: {1e3 * (time.perf_counter() - started):.1f} ms; {STEPS // EVERY} fits a run")
    for _ in range(args.rounds):
        plain, inline, background = (train(mode, observed) for mode in ("plain", "inline", "background"))
        print(
            f"plain {1e3 * plain:.0f} ms, fits inline {1e3 * inline:.0f} ms ({inline / plain:.2f}x), "
            f"on background threads {1e3 * background:.0f} ms ({background / plain:.2f}x)"
        )


if __name__ == "__main__":
    main()

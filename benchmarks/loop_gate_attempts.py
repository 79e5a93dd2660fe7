"""What one loss can tell the loop's gate: every attempt's statistics, and which rules keep which jumps.

    python benchmarks/loop_gate_attempts.py --workload tiny-lm-adamw --schedule linear --rhythm 40:0.1 --seeds 10

Each run is benchmarks/loop.py's memory-paired0 variant: `loss_fn` returns the gate half's losses per
example (per window of text), with no standard errors asked, so that it keeps exactly the jumps the
one-loss gate (margin 0) keeps, on the same trajectory. At every attempt it records the gain on the gate
half (the mean of before - after), the standard error of that mean paired difference (what the per-batch
gate sees), the gain on the other half (what the benchmark measures, held out from the gate), and the
loss's move since the previous attempt (from the loss kept there to the loss before this jump: what one
loss can see of its own movement). Then, over every attempt of every seed, for each rule: the jumps it
keeps, the sum of their held-out gains, how many kept lose on the held-out half and how many refused win
there, and how often it agrees with the per-batch gate at 0.5 standard errors (the Farcaster's default).
The rules are applied to the attempts of the one-loss gate's trajectory: what they would do there, not
what their own runs would meet (benchmarks/loop.py's memory-loss-moveC measures that).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import loop
import numpy as np

from farcast_cli.integrations.loop import Farcaster

MOVES = (0.01, 0.02, 0.05, 0.1)
STANDARD_ERRORS = (0.5, 1.0, 2.0)


class Recording(Farcaster):
    """The Farcaster, recording each attempt's gate and held-out losses (`measure`: the held-out loss)."""

    measure = staticmethod(lambda model: 0.0)

    def __init__(self, *args, **options) -> None:
        super().__init__(*args, **options)
        self.attempts: list[dict] = []
        self._held_out_before = 0.0

    def _from_memory(self, model, step, kept):
        self._model, self._held_out_before = model, self.measure(model)
        return super()._from_memory(model, step, kept)

    def _loss_decision(self, before, after):
        applied, why, error = super()._loss_decision(before, after)
        gain = float(np.mean(before) - np.mean(after))
        self.attempts.append({
            "before": float(np.mean(before)), "after": float(np.mean(after)), "gain": gain, "error": error,
            "held_out_gain": self._held_out_before - self.measure(self._model), "applied": applied,
        })  # fmt: skip
        return applied, why, error


def with_moves(attempts: list[dict]) -> list[dict]:
    """Each attempt with the loss's move since the previous one (None at the first)."""
    kept = None
    for attempt in attempts:
        attempt["move"] = None if kept is None else abs(kept - attempt["before"])
        kept = attempt["after"] if attempt["applied"] else attempt["before"]
    return attempts


def rules() -> dict:
    found = {"one loss, margin 0": lambda a: a["gain"] > 0}
    for k in STANDARD_ERRORS:
        found[f"per batch, {k:g} standard errors"] = lambda a, k=k: a["gain"] > k * a["error"]
    for share in MOVES:
        found[f"one loss, movement {share:g}"] = lambda a, share=share: a["gain"] > share * (a["move"] or 0.0)
    return found


def main() -> None:
    parser = loop.study_arguments(__doc__.splitlines()[0])
    args = parser.parse_args()
    every, jump = loop.study_rhythm(args)
    parts = loop.parts

    def recorded_parts(name, seed, schedule):
        made = parts(name, seed, schedule)
        Recording.measure = staticmethod(made.measure)
        return made

    farcasters: list[Recording] = []

    def recording(*positional, **options) -> Recording:
        farcasters.append(Recording(*positional, **options))
        return farcasters[-1]

    loop.parts, loop.Farcaster = recorded_parts, recording
    attempts = []
    with tempfile.TemporaryDirectory(prefix="farcast-attempts-") as scratch:
        for seed in range(args.seeds):
            loop.train(args.workload, "memory-paired0", seed, args.schedule, every, jump, Path(scratch))
            attempts += with_moves(farcasters[-1].attempts)
    default = rules()["per batch, 0.5 standard errors"]
    print(f"{args.workload} every {every} jump {jump:g}, {args.seeds} seeds, {len(attempts)} attempts of the one-loss gate's runs\n")
    print("| rule | jumps kept | held-out gain of those kept | kept, losing held out | refused, winning held out "
          "| agrees with 0.5 standard errors |\n|---|---|---|---|---|---|")  # fmt: skip
    for name, rule in rules().items():
        kept = [a for a in attempts if rule(a)]
        refused = [a for a in attempts if not rule(a)]
        agree = np.mean([rule(a) == default(a) for a in attempts])
        print(f"| {name} | {len(kept)} | {sum(a['held_out_gain'] for a in kept):+.4f} | {sum(a['held_out_gain'] < 0 for a in kept)} | "
              f"{sum(a['held_out_gain'] > 0 for a in refused)} | {100 * agree:.0f}% |")  # fmt: skip


if __name__ == "__main__":
    main()

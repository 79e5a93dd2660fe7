"""Stricter loss gates tried in the loop, by steps: does refusing the jumps worth little lift the small LM?

    python benchmarks/loop_gate_rules.py --workload tiny-lm-adamw --schedule linear --rhythm 40:0.1 --earn 0.05,0.5,1

The rule tried (not the Farcaster's; RESULTS.md, "The loop table, third session"): a jump verified by
`loss_fn` stays only if it lowers the loss by more than `earn` x what the steps it skips would have
earned at the run's recent pace, `earn x rate x horizon`, where `rate` is the loss's fall per real step
since the previous attempt (from the loss kept there to the loss before this jump; no extra loss calls;
the first attempt, with no rate yet, is gated as the Farcaster gates). Each run is benchmarks/loop.py's
memory-loss variant with that gate; the speed-up by steps to the plain run's losses (`loop.speedups`, the
third session's measure: loop.py's smoothed one is now its default), mean and min-max over seeds. The
fourth session's per-batch gate is the Farcaster's own (`standard_errors`; loop.py's memory-pairedK).
With `--traces` the plain runs are read from (or kept in) loop.py's trace folder.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import loop

from farcast_cli.integrations.loop import Farcaster


class EarningGate(Farcaster):
    """The memory-loss Farcaster whose loss gate also asks a jump to earn `earn` x its skipped steps' worth,
    on top of the third session's gate (the margin alone: `movement` 0)."""

    earn = 0.0

    def __init__(self, *args, **options) -> None:
        super().__init__(*args, **{"movement": 0.0, **options})
        self.kept_at: tuple[int, float] | None = None
        self.attempt_step = 0

    def _from_memory(self, model, step, kept):
        self.attempt_step = step
        result = super()._from_memory(model, step, kept)
        if result is not None and result.loss_before is not None:
            self.kept_at = (step, result.loss_after if result.applied else result.loss_before)
        return result

    def _loss_decision(self, before: float, after: float) -> tuple[bool, str, float | None]:
        applied, why, error = super()._loss_decision(before, after)
        if not applied or self.kept_at is None:
            return applied, why, error
        horizon = self.horizon(self.observed.steps[0], self.observed.steps[-1])
        rate = max(0.0, (self.kept_at[1] - before) / max(1, self.attempt_step - self.kept_at[0]))
        if before - after > self.earn * rate * horizon:
            return applied, why, error
        return False, f"the jump earned less than {self.earn:g} x its {horizon} steps at the recent pace", error


def main() -> None:
    parser = loop.study_arguments(__doc__.splitlines()[0])
    parser.add_argument("--earn", default="0.05,0.5,1", help="comma-separated shares of the skipped steps' worth to ask")
    parser.add_argument("--traces", type=Path)
    args = parser.parse_args()
    every, jump = loop.study_rhythm(args)
    loop.Farcaster = EarningGate
    with tempfile.TemporaryDirectory(prefix="farcast-gate-") as scratch:
        work = Path(scratch)
        for earn in (float(v) for v in args.earn.split(",")):
            EarningGate.earn = earn
            speedups = []
            for seed in range(args.seeds):
                plain = loop.trained(args.traces, args.workload, "plain", seed, args.schedule, 1, 0.0, work)
                trace = loop.train(args.workload, "memory-loss", seed, args.schedule, every, jump, work)
                speedups.append(loop.speedups(plain, trace)[0])
                made = sum(applied for _, _, applied in trace.jumps)
                print(f"earn {earn:g} seed {seed}: x{speedups[-1]:.3f} by steps, {made}/{len(trace.jumps)} jumps kept", flush=True)
            print(f"{args.workload} every {every} jump {jump:g}, earn {earn:g}: x{sum(speedups) / len(speedups):.2f} "
                  f"({min(speedups):.2f}-{max(speedups):.2f}) by steps", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

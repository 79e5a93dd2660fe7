"""Does farcasting inside the training loop save training? Steps and wall time to the plain run's losses.

    python benchmarks/loop.py --workload digits-mlp-adam --seeds 3          # about 10 minutes on 2 cores
    python benchmarks/loop.py --workload tiny-lm-adamw --schedule linear --seeds 2

Each variant trains the same model from the same seed and data order (benchmarks/workloads/loops.py),
saving a checkpoint every few steps, and every `every` real steps farcasts `jump` times the elapsed
steps through farcast's Python API (commands.predict, as `farcast predict` and the integrations do):

- plain: no farcasting.
- inproc: the Farcaster / FarcastCallback way (issue 15): a forecast that beats keeping the last
  checkpoint in the weight backtest is copied into the model; data order and LR schedule go on as before;
  later checkpoints are read at their forecast-time step.
- inproc-unshrunk: inproc with `--shrink none` (the forecast as fitted, not moved towards the last
  checkpoint by the weight backtest's factor).
- inproc-ungated, inproc-unshrunk-ungated: the same two, every forecast applied (`gate=False`).
- inproc-loss: the inproc way, gated by the loss on half of the validation set (the other half is what this
  benchmark reports, so the gate never sees it).
- memory: the in-memory Farcaster (issue 21, the default source): it observes the model at every save
  (a sample and the first weights), fits from that, gates by the weight backtest on the sample, and
  jumps in place; nothing is read back from the checkpoints.
- memory-loss: memory, verified by the loss on the gate half of the validation set (`loss_fn`): the
  loss before and after the jump, the jump undone when it does not lower it by the Farcaster's
  `movement` share (0.05 since the fifth session) of the loss's move since the last attempt.
  memory-loss-moveC: that share C (memory-loss-move0: the margin alone, the earlier default).
- memory-paired, memory-pairedK: memory-loss with `loss_fn` returning the gate half's loss per example
  (per window of text for the small LM): the jump must also lower their mean by more than K (default:
  the Farcaster's) standard errors of the mean paired difference.
- memory-ungated: memory, every forecast applied (`gate=False`).
- memory-budgetP (a word after memory or memory-loss, e.g. memory-budget5): the Farcaster's
  `max_overhead` at P percent: a due jump waits while it would take farcast past P% of the loop's time.
  A jump's cost is then reported against the training between attempts as they were made, not `every`.
- memory-fitshareP (a word after memory or memory-loss, e.g. memory-fitshare5): the Farcaster's
  `fit_share` at P percent (memory-fitshare0: None, a fit at every attempt).
- memory-refitG (a word after memory or memory-loss, e.g. memory-refit4): a fit reused for its cost
  serves until the observations have grown G-fold (the Farcaster's `refit_growth`, REFIT_GROWTH by default).
- memory-stopP (a word after memory or memory-loss, e.g. memory-stop50): no jump from P percent of the
  run on (the Farcaster's `max_steps`); without it, none at the last step only.
- memory-l1, memory-l2, memory-cheap (a suffix, also after memory-loss or memory-ungated): memory with
  the fit's settings given (FITS): PAPER.md's L1 by Adam from the least-squares start (the CLI's
  default), the closed-form least squares, and the closed form on 2000 coordinates; without a suffix,
  the Farcaster's default settings.
- null (and null-b, null-c): the control for the loop's own noise: no farcasting, the weights multiplied
  by 1 + 1e-6 (null-b: 1 - 1e-6, null-c: 1 + 3e-6) at the first point a farcast would be tried (a change
  far below any jump's); how far it moves the speed-up is how far two runs of the same training part
  from each other by chance (small runs are chaotic: the small LM every 40 steps moved x0.75-1.27 by
  such a nudge over 10 seeds), the band a variant's spread is read against.
- resume-keep / resume-advance: what the batch loop (train, `farcast predict --resumable`, resume) does,
  ungated: the forecast replaces the weights, the step counter moves on by the horizon, the next horizon
  batches of the data order are skipped (as a resumed Trainer skips them), the LR schedule kept or
  advanced by the horizon.
- graft-keep / graft-advance: the control for resume-*: the same skips and schedule at the same points,
  with the last checkpoint's weights kept: what resume-* gains over graft-* is the forecast's, not the
  schedule's or the data order's.

Two measures of the speed-up by steps, both printed:
- to the plain run's losses (the tables of earlier sessions): real optimizer steps to reach the plain
  run's validation loss at 40%, 60%, 80% and 100% of its steps (the first checkpoint at or below it);
  speed-up = plain steps / variant steps, its mean over the targets (a target never reached counts as
  reached at the last step: an upper bound). It is biased against every other run where the loss is
  noisy: the plain run reaches its own targets by construction, lucky dips included, while another run
  must wait for a dip of its own; measured against the variant's losses instead, the same pair of runs
  reads differently (MiniLM's null x0.99 one way, x1.07 the other).
- smoothed (the default since the fourth session): each run's losses smoothed alike (a centred mean of 5
  checkpoints, then the running minimum: the best loss so far, a monotone curve); at each target
  fraction the level is the worse of the two smoothed curves there, and the steps each run takes to
  reach it (interpolated between checkpoints) are compared. It treats the two runs alike: swapping them
  inverts the speed-up exactly, so two runs that differ only by chance read x1.00 on average.
- against a reference of several runs (`--reference null,null-b,null-c`): the plain run is one draw of
  the training; where it is a lucky one every variant reads low against it (the small LM's seed 2: all
  three nulls x0.85-0.88). With --reference the controls named join it: each run's smoothed speed-up
  is the geometric mean of those against each reference run but itself, so that a variant is measured
  against the baseline training rather than one run of it, and the controls against each other.
- ends at: where the run ends, its smoothed curve's last value (its best trend loss) over the reference
  runs', a geometric mean; above 1 it ends worse than the training without farcast. The speed-ups take
  the worse of the two curves at each target, so a run that reaches the middle levels sooner but ends
  higher still reads faster at the 100% target (the digits MLP with the weight gate: x1.07-1.10 by steps,
  ending x1.08 of the plain run's loss, no seed of 8 reaching it): read the two together.
The speed-up in wall time (training plus farcast, not the benchmark's own evaluations or saves) and at
the plain run's pace (`paced`: only farcast's own time counted against the loop) use the smoothed
measure. Mean and spread over seeds.

`--traces DIR` keeps each training run's trace there and reads it back instead of training again, so that
a long table can be measured in several short runs (the plain runs once, the variants in later runs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from workloads.loops import SAVE_EVERY, STEPS, parts

from farcast_cli import commands
from farcast_cli.evaluate.evaluator import EvalOptions
from farcast_cli.integrations.loop import Farcaster, load_into
from farcast_cli.io.run import Jump, record_jump
from farcast_cli.model.fit import FitSettings

TARGETS = (0.4, 0.6, 0.8, 1.0)
NUDGES = {"null": 1e-6, "null-b": -1e-6, "null-c": 3e-6}
SMOOTHING = 2
"""Checkpoints each side of the centred mean that smooths a loss curve (5 in all)."""
FITS = {"l1": FitSettings(), "l2": FitSettings(objective="l2"), "cheap": FitSettings(objective="l2", sample=2000)}
VARIANTS = (
    "plain", "null", "null-b", "null-c", "memory", "memory-loss", "memory-paired", "memory-ungated", "memory-l1", "memory-l2",
    "memory-cheap",
    "inproc", "inproc-unshrunk", "inproc-ungated",
    "inproc-unshrunk-ungated", "inproc-loss", "resume-keep", "graft-keep", "resume-advance", "graft-advance",
)  # fmt: skip


@dataclass
class Trace:
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    jumps: list[tuple[int, int, bool]] = field(default_factory=list)
    farcast_seconds: float = 0.0
    train_seconds: float = 0.0
    jump_seconds: list[float] = field(default_factory=list)
    loss_seconds: float = 0.0
    observe_seconds: float = 0.0


def train(name: str, variant: str, seed: int, schedule: str, every: int, jump: float, work: Path) -> Trace:
    """One training run of `variant` (module docstring), the measured loss at every checkpoint."""
    torch.manual_seed(seed)
    p = parts(name, seed, schedule)
    run = work / f"{name}-{variant}-{seed}"
    shutil.rmtree(run, ignore_errors=True)
    total, save_every = STEPS[name], SAVE_EVERY[name]
    trace, elapsed, label, batch = Trace(), 0.0, 0, 0
    _save(run, p.model, label)
    farcaster = _memory_farcaster(run, p, variant, every, jump, total)
    if farcaster is not None:
        started = time.perf_counter()
        farcaster.step(p.model, 0)
        elapsed += time.perf_counter() - started
    for real in range(1, total + 1):
        started = time.perf_counter()
        p.train_step(batch)
        batch, label = batch + 1, label + 1
        elapsed += time.perf_counter() - started
        trace.train_seconds += time.perf_counter() - started
        if real % save_every:
            continue
        _save(run, p.model, label)
        trace.steps.append(real), trace.losses.append(p.measure(p.model)), trace.seconds.append(elapsed)
        if farcaster is not None:
            started = time.perf_counter()
            result = farcaster.step(p.model, label, p.scheduler)
            elapsed += time.perf_counter() - started
            trace.farcast_seconds += time.perf_counter() - started
            if result is not None:
                trace.jumps.append((real, result.horizon, result.applied))
                trace.jump_seconds.append(result.seconds)
                trace.loss_seconds += result.loss_seconds
        elif variant in NUDGES and real == every:
            _nudge(p.model, NUDGES[variant])
        elif variant != "plain" and variant not in NUDGES and real % every == 0 and real < total:
            started = time.perf_counter()
            outcome = _farcast(run, p, variant, jump, label, work)
            trace.farcast_seconds += time.perf_counter() - started
            elapsed += time.perf_counter() - started
            if outcome is not None:
                horizon, applied = outcome
                trace.jumps.append((real, horizon, applied))
                if applied and variant.startswith(("resume", "graft")):
                    label, batch = label + horizon, batch + horizon
                    _advance(p, horizon, variant)
    if farcaster is not None:
        farcaster.close()
        trace.observe_seconds = farcaster.observe_seconds
    shutil.rmtree(run, ignore_errors=True)
    return trace


def trained(traces: Path | None, name: str, variant: str, seed: int, schedule: str, every: int, jump: float, work: Path) -> Trace:
    """`train`'s trace, read from `traces` where an earlier run kept it (and kept there when trained)."""
    kept = None if traces is None else traces / f"{name}-{schedule}-{variant}-{every}-{jump:g}-{seed}.json"
    if kept is not None and kept.exists():
        return Trace(**json.loads(kept.read_text()))
    trace = train(name, variant, seed, schedule, every, jump, work)
    if kept is not None:
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.write_text(json.dumps(asdict(trace)))
    return trace


def _memory_farcaster(run: Path, p, variant: str, every: int, jump: float, total: int) -> Farcaster | None:
    """The in-memory Farcaster of a memory-* variant (None for the others)."""
    if not variant.startswith("memory"):
        return None
    words = variant.split("-")
    options = {"settings": FITS[words[-1]]} if words[-1] in FITS else {}
    loss_fn = p.gate if "loss" in words else None
    paired, move, share, budget, stop, growth = (
        _suffix(words, prefix) for prefix in ("paired", "move", "fitshare", "budget", "stop", "refit")
    )
    if paired is not None:
        loss_fn = p.gate_batches
        options |= {"standard_errors": float(paired)} if paired else {}
    if move is not None:
        options |= {"movement": float(move)}
    if share is not None:
        options |= {"fit_share": float(share) / 100 or None}
    if budget is not None:
        options |= {"max_overhead": float(budget) / 100}
    last = total if stop is None else total * int(stop) // 100
    farcaster = Farcaster(run, every=every, jump=jump, loss_fn=loss_fn, gate="ungated" not in words, max_steps=last, **options)
    if growth:
        farcaster.refit_growth = float(growth)
    return farcaster


def _suffix(words: list[str], prefix: str) -> str | None:
    """What follows `prefix` in the variant's word that starts with it ("" for the bare word), or None."""
    return next((word[len(prefix) :] for word in words if word.startswith(prefix)), None)


def _farcast(run: Path, p, variant: str, jump: float, label: int, work: Path) -> tuple[int, bool] | None:
    """Forecast from the run; apply it by the variant's rule. None when the run is too short yet."""
    from farcast_cli.io.run import find_run

    found = find_run(run)
    if len(found.checkpoints) < 3:
        return None
    horizon = max(1, round(jump * (found.last.step - found.steps[0])))
    if variant.startswith("graft"):
        return horizon, True
    evaluation = EvalOptions(lambda folder: _folder_loss(p, folder), cache=False) if variant == "inproc-loss" else EvalOptions()
    out = work / "forecast"
    report = commands.predict(
        run,
        out,
        horizon=horizon,
        evaluation=evaluation,
        fallback=False,
        force=True,
        settings=FitSettings(shrink=1.0) if "unshrunk" in variant else FitSettings(),
        options=commands.StreamOptions(quiet=True, backtest="sample"),
    )
    applied = bool(report.beats_last) if variant.startswith("inproc") and not variant.endswith("ungated") else True
    if applied:
        load_into(p.model, out)
        if variant.startswith("inproc"):
            record_jump(run, Jump(label, horizon))
    shutil.rmtree(out, ignore_errors=True)
    return horizon, applied


def _folder_loss(p, folder: Path) -> float:
    """The gate's loss of a checkpoint folder, computed on a copy of the model so training is untouched."""
    import copy

    model = copy.deepcopy(p.model)
    load_into(model, folder)
    return p.gate(model)


def _nudge(model: torch.nn.Module, by: float) -> None:
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1 + by)


def _advance(p, horizon: int, variant: str) -> None:
    if variant.endswith("advance") and p.scheduler is not None:
        for _ in range(horizon):
            p.scheduler.step()


def _save(run: Path, model: torch.nn.Module, label: int) -> None:
    folder = run / f"checkpoint-{label}"
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: value.detach().to("cpu", copy=True).contiguous() for name, value in model.state_dict().items()}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def _on_a_save(every: float, save_every: int) -> int:
    """`every` as a multiple of the save interval: farcast runs right after a save, so an `every` off the
    saves would only try on their common multiples."""
    return max(save_every, int(round(every / save_every)) * save_every)


def study_arguments(description: str) -> argparse.ArgumentParser:
    """The command line of a study of one rhythm (loop_gate_rules.py, loop_gate_attempts.py): a workload,
    its schedule, seeds and `--rhythm every:jump`; a study adds its own options."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--workload", required=True, choices=sorted(SAVE_EVERY))
    parser.add_argument("--schedule", choices=("constant", "linear"), default="constant")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rhythm", required=True, help="every:jump, e.g. 40:0.1")
    return parser


def study_rhythm(args: argparse.Namespace) -> tuple[int, float]:
    """A study's rhythm (`study_arguments`) as (every, on a save; jump), torch on one thread as every
    training here runs."""
    torch.set_num_threads(1)
    every, jump = (float(v) for v in args.rhythm.split(":"))
    return _on_a_save(every, SAVE_EVERY[args.workload]), jump


def jump_cost(trace: Trace, plain: Trace, every: int) -> dict[str, float]:
    """A jump's own cost (fit + apply + verify, loss_fn excluded, plus the observations at the saves
    since the last jump), against the plain run's optimizer step and its training time between jumps."""
    saves = len(trace.steps)
    observe = trace.observe_seconds / max(saves, 1)
    between = float(np.mean(np.diff([0] + [real for real, _, _ in trace.jumps]))) if trace.jumps else every
    jump = float(np.mean(trace.jump_seconds)) + observe * between / (trace.steps[1] - trace.steps[0])
    step = plain.train_seconds / plain.steps[-1]
    return {
        "jump_ms": 1000 * jump, "observe_ms": 1000 * observe, "step_ms": 1000 * step, "optimizer_steps": jump / step,
        "of_training_between": jump / (step * between), "loss_ms": 1000 * trace.loss_seconds / len(trace.jump_seconds),
        "between": between, "loss_share": trace.loss_seconds / trace.seconds[-1],
    }  # fmt: skip


def reach(trace: Trace, loss: float) -> tuple[float, float] | None:
    """Real steps and seconds at the first checkpoint at or below `loss`."""
    for step, value, seconds in zip(trace.steps, trace.losses, trace.seconds):
        if value <= loss:
            return step, seconds
    return None


def speedups(plain: Trace, other: Trace) -> tuple[float, float]:
    """Mean over the targets of plain's steps (and seconds) over the variant's, to plain's loss at each target."""
    steps, seconds = [], []
    for fraction in TARGETS:
        index = int(round(fraction * len(plain.steps))) - 1
        target = plain.losses[index]
        mine, theirs = reach(other, target), reach(plain, target)
        if mine is None:
            steps.append(theirs[0] / other.steps[-1])
            seconds.append(theirs[1] / other.seconds[-1])
        else:
            steps.append(theirs[0] / mine[0])
            seconds.append(theirs[1] / mine[1])
    return float(np.mean(steps)), float(np.mean(seconds))


def smoothed(losses: list[float]) -> np.ndarray:
    """The best loss so far of a centred mean of 2 x SMOOTHING + 1 checkpoints (fewer near the ends, as
    many each side): a monotone curve of the run's trend, its lucky dips averaged out."""
    values = np.asarray(losses, dtype=float)
    means = np.empty_like(values)
    for index in range(len(values)):
        side = min(SMOOTHING, index, len(values) - 1 - index)
        means[index] = values[index - side : index + side + 1].mean()
    return np.minimum.accumulate(means)


def crossing(trace: Trace, curve: np.ndarray, level: float) -> tuple[float, float]:
    """Real steps and seconds at which the monotone `curve` first reaches `level`, interpolated linearly
    between the checkpoints around it."""
    at = int(np.argmax(curve <= level))
    if at == 0 or curve[at - 1] == curve[at]:
        return trace.steps[at], trace.seconds[at]
    share = (curve[at - 1] - level) / (curve[at - 1] - curve[at])
    steps = trace.steps[at - 1] + share * (trace.steps[at] - trace.steps[at - 1])
    return steps, trace.seconds[at - 1] + share * (trace.seconds[at] - trace.seconds[at - 1])


def smoothed_speedups(plain: Trace, other: Trace) -> tuple[float, float]:
    """Mean over the targets of plain's steps (and seconds) over the variant's, to the worse of the two
    smoothed curves at each target fraction of plain's checkpoints (module docstring)."""
    mine, theirs = smoothed(other.losses), smoothed(plain.losses)
    steps, seconds = [], []
    for fraction in TARGETS:
        index = min(int(round(fraction * len(plain.steps))), len(other.steps)) - 1
        level = max(theirs[index], mine[index])
        (plain_steps, plain_seconds), (other_steps, other_seconds) = crossing(plain, theirs, level), crossing(other, mine, level)
        steps.append(plain_steps / other_steps)
        seconds.append(plain_seconds / other_seconds)
    return float(np.mean(steps)), float(np.mean(seconds))


def against(baseline: dict[str, Trace], name: str, trace: Trace) -> tuple[float, float]:
    """The smoothed speed-ups by steps and by seconds of `trace` (the run of variant `name`) against each
    baseline run but itself: their geometric means."""
    pairs = [smoothed_speedups(reference, trace) for key, reference in baseline.items() if key != name]
    steps, seconds = (float(np.exp(np.mean(np.log(values)))) for values in zip(*pairs, strict=True))
    return steps, seconds


def ends_at(baseline: dict[str, Trace], name: str, trace: Trace) -> float:
    """Where the run ends: its smoothed curve's last value (its best trend loss) over each baseline run's
    but itself, their geometric mean; above 1, it ends worse than the training without farcast."""
    ratios = [smoothed(trace.losses)[-1] / smoothed(reference.losses)[-1] for key, reference in baseline.items() if key != name]
    return float(np.exp(np.mean(np.log(ratios))))


def paced(plain: Trace, other: Trace, by_steps: float) -> float:
    """The speed-up by wall time had the variant trained at the plain run's pace: the speed-up by steps
    times the plain step over the plain step plus farcast's time per step of the variant. Two runs'
    own step times differ by a few percent on a shared machine (MiniLM: 7% between two runs of the same
    steps), which the raw wall time counts as the loop's; this counts only farcast's own time."""
    step = plain.train_seconds / plain.steps[-1]
    return by_steps * step / (step + other.farcast_seconds / other.steps[-1])


def _spread(values: list[float], form: str) -> str:
    low, high = form.format(min(values)), form.format(max(values))
    return low if low == high else f"{low}-{high}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", required=True, choices=sorted(STEPS))
    parser.add_argument("--schedule", choices=("constant", "linear"), default="constant")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--rhythm", action="append", help="every:jump, e.g. 200:0.5 (repeatable; default 200:0.5 and 50:0.1 scaled to the run)"
    )
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--traces", type=Path, help="keep each training run's trace here, and reuse those kept by an earlier run")
    parser.add_argument("--reference", default="", help="controls that join the plain run as the reference, e.g. null,null-b,null-c")
    args = parser.parse_args()
    torch.set_num_threads(1)
    total = STEPS[args.workload]
    rhythms = [tuple(float(v) for v in r.split(":")) for r in args.rhythm] if args.rhythm else [(total // 5, 0.5), (total // 20, 0.1)]
    rhythms = [(_on_a_save(every, SAVE_EVERY[args.workload]), jump) for every, jump in rhythms]
    variants = [v for v in args.variants.split(",") if v == "plain" or args.schedule == "linear" or not v.endswith("advance")]
    references = [name for name in args.reference.split(",") if name]
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="farcast-loop-") as scratch:
        work = Path(scratch)
        for seed in range(args.seeds):
            plain = trained(args.traces, args.workload, "plain", seed, args.schedule, 1, 0.0, work)
            for every, jump in rhythms:
                baseline = {"plain": plain} | {
                    name: trained(args.traces, args.workload, name, seed, args.schedule, int(every), jump, work) for name in references
                }
                for variant in variants[1:] if variants[0] == "plain" else variants:
                    trace = baseline.get(variant)
                    if trace is None:
                        trace = trained(args.traces, args.workload, variant, seed, args.schedule, int(every), jump, work)
                    old_steps, old_time = speedups(plain, trace)
                    by_steps, by_time = against(baseline, variant, trace)
                    alone = smoothed_speedups(plain, trace)[0]
                    by_pace = paced(plain, trace, by_steps)
                    end = ends_at(baseline, variant, trace)
                    key = f"{variant} every {int(every)} jump {jump:g}"
                    results.setdefault(key, []).append(
                        {"seed": seed, "speedup_steps": by_steps, "speedup_time": by_time, "to_plains_losses": [old_steps, old_time],
                         "against_plain": alone,
                         "speedup_paced": by_pace, "ends_at": end, "jumps": trace.jumps,
                         "farcast_seconds": trace.farcast_seconds, "final_loss": trace.losses[-1], "plain_final_loss": plain.losses[-1]}
                    )  # fmt: skip
                    made = sum(applied for _, _, applied in trace.jumps)
                    final = f"final loss {trace.losses[-1]:.4f} (plain {plain.losses[-1]:.4f}), ends at x{end:.3f} of the reference's"
                    print(f"seed {seed} {key}: x{by_steps:.3f} steps, x{by_time:.2f} time (x{by_pace:.2f} at plain's pace); "
                          f"against plain alone x{alone:.3f} steps; to plain's losses x{old_steps:.3f} steps, x{old_time:.2f} time; "
                          f"{made}/{len(trace.jumps)} jumps, farcast {trace.farcast_seconds:.1f} s, {final}", flush=True)  # fmt: skip
                    if trace.jump_seconds:
                        cost = jump_cost(trace, plain, int(every))
                        results[key][-1]["cost"] = cost
                        print(f"  a jump's own cost {cost['jump_ms']:.1f} ms (observing {cost['observe_ms']:.2f} ms a save) = "
                              f"{cost['optimizer_steps']:.0f} optimizer steps of {cost['step_ms']:.3f} ms, "
                              f"{100 * cost['of_training_between']:.0f}% of the training between jumps "
                              f"(every {cost['between']:.0f} steps); loss_fn "
                              f"{cost['loss_ms']:.1f} ms an attempt = {cost['loss_ms'] / cost['step_ms']:.1f} optimizer steps, "
                              f"{100 * cost['loss_share']:.1f}% of the loop's wall time", flush=True)  # fmt: skip
    reference = " + ".join(["plain", *references])
    print(f"\n{args.workload}, {args.schedule} learning rate, {args.seeds} seeds: speed-up, smoothed, against {reference} (module")
    print("docstring), and by steps to the plain run's losses as earlier tables measured it (mean, and min-max over seeds)\n")
    print("| variant | rhythm | by steps | to plain's losses | by wall time | time / steps | at plain's pace | paced / steps | ends at "
          "| jumps made | a jump's own cost | = optimizer steps | of the training between jumps | loss_fn an attempt (of the loop) |\n"
          + "|---" * 14 + "|")  # fmt: skip
    for key, rows in results.items():
        variant, rhythm = key.split(" ", 1)
        steps, times = [r["speedup_steps"] for r in rows], [r["speedup_time"] for r in rows]
        paces, olds = [r["speedup_paced"] for r in rows], [r["to_plains_losses"][0] for r in rows]
        ends = [r["ends_at"] for r in rows]
        made = np.mean([sum(a for _, _, a in r["jumps"]) for r in rows])
        tried = np.mean([len(r["jumps"]) for r in rows])
        costs = [r["cost"] for r in rows if "cost" in r]
        cost = " | | | |"
        if costs:
            jump_ms, steps_of = _spread([c["jump_ms"] for c in costs], "{:.0f}"), _spread([c["optimizer_steps"] for c in costs], "{:.1f}")
            cost = f" {jump_ms} ms | {steps_of} | {_spread([100 * c['of_training_between'] for c in costs], '{:.0f}')}% |"
            if any(c["loss_ms"] for c in costs):
                loss_ms, share = _spread([c["loss_ms"] for c in costs], "{:.1f}"), _spread([100 * c["loss_share"] for c in costs], "{:.1f}")
                cost += f" {loss_ms} ms ({share}%) |"
            else:
                cost += " |"
        print(f"| {variant} | {rhythm} | x{np.mean(steps):.2f} ({min(steps):.2f}-{max(steps):.2f}) | "
              f"x{np.mean(olds):.2f} ({min(olds):.2f}-{max(olds):.2f}) | "
              f"x{np.mean(times):.2f} ({min(times):.2f}-{max(times):.2f}) | {np.mean(times) / np.mean(steps):.2f} | "
              f"x{np.mean(paces):.2f} ({min(paces):.2f}-{max(paces):.2f}) | {np.mean(paces) / np.mean(steps):.2f} | "
              f"x{np.mean(ends):.3f} ({min(ends):.3f}-{max(ends):.3f}) | {made:.1f} of {tried:.1f} |{cost}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"workload": args.workload, "schedule": args.schedule, "results": results}, indent=1))


if __name__ == "__main__":
    main()

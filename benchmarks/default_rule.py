"""Which rule should choose the shrink factor when there is no loss to ask? Chosen on some workloads,
reported on the others (leave one workload out).

    python benchmarks/default_rule.py [--workload NAME ...]     # after accuracy.py has trained the runs

For each workload, cut and jump of benchmarks/accuracy.py, every rule below makes a forecast from the
run's history up to the cut (farcast's own fit: per-tensor maps, anchor 1, through its model API)
and is scored by steps saved on the validation loss. Rules: the shrink factor chosen on the held-out
trial by weight MAE (farcast's default), by RMSE, by MAE with every tensor weighted equally, or fixed
(0.25 .. 1.25); and MAE-chosen with the anchor averaged over 5 checkpoints. Leave-one-workload-out:
for each workload, the rule with the best mean over the other workloads, and what it saves on this one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from accuracy import GPU_ONLY, WORKLOADS, Run, apply_forecaster, history, load_workload, sampled_rows, settings_of, steps_saved

from farcast_cli.model.fit import FitSettings
from farcast_cli.model.forecaster import SHRINK_GRID, fit_plain, held_out_trial
from farcast_cli.model.history import History

FIXED = (0.25, 0.5, 0.75, 1.0, 1.25)
RULES = ("mae", "rmse", "tensor-mae", *(f"fixed {a:g}" for a in FIXED), "mae, anchor 5")


def chosen_shrinks(h: History, horizon: int, settings: FitSettings, anchor: int) -> dict[str, float]:
    """The factor each data-driven criterion picks on the held-out trial (as farcast's own shrink choice does)."""
    trial = held_out_trial(h, horizon, settings, anchor)
    if trial is None:
        return {"mae": 1.0, "rmse": 1.0, "tensor-mae": 1.0}
    cut = h.column(trial.context_end)
    forecast, last, truth = trial.on_history(h, cut, 0), h.values[:, cut], h.values[:, -1]
    errors = np.stack([last + a * (forecast - last) - truth for a in SHRINK_GRID])
    per_tensor = np.stack([np.abs(errors[:, h.rows_of(i)]).mean(axis=1) for i in range(len(h.tensor_names))], axis=1)
    normalised = (per_tensor / np.maximum(per_tensor[0], 1e-30)).mean(axis=1)
    pick = lambda criterion: float(SHRINK_GRID[int(np.argmin(criterion))])  # noqa: E731
    return {"mae": pick(np.abs(errors).mean(axis=1)), "rmse": pick((errors**2).mean(axis=1)), "tensor-mae": pick(normalised)}


def forecasts(run: Run, cut: int, horizon: int, rows: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    settings = FitSettings(shrink=1.0)
    h = history(run, cut, rows)
    plain = fit_plain(h, horizon, [horizon], settings)
    factors = chosen_shrinks(h, horizon, settings, 1) | {f"fixed {a:g}": a for a in FIXED}
    made = {rule: apply_forecaster(run, cut, plain.shrunk(alpha)) for rule, alpha in factors.items()}
    five = chosen_shrinks(h, horizon, settings, 5)["mae"]
    made["mae, anchor 5"] = apply_forecaster(run, cut, fit_plain(h, horizon, [horizon], settings, 5).shrunk(five))
    return made, factors | {"mae, anchor 5": five}


def evaluate(run: Run, nominal: int, save_every: int, rng: np.random.Generator) -> list[dict]:
    rows = sampled_rows(run, rng)
    results = []
    for fraction, _, jump, horizon, cut, target in settings_of(run, nominal, save_every):
        made, factors = forecasts(run, cut, horizon, rows)
        saved = {rule: steps_saved(run, cut, target, run.loss(vector)) for rule, vector in made.items()}
        results.append({"cut": fraction, "jump": jump, "steps_saved": saved, "factors": factors})
        print(f"  cut {fraction:.2f}, jump {jump}x: " + ", ".join(f"{r} {v:+.2f}" for r, v in saved.items()), flush=True)
    return results


def leave_one_out(means: dict[str, dict[str, float]]) -> dict[str, tuple[str, float]]:
    """For each workload: the rule best on the others (mean of their means), and its mean here."""
    chosen = {}
    for held in means:
        others = [w for w in means if w != held]
        rule = max(RULES, key=lambda r: np.mean([means[w][r] for w in others]))
        chosen[held] = (rule, means[held][rule])
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", action="append", choices=sorted(WORKLOADS))
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/farcast-accuracy"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results, means = {}, {}
    for name in args.workload or [n for n in WORKLOADS if n not in GPU_ONLY]:
        workload = load_workload(name)
        print(f"{name}:", flush=True)
        results[name] = evaluate(Run(args.work / name, workload), workload.STEPS, workload.SAVE_EVERY, np.random.default_rng(0))
        means[name] = {rule: float(np.mean([r["steps_saved"][rule] for r in results[name]])) for rule in RULES}
    print("| workload | " + " | ".join(RULES) + " |\n|---|" + "---|" * len(RULES))
    for name, row in means.items():
        print(f"| {name} | " + " | ".join(f"{row[r]:+.2f}" for r in RULES) + " |")
    print("| **mean** | " + " | ".join(f"**{np.mean([means[w][r] for w in means]):+.2f}**" for r in RULES) + " |")
    held_out = leave_one_out(means)
    print("\nleave one workload out: the rule best on the other workloads, and what it saves on this one")
    for name, (rule, value) in held_out.items():
        print(f"| {name} | {rule} | {value:+.2f} | mae (default): {means[name]['mae']:+.2f} |")
    print(
        f"| **mean** | | **{np.mean([v for _, v in held_out.values()]):+.2f}** | **{np.mean([m['mae'] for m in means.values()]):+.2f}** |"
    )
    if args.json:
        args.json.write_text(json.dumps({"results": results, "means": means, "leave_one_out": held_out}, indent=1))


if __name__ == "__main__":
    main()

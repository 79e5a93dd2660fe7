"""Does the forecast save training? Every method on every workload, in weight space and in loss.

    python benchmarks/accuracy.py                      # all CPU workloads (a few minutes)
    python benchmarks/accuracy.py --workload digits-mlp-adam
    FARCAST_BENCH_DEVICE=cuda python benchmarks/accuracy.py --workload distilbert-size-lm-adamw   # GPU machine

For each workload (benchmarks/workloads/, runs cached under --work): cuts at 25%, 50% and 75% of the
nominal run length L, jumps of 0.5x and 1x the elapsed steps. For every method: weight MAE skill
against keeping the last checkpoint, and steps saved: where the true run reaches the forecast's
validation loss, minus the cut, as a fraction of the jump (0: no better than the last checkpoint,
1: as good as training the whole jump, capped at 1; negative: worse than the last checkpoint).

Methods: keep last, straight line (last two checkpoints), LAWA (mean of the last 5), full-window
linear (11 points of the history on a relative time grid, least squares), the paper's 2-point
model (unshrunk), variants: per-tensor coefficients, a recent anchor (the midpoint of the history
instead of its start), a smoothed last input (mean of the last 3 checkpoints); and farcast's
default, the 2-point model shrunk towards the last checkpoint by the factor its own backtest picks
(`farcast predict` as shipped, called through its Python API); and the same with time measured in
cumulative learning rate from trainer_state.json (lr-time; equal to the default at constant rate).

Oracles (only with --methods; they look at the future, so they measure the ceiling of the 2-point
family, not a forecaster): a·w_0 + c·w_t + b with coefficients fitted by least squares to the true
target weights, shared or per tensor; and with coefficients chosen to minimise the validation loss
itself, shared (3 numbers) or per tensor (3 per tensor).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))

from farcast_cli import commands  # noqa: E402
from farcast_cli.evaluate.evaluator import EvalOptions  # noqa: E402
from farcast_cli.evaluate.loss import step_reaching  # noqa: E402
from farcast_cli.model.fit import FitSettings, fit_linear_map  # noqa: E402
from farcast_cli.model.forecaster import Forecaster, fit_on_run  # noqa: E402
from farcast_cli.model.history import History  # noqa: E402
from farcast_cli.model.pairs import Pairs, interpolate, self_pairs  # noqa: E402

WORKLOADS = {
    "least-squares-gd": ("workloads.least_squares", None),
    "digits-mlp-adam": ("workloads.digits_mlp", "Adam"),
    "digits-mlp-sgdm": ("workloads.digits_mlp", "SGDMomentum"),
    "mnist1d-cnn-adam": ("workloads.mnist1d_cnn", None),
    "tiny-lm-adamw": ("workloads.tiny_lm", "SMALL"),
    "minilm-finetune-adamw": ("workloads.minilm_finetune", None),
    "distilbert-size-lm-adamw": ("workloads.tiny_lm", "DISTILBERT_SIZE"),
}
GPU_ONLY = {"distilbert-size-lm-adamw"}
CUTS, JUMPS = (0.25, 0.5, 0.75), (0.5, 1.0)
DEFAULT_METHODS = (
    "last",
    "line",
    "lawa",
    "full-window",
    "2-point",
    "per-tensor",
    "recent-anchor",
    "smoothed",
    "shared+shrink",
    "lr-time",
    "per-tensor+shrink",
    "farcast",
    "farcast+loss",
)
ORACLES = ("oracle-shared", "oracle-per-tensor", "oracle-loss", "oracle-loss-per-tensor")
METHODS = DEFAULT_METHODS + ORACLES
SAMPLE = 20000


def load_workload(name: str):
    module_name, attribute = WORKLOADS[name]
    module = importlib.import_module(module_name)
    return getattr(module, attribute) if attribute else module


class Run:
    """Every checkpoint of a workload's run as one flat float64 vector, with a way back to a model."""

    def __init__(self, run_dir: Path, workload) -> None:
        self.run_dir = run_dir
        folders = sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        self.steps = np.array([int(p.name.split("-")[1]) for p in folders], dtype=np.float64)
        states = [load_file(p / "model.safetensors") for p in folders]
        self.names = [n for n in sorted(states[0]) if states[0][n].is_floating_point()]
        self.shapes = {n: states[0][n].shape for n in self.names}
        self.template = states[0]
        self.vectors = np.stack([np.concatenate([s[n].float().reshape(-1).numpy() for n in self.names]) for s in states])
        self.tensor_index = np.concatenate([np.full(states[0][n].numel(), i) for i, n in enumerate(self.names)])
        self.workload = workload
        self._losses: dict[int, float] = {}

    def index(self, step: float) -> int:
        return int(np.searchsorted(self.steps, step))

    def loss(self, vector: np.ndarray) -> float:
        model = self.workload.build()
        state, position = dict(self.template), 0
        for name in self.names:
            count = int(np.prod(self.shapes[name]))
            state[name] = torch.from_numpy(vector[position : position + count].copy()).float().reshape(self.shapes[name])
            position += count
        model.load_state_dict(state)
        model.eval()
        return self.workload.validation_loss(model)

    def folder_loss(self, checkpoint: Path) -> float:
        """The validation loss of a checkpoint folder: farcast's evaluator in this harness, in-process."""
        model = self.workload.build()
        model.load_state_dict(load_file(Path(checkpoint) / "model.safetensors"))
        model.eval()
        return self.workload.validation_loss(model)

    def folder_vector(self, folder: Path) -> np.ndarray:
        state = load_file(folder / "model.safetensors")
        return np.concatenate([state[n].double().reshape(-1).numpy() for n in self.names])

    def checkpoint_loss(self, k: int) -> float:
        if k not in self._losses:
            self._losses[k] = self.loss(self.vectors[k])
        return self._losses[k]


def history(run: Run, upto: int, rows: np.ndarray | None = None) -> History:
    """The history up to checkpoint `upto` of the given coordinates; all of them (a view, no copy) for None."""
    if rows is None:
        return History(run.steps[: upto + 1], run.vectors[: upto + 1].T, run.tensor_index, run.names)
    return History(run.steps[: upto + 1], run.vectors[: upto + 1, rows].T.astype(np.float64), run.tensor_index[rows], run.names)


def fit_pairs(pairs: Pairs) -> tuple[tuple, tuple]:
    linear, _ = fit_linear_map(pairs, FitSettings(shrink=1.0))
    return linear.weight, linear.bias


def two_point(run: Run, cut: int, horizon: int, rows: np.ndarray, first_of=None, last_of=None) -> np.ndarray:
    """Fit the shared linear layer on the history up to `cut` and apply it at the cut.

    first_of(history, t) and last_of(history, t) choose the two inputs (default: w at s_0 and w at t).
    """
    h = history(run, cut, rows)
    pairs = self_pairs(h, horizon, [horizon])
    s0 = h.steps[0]
    rho = horizon / (h.steps[-1] - s0)
    anchors = [t for t in h.steps[1:] if t + rho * (t - s0) <= h.steps[-1] + 1e-9]
    if first_of is not None:
        pairs.first = np.concatenate([first_of(h, t) for t in anchors])
    if last_of is not None:
        pairs.last = np.concatenate([last_of(h, t) for t in anchors])
    weight, bias = fit_pairs(pairs)
    full = history(run, cut)
    first = full.values[:, 0] if first_of is None else first_of(full, full.steps[-1])
    last = full.values[:, -1] if last_of is None else last_of(full, full.steps[-1])
    return weight[0][0] * first + weight[1][0] * last + bias[0]


def midpoint_anchor(h: History, t: float) -> np.ndarray:
    return interpolate(h, h.steps[0] + 0.5 * (t - h.steps[0]))


def smoothed_last(h: History, t: float) -> np.ndarray:
    spacing = h.steps[1] - h.steps[0]
    return np.mean([interpolate(h, max(h.steps[0], t - k * spacing)) for k in range(3)], axis=0)


def full_window(run: Run, cut: int, horizon: int, rows: np.ndarray, points: int = 11) -> np.ndarray:
    """Least squares from the history at `points` relative times (plus a bias) to the jump's target."""
    h = history(run, cut, rows)
    s0, end = h.steps[0], h.steps[-1]
    rho = horizon / (end - s0)
    grid = np.linspace(0, 1, points)
    anchors = [t for t in h.steps[1:] if t + rho * (t - s0) <= end + 1e-9]
    design = lambda hist, t: np.stack([interpolate(hist, s0 + g * (t - s0)) for g in grid] + [np.ones(hist.values.shape[0])], axis=1)  # noqa: E731
    x = np.concatenate([design(h, t) for t in anchors])
    y = np.concatenate([interpolate(h, t + rho * (t - s0)) for t in anchors])
    coefficients, *_ = np.linalg.lstsq(x, y, rcond=None)
    return design(history(run, cut), end) @ coefficients


def per_tensor(run: Run, cut: int, horizon: int, rows: np.ndarray) -> np.ndarray:
    result = np.empty(run.vectors.shape[1])
    for index in range(len(run.names)):
        mine = rows[run.tensor_index[rows] == index]
        columns = np.nonzero(run.tensor_index == index)[0]
        if len(mine) < 20:
            mine = rows
        h = history(run, cut, mine)
        weight, bias = fit_pairs(self_pairs(h, horizon, [horizon]))
        result[columns] = weight[0][0] * run.vectors[0, columns] + weight[1][0] * run.vectors[cut, columns] + bias[0]
    return result


def farcast_fit(run: Run, cut: int, horizon: int, rows: np.ndarray, settings: FitSettings = FitSettings()) -> np.ndarray:
    """What `farcast predict` does with these settings (default: per-tensor coefficients, shrunk by
    the factor its own backtest picks), through its Python API."""
    return apply_forecaster(run, cut, fit_on_run(history(run, cut, rows), horizon, [horizon], settings).forecaster)


def apply_forecaster(run: Run, cut: int, forecaster: Forecaster) -> np.ndarray:
    """The forecaster applied to every weight of the run, forecasting from checkpoint `cut`."""
    inputs = [torch.from_numpy(run.vectors[k]).double() for k in forecaster.input_indices(cut)]
    result = np.empty(run.vectors.shape[1])
    for index, name in enumerate(run.names):
        columns = torch.from_numpy(np.nonzero(run.tensor_index == index)[0])
        result[columns.numpy()] = forecaster.map_for(name).apply([values[columns] for values in inputs], 0).numpy()
    return result


def farcast_predict(run: Run, cut: int, horizon: int, by_loss: bool, costs: dict, settings: FitSettings = FitSettings()) -> np.ndarray:
    """`farcast predict --last-step CUT -H H` as shipped, through commands.predict: by weight error, or
    with the validation loss as its evaluator (in-process, uncached). `costs` gets the evaluations,
    their seconds, the whole call's seconds and what was written."""
    import tempfile
    import time

    evaluation = EvalOptions(run.folder_loss, cache=False) if by_loss else EvalOptions()
    options = commands.StreamOptions(quiet=True, backtest="sample")
    with tempfile.TemporaryDirectory(dir=run.run_dir.parent) as scratch:
        started = time.perf_counter()
        report = commands.predict(
            run.run_dir, Path(scratch) / "out", horizon=horizon, last_step=int(run.steps[cut]), evaluation=evaluation, options=options,
            settings=settings,
        )  # fmt: skip
        costs.update(seconds=time.perf_counter() - started, written=report.written.label)
        if report.loss is not None:
            costs.update(evaluations=report.loss.evaluations, eval_seconds=report.loss.eval_seconds)
        return run.folder_vector(Path(scratch) / "out")


def _two_point_groups(run: Run, cut: int, per_tensor: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """(columns, design [w_0, w_cut, 1]) for all weights at once, or for each tensor."""
    groups = [np.arange(run.vectors.shape[1])] if not per_tensor else [np.nonzero(run.tensor_index == i)[0] for i in range(len(run.names))]
    return [(c, np.stack([run.vectors[0, c], run.vectors[cut, c], np.ones(len(c))], axis=1)) for c in groups]


def _combine(run: Run, groups: list[tuple[np.ndarray, np.ndarray]], coefficients: np.ndarray) -> np.ndarray:
    result = np.empty(run.vectors.shape[1])
    for k, (columns, design) in enumerate(groups):
        result[columns] = design @ coefficients[3 * k : 3 * k + 3]
    return result


def _closest_in_weights(run: Run, groups: list[tuple[np.ndarray, np.ndarray]], target: int) -> np.ndarray:
    return np.concatenate([np.linalg.lstsq(design, run.vectors[target, columns], rcond=None)[0] for columns, design in groups])


def oracle(run: Run, cut: int, target: int, per_tensor: bool) -> np.ndarray:
    """The ceiling of the 2-point family: coefficients fitted by least squares to the true future
    weights (which no forecaster has), shared by all weights or one set per tensor."""
    groups = _two_point_groups(run, cut, per_tensor)
    return _combine(run, groups, _closest_in_weights(run, groups, target))


def oracle_by_loss(run: Run, cut: int, target: int, per_tensor: bool) -> np.ndarray:
    """The ceiling of the 2-point family judged by loss: the (a, c, b) of a·w_0 + c·w_t + b (shared,
    or one set per tensor) that minimise the validation loss itself, searched from the weight-space
    oracle's coefficients (Nelder-Mead shared, Powell per tensor); no forecaster could know them."""
    from scipy.optimize import minimize

    groups = _two_point_groups(run, cut, per_tensor)
    if per_tensor:
        method, options = "Powell", {"maxfev": 3000, "xtol": 1e-4, "ftol": 1e-7}
    else:
        method, options = "Nelder-Mead", {"maxfev": 300, "xatol": 1e-4, "fatol": 1e-6}
    best = minimize(lambda c: run.loss(_combine(run, groups, c)), _closest_in_weights(run, groups, target), method=method, options=options)
    return _combine(run, groups, best.x)


def lr_clock(run: Run, cut_step: int):
    """Step -> cumulative learning rate, from the cut checkpoint's trainer_state.json log, the
    learning rate extrapolated linearly (from the last fifth of the log, floored at 0) beyond it.
    Scaled by the mean rate so that it reads in 'steps at the mean rate'."""
    state = json.loads((run.run_dir / f"checkpoint-{cut_step}" / "trainer_state.json").read_text())
    logged = [(e["step"], e["learning_rate"]) for e in state["log_history"] if "learning_rate" in e]
    steps, rates = np.array([s for s, _ in logged], dtype=float), np.array([r for _, r in logged])
    tail = slice(len(steps) * 4 // 5, None)
    slope, intercept = np.polyfit(steps[tail], rates[tail], 1) if len(steps[tail]) > 1 else (0.0, rates[-1])
    horizon = np.arange(1, int(run.steps[-1]) + 1, dtype=float)
    known = np.interp(horizon, steps, rates)
    future = np.maximum(0.0, intercept + slope * horizon)
    rate = np.where(horizon <= steps[-1], known, future)
    clock = np.concatenate([[0.0], np.cumsum(rate)]) / rates.mean()
    return lambda step: np.interp(step, np.arange(len(clock)), clock)


def lr_time(run: Run, cut: int, horizon: int, rows: np.ndarray) -> np.ndarray:
    """The default fit and shrinkage with time measured in cumulative learning rate, not steps."""
    clock = lr_clock(run, int(run.steps[cut]))
    h = history(run, cut, rows)
    h.steps = clock(h.steps)
    jump = float(clock(run.steps[cut] + horizon) - clock(run.steps[cut]))
    return apply_forecaster(run, cut, fit_on_run(h, jump, [jump], FitSettings(per_tensor=False)).forecaster)


def sampled_rows(run: Run, rng: np.random.Generator) -> np.ndarray:
    """The weight coordinates the harness's own fits read: all, or SAMPLE of them."""
    rows = np.arange(run.vectors.shape[1])
    return rows if len(rows) <= SAMPLE else np.sort(rng.choice(rows, SAMPLE, replace=False))


def settings_of(
    run: Run, nominal: int, save_every: int, cuts: tuple[float, ...] = CUTS
) -> Iterator[tuple[float, int, float, int, int, int]]:
    """(cut fraction, cut step, jump, horizon, cut index, target index) for each of `cuts` and each jump the run holds."""
    for fraction in cuts:
        cut_step = round(fraction * nominal / save_every) * save_every
        for jump in JUMPS:
            horizon = round(jump * cut_step / save_every) * save_every
            cut, target = run.index(cut_step), run.index(cut_step + horizon)
            if target < len(run.steps) and run.steps[target] == cut_step + horizon:
                yield fraction, cut_step, jump, horizon, cut, target


def steps_saved(run: Run, cut: int, target: int, loss: float) -> float:
    """Where the true run reaches `loss`, as a fraction of the jump cut -> target (1 when it never does;
    negative, from the run's earlier checkpoints, when the loss is worse than the cut's)."""
    curve = [(run.steps[k], run.checkpoint_loss(k)) for k in range(cut, target + 1)]
    horizon = run.steps[target] - run.steps[cut]
    if loss > curve[0][1]:
        return -_steps_back(run, cut, loss) / horizon
    reached = step_reaching(curve, loss)
    return 1.0 if reached is None else (reached - run.steps[cut]) / horizon


def evaluate(
    run: Run,
    nominal: int,
    save_every: int,
    rng: np.random.Generator,
    methods: tuple[str, ...] = DEFAULT_METHODS,
    fit: FitSettings = FitSettings(),
    cuts: tuple[float, ...] = CUTS,
) -> list[dict]:
    rows = sampled_rows(run, rng)
    results = []
    for fraction, cut_step, jump, horizon, cut, target in settings_of(run, nominal, save_every, cuts):
        last = run.vectors[cut]
        costs: dict[str, dict] = {}
        makers = {
            "last": lambda: last,
            "line": lambda: last + (last - run.vectors[cut - 1]) * horizon / save_every,
            "lawa": lambda: run.vectors[max(0, cut - 4) : cut + 1].mean(axis=0),
            "full-window": lambda: full_window(run, cut, horizon, rows),
            "2-point": lambda: two_point(run, cut, horizon, rows),
            "per-tensor": lambda: per_tensor(run, cut, horizon, rows),
            "recent-anchor": lambda: two_point(run, cut, horizon, rows, first_of=midpoint_anchor),
            "smoothed": lambda: two_point(run, cut, horizon, rows, last_of=smoothed_last),
            "shared+shrink": lambda: farcast_fit(run, cut, horizon, rows, FitSettings(per_tensor=False)),
            "lr-time": lambda: lr_time(run, cut, horizon, rows),
            "per-tensor+shrink": lambda: farcast_fit(run, cut, horizon, rows),
            "farcast": lambda: farcast_predict(run, cut, horizon, False, costs.setdefault("farcast", {}), fit),
            "farcast+loss": lambda: farcast_predict(run, cut, horizon, True, costs.setdefault("farcast+loss", {}), fit),
            "oracle-shared": lambda: oracle(run, cut, target, per_tensor=False),
            "oracle-per-tensor": lambda: oracle(run, cut, target, per_tensor=True),
            "oracle-loss": lambda: oracle_by_loss(run, cut, target, per_tensor=False),
            "oracle-loss-per-tensor": lambda: oracle_by_loss(run, cut, target, per_tensor=True),
        }
        predictions = {m: makers[m]() for m in METHODS if m in methods or m == "last"}
        truth = run.vectors[target]
        row = {
            "cut": fraction,
            "cut_step": cut_step,
            "jump": jump,
            "target_step": cut_step + horizon,
            "loss_last": run.checkpoint_loss(cut),
            "loss_target": run.checkpoint_loss(target),
            "methods": {},
        }
        mae_last = np.abs(last - truth).mean()
        for method, predicted in predictions.items():
            loss = run.loss(predicted)
            row["methods"][method] = {
                "weight_skill": float(1 - np.abs(predicted - truth).mean() / mae_last),
                "loss": float(loss),
                "steps_saved": float(steps_saved(run, cut, target, loss)),
                **costs.get(method, {}),
            }
        results.append(row)
        print(
            f"  cut {fraction:.2f} (step {cut_step}), jump {jump}x to {cut_step + horizon}: "
            + ", ".join(f"{m} {v['steps_saved']:+.2f}" for m, v in row["methods"].items()),
            flush=True,
        )
    return results


def _steps_back(run: Run, cut: int, loss: float) -> float:
    """How many steps before the cut the true run last had this (worse) loss, linear between
    checkpoints: a negative saving."""
    for k in range(cut - 1, -1, -1):
        later, earlier = run.checkpoint_loss(k + 1), run.checkpoint_loss(k)
        if earlier >= loss:
            fraction = (loss - later) / (earlier - later) if earlier > later else 1.0
            return float(run.steps[cut] - run.steps[k + 1] + fraction * (run.steps[k + 1] - run.steps[k]))
    return float(run.steps[cut] - run.steps[0])


def table(name: str, results: list[dict]) -> str:
    methods = [m for m in METHODS if m in results[0]["methods"]]
    head = "| cut, jump | " + " | ".join(methods) + " |\n|---|" + "---|" * len(methods) + "\n"
    lines = []
    for row in results:
        cells = [f"{row['methods'][m]['steps_saved']:+.2f} ({row['methods'][m]['weight_skill']:+.2f})" for m in methods]
        lines.append(f"| {row['cut']:.0%}, {row['jump']:g}x | " + " | ".join(cells) + " |")
    means = [np.mean([r["methods"][m]["steps_saved"] for r in results]) for m in methods]
    lines.append("| **mean steps saved** | " + " | ".join(f"**{v:+.2f}**" for v in means) + " |")
    return f"### {name}\n\nsteps saved (weight MAE skill vs keep last)\n\n" + head + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", action="append", choices=sorted(WORKLOADS))
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/farcast-accuracy"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--methods", help="comma-separated, from: " + ", ".join(METHODS) + " (default: all but the oracles)")
    parser.add_argument(
        "--objective", choices=("l1", "l2"), default=FitSettings.objective, help="the fit objective of farcast, farcast+loss"
    )
    parser.add_argument(
        "--cuts", type=lambda text: tuple(float(c) for c in text.split(",")), default=CUTS,
        help="comma-separated, from: " + ", ".join(map(str, CUTS)) + " (all by default; the same figures as a whole run, "
        "to split a slow workload over several runs)",
    )  # fmt: skip
    args = parser.parse_args()
    if not set(args.cuts) <= set(CUTS):
        parser.error(f"--cuts: from {', '.join(map(str, CUTS))}")
    fit = FitSettings(objective=args.objective)
    methods = tuple(args.methods.split(",")) if args.methods else DEFAULT_METHODS
    torch.set_num_threads(1)
    everything = {}
    for name in args.workload or [n for n in WORKLOADS if n not in GPU_ONLY]:
        workload = load_workload(name)
        run_dir = args.work / name
        if not run_dir.exists():
            print(f"{name}: training ...", flush=True)
            workload.train(run_dir)
        print(f"{name}:", flush=True)
        run = Run(run_dir, workload)
        everything[name] = evaluate(run, workload.STEPS, workload.SAVE_EVERY, np.random.default_rng(0), methods, fit, args.cuts)
        print(table(name, everything[name]))
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1))


if __name__ == "__main__":
    main()

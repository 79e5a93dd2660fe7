"""The paper's synthetic experiment, run through farcast's reference-run mode.

Least-squares problems min_w |Xw - y|^2 / 2n (n = 100 rows, X and w* standard normal, lr 0.01),
one random problem per trajectory, solved by GD or by SGD on minibatches of 10 rows,
for 200 steps (201 saved points). 200 trajectories: 100 train + 50 validation form the reference
run (its tensor `w` has one row per trajectory), 50 test trajectories form the run to forecast.
Input: steps 0 and 20; forecast: steps 40, 60, ..., 200. Metric: test MSE, mean over 5 seeds.

    python benchmarks/synthetic_least_squares.py            # all four data sets, 5 seeds
    python benchmarks/synthetic_least_squares.py --seeds 1  # quicker
    python benchmarks/synthetic_least_squares.py --authors  # the authors' data layout and protocol, step 200 only

Baselines computed here: last value (w_20), linear extrapolation through w_19 and w_20, and the
full-window linear model (least squares on all 21 inputs, fitted on the reference trajectories).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from farcast_cli.cli import app

STEPS = 200
CONTEXT_END = 20
OUTPUT_STEPS = list(range(40, STEPS + 1, 20))
PAPER_AT_200 = {  # PAPER.md: last value, linear extrapolation, full-window linear, 2-point
    ("3-d", "GD"): (5.8e-1, 8.0e-1, 1.4e-2, 8.9e-3),
    ("3-d", "SGD"): (5.6e-1, 6.9e-1, 4.6e-2, 3.0e-2),
    ("1-d", "GD"): (5.8e-1, 1.1e0, 1.1e-1, 2.7e-2),
    ("1-d", "SGD"): (5.1e-1, 6.4e-1, 2.7e-1, 7.1e-2),
}


def trajectories(
    count: int, dim: int, optimizer: str, rng: np.random.Generator, n: int = 100, lr: float = 0.01, batch: int = 10
) -> np.ndarray:
    """(count, STEPS + 1, dim): GD, or SGD on minibatches of `batch` rows, on a fresh random problem each."""
    result = np.empty((count, STEPS + 1, dim))
    for i in range(count):
        x = rng.normal(size=(n, dim))
        w_true = rng.normal(size=dim)
        y = x @ w_true + 0.1 * rng.normal(size=n)
        w = rng.normal(size=dim)
        result[i, 0] = w
        for t in range(1, STEPS + 1):
            rows = slice(None) if optimizer == "GD" else rng.integers(n, size=batch)
            xb, yb = x[rows], y[rows]
            w = w - lr * xb.T @ (xb @ w - yb) / len(yb)
            result[i, t] = w
    return result


def write_as_run(folder: Path, series: np.ndarray, steps: list[int]) -> Path:
    folder.mkdir(parents=True)
    for step in steps:
        save_file({"w": torch.tensor(series[:, step, :], dtype=torch.float32).contiguous()}, folder / f"step_{step}.safetensors")
    return folder


def farcast(*args: object) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exit_code != 0:
        raise SystemExit(f"farcast {' '.join(map(str, args))} failed: {result.stderr}")
    return result.stdout


def full_window_linear(train: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Least squares from all 21 observed values (plus a bias) to each output step, channel-independent."""

    def design(series: np.ndarray) -> np.ndarray:
        window = series[:, : CONTEXT_END + 1, :].transpose(0, 2, 1).reshape(-1, CONTEXT_END + 1)
        return np.hstack([window, np.ones((len(window), 1))])

    targets = train[:, OUTPUT_STEPS, :].transpose(0, 2, 1).reshape(-1, len(OUTPUT_STEPS))
    coefficients, *_ = np.linalg.lstsq(design(train), targets, rcond=None)
    count, _, dim = test.shape
    return (design(test) @ coefficients).reshape(count, dim, len(OUTPUT_STEPS)).transpose(0, 2, 1)


def one_seed(dim: int, optimizer: str, seed: int, work: Path) -> dict[str, np.ndarray]:
    """MSE per output step for each method."""
    rng = np.random.default_rng(seed)
    series = trajectories(200, dim, optimizer, rng)
    reference, test = series[:150], series[150:]
    reference_run = write_as_run(work / "reference", reference, list(range(STEPS + 1)))
    test_run = write_as_run(work / "test", test, list(range(CONTEXT_END + 1)))
    emits = [f"--emit={s - CONTEXT_END}" for s in OUTPUT_STEPS[:-1]]
    farcast(
        "fit",
        reference_run,
        "--context-end",
        CONTEXT_END,
        "--horizon",
        STEPS - CONTEXT_END,
        *emits,
        "-o",
        work / "forecaster.json",
        "--seed",
        seed,
        "--batch-size",
        32,
        "--quiet",
        "--json",
    )
    farcast("predict", test_run, "--forecaster", work / "forecaster.json", "-o", work / "out", "--quiet", "--json")
    two_point = np.stack(
        [load_file(work / "out" / f"checkpoint-{s}" / "model.safetensors")["w"].double().numpy() for s in OUTPUT_STEPS], axis=1
    )
    truth = test[:, OUTPUT_STEPS, :]
    last = np.repeat(test[:, CONTEXT_END : CONTEXT_END + 1, :], len(OUTPUT_STEPS), axis=1)
    slope = test[:, CONTEXT_END, :] - test[:, CONTEXT_END - 1, :]
    line = test[:, CONTEXT_END, None, :] + slope[:, None, :] * (np.array(OUTPUT_STEPS) - CONTEXT_END)[None, :, None]
    predictions = {
        "last value": last,
        "linear extrapolation": line,
        "full-window linear": full_window_linear(reference[:100], test),
        "2-point (farcast)": two_point,
    }
    return {name: ((p - truth) ** 2).mean(axis=(0, 2)) for name, p in predictions.items()}


def authors_trajectories(count: int, dim: int, optimizer: str, rng: np.random.Generator, n: int = 100) -> np.ndarray:
    """The authors' data layout (issue 22), our own code: w* ~ N(0, I), X ~ N(0, 1) of n x d, y = X w*,
    w_0 ~ U(0, 1)^d; gradient X^T X w - X^T y summed over rows; GD with step 0.01 / lambda_max(X^T X),
    SGD on 8 random rows a step with step 0.001."""
    result = np.empty((count, STEPS + 1, dim))
    for i in range(count):
        w_true = rng.normal(size=dim)
        x = rng.normal(size=(n, dim))
        y = x @ w_true
        w = rng.uniform(size=dim)
        lr = 0.01 / np.linalg.eigvalsh(x.T @ x).max() if optimizer == "GD" else 0.001
        result[i, 0] = w
        for t in range(1, STEPS + 1):
            rows = slice(None) if optimizer == "GD" else rng.integers(n, size=8)
            w = w - lr * (x[rows].T @ (x[rows] @ w - y[rows]))
            result[i, t] = w
    return result


def authors_seed(dim: int, optimizer: str, seed: int, work: Path, extra: list[str], held_out: str) -> dict[str, float]:
    """Test MSE at step 200: keep-last, exact least squares of the 2-point form on the 100 training
    sequences (and the same coefficients on the float32 checkpoints farcast reads and writes, then also
    computed in float32 as farcast computes an F32 forecast: the floors of any forecast from them),
    and farcast's fit, default and `--objective l2`. held_out "run": the paper's protocol,
    the 100 training sequences as the reference run and the 50 validation ones as `--validation-run`;
    "coordinates": the 150 as one reference run, farcast holding out its own coordinates."""
    series = authors_trajectories(200, dim, optimizer, np.random.default_rng(seed))
    train, test = series[:100], series[150:]
    steps = [0, CONTEXT_END, STEPS]
    if held_out == "run":
        reference_run = write_as_run(work / "reference", train, steps)
        validation = ["--validation-run", write_as_run(work / "validation", series[100:150], steps)]
    else:
        reference_run, validation = write_as_run(work / "reference", series[:150], steps), []
    test_run = write_as_run(work / "test", test, [0, CONTEXT_END])
    truth = test[:, STEPS]
    mse = lambda p: float(((p - truth) ** 2).mean())  # noqa: E731
    result = {"keep-last": mse(test[:, CONTEXT_END])}

    def design(s: np.ndarray) -> np.ndarray:
        return np.stack([s[:, 0].ravel(), s[:, CONTEXT_END].ravel(), np.ones(s[:, 0].size)], axis=1)

    coefficients, *_ = np.linalg.lstsq(design(train), train[:, STEPS].ravel(), rcond=None)
    result["exact least squares"] = mse((design(test) @ coefficients).reshape(truth.shape))
    as_f32 = test.astype(np.float32).astype(np.float64)
    result["exact, f32 in and out"] = mse((design(as_f32) @ coefficients).reshape(truth.shape).astype(np.float32))
    in_f32 = design(as_f32).astype(np.float32) @ coefficients.astype(np.float32)
    result["exact, f32 arithmetic"] = mse(in_f32.reshape(truth.shape))
    for name, objective in (("farcast", []), ("farcast l2", ["--objective", "l2"])):
        out = work / name.replace(" ", "-")
        farcast("fit", reference_run, "--context-end", CONTEXT_END, "--horizon", STEPS - CONTEXT_END, "-o", out.with_suffix(".json"),
                *validation, "--seed", seed, "--quiet", "--json", *objective, *extra)  # fmt: skip
        farcast("predict", test_run, "--forecaster", out.with_suffix(".json"), "-o", out, "--quiet", "--json")
        result[name] = mse(load_file(out / "model.safetensors")["w"].double().numpy())
    return result


def authors_main(seeds: int, extra: list[str], held_out: str) -> dict:
    table = {}
    for dim in (3, 1):
        for optimizer in ("GD", "SGD"):
            runs = []
            for seed in range(seeds):
                with tempfile.TemporaryDirectory() as work:
                    runs.append(authors_seed(dim, optimizer, seed, Path(work), extra, held_out))
            row = {name: float(np.mean([r[name] for r in runs])) for name in runs[0]}
            table[f"{dim}-d {optimizer}"] = row
            ratios = " | ".join(f"{name} / exact {row[name] / row['exact least squares']:.3f}" for name in ("farcast", "farcast l2"))
            print(f"{dim}-d {optimizer:3s} | " + " | ".join(f"{k} {v:.2e}" for k, v in row.items()) + f" | {ratios}", flush=True)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--authors", action="store_true", help="the authors' data layout (issue 22), test MSE at step 200")
    parser.add_argument(
        "--held-out",
        choices=("run", "coordinates"),
        default="run",
        help="with --authors: a validation run (the paper's protocol) or farcast's own held-out coordinates",
    )
    parser.add_argument("--fit-args", default="", help="extra farcast fit arguments, e.g. '--lr 0.001'")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.authors:
        table = authors_main(args.seeds, args.fit_args.split(), args.held_out)
        if args.json:
            args.json.write_text(json.dumps(table, indent=1))
        return
    table = {}
    for dim_name, dim in (("3-d", 3), ("1-d", 1)):
        for optimizer in ("GD", "SGD"):
            runs = []
            for seed in range(args.seeds):
                with tempfile.TemporaryDirectory() as work:
                    runs.append(one_seed(dim, optimizer, seed, Path(work)))
            table[f"{dim_name} {optimizer}"] = {name: np.mean([r[name] for r in runs], axis=0).tolist() for name in runs[0]}
            paper = PAPER_AT_200[(dim_name, optimizer)]
            ours = [table[f"{dim_name} {optimizer}"][name][-1] for name in runs[0]]
            print(
                f"least squares {dim_name}, {optimizer:3s} | ours at step 200: "
                + " | ".join(f"{v:.1e}" for v in ours)
                + " || paper: "
                + " | ".join(f"{v:.1e}" for v in paper),
                flush=True,
            )
    print("columns: last value | linear extrapolation | full-window linear | 2-point")
    if args.json:
        args.json.write_text(json.dumps({"output_steps": OUTPUT_STEPS, "mse": table}, indent=1))


if __name__ == "__main__":
    main()

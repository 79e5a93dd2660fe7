"""The model's math, pinned on trajectories whose future is known in closed form, through the CLI;
and the fit's hand-written gradient against finite differences.

A linear trajectory w(t) = a + b t is forecast exactly by the time rule (model/pairs.py): with
rho = H / (s_K - s_0) every pair's target is -rho w_0 + (1 + rho) w_t. Gradient descent on a
quadratic with one rate c gives w(t) = w* + c^t (w_0 - w*), and w(E + o) is exactly a linear map of
(w_0, w_E) with known coefficients (PAPER.md): the reference protocol must find them. A 10% error in
the time rule, in the anchor or in the shrink factor moves these forecasts by 5-10% of the jump.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_run
from safetensors.torch import load_file

from farcast_cli.model.fit import _Problem
from farcast_cli.model.pairs import Pairs

TOLERANCE = 0.01
SHAPES = {"w": (32, 16), "v": (200,)}


def linear_trajectory(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    start = {name: torch.randn(shape, generator=generator, dtype=torch.float64) for name, shape in SHAPES.items()}
    slope = {name: torch.randn(shape, generator=generator, dtype=torch.float64) * 0.01 for name, shape in SHAPES.items()}
    return lambda t: {name: start[name] + slope[name] * t for name in SHAPES}


def gradient_descent_trajectory(seed: int, rate: float = 0.99):
    generator = torch.Generator().manual_seed(seed)
    start = {name: torch.randn(shape, generator=generator, dtype=torch.float64) for name, shape in SHAPES.items()}
    optimum = {name: torch.randn(shape, generator=generator, dtype=torch.float64) for name, shape in SHAPES.items()}
    return lambda t: {name: optimum[name] + rate**t * (start[name] - optimum[name]) for name in SHAPES}


def run_of(root: Path, trajectory, steps: list[int]) -> Path:
    return write_run(root, steps=steps, weights={s: trajectory(s) for s in steps}, extras=False, dtype=torch.float64)


def error_over_jump(folder: Path, truth: dict[str, torch.Tensor], last: dict[str, torch.Tensor]) -> float:
    """The forecast's largest error, as a fraction of the largest distance from the last checkpoint to the truth."""
    forecast = load_file(folder / "model.safetensors")
    return max(float((forecast[n] - truth[n]).abs().max() / (truth[n] - last[n]).abs().max()) for n in truth)


@pytest.mark.parametrize("options", [[], ["--shrink", "none"], ["--shared"]])
def test_a_linear_trajectory_is_forecast_exactly(tmp_path, farcast, options):
    trajectory = linear_trajectory()
    run = run_of(tmp_path / "run", trajectory, list(range(0, 201, 20)))
    report = json.loads(farcast("predict", run, "-H", 100, "-o", tmp_path / "out", "--json", "--quiet", *options).stdout)
    assert error_over_jump(tmp_path / "out", trajectory(300), trajectory(200)) < TOLERANCE
    (a_first,), (a_last,) = report["forecaster"]["weight"]
    assert (a_first, a_last) == pytest.approx((-0.5, 1.5), abs=TOLERANCE)
    assert report["forecaster"]["fit"]["shrink"] == 1.0


def test_emitted_steps_follow_the_time_rule(tmp_path, farcast):
    trajectory = linear_trajectory(1)
    run = run_of(tmp_path / "run", trajectory, list(range(100, 401, 30)))
    farcast("predict", run, "-H", 150, "--emit", 60, "-o", tmp_path / "out", "--quiet")
    for step in (460, 550):
        assert error_over_jump(tmp_path / "out" / f"checkpoint-{step}", trajectory(step), trajectory(400)) < TOLERANCE


def test_a_shrink_factor_moves_the_forecast_that_fraction_of_the_way(tmp_path, farcast):
    trajectory = linear_trajectory(2)
    run = run_of(tmp_path / "run", trajectory, list(range(0, 201, 20)))
    farcast("predict", run, "-H", 100, "-o", tmp_path / "out", "--shrink", "0.5", "--quiet")
    last, truth = trajectory(200), trajectory(300)
    halfway = {name: last[name] + 0.5 * (truth[name] - last[name]) for name in truth}
    assert error_over_jump(tmp_path / "out", halfway, last) < TOLERANCE


def test_gradient_descent_on_a_quadratic_is_forecast_exactly_by_the_reference_protocol(tmp_path, farcast):
    rate, context_end = 0.99, 100
    reference = run_of(tmp_path / "reference", gradient_descent_trajectory(1, rate), list(range(0, 401, 20)))
    farcast("fit", reference, "--context-end", context_end, "-H", 200, "--emit", 100, "-o", tmp_path / "f.json", "--shared", "--quiet")
    weight = np.array(json.loads((tmp_path / "f.json").read_text())["weight"])
    for column, offset in enumerate((100, 200)):
        beta = (1 - rate ** (context_end + offset)) / (1 - rate**context_end)
        alpha = rate ** (context_end + offset) - rate**context_end * beta
        assert weight[:, column] == pytest.approx([alpha, beta], abs=TOLERANCE)

    trajectory = gradient_descent_trajectory(2, rate)
    new = run_of(tmp_path / "new", trajectory, list(range(0, context_end + 1, 20)))
    farcast("predict", new, "--forecaster", tmp_path / "f.json", "-o", tmp_path / "out", "--quiet")
    for step in (200, 300):
        assert error_over_jump(tmp_path / "out" / f"checkpoint-{step}", trajectory(step), trajectory(context_end)) < TOLERANCE


def test_the_fits_gradient_matches_finite_differences():
    """Away from the kinks of |.| and ReLU, the hand-derived gradient is the loss's derivative."""
    rng = np.random.default_rng(0)
    rows, outputs = 400, 3
    first = rng.normal(size=rows)
    last = first + rng.normal(scale=0.1, size=rows)
    targets = last[:, None] + rng.normal(scale=0.2, size=(rows, outputs))
    pairs = Pairs(first, last, targets, np.abs(rng.normal(scale=0.01, size=rows)), np.full(rows, 5.0), np.arange(rows))
    problem = _Problem(pairs, lam=0.5)
    coefficients = rng.normal(scale=0.3, size=(3, outputs))
    every = np.arange(rows)
    numeric = np.zeros_like(coefficients)
    for index in np.ndindex(coefficients.shape):
        step = np.zeros_like(coefficients)
        step[index] = 1e-6
        numeric[index] = (problem.loss(coefficients + step, every) - problem.loss(coefficients - step, every)) / 2e-6
    regulariser_active = problem.rows(every).terms(coefficients)[-1] > 0
    assert regulariser_active.any() and not regulariser_active.all()
    assert problem.gradient(coefficients, every) == pytest.approx(numeric, rel=1e-4, abs=1e-7)


def test_the_baselines_of_the_backtest_on_a_linear_trajectory(tmp_path, farcast):
    """The straight line is exact on a line; the average of the last five lags it by the mean distance
    from their steps to the target; keeping the last checkpoint lags by the whole backtest jump."""
    trajectory = linear_trajectory(3)
    run = run_of(tmp_path / "run", trajectory, list(range(0, 201, 20)))
    report = json.loads(farcast("predict", run, "-H", 100, "-o", tmp_path / "out", "--json", "--quiet").stdout)
    plan, overall = report["backtest"]["plan"], report["backtest"]["overall"]
    slope_mae = float(np.mean(np.concatenate([(trajectory(1)[n] - trajectory(0)[n]).abs().numpy().ravel() for n in SHAPES])))
    window = [plan["last_step"] - 20 * k for k in range(5)]
    assert overall["line"]["mae"] == pytest.approx(0.0, abs=1e-9)
    assert overall["last"]["mae"] == pytest.approx(slope_mae * (plan["target_step"] - plan["last_step"]), rel=1e-6)
    assert overall["lawa"]["mae"] == pytest.approx(slope_mae * (plan["target_step"] - np.mean(window)), rel=1e-6)


def test_a_saved_forecasters_bias_is_added(tmp_path, farcast):
    from farcast_cli.model.forecaster import Forecaster
    from farcast_cli.model.linear import LinearMap

    trajectory = linear_trajectory(4)
    run = run_of(tmp_path / "run", trajectory, [0, 50, 100])
    Forecaster("self", 0, 100, [50], LinearMap.of([[0.0], [1.0]], [0.25]), {}).save(tmp_path / "f.json")
    farcast("predict", run, "--forecaster", tmp_path / "f.json", "-o", tmp_path / "out", "--quiet")
    forecast = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.allclose(forecast[n], trajectory(100)[n] + 0.25) for n in SHAPES)

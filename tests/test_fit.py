"""`farcast fit`: the two fitting modes and the saved forecaster, through the CLI and the Python API."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import FAST, trajectories, write_run
from safetensors.torch import load_file

from farcast_cli.model.fit import FitSettings, _least_squares, _Problem, _split_coordinates, fit_linear_map, fit_linear_maps
from farcast_cli.model.linear import LinearMap
from farcast_cli.model.pairs import Pairs


def test_reference_fit_then_predict_on_another_run(tmp_path, farcast):
    steps = list(range(0, 301, 20))
    reference = write_run(tmp_path / "reference", steps=steps, seed=1)
    forecaster_file = tmp_path / "forecaster.json"
    result = farcast("fit", reference, "--context-end", 100, "--horizon", 200, "-o", forecaster_file, "--json", *FAST)
    report = json.loads(result.stdout)
    assert report["mode"] == "reference"
    assert report["backtest"]["plan"] == {"first_step": 0, "line_from_step": 80, "last_step": 100, "target_step": 300}
    assert report["skill_vs_last"] > 0.3

    saved = json.loads(forecaster_file.read_text())
    assert saved["format"] == "farcast-forecaster/1"
    assert np.array(saved["weight"]).shape == (2, 1) and len(saved["bias"]) == 1
    assert saved["settings"]["sample"] == 2000 and saved["context_end"] == 100

    new_steps = [0, 20, 40, 60, 80, 100]
    new_run = write_run(tmp_path / "new", steps=new_steps, seed=2)
    out = tmp_path / "out"
    predicted = json.loads(farcast("predict", new_run, "--forecaster", forecaster_file, "-o", out, "--json", "--quiet").stdout)
    assert predicted["target_steps"] == [300]
    assert predicted["backtest"] == report["backtest"]
    truth = trajectories([300], seed=2)[300]["encoder.weight"]
    forecast = load_file(out / "model.safetensors")["encoder.weight"]
    last = load_file(new_run / "checkpoint-100" / "model.safetensors")["encoder.weight"]
    assert (forecast - truth).abs().mean() < 0.7 * (last - truth).abs().mean()


def test_fit_on_the_run_itself_then_predict_with_the_saved_forecaster(run_dir, farcast, tmp_path):
    forecaster_file = tmp_path / "f.json"
    fitted = json.loads(farcast("fit", run_dir, "--horizon", 100, "-o", forecaster_file, "--json", *FAST).stdout)
    assert fitted["mode"] == "self" and fitted["target_steps"] == [300]
    farcast("predict", run_dir, "--forecaster", forecaster_file, "-o", tmp_path / "a", "--quiet")
    farcast("predict", run_dir, "--horizon", 100, "-o", tmp_path / "b", *FAST)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    ignored = farcast("predict", run_dir, "--forecaster", forecaster_file, "-o", tmp_path / "c", "--shrink", 0, "--anchor", 2, expect=2)
    assert "keeps the --anchor, --shrink it was fitted with" in ignored.stderr and not (tmp_path / "c").exists()
    planned = farcast("predict", run_dir, "--forecaster", forecaster_file, "-o", tmp_path / "c", "--anchor", 2, "--dry-run", expect=2)
    assert "keeps the --anchor it was fitted with" in planned.stderr


def test_forecaster_must_fit_the_run(tmp_path, farcast):
    reference = write_run(tmp_path / "reference", steps=list(range(0, 301, 20)))
    farcast("fit", reference, "--context-end", 100, "--horizon", 200, "-o", tmp_path / "f.json", *FAST)
    other = write_run(tmp_path / "other", steps=[10, 50, 100])
    result = farcast("predict", other, "--forecaster", tmp_path / "f.json", "-o", tmp_path / "out", expect=3)
    assert "starts at step 10" in result.stderr
    short = write_run(tmp_path / "short", steps=[0, 40, 80])
    result = farcast("predict", short, "--forecaster", tmp_path / "f.json", "-o", tmp_path / "out", expect=3)
    assert "no checkpoint at step 100" in result.stderr
    result = farcast("predict", reference, "--forecaster", tmp_path / "f.json", "-H", 5, "-o", tmp_path / "out", expect=2)
    assert "differs from the forecaster's horizon 200" in result.stderr
    assert not (tmp_path / "out").exists()


def test_reference_fit_needs_the_target_inside_the_run(tmp_path, farcast):
    reference = write_run(tmp_path / "reference", steps=list(range(0, 201, 20)))
    result = farcast("fit", reference, "--context-end", 100, "--horizon", 150, "-o", tmp_path / "f.json", *FAST, expect=2)
    assert "past the reference run's last step 200" in result.stderr
    result = farcast("fit", reference, "--context-end", 110, "--horizon", 50, "-o", tmp_path / "f.json", *FAST, expect=2)
    assert "--context-end 110 is not a checkpoint step" in result.stderr
    assert not (tmp_path / "f.json").exists()


def test_fit_refuses_to_overwrite_a_forecaster(run_dir, farcast, tmp_path):
    (tmp_path / "f.json").write_text("keep me")
    result = farcast("fit", run_dir, "-H", 50, "-o", tmp_path / "f.json", *FAST, expect=2)
    assert "already exists" in result.stderr
    assert (tmp_path / "f.json").read_text() == "keep me"


def test_emit_with_a_reference_forecaster(tmp_path, farcast):
    reference = write_run(tmp_path / "reference", steps=list(range(0, 301, 20)))
    fitted = json.loads(
        farcast("fit", reference, "--context-end", 100, "-H", 200, "--emit", 100, "-o", tmp_path / "f.json", "--json", *FAST).stdout
    )
    assert fitted["target_steps"] == [200, 300]
    farcast("predict", reference, "--forecaster", tmp_path / "f.json", "-o", tmp_path / "out", "--quiet")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["checkpoint-200", "checkpoint-300", "farcast_report.json"]


def test_horizon_too_far_names_the_largest_supported(run_dir, farcast, tmp_path):
    result = farcast("predict", run_dir, "--horizon", 5000, "-o", tmp_path / "out", *FAST, expect=2)
    assert "largest it supports is 1800 steps" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("horizon", [0, -10])
def test_horizon_must_be_positive(run_dir, farcast, tmp_path, horizon):
    result = farcast("predict", run_dir, "--horizon", horizon, "-o", tmp_path / "out", *FAST, expect=2)
    assert "--horizon must be a positive number of steps" in result.stderr


def test_fit_recovers_a_known_linear_map():
    """Targets made exactly by y = 0.3*first + 0.9*last + 0.01: the fit must find those coefficients."""
    rng = np.random.default_rng(0)
    first = rng.normal(size=4000)
    last = first + rng.normal(scale=0.3, size=4000)
    targets = (0.3 * first + 0.9 * last + 0.01)[:, None]
    pairs = Pairs(first, last, targets, np.abs(last - first), np.ones(4000), np.arange(4000))
    linear, info = fit_linear_map(pairs, FitSettings(lam=0.0, max_updates=2000))
    assert linear.weight[0][0] == pytest.approx(0.3, abs=0.01)
    assert linear.weight[1][0] == pytest.approx(0.9, abs=0.01)
    assert linear.bias[0] == pytest.approx(0.01, abs=0.005)
    assert info.held_out_pairs == 800


def _drifting_pairs(rng, rows: int, outputs: int, bf16: bool) -> Pairs:
    """Pairs like a run's: a drift with noise, optionally rounded to bfloat16 (the L1 optimum then moves
    away from the least-squares start, so Adam takes many updates)."""
    first = rng.normal(scale=0.02, size=rows)
    last = first + rng.normal(scale=1e-3, size=rows)
    targets = last[:, None] + (last - first)[:, None] * rng.uniform(1, 3, outputs) + rng.normal(scale=2e-4, size=(rows, outputs))
    if bf16:
        first, last, targets = (torch.from_numpy(a).to(torch.bfloat16).double().numpy() for a in (first, last, targets))
    return Pairs(first, last, targets, np.abs(last - first) / 100, np.full(rows, 100.0), np.repeat(np.arange(rows), 2)[:rows])


def _plain_adam(pairs: Pairs, settings: FitSettings) -> np.ndarray:
    """The fit's Adam written out one fit at a time, as it was before fits were taken together: numpy's
    mean for the loss, einsum for the gradient's sum over rows."""
    problem = _Problem(pairs, settings.lam)
    train, held = _split_coordinates(pairs, settings.validation_fraction, settings.seed)

    def terms(c, rows):
        x = problem.inputs[rows]
        predicted = x @ c
        step = predicted[:, -1] - (predicted[:, -2] if predicted.shape[1] > 1 else 0.0)
        return x, predicted - problem.residual[rows], step, np.abs(step) / problem.last_dt[rows] - problem.rate_bound[rows]

    def loss(c):
        _, error, _, excess = terms(c, held)
        return float(np.abs(error).mean() + settings.lam * np.maximum(excess, 0.0).mean())

    c = _least_squares(problem, train)
    m, v, t = np.zeros_like(c), np.zeros_like(c), 0
    generator = torch.Generator().manual_seed(settings.seed)
    check_every = max(1, min(20, -(-len(train) // settings.batch_size)))
    best_loss, best, stale = loss(c), c.copy(), 0
    while t < settings.max_updates and stale < settings.patience:
        order = train[torch.randperm(len(train), generator=generator).numpy()]
        for begin in range(0, len(order), settings.batch_size):
            rows = order[begin : begin + settings.batch_size]
            x, error, step, excess = terms(c, rows)
            d = np.sign(error) / error.size
            d_step = settings.lam * (excess > 0) * np.sign(step) / problem.last_dt[rows] / len(rows)
            d[:, -1] += d_step
            if d.shape[1] > 1:
                d[:, -2] -= d_step
            g = np.einsum("ri,rm->im", x, d)
            t += 1
            m = 0.9 * m + 0.1 * g
            v = 0.999 * v + 0.001 * g * g
            c -= (settings.lr / (1 - 0.9**t)) * m / (np.sqrt(v) / np.sqrt(1 - 0.999**t) + 1e-8)
            if t % check_every == 0:
                now = loss(c)
                best_loss, best, stale = (now, c.copy(), 0) if now < best_loss else (best_loss, best, stale + 1)
            if t >= settings.max_updates or stale >= settings.patience:
                break
    return best


def test_fits_taken_together_are_each_fit_alone_bit_for_bit():
    """Per-tensor fits advance in lock step (one array operation per update for all): each map and
    summary must be exactly what the fit alone gives, whatever the others' sizes, outputs, stops and
    held-out rows; and the same as the plain Adam loop, one fit at a time."""
    rng = np.random.default_rng(3)
    sizes = [40, 255, 256, 257, 700, 1400, 3000]
    problems = [(_drifting_pairs(rng, rows, 1, bf16=k % 2 == 0), None) for k, rows in enumerate(sizes)]
    problems += [
        (_drifting_pairs(rng, 600, 2, bf16=True), None),
        (_drifting_pairs(rng, 500, 1, bf16=True), _drifting_pairs(rng, 200, 1, bf16=True)),
    ]
    for settings in (FitSettings(), FitSettings(lam=1.0, max_updates=60), FitSettings(objective="l2")):
        together = fit_linear_maps(problems, settings)
        alone = [fit_linear_map(pairs, settings, validation) for pairs, validation in problems]
        assert [(linear.weight, linear.bias, info) for linear, info in together] == [
            (linear.weight, linear.bias, info) for linear, info in alone
        ]
    infos = [info for _, info in fit_linear_maps(problems, FitSettings())]
    assert len({info.updates for info in infos}) > 3 and any(info.best_update > 0 for info in infos)
    for (pairs, validation), (linear, _) in zip(problems, fit_linear_maps(problems, FitSettings()), strict=True):
        if validation is None and pairs.targets.shape[1] == 1:
            assert _Problem(pairs, 1e-5).as_linear_map(_plain_adam(pairs, FitSettings())) == linear


def test_regulariser_shrinks_a_forecast_that_outruns_the_first_step():
    """With a heavy lambda, the forecast's last step may not exceed the first observed step."""
    rng = np.random.default_rng(0)
    first = rng.normal(size=2000)
    last = first + 0.1
    targets = (last + 1.0)[:, None]
    pairs = Pairs(first, last, targets, np.full(2000, 0.01), np.ones(2000), np.arange(2000))
    free, _ = fit_linear_map(pairs, FitSettings(lam=0.0))
    held, _ = fit_linear_map(pairs, FitSettings(lam=100.0))
    jump = lambda m: np.mean(np.abs(m.weight[0][0] * first + m.weight[1][0] * last + m.bias[0] - last))  # noqa: E731
    assert jump(free) == pytest.approx(1.0, abs=0.05)
    assert jump(held) < 0.5


def test_shrinking_moves_the_forecast_towards_the_last_checkpoint():
    import torch

    from farcast_cli.model.forecaster import Forecaster

    forecaster = Forecaster("self", 0, 100, [50], LinearMap.of([[-0.5], [1.4]], [0.01]), {})
    first, last = torch.tensor([1.0, 2.0]), torch.tensor([1.5, 1.0])
    full = forecaster.shared.apply([first, last], 0)
    assert torch.allclose(forecaster.shrunk(0.0).shared.apply([first, last], 0), last)
    assert torch.allclose(forecaster.shrunk(0.5).shared.apply([first, last], 0), last + 0.5 * (full - last))
    assert forecaster.shrunk(0.5).fit_info.shrink == 0.5


def test_shrink_option(run_dir, farcast, tmp_path):
    none = json.loads(farcast("predict", run_dir, "-H", 100, "-o", tmp_path / "none", "--shrink", "none", "--json", *FAST).stdout)
    assert none["forecaster"]["fit"]["shrink"] == 1.0 and not any("shrunk" in note for note in none["notes"])
    half = json.loads(farcast("predict", run_dir, "-H", 100, "-o", tmp_path / "half", "--shrink", "0.5", "--json", *FAST).stdout)
    assert any("last + 0.50 x" in note and "set by --shrink" in note for note in half["notes"])
    farcast("predict", run_dir, "-H", 100, "-o", tmp_path / "zero", "--shrink", "0", *FAST)
    kept = load_file(tmp_path / "zero" / "model.safetensors")["encoder.weight"]
    assert torch_equal(kept, load_file(run_dir / "checkpoint-200" / "model.safetensors")["encoder.weight"])
    result = farcast("predict", run_dir, "-H", 100, "-o", tmp_path / "bad", "--shrink", "lots", *FAST, expect=2)
    assert "--shrink" in result.stderr


def test_auto_shrink_keeps_the_last_checkpoint_when_the_trend_turns(tmp_path, farcast):
    """w = base (1 + u - u^2 / 2), u = step / 100, stops rising at step 100 and falls after: a fit on
    the early history extrapolates the rise, so the held-out trial does best unmoved, at factor 0."""
    steps = list(range(0, 201, 20))
    base = torch.randn(24, 16, generator=torch.Generator().manual_seed(3))
    weights = {s: {"encoder.weight": base * (1 + s / 100 - (s / 100) ** 2 / 2)} for s in steps}
    run = write_run(tmp_path / "run", steps=steps, weights=weights, extras=False)
    report = json.loads(farcast("predict", run, "-H", 100, "-o", tmp_path / "out", "--json", *FAST).stdout)
    assert report["forecaster"]["fit"]["shrink"] == 0.0
    assert any("last + 0.00 x" in note and "chosen by a backtest" in note for note in report["notes"])
    assert torch_equal(load_file(tmp_path / "out" / "model.safetensors")["encoder.weight"], weights[200]["encoder.weight"])


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def two_speed_run(root):
    """encoder.weight relaxes ten times faster than head.weight: one shared layer cannot fit both."""
    import torch

    steps = list(range(0, 201, 20))
    generator = torch.Generator().manual_seed(0)
    starts = {"encoder.weight": torch.randn(24, 16, generator=generator), "head.weight": torch.randn(4, 24, generator=generator)}
    ends = {name: torch.randn(value.shape, generator=generator) for name, value in starts.items()}
    rates = {"encoder.weight": 0.02, "head.weight": 0.002}
    weights = {s: {n: ends[n] + (starts[n] - ends[n]) * torch.exp(torch.tensor(-rates[n] * s)) for n in starts} for s in steps}
    return write_run(root, steps=steps, weights=weights, extras=False)


def test_per_tensor_coefficients_fit_tensors_that_move_differently(tmp_path, farcast):
    run = two_speed_run(tmp_path / "run")
    shared = json.loads(farcast("predict", run, "-H", 100, "-o", tmp_path / "a", "--shared", "--json", *FAST).stdout)
    own = json.loads(farcast("predict", run, "-H", 100, "-o", tmp_path / "b", "--per-tensor", "--json", *FAST).stdout)
    assert own["skill_vs_last"] > shared["skill_vs_last"] + 0.02
    forecaster_file = tmp_path / "f.json"
    farcast("fit", run, "-H", 100, "-o", forecaster_file, "--per-tensor", *FAST)
    saved = json.loads(forecaster_file.read_text())
    assert sorted(saved["per_tensor"]) == ["encoder.weight", "head.weight"]
    fast, slow = saved["per_tensor"]["encoder.weight"][0], saved["per_tensor"]["head.weight"][0]
    assert fast != slow
    farcast("predict", run, "--forecaster", forecaster_file, "-o", tmp_path / "c", "--quiet")
    assert (tmp_path / "b" / "model.safetensors").read_bytes() == (tmp_path / "c" / "model.safetensors").read_bytes()


def test_small_tensors_keep_the_shared_coefficients(run_dir, farcast, tmp_path):
    farcast("fit", run_dir, "-H", 100, "-o", tmp_path / "f.json", "--backtest", "sample", *FAST)
    saved = json.loads((tmp_path / "f.json").read_text())
    assert sorted(saved["per_tensor"]) == ["encoder.weight", "head.weight"]
    assert saved["settings"]["per_tensor"] is True


def test_shared_gives_the_papers_single_set_of_coefficients(run_dir, farcast, tmp_path):
    farcast("fit", run_dir, "-H", 100, "-o", tmp_path / "f.json", "--shared", "--backtest", "sample", *FAST)
    saved = json.loads((tmp_path / "f.json").read_text())
    assert saved["per_tensor"] == {} and saved["settings"]["per_tensor"] is False


def test_report_lists_the_per_tensor_coefficients(run_dir, farcast, tmp_path):
    report = json.loads(farcast("predict", run_dir, "-H", 100, "-o", tmp_path / "out", "--json", *FAST).stdout)
    assert sorted(report["forecaster"]["per_tensor"]) == ["encoder.weight", "head.weight"]
    weight, bias = report["forecaster"]["per_tensor"]["encoder.weight"]
    assert len(weight) == 2 and len(bias) == 1


@pytest.mark.slow
def test_fitting_does_not_pull_in_torch_compiler(run_dir, tmp_path):
    """torch.optim imports torch._dynamo on first use (1.3 s of start-up measured); the fit must not."""
    script = (
        "import sys\n"
        "from farcast_cli.cli import main\n"
        f"sys.argv = ['farcast', 'fit', {str(run_dir)!r}, '--horizon', '40', '-o', {str(tmp_path / 'f.json')!r}, '--quiet']\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert (tmp_path / "f.json").exists()
    assert result.stdout.strip().splitlines()[-1] == "False"


def _contracting(steps: list[int], shapes: dict[str, tuple[int, ...]], seed: int = 5) -> dict[int, dict[str, torch.Tensor]]:
    """GD on a 1-d quadratic per coordinate: w_t = w* + 0.99^t (w_0 - w*), exactly linear in (w_0, w_t0)."""
    generator = torch.Generator().manual_seed(seed)
    draw = {"dtype": torch.float64, "generator": generator}
    ends = {name: (torch.rand(shape, **draw), torch.randn(shape, **draw)) for name, shape in shapes.items()}
    return {s: {name: optimum + 0.99**s * (start - optimum) for name, (start, optimum) in ends.items()} for s in steps}


def test_a_tensor_of_64_coordinates_reaches_the_exact_coefficients(tmp_path, farcast):
    """Per-tensor fits on few coordinates converge: the closed-form start is exact and Adam keeps it."""
    steps = list(range(0, 201, 10))
    reference = write_run(tmp_path / "reference", steps=steps, dtype=torch.float64, extras=False,
                          weights=_contracting(steps, {"small.weight": (8, 8), "big.weight": (40, 50)}))  # fmt: skip
    forecaster_file = tmp_path / "forecaster.json"
    result = farcast("fit", reference, "--context-end", 20, "--horizon", 180, "-o", forecaster_file, "--json", "--quiet")
    (a_first,), (a_last,) = json.loads(forecaster_file.read_text())["per_tensor"]["small.weight"][0]
    r20, r200 = 0.99**20, 0.99**200
    assert a_last == pytest.approx((1 - r200) / (1 - r20), abs=1e-6)
    assert a_first == pytest.approx(r200 - r20 * (1 - r200) / (1 - r20), abs=1e-6)
    assert json.loads(result.stdout)["forecaster"]["fit"]["stopped"] == "converged"


def test_l2_objective_is_the_closed_form_and_a_small_budget_is_reported(tmp_path, farcast):
    rng = np.random.default_rng(0)
    first, last = rng.normal(size=3000), rng.normal(size=3000)
    targets = (0.3 * first + 0.9 * last + 0.01 + rng.laplace(scale=0.05, size=3000))[:, None]
    pairs = Pairs(first, last, targets, np.abs(last - first), np.ones(3000), np.arange(3000))
    validation = pairs.subset(np.arange(500))
    linear, info = fit_linear_map(pairs, FitSettings(objective="l2", lam=0.0), validation)
    exact = np.linalg.lstsq(np.stack([first, last, np.ones(3000)], axis=1), targets[:, 0], rcond=None)[0]
    assert [linear.weight[0][0], linear.weight[1][0], linear.bias[0]] == pytest.approx(exact.tolist(), abs=1e-10)
    assert info.stopped == "closed form" and info.updates == 0
    assert (info.pairs, info.held_out_pairs, info.held_out) == (3000, 500, "validation run")
    residual = exact[0] * first[:500] + exact[1] * last[:500] + exact[2] - targets[:500, 0]
    assert info.validation_l1 == pytest.approx(np.abs(residual).mean(), rel=1e-9)
    _, budget = fit_linear_map(pairs, FitSettings(max_updates=3, patience=1000))
    assert budget.stopped == "budget" and budget.updates == 3

    run = write_run(tmp_path / "run")
    report = json.loads(farcast("predict", run, "-H", 100, "-o", tmp_path / "out", "--json", "--sample", "2000", "--max-updates", 1,
                                "--patience", 1000, "--quiet").stdout)  # fmt: skip
    assert report["forecaster"]["fit"]["stopped"] == "budget"
    assert any("stopped at its budget of 1 updates" in warning for warning in report["warnings"])
    result = farcast("predict", run, "-H", 100, "-o", tmp_path / "bad", "--objective", "l3", "--quiet", expect=2)
    assert "--objective" in result.stderr


def test_a_validation_run_decides_when_a_reference_fit_has_converged(tmp_path, farcast):
    """The paper's protocol: every reference coordinate is fitted, and a second run's pairs stop the fit
    (its tensors may be of other sizes: pairs are per coordinate)."""
    steps = list(range(0, 201, 10))
    sizes = {"reference": {"small.weight": (8, 8), "big.weight": (40, 50)}, "validation": {"small.weight": (4, 8), "big.weight": (20, 50)}}
    runs = {
        name: write_run(tmp_path / name, steps=steps, dtype=torch.float64, extras=False, weights=_contracting(steps, sizes[name], seed))
        for name, seed in (("reference", 5), ("validation", 6))
    }
    forecaster_file = tmp_path / "forecaster.json"
    fitted = farcast("fit", runs["reference"], "--context-end", 20, "--horizon", 180, "--validation-run", runs["validation"],
                     "-o", forecaster_file, "--json", "--quiet")  # fmt: skip
    fit = json.loads(fitted.stdout)["forecaster"]["fit"]
    assert (fit["held_out"], fit["pairs"], fit["held_out_pairs"], fit["stopped"]) == ("validation run", 2064, 1032, "converged")
    assert fit["validation_l1"] < 1e-9
    (a_first,), (a_last,) = json.loads(forecaster_file.read_text())["per_tensor"]["small.weight"][0]
    r20, r200 = 0.99**20, 0.99**200
    assert (a_first, a_last) == pytest.approx((r200 - r20 * (1 - r200) / (1 - r20), (1 - r200) / (1 - r20)), abs=1e-6)

    own = json.loads(farcast("fit", runs["reference"], "--context-end", 20, "-H", 180, "-o", tmp_path / "own.json", "--json").stdout)
    assert (own["forecaster"]["fit"]["held_out"], own["forecaster"]["fit"]["held_out_pairs"]) == ("coordinates", 413)


def test_a_validation_run_that_does_not_match_is_one_error_line(tmp_path, farcast):
    steps, shapes = list(range(0, 201, 10)), {"small.weight": (8, 8)}
    reference = write_run(tmp_path / "reference", steps=steps, extras=False, weights=_contracting(steps, shapes))
    other = write_run(tmp_path / "other", steps=steps, extras=False, weights=_contracting(steps, {"small.weight": (8, 8), "x": (3,)}))
    short = write_run(tmp_path / "short", steps=steps[:11], extras=False, weights=_contracting(steps[:11], shapes))
    out = tmp_path / "f.json"
    for validation, expected in ((other, "tensors differ from the reference run's (x)"), (short, "up to step 200")):
        result = farcast("fit", reference, "--context-end", 20, "-H", 180, "--validation-run", validation, "-o", out, expect=3)
        assert result.stderr.startswith(f"farcast: error: {validation}: ") and expected in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()
    result = farcast("fit", reference, "-H", 100, "--validation-run", reference, "-o", out, expect=2)
    assert "--validation-run" in result.stderr and "--context-end" in result.stderr and not out.exists()

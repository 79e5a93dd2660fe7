"""Break the model on purpose, one mutation at a time, and check that the test suite notices.

    python benchmarks/mutations.py            # about 10 minutes on 2 cores

Each mutation edits one line of farcast_cli, runs the tests that pin the math and the model's
selection, and is undone (from a copy of the file, so the tree's other changes stay). Prints each
mutation with CAUGHT or MISSED.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = [
    "tests/test_math.py",
    "tests/test_fit.py",
    "tests/test_predict.py",
    "tests/test_loss.py",
    "tests/test_candidates.py",
    "tests/test_closed_form.py",
]
LOOP_TESTS = ["tests/test_loop_memory.py", "-m", "not slow"]
MUTATIONS = [
    # (name, file, text, replacement), and the tests to run where not TESTS
    (
        "closed form from sums: the shared fit trains on the held-out coordinates too",
        "farcast_cli/model/fit.py",
        "systems = np.concatenate([gram[:, 1].sum(axis=(0, 1))[None]",
        "systems = np.concatenate([gram.sum(axis=(0, 1, 2))[None]",
    ),
    (
        "closed form from sums: targets at the checkpoint before, not interpolated",
        "farcast_cli/model/pairs.py",
        "before, alpha = before.T, alpha.T",
        "before, alpha = before.T, 0.0 * alpha.T",
    ),
    ("time rule scaled by 0.9", "farcast_cli/model/pairs.py", "rho = horizon / (sk - s0)", "rho = 0.9 * horizon / (sk - s0)"),
    (
        "reference targets 10% short",
        "farcast_cli/model/pairs.py",
        "interpolate(history, context_end + o)",
        "interpolate(history, context_end + 0.9 * o)",
    ),
    (
        "anchor: the checkpoint before the last",
        "farcast_cli/model/forecaster.py",
        "return [0, *range(end - self.anchor + 1, end + 1)]",
        "return [0, *range(end - self.anchor, end)]",
    ),
    (
        "first input: the second checkpoint",
        "farcast_cli/model/forecaster.py",
        "return [0, *range(end - self.anchor + 1, end + 1)]",
        "return [1, *range(end - self.anchor + 1, end + 1)]",
    ),
    (
        "line through the last checkpoint twice",
        "farcast_cli/forecast/candidates.py",
        "inputs=lambda checkpoints, end: [checkpoints[end - 1], checkpoints[end]],",
        "inputs=lambda checkpoints, end: [checkpoints[end - 2], checkpoints[end]],",
    ),
    (
        "shrink factor scaled by 0.9",
        "farcast_cli/model/forecaster.py",
        "linear.shrunk(alpha, last) for name",
        "linear.shrunk(0.9 * alpha, last) for name",
    ),
    (
        "shared shrink scaled by 0.9",
        "farcast_cli/model/forecaster.py",
        "shared=self.shared.shrunk(alpha, last)",
        "shared=self.shared.shrunk(0.9 * alpha, last)",
    ),
    ("regulariser gradient sign", "farcast_cli/model/fit.py", "d_predicted[..., -2] -= d_step", "d_predicted[..., -2] += d_step"),
    (
        "regulariser gradient without the time step",
        "farcast_cli/model/fit.py",
        "scales = settings.lam / window.last_dt / counts[..., None]",
        "scales = settings.lam / counts[..., None]",
    ),
    ("L1 gradient halved", "farcast_cli/model/fit.py", "np.sign(error) / sizes", "0.5 * np.sign(error) / sizes"),
    (
        "Adam from zero instead of the least-squares start",
        "farcast_cli/model/fit.py",
        "starts = [_least_squares(fit.problem, fit.train) for fit in fits]",
        "starts = [np.zeros((3, fit.problem.residual.shape[1])) for fit in fits]",
    ),
    (
        "the fit keeps Adam's last coefficients, not the best held-out ones",
        "farcast_cli/model/fit.py",
        "self.ends[index] = (self.best[index], stopped, self.updates, self.best_update[index])",
        "self.ends[index] = (self.optimizer.parameters[place].copy(), stopped, self.updates, self.best_update[index])",
    ),
    (
        "a fit stopped by its budget counts as converged",
        "farcast_cli/model/fit.py",
        'stopped = "converged" if self.stale[index] >= self.settings.patience else "budget"',
        'stopped = "converged"',
    ),
    (
        "the validation run is read but not used",
        "farcast_cli/model/forecaster.py",
        "fit_linear_map(pairs, settings, None if held is None else held.pairs)",
        "fit_linear_map(pairs, settings, None)",
    ),
    (
        "bias dropped from the map",
        "farcast_cli/model/linear.py",
        "return out.add_(self.bias[output]) if self.bias[output] else out",
        "return out",
    ),
    ("skill inverted", "farcast_cli/evaluate/backtest.py", "1.0 - error / baseline_error", "1.0 - baseline_error / error"),
    (
        "line slope off by one step",
        "farcast_cli/forecast/candidates.py",
        "(target - last_step) / (last_step - previous_step)",
        "(target - previous_step) / (last_step - previous_step)",
    ),
    (
        "a loss win inside the run's jitter counts",
        "farcast_cli/evaluate/loss.py",
        "return best if best.loss < last.loss - noise else last",
        "return best if best.loss < last.loss else last",
    ),
    (
        "the line competes however short its backtest",
        "farcast_cli/evaluate/loss.py",
        "return line_tested or not (method in CANDIDATES",
        "return True or not (method in CANDIDATES",
    ),
    (
        "a backtest jump of a quarter counts as tested",
        "farcast_cli/evaluate/report.py",
        "plan.target_step - plan.last_step >= TESTED_FRACTION * horizon",
        "plan.target_step - plan.last_step >= 0.5 * TESTED_FRACTION * horizon",
    ),
    (
        "steps saved measured from the target",
        "farcast_cli/evaluate/loss.py",
        "return (1.0 if reached is None else (reached - start) / (end - start)), False",
        "return (1.0 if reached is None else (end - reached) / (end - start)), False",
    ),
    (
        "line rule compares spacings one short",
        "farcast_cli/forecast/candidates.py",
        "return (target - last) / (last - previous) >= horizon / spacing - 1e-9",
        "return (target - last) / (last - previous) + 1 >= horizon / spacing - 1e-9",
    ),
    (
        "backtest errors of the first four candidates only",
        "farcast_cli/evaluate/backtest.py",
        "        weight.append(row)\n        bias.append(offset)\n    for output",
        "        weight.append(row if len(weight) < 4 else [0.0] * len(row))\n"
        "        bias.append(offset if len(bias) < 4 else 0.0)\n    for output",
    ),
    (
        "the loss backtest scores only the built-in alternatives",
        "farcast_cli/evaluate/loss.py",
        "    for candidate in baselines():\n",
        "    for candidate in baselines()[:3]:\n",
    ),
    (
        "a fit the history could not test lends its want of a verdict",
        "farcast_cli/integrations/loop.py",
        "self.kept_fit = fit if verdict is not None else None",
        "self.kept_fit = fit",
        LOOP_TESTS,
    ),
    (
        "a fit the weight gate refused is fitted anew at the next attempt (the rule before the ninth session)",
        "farcast_cli/integrations/loop.py",
        "self.kept_fit = fit if verdict is not None else None",
        "self.kept_fit = fit if applied or self.loss_fn is not None else None",
        LOOP_TESTS,
    ),
    (
        "a fit the loss refused is not tried again",
        "farcast_cli/integrations/loop.py",
        "self.kept_fit = fit if verdict is not None else None",
        "self.kept_fit = fit if applied else None",
        LOOP_TESTS,
    ),
    (
        "a reused fit serves however far the history has grown",
        "farcast_cli/integrations/loop.py",
        "len(self.observed) >= self.refit_growth * kept.observations",
        "len(self.observed) >= 1e9 * kept.observations",
        LOOP_TESTS,
    ),
    (
        "fits reused whatever they cost beside the training",
        "farcast_cli/integrations/loop.py",
        "self.fit_seconds > self.fit_share * self._clock.training()",
        "self.fit_seconds >= 0",
        LOOP_TESTS,
    ),
    (
        "a jump the loss refuses is left in the weights",
        "farcast_cli/integrations/loop.py",
        "            if not applied and backup is not None:\n",
        "            if False:\n",
        ["tests/test_loop.py", "-m", "not slow"],
    ),
]


def run_tests(tests: list[str] = TESTS) -> bool:
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests], cwd=ROOT, capture_output=True)
    return done.returncode == 0


def main() -> None:
    assert run_tests() and run_tests(LOOP_TESTS), "the suite must pass before mutating"
    for name, file, old, new, *tests in MUTATIONS:
        path = ROOT / file
        original = path.read_text()
        assert original.count(old) == 1, f"{file}: {old!r} found {original.count(old)} times"
        path.write_text(original.replace(old, new))
        try:
            passed = run_tests(*tests)
        finally:
            path.write_text(original)
        print(f"{'MISSED' if passed else 'CAUGHT'}  {name}  ({file})", flush=True)


if __name__ == "__main__":
    main()

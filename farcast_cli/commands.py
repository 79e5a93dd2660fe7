"""The steps of each command in order: find the run, read a sample, fit, backtest, write, report."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from farcast_cli import __version__
from farcast_cli.evaluate.backtest import INPUT_BYTES_PER_ELEMENT, LAWA_WINDOW, SCRATCH_BYTES_PER_ELEMENT, BacktestPlan, backtest_sample, backtest_streaming, best_shrink, choose_cut, line_slopes
from farcast_cli.io.output import atomic_folder, check_output_location, write_text
from farcast_cli.io.device import resolve_device
from farcast_cli.io.engine import EngineSettings, plan_chunk_elements
from farcast_cli.errors import InputError, LowSkillError, UsageError
from farcast_cli.forecast.write import Combination, combination, write_forecast
from farcast_cli.evaluate.loss import run_eval_command, steps_saved
from farcast_cli.model.forecaster import FitSettings, Forecaster, fit_coefficients
from farcast_cli.progress import byte_progress
from farcast_cli.evaluate.report import NAMES, REPORT_FILE, verdict
from farcast_cli.io.run import Run, find_run
from farcast_cli.io.reader import ITEM_SIZES
from farcast_cli.model.history import History, read_history, sample_forecast
from farcast_cli.model.pairs import Pairs, max_self_horizon, reference_pairs, self_pairs


PREDICT_BYTES_PER_ELEMENT = (2 * 8, 4 * 8)
MIN_TENSOR_SAMPLE = 64


@dataclass(frozen=True)
class StreamOptions:
    device: str = "auto"
    max_memory: int = 1 << 30
    backtest: str = "full"
    quiet: bool = False
    use_mmap: bool = False
    eval_cmd: str | None = None

    def engine(self, input_bytes: int, scratch_bytes: int, advance=lambda n: None) -> EngineSettings:
        """Engine settings whose buffers for one pass fit in max_memory."""
        chunk = plan_chunk_elements(self.max_memory, input_bytes, scratch_bytes)
        return EngineSettings(resolve_device(self.device), chunk, use_mmap=self.use_mmap, advance=advance)


@contextmanager
def timed(timings: dict[str, float], phase: str):
    """Add the seconds spent in the block to timings[phase]; the report carries them."""
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - started


def inspect_run(run_dir: Path) -> dict:
    run = find_run(run_dir)
    infos = run.tensor_infos()
    forecast = [i for i in infos if i.is_forecast]
    steps = run.steps
    return {
        "run": str(run.path),
        "layout": run.layout,
        "steps": steps,
        "checkpoints": [{"step": c.step, "path": str(c.path), "files": sorted(c.files), "bytes": c.nbytes} for c in run.checkpoints],
        "tensors": len(infos),
        "forecast_tensors": len(forecast),
        "parameters": sum(i.numel for i in infos),
        "forecast_parameters": sum(i.numel for i in forecast),
        "dtypes": sorted({i.dtype for i in infos}),
        "bytes_per_checkpoint": run.last.nbytes,
        "total_bytes": sum(c.nbytes for c in run.checkpoints),
        "max_horizon": max_self_horizon(steps) if len(steps) > 2 else 0,
        "warnings": run.warnings,
    }


def output_offsets(horizon: int, emit: list[int]) -> list[int]:
    if horizon <= 0:
        raise UsageError(f"--horizon must be a positive number of steps, not {horizon}")
    bad = [e for e in emit if not 0 < e < horizon]
    if bad:
        raise UsageError(f"--emit {bad[0]}: each emitted step must lie between 0 and the horizon {horizon}")
    return sorted(set(emit)) + [horizon]


def fit_on_run(history: History, horizon: int, offsets: list[int], settings: FitSettings) -> Forecaster:
    """The default mode: learn the jump from the run's own history, scaled to each earlier anchor,
    then shrink towards the last checkpoint by settings.shrink, or (None) by the factor that did
    best in a backtest on this same history (benchmarks/RESULTS.md: the most robust variant)."""
    trial = _held_out_trial(history, horizon, settings) if settings.shrink is None else None
    return _fit_plain(history, horizon, offsets, settings).shrunk(_shrink_factor(history, trial, settings))


def _shrink_factor(history: History, trial: tuple[int, Forecaster] | None, settings: FitSettings) -> float:
    """settings.shrink, or the factor for which the held-out trial came closest to the last checkpoint."""
    if settings.shrink is not None:
        return settings.shrink
    return 1.0 if trial is None else _shrink_from_trial(history, *trial)


def _fit_plain(history: History, horizon: int, offsets: list[int], settings: FitSettings) -> Forecaster:
    pairs = self_pairs(history, horizon, offsets)
    weight, bias, info = fit_coefficients(pairs, settings)
    per_tensor = _fit_per_tensor(history, pairs, settings)
    return Forecaster("self", int(history.steps[0]), int(history.steps[-1]), offsets, weight, bias, asdict(settings), info, per_tensor=per_tensor)


def _fit_per_tensor(history: History, pairs: Pairs, settings: FitSettings) -> dict[str, list]:
    """With settings.per_tensor: (A, b) for each tensor with at least MIN_TENSOR_SAMPLE sampled
    coordinates; the others keep the shared coefficients."""
    if not settings.per_tensor:
        return {}
    owner = history.tensor_index[pairs.coordinate]
    fitted = {}
    for index, name in enumerate(history.tensor_names):
        if np.count_nonzero(history.tensor_index == index) >= MIN_TENSOR_SAMPLE:
            weight, bias, _ = fit_coefficients(pairs.subset(owner == index), settings)
            fitted[name] = [weight, bias]
    return fitted


def _held_out_trial(history: History, horizon: int, settings: FitSettings) -> tuple[int, Forecaster] | None:
    """The unshrunk fit on the history up to the backtest's cut, or None when no cut can be fitted."""
    steps = list(history.steps)
    cut = choose_cut(steps, horizon / (steps[-1] - steps[0]))
    if cut is None:
        return None
    jump = int(steps[-1] - steps[cut])
    return cut, _fit_plain(history.truncated(cut), jump, [jump], settings)


def _shrink_from_trial(history: History, cut: int, trial: Forecaster) -> float:
    forecast = sample_forecast(history, 0, cut, trial, 0)
    return best_shrink(history.values[:, cut], forecast, history.values[:, -1])


def _require_three_checkpoints(run: Run) -> None:
    if len(run.checkpoints) < 3:
        raise InputError(f"{run.path}: only {len(run.checkpoints)} checkpoints; fitting on the run itself needs at least three (or fit on a reference run)")


def fit_on_reference(history: History, context_end: int, offsets: list[int], settings: FitSettings) -> Forecaster:
    """The paper's protocol: learn (w at s_0, w at E) -> w at E + H from a complete reference run.
    Shrinks only by a number given in settings.shrink: here the fit already saw the truth."""
    pairs = reference_pairs(history, context_end, offsets)
    weight, bias, info = fit_coefficients(pairs, settings)
    per_tensor = _fit_per_tensor(history, pairs, settings)
    forecaster = Forecaster("reference", int(history.steps[0]), context_end, offsets, weight, bias, asdict(settings), info, per_tensor=per_tensor)
    return forecaster.shrunk(1.0 if settings.shrink is None else settings.shrink)


def _evaluate(run: Run, history: History, plan: BacktestPlan, forecaster: Forecaster, options: StreamOptions) -> dict:
    if options.backtest == "sample":
        result = backtest_sample(history, plan, forecaster)
    else:
        total = sum(run.checkpoints[i].nbytes for i in plan.inputs(run.steps))
        with byte_progress("backtest", total, options.quiet) as advance:
            result = backtest_streaming(run, plan, forecaster, options.engine(INPUT_BYTES_PER_ELEMENT, SCRATCH_BYTES_PER_ELEMENT, advance))
    steps = run.steps
    result["plan"] = {
        "first_step": steps[plan.first_index],
        "line_from_step": steps[plan.previous_index],
        "last_step": steps[plan.last_index],
        "target_step": plan.target_step,
    }
    return result


def fit_and_backtest(
    run: Run, history: History, horizon: int, offsets: list[int], settings: FitSettings, options: StreamOptions, scratch_parent: Path
) -> tuple[Forecaster, dict]:
    """Fit on the whole run; repeat the fit with the last checkpoints held out, and forecast the last one.

    The held-out fit serves twice: its error picks the full forecaster's shrinkage, and, shrunk by a
    factor from a backtest nested inside the held-out history, it is the forecaster the report scores.
    """
    trial = _held_out_trial(history, horizon, settings)
    forecaster = _fit_plain(history, horizon, offsets, settings).shrunk(_shrink_factor(history, trial, settings))
    if trial is None:
        return forecaster, {"unavailable": f"{len(run.steps)} checkpoints are too few to hold some out and still fit a jump of this size"}
    cut, plain = trial
    held_out = history.truncated(cut)
    inner = _held_out_trial(held_out, plain.horizon, settings) if settings.shrink is None else None
    scored = plain.shrunk(_shrink_factor(held_out, inner, settings))
    result = _evaluate(run, history, BacktestPlan(0, cut - 1, cut, float(run.steps[-1])), scored, options)
    return forecaster, _with_steps_saved(result, run, scored, len(run.steps) - 1, options, scratch_parent)


def _with_steps_saved(result: dict, run: Run, forecaster: Forecaster, end: int, options: StreamOptions, scratch_parent: Path) -> dict:
    """With --eval-cmd: score the backtest's candidates and the true checkpoints, and add steps saved."""
    if options.eval_cmd is None:
        return result
    cut = run.steps.index(forecaster.context_end)
    truncated = run.truncated(end)
    engine = lambda: options.engine(*PREDICT_BYTES_PER_ELEMENT)  # noqa: E731
    result["eval"] = steps_saved(truncated, cut, candidates(truncated, forecaster), options.eval_cmd, scratch_parent, engine)
    return result


def evaluate_on_reference(run: Run, history: History, forecaster: Forecaster, options: StreamOptions, scratch_parent: Path) -> dict:
    """Score the reference forecaster on the reference run itself, where the truth at E + H is known."""
    end = run.steps.index(forecaster.context_end)
    result = _evaluate(run, history, BacktestPlan(0, end - 1, end, float(forecaster.target_steps[-1])), forecaster, options)
    target = forecaster.target_steps[-1]
    if options.eval_cmd is None:
        return result
    if target not in run.steps:
        result["eval"] = {"unavailable": f"step {target} is not a checkpoint of the reference run"}
        return result
    return _with_steps_saved(result, run, forecaster, run.steps.index(target), options, scratch_parent)


def _notes(run: Run) -> list[str]:
    dtypes = {i.dtype for i in run.tensor_infos() if i.is_forecast}
    notes = []
    if dtypes & {"BF16", "F16"}:
        floor = "2^-8 (0.4%)" if "BF16" in dtypes else "2^-11 (0.05%)"
        notes.append(f"weights are stored in {'/'.join(sorted(dtypes & {'BF16', 'F16'}))}: rounding alone gives relative errors up to {floor}, a floor under any forecast error")
    return notes


def _shrink_note(forecaster: Forecaster) -> list[str]:
    alpha = forecaster.fit_info.get("shrink", 1.0)
    if alpha == 1.0:
        return []
    how = "chosen by a backtest on the run's history" if forecaster.settings.get("shrink") is None else "set by --shrink"
    return [f"the forecast is shrunk towards the last checkpoint: last + {alpha:.2f} x (2-point forecast - last), {how}"]


def _report(command: str, run: Run, forecaster: Forecaster, backtest: dict, extra_notes: list[str] = ()) -> dict:
    report = {
        "farcast_version": __version__,
        "command": command,
        "run": str(run.path),
        "layout": run.layout,
        "steps": run.steps,
        "mode": forecaster.mode,
        "context": {"first_step": forecaster.first_step, "last_step": forecaster.context_end},
        "horizon": forecaster.horizon,
        "target_steps": forecaster.target_steps,
        "forecaster": {"weight": forecaster.weight, "bias": forecaster.bias, "per_tensor": forecaster.per_tensor, "fit": forecaster.fit_info},
        "backtest": backtest,
        "notes": _notes(run) + _shrink_note(forecaster) + list(extra_notes),
        "warnings": run.warnings,
    }
    report.update(verdict(backtest))
    return report


def fit(
    run_dir: Path, out_file: Path, horizon: int, context_end: int | None, emit: list[int], settings: FitSettings, options: StreamOptions, force: bool = False
) -> dict:
    """`farcast fit`: fit on a reference run (with context_end) or on the run itself; save the forecaster."""
    if out_file.exists() and not force:
        raise UsageError(f"{out_file}: already exists; choose a new name or pass --force")
    offsets = output_offsets(horizon, emit)
    timings: dict[str, float] = {}
    with timed(timings, "find_run"):
        run = find_run(run_dir)
    if context_end is None:
        _require_three_checkpoints(run)
    with timed(timings, "read_sample"):
        history = read_history(run, settings.sample, settings.seed)
    if context_end is None:
        with timed(timings, "fit_and_backtest"):
            forecaster, backtest = fit_and_backtest(run, history, horizon, offsets, settings, options, _existing_parent(out_file))
    else:
        with timed(timings, "fit"):
            forecaster = fit_on_reference(history, context_end, offsets, settings)
        with timed(timings, "backtest"):
            backtest = evaluate_on_reference(run, history, forecaster, options, _existing_parent(out_file))
    report = _report("fit", run, forecaster, backtest)
    report["seconds"] = {phase: round(value, 4) for phase, value in timings.items()}
    forecaster.report = report
    forecaster.save(out_file)
    report["output"] = [str(out_file)]
    return report


def _forecaster_for(run: Run, forecaster_file: Path, horizon: int | None) -> Forecaster:
    forecaster = Forecaster.load(forecaster_file)
    if horizon is not None and horizon != forecaster.horizon:
        raise UsageError(f"--horizon {horizon} differs from the forecaster's horizon {forecaster.horizon}; refit or drop --horizon")
    if run.steps[0] != forecaster.first_step:
        raise InputError(f"{run.path}: starts at step {run.steps[0]} but {forecaster_file} was fitted on runs starting at step {forecaster.first_step}")
    if forecaster.mode == "self" and run.steps[-1] != forecaster.context_end:
        raise InputError(f"{run.path}: ends at step {run.steps[-1]} but {forecaster_file} was fitted on this run ending at step {forecaster.context_end}; refit")
    run.at_step(forecaster.context_end)
    return forecaster


def predict(
    run_dir: Path,
    out_dir: Path,
    horizon: int | None,
    forecaster_file: Path | None,
    emit: list[int],
    settings: FitSettings,
    options: StreamOptions,
    dtype: str | None = None,
    force: bool = False,
    min_skill: float | None = None,
    fallback: bool = False,
) -> dict:
    """`farcast predict`: fit (unless given a forecaster), backtest, then stream the forecast checkpoint.

    With `fallback`, write whichever candidate (forecast, last checkpoint, straight line, average of
    the last checkpoints) had the lowest backtest error instead of the forecast, and say so."""
    timings: dict[str, float] = {}
    with timed(timings, "find_run"):
        run = find_run(run_dir)
        check_output_location(out_dir, run, force)
        resolve_device(options.device)
    if forecaster_file is not None:
        forecaster = _forecaster_for(run, forecaster_file, horizon)
        backtest = (forecaster.report or {}).get("backtest", {"unavailable": "the forecaster file holds no evaluation"})
        report = _report("predict", run, forecaster, backtest, [f"backtest measured at fit time, by {forecaster_file}"])
    else:
        if horizon is None:
            raise UsageError("give --horizon (training steps to jump ahead) or --forecaster")
        offsets = output_offsets(horizon, emit)
        _require_three_checkpoints(run)
        with timed(timings, "read_sample"):
            history = read_history(run, settings.sample, settings.seed)
        with timed(timings, "fit_and_backtest"):
            forecaster, backtest = fit_and_backtest(run, history, horizon, offsets, settings, options, _existing_parent(out_dir))
        report = _report("predict", run, forecaster, backtest)
    _enforce_min_skill(report, min_skill)
    candidate = candidates(run, forecaster)["forecast"]
    if fallback and report["best"] not in (None, "forecast"):
        candidate = candidates(run, forecaster)[report["best"]]
        report["written"] = {"method": report["best"], "why": f"--fallback: wrote {NAMES[report['best']]} instead of the forecast: it had the lowest error in the backtest."}
    last = run.at_step(forecaster.context_end)
    with atomic_folder(out_dir) as folder:
        with timed(timings, "write_forecast"), byte_progress("forecast", len(candidate.inputs) * last.nbytes, options.quiet) as advance:
            written = write_forecast(candidate, last, folder, options.engine(*PREDICT_BYTES_PER_ELEMENT, advance), dtype)
            for checkpoint in run.checkpoints:
                checkpoint.check_unchanged()
        report["output"] = [str(out_dir / p.relative_to(folder)) if p != folder else str(out_dir) for p in written]
        if options.eval_cmd is not None:
            with timed(timings, "eval"):
                report["written_loss"] = run_eval_command(options.eval_cmd, written[-1])
                report["last_checkpoint_loss"] = run_eval_command(options.eval_cmd, last.path)
        report["seconds"] = {phase: round(value, 4) for phase, value in timings.items()}
        write_text(folder / REPORT_FILE, json.dumps(report, indent=1) + "\n")
    return report


def candidates(run: Run, forecaster: Forecaster) -> dict[str, Combination]:
    """Everything predict can write for this run, as combinations of its checkpoints."""
    end = run.steps.index(forecaster.context_end)
    first, previous, last = run.checkpoints[0], run.checkpoints[end - 1], run.checkpoints[end]
    window = run.checkpoints[max(0, end - LAWA_WINDOW + 1) : end + 1]
    targets, outputs = forecaster.target_steps, len(forecaster.offsets)
    slopes = line_slopes(previous.step, last.step, targets)
    zero = [0.0] * outputs
    return {
        "forecast": combination("farcast", [first, last], forecaster.weight, forecaster.bias, targets, forecaster.per_tensor),
        "last": combination("keep last", [last], [[1.0] * outputs], zero, targets),
        "line": combination("straight line", [previous, last], [[-s for s in slopes], [1.0 + s for s in slopes]], zero, targets),
        "lawa": combination(f"average of the last {len(window)}", window, [[1.0 / len(window)] * outputs] * len(window), zero, targets),
    }


def dry_run(
    run_dir: Path, out_dir: Path, horizon: int | None, forecaster_file: Path | None, emit: list[int], settings: FitSettings, options: StreamOptions, dtype: str | None
) -> dict:
    """What `predict` would read and write, and its memory plan, without reading any tensor data."""
    run = find_run(run_dir)
    if forecaster_file is not None:
        forecaster = _forecaster_for(run, forecaster_file, horizon)
        offsets, context_end, fits = forecaster.offsets, forecaster.context_end, False
    else:
        if horizon is None:
            raise UsageError("give --horizon (training steps to jump ahead) or --forecaster")
        offsets, context_end, fits = output_offsets(horizon, emit), run.steps[-1], True
        _require_three_checkpoints(run)
    first, last = run.checkpoints[0], run.at_step(context_end)
    infos = run.tensor_infos()
    out_bytes = sum(i.numel * ITEM_SIZES[dtype] if dtype and i.is_forecast else i.nbytes for i in infos)
    engine = options.engine(*PREDICT_BYTES_PER_ELEMENT)
    plan: dict = {
        "run": str(run.path),
        "steps": run.steps,
        "device": str(engine.device),
        "reads": {"forecast": {"checkpoints": [first.step, last.step], "bytes": first.nbytes + last.nbytes}},
        "writes": {"folder": str(out_dir), "checkpoints": [context_end + o for o in offsets], "bytes": out_bytes * len(offsets)},
        "memory": {
            "max_memory": options.max_memory,
            "chunk_elements": engine.chunk_elements,
            "read_buffers_bytes": (engine.depth + 1) * PREDICT_BYTES_PER_ELEMENT[0] * engine.chunk_elements,
            "scratch_bytes": PREDICT_BYTES_PER_ELEMENT[1] * engine.chunk_elements,
        },
    }
    if fits:
        coordinates = min(settings.sample, sum(i.numel for i in infos if i.is_forecast))
        plan["reads"]["sample"] = {"coordinates": coordinates, "checkpoints": len(run.steps)}
        cut = choose_cut(run.steps, offsets[-1] / (run.steps[-1] - run.steps[0]))
        if cut is None:
            plan["reads"]["backtest"] = {"unavailable": "too few checkpoints"}
        elif options.backtest == "full":
            used = BacktestPlan(0, cut - 1, cut, float(run.steps[-1])).inputs(run.steps)
            plan["reads"]["backtest"] = {"checkpoints": [run.steps[i] for i in used], "bytes": sum(run.checkpoints[i].nbytes for i in used)}
        else:
            plan["reads"]["backtest"] = {"sampled coordinates only": True, "bytes": 0}
    return plan


def _existing_parent(path: Path) -> Path:
    """The nearest existing folder above `path`: scratch space on the output's file system."""
    parent = path.resolve().parent
    while not parent.exists():
        parent = parent.parent
    return parent


def _enforce_min_skill(report: dict, min_skill: float | None) -> None:
    if min_skill is None:
        return
    skill = report.get("skill_vs_last")
    if skill is None or skill < min_skill:
        shown = "unknown" if skill is None else f"{skill:.3f}"
        error = LowSkillError(f"backtest skill against keeping the last checkpoint is {shown}, below --min-skill {min_skill}; nothing written")
        error.report = report
        raise error

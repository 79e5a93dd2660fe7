"""The commands, each its pipeline in order: find the run -> read a sample -> fit -> backtest ->
write the checkpoint -> report. This is farcast's Python API; the CLI only parses arguments into it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from farcast_cli.errors import InputError, LowSkillError, UsageError
from farcast_cli.evaluate.backtest import (
    INPUT_BYTES_PER_ELEMENT,
    SCRATCH_BYTES_PER_ELEMENT,
    backtest_sample,
    backtest_streaming,
    checkpoints_read,
)
from farcast_cli.evaluate.loss import run_eval_command, steps_saved
from farcast_cli.evaluate.report import NAMES, REPORT_FILE, Backtest, Report, Written, verdict
from farcast_cli.forecast.candidates import candidate_inputs, candidates
from farcast_cli.forecast.write import write_forecast
from farcast_cli.io.device import resolve_device
from farcast_cli.io.engine import EngineSettings, plan_chunk_elements
from farcast_cli.io.output import atomic_folder, check_output_location, write_text
from farcast_cli.io.reader import ITEM_SIZES
from farcast_cli.io.run import Run, find_run
from farcast_cli.model.fit import FitSettings
from farcast_cli.model.forecaster import Forecaster, choose_cut, fit_on_reference, fit_on_run
from farcast_cli.model.history import History, read_history
from farcast_cli.model.pairs import max_self_horizon
from farcast_cli.progress import byte_progress

PREDICT_BYTES_PER_ELEMENT = (2 * 8, 4 * 8)


@dataclass(frozen=True)
class StreamOptions:
    """How tensors are streamed and evaluated: device, memory, backtest scope, progress, reads, loss."""

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
def timed(timings: dict[str, float], phase: str) -> Iterator[None]:
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


def fit(
    run_dir: Path,
    out_file: Path,
    *,
    horizon: int,
    context_end: int | None = None,
    emit: list[int] = (),
    settings: FitSettings = FitSettings(),
    options: StreamOptions = StreamOptions(),
    force: bool = False,
) -> Report:
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
            forecaster, backtest, unavailable = _fit_and_backtest(
                run, history, horizon, offsets, settings, options, _existing_parent(out_file)
            )
    else:
        with timed(timings, "fit"):
            forecaster = fit_on_reference(history, context_end, offsets, settings)
        with timed(timings, "backtest"):
            backtest, unavailable = _evaluate_on_reference(run, history, forecaster, options, _existing_parent(out_file)), None
    report = _report("fit", run, forecaster, backtest, unavailable)
    report.seconds = _rounded(timings)
    forecaster.report = report.to_json()
    forecaster.save(out_file)
    report.output = [str(out_file)]
    return report


def predict(
    run_dir: Path,
    out_dir: Path,
    *,
    horizon: int | None = None,
    forecaster_file: Path | None = None,
    emit: list[int] = (),
    settings: FitSettings = FitSettings(),
    options: StreamOptions = StreamOptions(),
    dtype: str | None = None,
    force: bool = False,
    min_skill: float | None = None,
    fallback: bool = False,
) -> Report:
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
        saved = forecaster.report or {}
        backtest = Backtest.from_json(saved["backtest"]) if saved.get("backtest") else None
        unavailable = None if backtest else saved.get("backtest_unavailable", "the forecaster file holds no evaluation")
        report = _report("predict", run, forecaster, backtest, unavailable, [f"backtest measured at fit time, by {forecaster_file}"])
    else:
        if horizon is None:
            raise UsageError("give --horizon (training steps to jump ahead) or --forecaster")
        offsets = output_offsets(horizon, emit)
        _require_three_checkpoints(run)
        with timed(timings, "read_sample"):
            history = read_history(run, settings.sample, settings.seed)
        with timed(timings, "fit_and_backtest"):
            forecaster, backtest, unavailable = _fit_and_backtest(
                run, history, horizon, offsets, settings, options, _existing_parent(out_dir)
            )
        report = _report("predict", run, forecaster, backtest, unavailable)
    _enforce_min_skill(report, min_skill)
    choice = "forecast"
    if fallback and report.best not in (None, "forecast"):
        choice = report.best
        report.written = Written(
            choice, f"--fallback: wrote {NAMES[choice]} instead of the forecast: it had the lowest error in the backtest."
        )
    candidate = candidates(run, forecaster)[choice]
    last = run.at_step(forecaster.context_end)
    with atomic_folder(out_dir) as folder:
        with timed(timings, "write_forecast"), byte_progress("forecast", len(candidate.inputs) * last.nbytes, options.quiet) as advance:
            written = write_forecast(candidate, last, folder, options.engine(*PREDICT_BYTES_PER_ELEMENT, advance), dtype)
            for checkpoint in run.checkpoints:
                checkpoint.check_unchanged()
        report.output = [str(out_dir / p.relative_to(folder)) if p != folder else str(out_dir) for p in written]
        if options.eval_cmd is not None:
            with timed(timings, "eval"):
                report.written_loss = run_eval_command(options.eval_cmd, written[-1])
                report.last_checkpoint_loss = run_eval_command(options.eval_cmd, last.path)
        report.seconds = _rounded(timings)
        write_text(folder / REPORT_FILE, json.dumps(report.to_json(), indent=1) + "\n")
    return report


def dry_run(
    run_dir: Path,
    out_dir: Path,
    *,
    horizon: int | None = None,
    forecaster_file: Path | None = None,
    emit: list[int] = (),
    settings: FitSettings = FitSettings(),
    options: StreamOptions = StreamOptions(),
    dtype: str | None = None,
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
            inputs = {c.step for group in candidate_inputs(run, cut).values() for c in group}
            used = sorted(run.steps.index(step) for step in inputs | {run.steps[-1]})
            plan["reads"]["backtest"] = {"checkpoints": [run.steps[i] for i in used], "bytes": sum(run.checkpoints[i].nbytes for i in used)}
        else:
            plan["reads"]["backtest"] = {"sampled coordinates only": True, "bytes": 0}
    return plan


def output_offsets(horizon: int, emit: list[int]) -> list[int]:
    if horizon <= 0:
        raise UsageError(f"--horizon must be a positive number of steps, not {horizon}")
    bad = [e for e in emit if not 0 < e < horizon]
    if bad:
        raise UsageError(f"--emit {bad[0]}: each emitted step must lie between 0 and the horizon {horizon}")
    return sorted(set(emit)) + [horizon]


def _fit_and_backtest(
    run: Run, history: History, horizon: int, offsets: list[int], settings: FitSettings, options: StreamOptions, scratch_parent: Path
) -> tuple[Forecaster, Backtest | None, str | None]:
    """Fit on the whole run, and score the held-out fit (model/forecaster.py, SelfFit) on the last checkpoint."""
    fitted = fit_on_run(history, horizon, offsets, settings)
    if fitted.scored is None:
        return fitted.forecaster, None, f"{len(run.steps)} checkpoints are too few to hold some out and still fit a jump of this size"
    backtest = _backtest(run, history, fitted.scored, options)
    backtest.eval = _steps_saved(run, fitted.scored, len(run.steps) - 1, options, scratch_parent)
    return fitted.forecaster, backtest, None


def _evaluate_on_reference(run: Run, history: History, forecaster: Forecaster, options: StreamOptions, scratch_parent: Path) -> Backtest:
    """Score the reference forecaster on the reference run itself, where the truth at E + H is known."""
    backtest = _backtest(run, history, forecaster, options)
    target = forecaster.target_steps[-1]
    if options.eval_cmd is not None:
        if target in run.steps:
            backtest.eval = _steps_saved(run, forecaster, run.steps.index(target), options, scratch_parent)
        else:
            backtest.eval = {"unavailable": f"step {target} is not a checkpoint of the reference run"}
    return backtest


def _backtest(run: Run, history: History, forecaster: Forecaster, options: StreamOptions) -> Backtest:
    """The forecaster and the alternatives, from its context end to its last target, in weight error."""
    scored = candidates(run, forecaster)
    if options.backtest == "sample":
        return backtest_sample(history, scored)
    total = sum(run.checkpoints[i].nbytes for i in checkpoints_read(run.steps, scored))
    with byte_progress("backtest", total, options.quiet) as advance:
        return backtest_streaming(run, scored, options.engine(INPUT_BYTES_PER_ELEMENT, SCRATCH_BYTES_PER_ELEMENT, advance))


def _steps_saved(run: Run, forecaster: Forecaster, end: int, options: StreamOptions, scratch_parent: Path) -> dict | None:
    """With --eval-cmd: score the backtest's candidates and the true checkpoints, and add steps saved."""
    if options.eval_cmd is None:
        return None
    cut = run.steps.index(forecaster.context_end)
    truncated = run.truncated(end)
    engine = lambda: options.engine(*PREDICT_BYTES_PER_ELEMENT)  # noqa: E731
    return steps_saved(truncated, cut, candidates(truncated, forecaster), options.eval_cmd, scratch_parent, engine)


def _require_three_checkpoints(run: Run) -> None:
    if len(run.checkpoints) < 3:
        raise InputError(
            f"{run.path}: only {len(run.checkpoints)} checkpoints; "
            "fitting on the run itself needs at least three (or fit on a reference run)"
        )


def _notes(run: Run) -> list[str]:
    dtypes = {i.dtype for i in run.tensor_infos() if i.is_forecast}
    notes = []
    if dtypes & {"BF16", "F16"}:
        floor = "2^-8 (0.4%)" if "BF16" in dtypes else "2^-11 (0.05%)"
        notes.append(
            f"weights are stored in {'/'.join(sorted(dtypes & {'BF16', 'F16'}))}: "
            f"rounding alone gives relative errors up to {floor}, a floor under any forecast error"
        )
    return notes


def _shrink_note(forecaster: Forecaster) -> list[str]:
    alpha = forecaster.shrink
    if alpha == 1.0:
        return []
    how = "chosen by a backtest on the run's history" if forecaster.settings.get("shrink") is None else "set by --shrink"
    return [f"the forecast is shrunk towards the last checkpoint: last + {alpha:.2f} x (2-point forecast - last), {how}"]


def _report(
    command: str, run: Run, forecaster: Forecaster, backtest: Backtest | None, unavailable: str | None, extra_notes: list[str] = ()
) -> Report:
    weight, bias = forecaster.shared.as_lists()
    return Report(
        command=command,
        run=str(run.path),
        layout=run.layout,
        steps=run.steps,
        mode=forecaster.mode,
        context={"first_step": forecaster.first_step, "last_step": forecaster.context_end},
        horizon=forecaster.horizon,
        target_steps=forecaster.target_steps,
        forecaster={"weight": weight, "bias": bias, "per_tensor": forecaster.as_dict()["per_tensor"], "fit": forecaster.fit_info},
        backtest=backtest,
        backtest_unavailable=unavailable,
        notes=_notes(run) + _shrink_note(forecaster) + list(extra_notes),
        warnings=run.warnings,
        **verdict(backtest, unavailable),
    )


def _forecaster_for(run: Run, forecaster_file: Path, horizon: int | None) -> Forecaster:
    forecaster = Forecaster.load(forecaster_file)
    if horizon is not None and horizon != forecaster.horizon:
        raise UsageError(f"--horizon {horizon} differs from the forecaster's horizon {forecaster.horizon}; refit or drop --horizon")
    if run.steps[0] != forecaster.first_step:
        raise InputError(
            f"{run.path}: starts at step {run.steps[0]} but {forecaster_file} was fitted on runs starting at step {forecaster.first_step}"
        )
    if forecaster.mode == "self" and run.steps[-1] != forecaster.context_end:
        raise InputError(
            f"{run.path}: ends at step {run.steps[-1]} but {forecaster_file} was fitted on this run "
            f"ending at step {forecaster.context_end}; refit"
        )
    run.at_step(forecaster.context_end)
    return forecaster


def _existing_parent(path: Path) -> Path:
    """The nearest existing folder above `path`: scratch space on the output's file system."""
    parent = path.resolve().parent
    while not parent.exists():
        parent = parent.parent
    return parent


def _rounded(timings: dict[str, float]) -> dict[str, float]:
    return {phase: round(value, 4) for phase, value in timings.items()}


def _enforce_min_skill(report: Report, min_skill: float | None) -> None:
    if min_skill is None:
        return
    skill = report.skill_vs_last
    if skill is None or skill < min_skill:
        shown = "unknown" if skill is None else f"{skill:.3f}"
        error = LowSkillError(
            f"backtest skill against keeping the last checkpoint is {shown}, below --min-skill {min_skill}; nothing written"
        )
        error.report = report
        raise error

"""The commands, each its pipeline in order: find the run -> read a sample -> fit -> backtest ->
write the checkpoint -> report. This is farcast's Python API; the CLI only parses arguments into it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from farcast_cli.distributed import ONE_PROCESS, World, shared_file_writes
from farcast_cli.errors import InputError, LowSkillError, UsageError, parameter
from farcast_cli.evaluate.backtest import (
    INPUT_BYTES_PER_ELEMENT,
    backtest_sample,
    backtest_streaming,
    scratch_bytes_per_element,
    streamed_bytes,
)
from farcast_cli.evaluate.evaluator import EvalOptions
from farcast_cli.evaluate.loss import ANCHORS, CandidateScores, LossBacktest, loss_backtest, reference_loss_backtest
from farcast_cli.evaluate.report import REPORT_FILE, Backtest, Report, Written, headline, name_of
from farcast_cli.evaluate.trajectories import sampled_trajectories
from farcast_cli.forecast.candidates import (
    CANDIDATES,
    FORECAST,
    REFERENCE,
    Combination,
    baselines,
    candidate_inputs,
    candidates,
    line_tested,
)
from farcast_cli.forecast.write import combination_key, finish_forecast, output_info, split_files, split_work, write_tensors
from farcast_cli.io.dcp import describe_dcp
from farcast_cli.io.device import resolve_device
from farcast_cli.io.engine import EngineSettings, plan_chunk_elements
from farcast_cli.io.output import build_folder, check_file_location, check_output_location, write_text
from farcast_cli.io.resume import Resume, check_resumable, check_still_newest, resumable_folder_name, write_trainer_state
from farcast_cli.io.run import Checkpoint, Run, describe_steps, find_run, output_files
from farcast_cli.model.fit import FitSettings
from farcast_cli.model.forecaster import Forecaster, SelfFit, choose_cut, fit_on_reference, fit_on_run, fit_plain
from farcast_cli.model.history import History, read_history
from farcast_cli.model.pairs import max_self_horizon
from farcast_cli.progress import byte_progress, phase

UNSCORED_CONSOLIDATED = "the written forecast is not scored: it is in safetensors, and the eval command reads the run's own format"


def predict_bytes(inputs: int) -> tuple[int, int]:
    """Read-buffer and scratch bytes per element when writing a combination of `inputs` checkpoints
    (float64 at most), for the engine's chunk plan."""
    return inputs * 8, 4 * 8


@dataclass(frozen=True)
class StreamOptions:
    """How tensors are streamed: device, memory, backtest scope, progress, reads."""

    device: str = "auto"
    max_memory: int = 1 << 30
    backtest: str = "full"
    quiet: bool = False
    use_mmap: bool = False

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


def inspect_run(run_dir: Path, skip_damaged: bool = False) -> dict:
    run = find_run(run_dir, skip_damaged=skip_damaged)
    infos = run.tensor_infos()
    forecast = [i for i in infos if i.is_forecast]
    steps = run.steps
    copied, left_out = output_files(run.last)
    return {
        "run": str(run.path),
        "layout": run.layout.name,
        "steps": steps,
        "steps_summary": describe_steps(steps),
        "checkpoints": [
            {
                "step": c.step,
                "saved_step": c.saved_step,
                "path": str(c.path),
                "files": sorted(c.files) if c.dcp is None else [p.name for p in c.dcp.files],
                "bytes": c.nbytes,
            }
            for c in run.checkpoints
        ],
        "forecasts": [{"saved_step": c.saved_step, "path": str(c.path)} for c in run.forecasts],
        "jumps": [{"at_step": j.at_step, "horizon": j.horizon} for j in run.jumps],
        "copied_files": copied,
        "left_out_files": [{"name": name, "why": why} for name, why in left_out],
        "tensors": len(infos),
        "forecast_tensors": len(forecast),
        "copied_dtypes": sorted({i.dtype for i in infos if not i.is_forecast}),
        "parameters": sum(i.numel for i in infos),
        "forecast_parameters": sum(i.numel for i in forecast),
        "dtypes": sorted({i.dtype for i in infos}),
        "bytes_per_checkpoint": run.last.nbytes,
        "total_bytes": sum(c.nbytes for c in run.checkpoints),
        "max_horizon": max_self_horizon(steps) if len(steps) > 2 else 0,
        "skipped_checkpoints": run.skipped,
        "warnings": run.warnings,
        "distributed": None if run.last.dcp is None else describe_dcp(run.last),
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
    evaluation: EvalOptions = EvalOptions(),
    anchor: int | None = None,
    force: bool = False,
    skip_damaged: bool = False,
    world: World = ONE_PROCESS,
    validation_run: Path | None = None,
) -> Report:
    """`farcast fit`: fit on a reference run (with context_end) or on the run itself; save the forecaster.
    A reference fit stops early on `validation_run` where given (the paper's protocol), else on
    held-out coordinates of the reference run.
    Under torchrun (`world`) the ranks share the reads; rank 0 fits, runs any eval commands and saves."""
    if validation_run is not None and context_end is None:
        raise UsageError(f"{validation_run}: a validation run is for fitting on a reference run (context_end), not on the run itself")
    if out_file.exists() and not force:
        raise UsageError(f"{out_file}: already exists; choose a new name or pass {parameter('force=True')}")
    _check_horizon(horizon)
    offsets = output_offsets(horizon, emit)
    options = _for_rank(options, world)
    judged = evaluation.evaluator is not None
    timings: dict[str, float] = {}
    _check_anchor(anchor)
    with timed(timings, "find_run"):
        run = world.together(lambda: find_run(run_dir, skip_damaged=skip_damaged))
        check_file_location(out_file, run)
    with _judge(evaluation, run, out_file, options, world) as judge:
        if context_end is None:
            found = _fit_and_evaluate(run, horizon, offsets, settings, options, judge, anchor, timings, world, judged)
        else:
            found = _fit_reference(run, context_end, offsets, settings, options, judge, anchor or 1, timings, world, judged, validation_run)
        counts = _count_evaluations(judge, timings)
    forecaster = found.forecaster
    forecaster.report = assemble("fit", run, found, counts=counts, seconds=timings).to_json()
    world.on_main(lambda: forecaster.save(out_file))
    return assemble("fit", run, found, Outcome(output=[str(out_file)]), counts, timings)


def predict(
    run_dir: Path,
    out_dir: Path,
    *,
    horizon: int | None = None,
    forecaster_file: Path | None = None,
    emit: list[int] = (),
    settings: FitSettings = FitSettings(),
    options: StreamOptions = StreamOptions(),
    evaluation: EvalOptions = EvalOptions(),
    anchor: int | None = None,
    last_step: int | None = None,
    dtype: str | None = None,
    force: bool = False,
    min_skill: float | None = None,
    fallback: bool | None = None,
    resumable: bool = False,
    schedule: str | None = None,
    dry_run: bool = False,
    skip_damaged: bool = False,
    world: World = ONE_PROCESS,
    output_format: str = "same",
) -> Report | dict:
    """`farcast predict`: fit (unless given a forecaster), backtest, then stream the chosen checkpoint.
    With `dry_run`, only the plan: what it would read and write, and its memory (`plan`).

    The backtest decides by the user's loss when `evaluation` has an evaluator, else by weight error.
    With `fallback` (the default when there is an evaluator) whichever candidate won the backtest is
    written (the forecast, the last checkpoint, the straight line, the average of the last checkpoints);
    without it, the forecast, whatever the backtest says. A `resumable` output is a checkpoint the
    trainer resumes from, with its state advanced by the horizon and the LR `schedule` kept or advanced
    (io/resume.py); it may be the run's own checkpoint-<last + horizon>. `output_format` "safetensors"
    writes a DCP run's forecast as whole tensors in a Hugging Face layout. Under torchrun (`world`) every
    streaming pass divides its tensors among the ranks; rank 0 fits, runs any eval commands and publishes."""
    timings: dict[str, float] = {}
    options = _for_rank(options, world)
    judged = evaluation.evaluator is not None
    with timed(timings, "find_run"):
        _check_horizon(horizon, forecaster_file)
        _check_anchor(anchor)
        _check_saved_forecaster_options(forecaster_file, emit, anchor, settings)
        if resumable:
            _check_resumable(last_step, emit)
        resumable_horizon = (horizon if horizon is not None else Forecaster.load(forecaster_file).horizon) if resumable else None
        opened = (run_dir, out_dir, force, last_step, options, resumable_horizon, schedule, skip_damaged)
        whole, run = world.together(lambda: _open_run(*opened))
    if dry_run:
        return plan(run, out_dir, horizon, forecaster_file, emit, settings, options, dtype, anchor)
    with _judge(evaluation, run, out_dir, options, world) as judge:
        if forecaster_file is not None:
            found = _saved_evaluation(run, world.together(lambda: _forecaster_for(run, forecaster_file, horizon)), forecaster_file)
        else:
            offsets = output_offsets(horizon, emit)
            found = _fit_and_evaluate(run, horizon, offsets, settings, options, judge, anchor, timings, world, judged)
        forecaster = found.forecaster
        verdict = assemble("predict", run, found)
        _enforce_min_skill(verdict, min_skill)
        chosen, candidate = _choose(verdict, candidates(run, forecaster), judged if fallback is None else fallback)
        last = run.at_step(forecaster.context_end)
        if resumable:
            _check_resumable_choice(assemble("predict", run, found, Outcome(written=chosen)), run, last)
        share = _write_share(last, out_dir, world)
        consolidate = output_format == "safetensors" and last.dcp is not None

        def write(folder: Path) -> None:
            share_bytes = last.nbytes if share is None else sum(last.tensor(name)[1].nbytes for name in share)
            phase(f"writing: {chosen.label} to {out_dir}", options.quiet)
            with timed(timings, "write_forecast"), byte_progress("forecast", len(candidate.inputs) * share_bytes, options.quiet) as advance:
                write_tensors(
                    candidate,
                    last,
                    folder,
                    options.engine(*predict_bytes(len(candidate.inputs)), advance),
                    dtype,
                    only=share,
                    consolidate=consolidate,
                )
                for checkpoint in whole.checkpoints:
                    checkpoint.check_unchanged()

        def finish(folder: Path) -> Report:
            with timed(timings, "write_forecast"):
                written = finish_forecast(candidate, last, folder, dtype, consolidate=consolidate)
            outcome = Outcome(chosen, [str(out_dir / p.relative_to(folder)) if p != folder else str(out_dir) for p in written])
            if resumable:
                provenance = {"method": chosen.method, "from_steps": chosen.from_steps}
                outcome = replace(outcome, resume=write_trainer_state(last, folder, forecaster.horizon, schedule, provenance))
            if judge is not None and consolidate:
                outcome = replace(outcome, notes=(UNSCORED_CONSOLIDATED,))
            elif judge is not None:
                with timed(timings, "eval_written"):
                    outcome = replace(outcome, **_score_written(judge, run, candidate, written[-1], dtype))
            report = assemble("predict", run, found, outcome, _count_evaluations(judge, timings), timings)
            write_text(folder / REPORT_FILE, json.dumps(report.to_json(), indent=1) + "\n")
            if resumable:
                check_still_newest(whole, last)
            return report

        return build_folder(out_dir, write, finish, world)


def _open_run(
    run_dir: Path,
    out_dir: Path,
    force: bool,
    last_step: int | None,
    options: StreamOptions,
    resumable_horizon: int | None,
    schedule: str | None,
    skip_damaged: bool = False,
) -> tuple[Run, Run]:
    """The run as read (no checkpoint after last_step), and the run up to last_step; checks the output's
    place (a resumable forecast's place is the run's checkpoint-<last + horizon>) and the device first."""
    whole = find_run(run_dir, last_step=last_step, skip_damaged=skip_damaged)
    run = _up_to(whole, last_step)
    if resumable_horizon is not None:
        check_resumable(run, schedule)
    resumable_name = None if resumable_horizon is None else resumable_folder_name(run, resumable_horizon)
    check_output_location(out_dir, whole, force, resumable_name)
    resolve_device(options.device)
    return whole, run


def _up_to(whole: Run, last_step: int | None) -> Run:
    """The run as it stood at --last-step (its checkpoints up to that step)."""
    return whole if last_step is None else whole.truncated(whole.steps.index(whole.at_step(last_step).step))


def _for_rank(options: StreamOptions, world: World) -> StreamOptions:
    """Under torchrun: this rank's own GPU for auto/cuda, and progress from rank 0 only."""
    return replace(options, device=world.device(options.device), quiet=options.quiet or not world.is_main)


def _write_share(last: Checkpoint, out_dir: Path, world: World) -> frozenset[str] | None:
    """The tensors this rank writes (None: all of them, one process): shares of every file where the
    output's file system takes writes to one file from several nodes, else whole files; rank 0 decides,
    so that the shares agree even where nodes mount the output differently."""
    if world.size == 1:
        return None
    split = split_work if world.on_main(lambda: shared_file_writes(world, out_dir)) else split_files
    return split(last, world.size)[world.rank]


def plan(
    run: Run,
    out_dir: Path,
    horizon: int | None,
    forecaster_file: Path | None,
    emit: list[int],
    settings: FitSettings,
    options: StreamOptions,
    dtype: str | None,
    anchor: int | None,
) -> dict:
    """What `predict` would read and write from the run as opened (so refusing what the real run refuses
    before reading), and its memory plan, without reading any tensor data."""
    if forecaster_file is not None:
        forecaster = _forecaster_for(run, forecaster_file, horizon)
        offsets, context_end, fits = forecaster.offsets, forecaster.context_end, False
        anchor = forecaster.anchor
    else:
        offsets, context_end, fits = output_offsets(horizon, emit), run.steps[-1], True
        _require_three_checkpoints(run)
    first, last = run.checkpoints[0], run.at_step(context_end)
    infos = run.tensor_infos()
    out_bytes = sum(output_info(info, dtype).nbytes for info in infos)
    read_bytes, scratch_bytes = predict_bytes(max(1 + (anchor or max(ANCHORS)), *(c.most_inputs for c in baselines())))
    engine = options.engine(read_bytes, scratch_bytes)
    plan: dict = {
        "run": str(run.path),
        "steps": run.steps,
        "device": str(engine.device),
        "reads": {"forecast": {"checkpoints": [first.step, last.step], "bytes": first.nbytes + last.nbytes}},
        "writes": {"folder": str(out_dir), "checkpoints": [context_end + o for o in offsets], "bytes": out_bytes * len(offsets)},
        "copied_files": output_files(last)[0],
        "left_out_files": [{"name": name, "why": why} for name, why in output_files(last)[1]],
        "memory": {
            "max_memory": options.max_memory,
            "chunk_elements": engine.chunk_elements,
            "read_buffers_bytes": (engine.depth + 1) * read_bytes * engine.chunk_elements,
            "scratch_bytes": scratch_bytes * engine.chunk_elements,
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


def _check_resumable_choice(report: Report, run: Run, last: Checkpoint) -> None:
    """A resumable output moves the trainer H steps on: only a forecast from the run's newest checkpoint
    is worth that (the last checkpoint written unchanged would only skip H batches)."""
    if last.path != run.last.path:
        raise UsageError(
            f"{parameter('resumable=True')} continues the run from its newest checkpoint, {run.last.path.name}; "
            f"this forecaster starts at step {last.step}"
        )
    if report.written.method != FORECAST.key:
        error = LowSkillError(
            f"the backtest chose {name_of(report.written.method)} over the forecast: a resumable output of it would only move the "
            f"trainer on without changing the weights; nothing written ({parameter('fallback=False')} writes the forecast)"
        )
        error.report = report
        raise error


def _check_saved_forecaster_options(forecaster_file: Path | None, emit: list[int], anchor: int | None, settings: FitSettings) -> None:
    """A saved forecaster fixed its steps, anchor and shrink when it was fitted: options that would change
    them are refused rather than ignored."""
    given = [
        parameter(name) for name, value in (("emit", emit), ("anchor", anchor), ("shrink", settings.shrink)) if value not in (None, [], ())
    ]
    if forecaster_file is not None and given:
        raise UsageError(f"{forecaster_file}: a saved forecaster keeps the {', '.join(given)} it was fitted with; give them to farcast fit")


def _check_anchor(anchor: int | None) -> None:
    if anchor is not None and anchor < 1:
        raise UsageError(f"{parameter('anchor')} {anchor}: the number of checkpoints averaged must be at least 1")


def _check_resumable(last_step: int | None, emit: list[int]) -> None:
    if last_step is not None or emit:
        raise UsageError(
            f"{parameter('resumable=True')} writes one checkpoint past the run's newest: "
            f"it takes neither {parameter('last_step')} nor {parameter('emit')}"
        )


def _check_horizon(horizon: int | None, forecaster_file: Path | None = None) -> None:
    if horizon is None and forecaster_file is None:
        raise UsageError(f"give {parameter('horizon')} (training steps to jump ahead) or {parameter('forecaster_file')}")
    if horizon is not None and horizon <= 0:
        raise UsageError(f"{parameter('horizon')} must be a positive number of steps, not {horizon}")


def output_offsets(horizon: int, emit: list[int]) -> list[int]:
    """The steps past the context end to forecast: each emitted one, and the horizon (checked already)."""
    bad = [e for e in emit if not 0 < e < horizon]
    if bad:
        raise UsageError(f"{parameter('emit')} {bad[0]}: each emitted step must lie between 0 and the horizon {horizon}")
    return sorted(set(emit)) + [horizon]


@contextmanager
def _judge(evaluation: EvalOptions, run: Run, output: Path, options: StreamOptions, world: World) -> Iterator[CandidateScores | None]:
    """The user's loss as a judge of candidates (None without an evaluator, and on ranks other than 0);
    scratch space beside the output."""
    scorer = evaluation.scorer(options.quiet) if world.is_main else None
    if scorer is None:
        yield None
        return
    engine = lambda: options.engine(*predict_bytes(1 + max(ANCHORS)))  # noqa: E731
    scores = CandidateScores(run, scorer, _existing_parent(output), engine)
    try:
        yield scores
    finally:
        scorer.close()
        scores.close()


def _fit_and_evaluate(
    run: Run,
    horizon: int,
    offsets: list[int],
    settings: FitSettings,
    options: StreamOptions,
    judge: CandidateScores | None,
    anchor: int | None,
    timings: dict[str, float],
    world: World = ONE_PROCESS,
    judged: bool = False,
) -> Evaluation:
    """Fit on the whole run; score the held-out fit (model/forecaster.py, SelfFit) in weight error, and
    when `judged`, score every candidate by the user's loss (on rank 0, with the judge) and refit with
    the best forecast's settings."""
    _require_three_checkpoints(run)
    with timed(timings, "read_sample"):
        phase(_sampling(run, settings), options.quiet)
        history = read_history(run, settings.sample, settings.seed, world)
    with timed(timings, "fit"):
        phase("fitting: the forecaster and its held-out trial", options.quiet)
        fitted = world.on_main(lambda: fit_on_run(history, horizon, offsets, settings, anchor or 1))
    with timed(timings, "backtest"):
        backtest = None if fitted.scored is None else _backtest(run, history, fitted.scored, options, world)
    forecaster, loss, loss_unavailable = fitted.forecaster, None, None
    if judged:
        with timed(timings, "loss_backtest"):
            forecaster, loss, loss_unavailable = world.on_main(
                lambda: _decided_by_loss(run, history, horizon, offsets, settings, judge, anchor, fitted), patient=True
            )
    unavailable = None if backtest else _too_few_to_hold_out(run)
    trajectories = sampled_trajectories(history, {i.name: i.numel for i in run.tensor_infos()}, fitted.scored, forecaster)
    return Evaluation(forecaster, backtest, unavailable, loss, loss_unavailable, trajectories)


def _decided_by_loss(
    run: Run,
    history: History,
    horizon: int,
    offsets: list[int],
    settings: FitSettings,
    judge: CandidateScores,
    anchor: int | None,
    fitted: SelfFit,
) -> tuple[Forecaster, LossBacktest | None, str | None]:
    """The loss backtest, the forecaster with the settings of its best forecast (`fitted`'s fit and
    trial are reused where its anchor is the best, not fitted again), and why there is no loss
    backtest (or None)."""
    plain = fitted.plain
    loss = loss_backtest(run, history, horizon, settings, judge, (anchor,) if anchor else ANCHORS, {plain.anchor: fitted.trial})
    if loss is None:
        return fitted.forecaster, None, _too_few_to_hold_out(run)
    forecaster = fitted.forecaster
    if loss.best_forecast is not None:
        best = loss.best_forecast
        plain = plain if best.anchor == plain.anchor else fit_plain(history, horizon, offsets, settings, best.anchor)
        forecaster = plain.shrunk(best.shrink)
        forecaster.fit_info["chosen_by"] = "validation loss"
    return forecaster, loss, None


def _fit_reference(
    run: Run,
    context_end: int,
    offsets: list[int],
    settings: FitSettings,
    options: StreamOptions,
    judge: CandidateScores | None,
    anchor: int,
    timings: dict[str, float],
    world: World = ONE_PROCESS,
    judged: bool = False,
    validation_dir: Path | None = None,
) -> Evaluation:
    """The paper's protocol on a complete reference run, scored on that run, where the truth at E + H is known."""
    validation_run = None
    if validation_dir is not None:
        validation_run = world.together(lambda: find_run(validation_dir))
        _check_validation_run(validation_run, run, context_end, context_end + offsets[-1])
    with timed(timings, "read_sample"):
        phase(_sampling(run, settings), options.quiet)
        history = read_history(run, settings.sample, settings.seed, world)
        validation = None if validation_run is None else read_history(validation_run, settings.sample, settings.seed, world)
    with timed(timings, "fit"):
        phase("fitting: the forecaster on the reference run", options.quiet)
        forecaster = world.on_main(lambda: fit_on_reference(history, context_end, offsets, settings, anchor, validation))
    with timed(timings, "backtest"):
        backtest = _backtest(run, history, forecaster, options, world)
    loss, loss_unavailable = None, None
    if judged:
        target = forecaster.target_steps[-1]
        if target in run.steps:
            with timed(timings, "loss_backtest"):
                loss = world.on_main(
                    lambda: reference_loss_backtest(run.truncated(run.steps.index(target)), forecaster, judge), patient=True
                )
        else:
            loss_unavailable = f"step {target} is not a checkpoint of the reference run"
    return Evaluation(forecaster, backtest, None, loss, loss_unavailable)


def _check_validation_run(validation: Run, reference: Run, context_end: int, target: int) -> None:
    """A validation run must hold tensors of the reference run's names (their sizes may differ: the
    pairs are per coordinate, per tensor), a checkpoint at the context end and one at or past the
    target, so that it gives pairs of the kind the fit learns from."""
    expected = {info.name for info in reference.tensor_infos()}
    found = {info.name for info in validation.tensor_infos()}
    if found != expected:
        differing = sorted(expected ^ found)
        raise InputError(f"{validation.path}: the validation run's tensors differ from the reference run's ({', '.join(differing[:3])})")
    if context_end not in validation.steps or validation.steps[-1] < target or validation.steps[0] >= context_end:
        raise InputError(
            f"{validation.path}: a validation run needs checkpoints from before step {context_end}, at it, and up to step {target}; "
            f"found {describe_steps(validation.steps)}"
        )


def _saved_evaluation(run: Run, forecaster: Forecaster, forecaster_file: Path) -> Evaluation:
    """The evaluation of a forecaster saved by `farcast fit`, measured at fit time."""
    saved = forecaster.report or {}
    backtest = Backtest.from_json(saved["backtest"]) if saved.get("backtest") else None
    loss = LossBacktest.from_json(saved["loss"]) if saved.get("loss") else None
    unavailable = None if backtest else saved.get("backtest_unavailable") or "the forecaster file holds no evaluation"
    notes = (f"backtest measured at fit time, by {forecaster_file}",)
    return Evaluation(forecaster, backtest, unavailable, loss, saved.get("loss_unavailable"), notes=notes)


def _choose(report: Report, options: dict[str, Combination], fallback: bool) -> tuple[Written, Combination]:
    """The candidate to write, and why: the backtest's winner with `fallback` (the last checkpoint where
    the backtest could not test a jump this long), else the forecast."""
    method = FORECAST.key
    if fallback and report.tested is False:
        method, why = REFERENCE, "the backtest could not test a jump this long, so --fallback keeps the last checkpoint"
    elif fallback and report.best not in (None, FORECAST.key):
        method = report.best
        why = f"{name_of(method)} did best in the backtest ({report.criterion}), so --fallback writes it instead of the forecast"
    elif report.best not in (None, FORECAST.key):
        why = f"the forecast, as asked, although {name_of(report.best)} did better in the backtest ({report.criterion})"
    else:
        why = "the forecast, which did best in the backtest" if report.best == FORECAST.key else "the forecast (no backtest)"
    chosen = options[method]
    return Written(method, _written_label(report, method), chosen.from_steps, why), chosen


def _written_label(report: Report, method: str) -> str:
    if method != FORECAST.key:
        return CANDIDATES[method].written
    fit = report.forecaster
    return f"the forecast (anchor {fit['anchor']}, shrink {fit['fit'].get('shrink', 1.0):g})"


def _score_written(judge: CandidateScores, run: Run, candidate: Combination, folder: Path, dtype: str | None) -> dict[str, float]:
    """The loss of what was written and of the last checkpoint, from the cache where they were scored already."""
    last = run.last
    kept = candidate.kept_input() if dtype is None else None
    if kept is not None:
        written = judge.checkpoint(kept, "written checkpoint")
    else:
        key = combination_key(candidate, [judge.fingerprint(c) for c in candidate.inputs], dtype)
        written = judge.written(key, run.layout.evaluated(folder), "written checkpoint")
    written_loss = written.result().loss
    return {"written_loss": written_loss, "last_checkpoint_loss": judge.checkpoint(last, f"checkpoint {last.step}").result().loss}


@dataclass(frozen=True)
class EvalCounts:
    """How the evaluator was used: evaluations run, scores from the cache, seconds in eval commands."""

    evaluations: int
    cache_hits: int
    seconds: float
    wall_seconds: float


def _count_evaluations(judge: CandidateScores | None, timings: dict[str, float]) -> EvalCounts | None:
    """The evaluator's use so far (None without one), its seconds added to the timings."""
    if judge is None:
        return None
    scorer = judge.scorer
    timings["eval_commands"] = scorer.seconds
    timings["eval_wall"] = scorer.wall_seconds
    return EvalCounts(scorer.evaluations, scorer.cache_hits, round(scorer.seconds, 4), round(scorer.wall_seconds, 4))


def _backtest(run: Run, history: History, forecaster: Forecaster, options: StreamOptions, world: World = ONE_PROCESS) -> Backtest:
    """The forecaster and the alternatives, from its context end to its last target, in weight error."""
    scored = candidates(run, forecaster)
    phase(f"backtest: weight error of every candidate at step {forecaster.target_steps[-1]:g}", options.quiet)
    if options.backtest == "sample":
        return backtest_sample(history, scored)
    with byte_progress("backtest", streamed_bytes(run, scored, world), options.quiet) as advance:
        return backtest_streaming(run, scored, options.engine(INPUT_BYTES_PER_ELEMENT, scratch_bytes_per_element(), advance), world)


def _sampling(run: Run, settings: FitSettings) -> str:
    return f"sampling: up to {settings.sample:,} weight coordinates at each of {len(run.steps)} checkpoints"


def _too_few_to_hold_out(run: Run) -> str:
    return f"{len(run.steps)} checkpoints are too few to hold some out and still fit a jump of this size"


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
    if forecaster.settings.get("shrink") is not None:
        how = "set by --shrink"
    elif forecaster.fit_info.get("chosen_by") == "validation loss":
        how = "chosen by your loss in the backtest"
    else:
        how = "chosen by a backtest on the run's history (weight error)"
    return [f"the forecast is shrunk towards the last checkpoint: last + {alpha:.2f} x (2-point forecast - last), {how}"]


@dataclass(frozen=True)
class Evaluation:
    """What fitting and backtesting found: the forecaster, the weight backtest and the loss backtest
    (each with why it is missing), the sampled weights the plot draws, and notes of its own."""

    forecaster: Forecaster
    backtest: Backtest | None
    backtest_unavailable: str | None
    loss: LossBacktest | None = None
    loss_unavailable: str | None = None
    trajectories: list[dict] = field(default_factory=list)
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Outcome:
    """What predict wrote (or fit saved): the candidate and why, the paths, the trainer's state, and
    with an evaluator the loss of what was written and of the last checkpoint."""

    written: Written | None = None
    output: list[str] = field(default_factory=list)
    resume: Resume | None = None
    written_loss: float | None = None
    last_checkpoint_loss: float | None = None
    notes: tuple[str, ...] = ()


def assemble(
    command: str,
    run: Run,
    found: Evaluation,
    outcome: Outcome = Outcome(),
    counts: EvalCounts | None = None,
    seconds: dict[str, float] | None = None,
) -> Report:
    """The report, built in this one place from what the stages found: the evaluation, and once
    something is written, the outcome, the evaluator's use and the seconds per phase."""
    forecaster, backtest, loss = found.forecaster, found.backtest, found.loss
    if counts is not None and loss is not None:
        loss = replace(
            loss,
            evaluations=counts.evaluations,
            cache_hits=counts.cache_hits,
            eval_seconds=counts.seconds,
            eval_wall_seconds=counts.wall_seconds,
        )
    weight, bias = forecaster.shared.as_lists()
    return Report(
        command=command,
        run=str(run.path),
        layout=run.layout.name,
        steps=run.steps,
        mode=forecaster.mode,
        context={"first_step": forecaster.first_step, "last_step": forecaster.context_end},
        horizon=forecaster.horizon,
        target_steps=forecaster.target_steps,
        forecaster={
            "anchor": forecaster.anchor,
            "weight": weight,
            "bias": bias,
            "per_tensor": forecaster.as_dict()["per_tensor"],
            "fit": forecaster.fit_info,
        },
        backtest=backtest,
        backtest_unavailable=found.backtest_unavailable,
        loss=loss,
        loss_unavailable=found.loss_unavailable,
        notes=_notes(run) + _shrink_note(forecaster) + list(found.notes) + list(outcome.notes),
        warnings=run.warnings + _fit_warnings(forecaster),
        written=outcome.written,
        written_loss=outcome.written_loss,
        last_checkpoint_loss=outcome.last_checkpoint_loss,
        resume=outcome.resume,
        trajectories=found.trajectories,
        output=outcome.output,
        seconds=_rounded(seconds or {}),
        skipped_checkpoints=run.skipped,
        **headline(backtest, found.backtest_unavailable, loss, forecaster.horizon, _line_tested(run, forecaster, backtest)),
    )


def _fit_warnings(forecaster: Forecaster) -> list[str]:
    fit = forecaster.fit_info
    if fit.get("stopped") != "budget":
        return []
    return [
        f"the forecaster's fit stopped at its budget of {fit['updates']} updates before the held-out pairs "
        f"stopped improving (best at update {fit['best_update']}): it may be under-fitted; raise the update budget"
    ]


def _line_tested(run: Run, forecaster: Forecaster, backtest: Backtest | None) -> bool:
    """Whether the weight backtest's straight line extrapolated as far as the one the forecast would write."""
    if backtest is None or forecaster.mode == "reference":
        return True
    plan, steps = backtest.plan, run.steps
    end = steps.index(forecaster.context_end)
    return line_tested(plan.line_from_step, plan.last_step, plan.target_step, forecaster.horizon, steps[end] - steps[end - 1])


def _forecaster_for(run: Run, forecaster_file: Path, horizon: int | None) -> Forecaster:
    forecaster = Forecaster.load(forecaster_file)
    if horizon is not None and horizon != forecaster.horizon:
        raise UsageError(
            f"{parameter('horizon')} {horizon} differs from the forecaster's horizon {forecaster.horizon}; "
            f"refit or drop {parameter('horizon')}"
        )
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
    """Exit 4 below --min-skill: steps saved by the loss with an evaluator, else the weight skill."""
    if min_skill is None:
        return
    by_loss = report.criterion == "validation loss"
    skill = report.steps_saved if by_loss else report.skills[REFERENCE]
    if skill is None or skill < min_skill or report.tested is False:
        what = "steps saved by your loss in the backtest" if by_loss else "backtest skill against keeping the last checkpoint"
        shown = "unknown" if skill is None else f"{skill:.3f}"
        if report.tested is False:
            shown += " (on a jump too short to test the one asked)"
        error = LowSkillError(f"{what} is {shown}, below {parameter('min_skill')} {min_skill}; nothing written")
        error.report = report
        raise error

"""The stages of the commands, in pipeline order: open the run -> fit and backtest -> select the
candidate to write -> write it (and the report, assemble.py). Each takes the request (requests.py) and
what the stages before it returned, and returns a typed value; `Session` is what they share.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from farcast_cli.assemble import EvalCounts, Evaluation, Outcome, assemble
from farcast_cli.distributed import ONE_PROCESS, World, shared_file_writes
from farcast_cli.errors import InputError, LowSkillError, UsageError, named, parameter
from farcast_cli.evaluate.backtest import (
    INPUT_BYTES_PER_ELEMENT,
    StreamedBacktest,
    backtest_checkpoints,
    backtest_sample,
    backtest_streaming,
    scratch_bytes_per_element,
    streamed_bytes,
)
from farcast_cli.evaluate.evaluator import EvalOptions
from farcast_cli.evaluate.loss import ANCHORS, CandidateScores, LossBacktest, loss_backtest, reference_loss_backtest
from farcast_cli.evaluate.report import (
    REPORT_FILE,
    Backtest,
    BacktestRead,
    LeftOut,
    MemoryPlan,
    Plan,
    Read,
    Report,
    Written,
    name_of,
)
from farcast_cli.evaluate.trajectories import sampled_trajectories
from farcast_cli.forecast.candidates import CANDIDATES, FORECAST, REFERENCE, Combination, baselines, candidate_inputs, candidates
from farcast_cli.forecast.write import (
    Share,
    checkpoints_to_read,
    combination_key,
    finish_forecast,
    output_info,
    share_nbytes,
    split_files,
    split_work,
    write_tensors,
)
from farcast_cli.io.device import resolve_device
from farcast_cli.io.output import build_folder, check_file_location, check_output_location, write_text
from farcast_cli.io.resume import check_resumable, check_still_newest, resumable_folder_name, write_trainer_state
from farcast_cli.io.run import Checkpoint, Run, describe_steps, find_run, output_files
from farcast_cli.model.forecaster import Forecaster, SelfFit, choose_cut, fit_on_reference, fit_on_run, fit_plain
from farcast_cli.model.history import History, read_history
from farcast_cli.progress import byte_progress, phase
from farcast_cli.requests import FitRequest, PredictRequest, StreamOptions

UNSCORED_CONSOLIDATED = "the written forecast is not scored: it is in safetensors, and the eval command reads the run's own format"


def predict_bytes(inputs: int) -> tuple[int, int]:
    """Read-buffer and scratch bytes per element when writing a combination of `inputs` checkpoints
    (float64 at most), for the engine's chunk plan."""
    return inputs * 8, 4 * 8


@dataclass
class Session:
    """What the stages of one command share: this rank's stream options, the ranks, the seconds spent
    per phase (the report carries them), and the user's loss as a judge of candidates while one is open
    (None without an evaluator, and on ranks other than 0). Where the full backtest is taken from the
    forecast's write (`alongside`, backtest_alongside_write), the candidates it scores wait in `deferred`
    and its result comes in `streamed`."""

    options: StreamOptions
    world: World = ONE_PROCESS
    timings: dict[str, float] = field(default_factory=dict)
    judge: CandidateScores | None = None
    alongside: bool = False
    deferred: dict[str, Combination] | None = None
    streamed: Backtest | None = None

    @classmethod
    def for_rank(cls, options: StreamOptions, world: World = ONE_PROCESS) -> Session:
        """Under torchrun: this rank's own GPU for auto/cuda, and progress from rank 0 only."""
        return cls(replace(options, device=world.device(options.device), quiet=options.quiet or not world.is_main), world)

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Add the seconds spent in the block to the phase's."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - started

    @contextmanager
    def judging(self, evaluation: EvalOptions, run: Run, output: Path) -> Iterator[None]:
        """The user's loss as the judge within the block, with scratch space beside the output."""
        scorer = evaluation.scorer(self.options.quiet) if self.world.is_main else None
        if scorer is None:
            yield
            return
        engine = lambda: self.options.engine(*predict_bytes(1 + max(ANCHORS)))  # noqa: E731
        self.judge = CandidateScores(run, scorer, _existing_parent(output), engine)
        try:
            yield
        finally:
            scorer.close()
            self.judge.close()
            self.judge = None

    def outcome(self, outcome: Outcome = Outcome()) -> Outcome:
        """`outcome` with the evaluator's use so far and the seconds per phase (the evaluator's added)."""
        counts = None
        if self.judge is not None:
            scorer = self.judge.scorer
            self.timings["eval_commands"] = scorer.seconds
            self.timings["eval_wall"] = scorer.wall_seconds
            counts = EvalCounts(scorer.evaluations, scorer.cache_hits, round(scorer.seconds, 4), round(scorer.wall_seconds, 4))
        return replace(outcome, counts=counts, seconds=self.timings)


# -- open ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Opened:
    """The run as read (no checkpoint after the last step asked for), and the run up to that step."""

    whole: Run
    run: Run


def open_for_predict(request: PredictRequest, session: Session) -> Opened:
    """The run, with the output's place checked (a resumable forecast's place is the run's folder for
    the step last + horizon) and the device, before any tensor is read."""
    with session.timed("find_run"):
        resumable_horizon = None
        if request.resumable:
            resumable_horizon = request.horizon if request.horizon is not None else Forecaster.load(request.forecaster_file).horizon
        return session.world.together(lambda: _open_run(request, resumable_horizon, session.options))


def _open_run(request: PredictRequest, resumable_horizon: int | None, options: StreamOptions) -> Opened:
    whole = find_run(request.run_dir, last_step=request.last_step, skip_damaged=request.skip_damaged)
    run = whole if request.last_step is None else whole.truncated(whole.steps.index(whole.at_step(request.last_step).step))
    if resumable_horizon is not None:
        check_resumable(run)
    resumable_name = None if resumable_horizon is None else resumable_folder_name(run, resumable_horizon)
    check_output_location(request.out_dir, whole, request.force, resumable_name)
    resolve_device(options.device)
    return Opened(whole, run)


def open_for_fit(request: FitRequest, session: Session) -> Run:
    """The run, with the forecaster file's place checked."""
    if request.out_file.exists() and not request.force:
        raise UsageError(f"{request.out_file}: already exists; choose a new name or pass {parameter('force=True')}")
    with session.timed("find_run"):
        run = session.world.together(lambda: find_run(request.run_dir, skip_damaged=request.skip_damaged))
        check_file_location(request.out_file, run)
    return run


# -- fit ----------------------------------------------------------------------------------------


def evaluate(request: PredictRequest, run: Run, session: Session) -> Evaluation:
    """The forecaster and its evaluation: the saved one's, or fitted on the run and backtested."""
    if request.forecaster_file is None:
        session.alongside = backtest_alongside_write(request, run, session)
        return fit_on_itself(run, request, session)
    forecaster = session.world.together(lambda: forecaster_for(run, request.forecaster_file, request.horizon))
    return _saved_evaluation(forecaster, request.forecaster_file)


def fit_on_itself(run: Run, request: PredictRequest | FitRequest, session: Session) -> Evaluation:
    """Fit on the whole run; score the held-out fit (model/forecaster.py, SelfFit) in weight error, and
    when the loss decides, score every candidate by the user's loss (on rank 0, with the judge) and
    refit with the best forecast's settings."""
    _require_three_checkpoints(run)
    world, settings = session.world, request.settings
    with session.timed("read_sample"):
        phase(_sampling(run, request), session.options.quiet)
        history = read_history(run, settings.sample, settings.seed, world)
    with session.timed("fit"):
        phase("fitting: the forecaster and its held-out trial", session.options.quiet)
        fitted = world.on_main(lambda: fit_on_run(history, request.horizon, request.offsets, settings, request.anchor or 1))
    with session.timed("backtest"):
        backtest = None
        if fitted.scored is not None and session.alongside:
            session.deferred = candidates(run, fitted.scored)
        elif fitted.scored is not None:
            backtest = _backtest(run, history, fitted.scored, session)
    forecaster, loss, loss_unavailable = fitted.forecaster, None, None
    if request.judged:
        with session.timed("loss_backtest"):
            forecaster, loss, loss_unavailable = world.on_main(
                lambda: _decided_by_loss(run, history, request, session.judge, fitted), patient=True
            )
    unavailable = None if backtest or session.deferred else _too_few_to_hold_out(run)
    trajectories = sampled_trajectories(history, {i.name: i.numel for i in run.tensor_infos()}, fitted.scored, forecaster)
    return Evaluation(forecaster, backtest, unavailable, loss, loss_unavailable, trajectories)


def _decided_by_loss(
    run: Run, history: History, request: PredictRequest | FitRequest, judge: CandidateScores, fitted: SelfFit
) -> tuple[Forecaster, LossBacktest | None, str | None]:
    """The loss backtest, the forecaster with the settings of its best forecast (`fitted`'s fit and
    trial are reused where its anchor is the best, not fitted again), and why there is no loss
    backtest (or None)."""
    anchors = (request.anchor,) if request.anchor else ANCHORS
    plain = fitted.plain
    loss = loss_backtest(run, history, request.horizon, request.settings, judge, anchors, {plain.anchor: fitted.trial})
    if loss is None:
        return fitted.forecaster, None, _too_few_to_hold_out(run)
    forecaster = fitted.forecaster
    if loss.best_forecast is not None:
        best = loss.best_forecast
        if best.anchor != plain.anchor:
            plain = fit_plain(history, request.horizon, request.offsets, request.settings, best.anchor)
        forecaster = plain.shrunk(best.shrink)
        forecaster = replace(forecaster, fit_info=replace(forecaster.fit_info, chosen_by="validation loss"))
    return forecaster, loss, None


def fit_reference(run: Run, request: FitRequest, session: Session) -> Evaluation:
    """The paper's protocol on a complete reference run, scored on that run, where the truth at E + H is known."""
    world, settings, context_end = session.world, request.settings, request.context_end
    validation_run = None
    if request.validation_run is not None:
        validation_run = world.together(lambda: find_run(request.validation_run))
        _check_validation_run(validation_run, run, context_end, context_end + request.offsets[-1])
    with session.timed("read_sample"):
        phase(_sampling(run, request), session.options.quiet)
        history = read_history(run, settings.sample, settings.seed, world)
        validation = None if validation_run is None else read_history(validation_run, settings.sample, settings.seed, world)
    with session.timed("fit"):
        phase("fitting: the forecaster on the reference run", session.options.quiet)
        forecaster = world.on_main(
            lambda: fit_on_reference(history, context_end, request.offsets, settings, request.anchor or 1, validation)
        )
    with session.timed("backtest"):
        backtest = _backtest(run, history, forecaster, session)
    loss, loss_unavailable = None, None
    if request.judged:
        target = forecaster.target_steps[-1]
        if target in run.steps:
            with session.timed("loss_backtest"):
                loss = world.on_main(
                    lambda: reference_loss_backtest(run.truncated(run.steps.index(target)), forecaster, session.judge), patient=True
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


def _saved_evaluation(forecaster: Forecaster, forecaster_file: Path) -> Evaluation:
    """The evaluation of a forecaster saved by `farcast fit`, measured at fit time."""
    saved = forecaster.report or {}
    backtest = Backtest.from_json(saved["backtest"]) if saved.get("backtest") else None
    loss = LossBacktest.from_json(saved["loss"]) if saved.get("loss") else None
    unavailable = None if backtest else saved.get("backtest_unavailable") or "the forecaster file holds no evaluation"
    notes = (f"backtest measured at fit time, by {forecaster_file}",)
    return Evaluation(forecaster, backtest, unavailable, loss, saved.get("loss_unavailable"), notes=notes)


def forecaster_for(run: Run, forecaster_file: Path, horizon: int | None) -> Forecaster:
    """The saved forecaster, checked against the run it is applied to."""
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


def _backtest(run: Run, history: History, forecaster: Forecaster, session: Session) -> Backtest:
    """The forecaster and the alternatives, from its context end to its last target, in weight error."""
    scored, options = candidates(run, forecaster), session.options
    phase(_backtest_phase(forecaster.target_steps[-1]), options.quiet)
    if options.backtest == "sample":
        return backtest_sample(history, scored)
    grain = options.engine(INPUT_BYTES_PER_ELEMENT, scratch_bytes_per_element()).chunk_elements
    with byte_progress("backtest", streamed_bytes(run, scored, grain, session.world), options.quiet) as advance:
        engine = options.engine(INPUT_BYTES_PER_ELEMENT, scratch_bytes_per_element(), advance)
        return backtest_streaming(run, scored, engine, session.world)


def backtest_alongside_write(request: PredictRequest, run: Run, session: Session) -> bool:
    """Whether the full backtest is taken from the forecast's write, one pass reading the checkpoints of
    both (a 4 GB bfloat16 run's streaming phases 2.84-3.15 -> 2.42-2.49 s, benchmarks/RESULTS.md, issue 25): where
    nothing before the write depends on it (the forecast is written whatever the backtest says: no
    fallback, minimum skill or evaluator; not resumable), in one process, on the CPU (safetensors or DCP runs)."""
    options = session.options
    return (
        options.backtest == "full"
        and session.world.size == 1
        and not request.judged
        and not request.writes_winner
        and request.min_skill is None
        and not request.resumable
        and resolve_device(options.device).type == "cpu"
    )


def _backtest_phase(target: float) -> str:
    return f"backtest: weight error of every candidate at step {target:g}"


def _sampling(run: Run, request: PredictRequest | FitRequest) -> str:
    return f"sampling: up to {request.settings.sample:,} weight coordinates at each of {len(run.steps)} checkpoints"


def _too_few_to_hold_out(run: Run) -> str:
    return f"{len(run.steps)} checkpoints are too few to hold some out and still fit a jump of this size"


def _require_three_checkpoints(run: Run) -> None:
    if len(run.checkpoints) < 3:
        raise InputError(
            f"{run.path}: only {len(run.checkpoints)} checkpoints; "
            "fitting on the run itself needs at least three (or fit on a reference run)"
        )


# -- select -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """The candidate to write and why, and the checkpoint it is written from (the forecaster's last)."""

    written: Written
    candidate: Combination
    last: Checkpoint


def select(request: PredictRequest, run: Run, found: Evaluation) -> Selection:
    """What to write: nothing below `min_skill`; the backtest's winner where it is asked to write it,
    else the forecast; for a resumable output only a forecast from the run's newest checkpoint."""
    forecaster = found.forecaster
    verdict = assemble("predict", run, found)
    _enforce_min_skill(verdict, request.min_skill)
    written, candidate = _choose(verdict, candidates(run, forecaster), request.writes_winner)
    last = run.at_step(forecaster.context_end)
    if request.resumable:
        _check_resumable_choice(assemble("predict", run, found, Outcome(written=written)), run, last)
    return Selection(written, candidate, last)


def _enforce_min_skill(report: Report, min_skill: float | None) -> None:
    """Exit 4 below `min_skill`: steps saved by the loss with an evaluator, else the weight skill."""
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


def _choose(report: Report, options: dict[str, Combination], fallback: bool) -> tuple[Written, Combination]:
    """The candidate to write, and why: the backtest's winner with `fallback` (the last checkpoint where
    the backtest could not test a jump this long), else the forecast."""
    method, asked = FORECAST.key, parameter("fallback=True")
    if fallback and report.tested is False:
        method, why = REFERENCE, f"the backtest could not test a jump this long, so {asked} keeps the last checkpoint"
    elif fallback and report.best not in (None, FORECAST.key):
        method = report.best
        why = f"{name_of(method)} did best in the backtest ({report.criterion}), so {asked} writes it instead of the forecast"
    elif report.best not in (None, FORECAST.key):
        why = f"the forecast, as asked, although {name_of(report.best)} did better in the backtest ({report.criterion})"
    else:
        why = "the forecast, which did best in the backtest" if report.best == FORECAST.key else "the forecast (no backtest)"
    chosen = options[method]
    return Written(method, _written_label(report, method), chosen.from_steps, named(why)), chosen


def _written_label(report: Report, method: str) -> str:
    if method != FORECAST.key:
        return CANDIDATES[method].written
    fitted = report.forecaster
    return f"the forecast (anchor {fitted.anchor}, shrink {fitted.fit.shrink:g})"


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


# -- write --------------------------------------------------------------------------------------


def write(request: PredictRequest, opened: Opened, found: Evaluation, selection: Selection, session: Session) -> Report:
    """The selected candidate streamed into a folder built under a temporary name (each rank its share
    of the tensors), the trainer's state beside a resumable one, what was written scored by the user's
    loss, and the report; then the folder renamed to the output."""
    last = selection.last
    grain = session.options.engine(*predict_bytes(len(selection.candidate.inputs))).chunk_elements
    writing = _Writing(request, opened, found, selection, session, _write_share(last, request.out_dir, session.world, grain))
    return build_folder(request.out_dir, writing.tensors, writing.finish, session.world)


@dataclass(frozen=True)
class _Writing:
    request: PredictRequest
    opened: Opened
    found: Evaluation
    selection: Selection
    session: Session
    share: Share | None

    @property
    def consolidate(self) -> bool:
        """A DCP run's forecast written as whole tensors in safetensors."""
        return self.request.output_format == "safetensors" and self.selection.last.dcp is not None

    def tensors(self, folder: Path) -> None:
        last, candidate, session = self.selection.last, self.selection.candidate, self.session
        options, deferred = session.options, session.deferred
        if deferred is not None:
            phase(_backtest_phase(deferred[FORECAST.key].target_steps[-1]) + ", in the same pass as the write", options.quiet)
        phase(f"writing: {self.selection.written.label} to {self.request.out_dir}", options.quiet)
        read = checkpoints_to_read(candidate, [] if deferred is None else backtest_checkpoints(self.opened.run, deferred))
        total = len(read) * share_nbytes(last, self.share)
        with session.timed("write_forecast"), byte_progress("forecast", total, options.quiet) as advance:
            engine = options.engine(*predict_bytes(len(read)), advance)
            backtest = None if deferred is None else StreamedBacktest(self.opened.run, deferred, engine.block_elements)
            write_tensors(candidate, last, folder, engine, self.request.dtype, self.share, consolidate=self.consolidate, backtest=backtest)
            for checkpoint in self.opened.whole.checkpoints:
                checkpoint.check_unchanged()
            if backtest is not None:
                session.streamed = backtest.result()

    def finish(self, folder: Path) -> Report:
        request, session, selection, run, found = self.request, self.session, self.selection, self.opened.run, self.found
        if session.streamed is not None:
            found = replace(found, backtest=session.streamed)
            selection = replace(selection, written=_choose(assemble("predict", run, found), {FORECAST.key: selection.candidate}, False)[0])
        with session.timed("write_forecast"):
            written = finish_forecast(selection.candidate, selection.last, folder, request.dtype, consolidate=self.consolidate)
        paths = [str(request.out_dir / p.relative_to(folder)) if p != folder else str(request.out_dir) for p in written]
        outcome = Outcome(selection.written, paths)
        if request.resumable:
            provenance = {"method": selection.written.method, "from_steps": selection.written.from_steps}
            horizon = found.forecaster.horizon
            outcome = replace(outcome, resume=write_trainer_state(selection.last, folder, horizon, request.schedule, provenance))
        if session.judge is not None and self.consolidate:
            outcome = replace(outcome, notes=(UNSCORED_CONSOLIDATED,))
        elif session.judge is not None:
            with session.timed("eval_written"):
                outcome = replace(outcome, **_score_written(session.judge, run, selection.candidate, written[-1], request.dtype))
        report = assemble("predict", run, found, session.outcome(outcome))
        write_text(folder / REPORT_FILE, json.dumps(report.to_json(), indent=1) + "\n")
        if request.resumable:
            check_still_newest(self.opened.whole, selection.last)
        return report


def _write_share(last: Checkpoint, out_dir: Path, world: World, grain: int) -> Share | None:
    """What this rank writes (None: all of it, one process): shares of every file (a large tensor in
    ranges of `grain` elements) where the output's file system takes writes to one file from several
    nodes, else whole files; rank 0 decides, so that the shares agree even where nodes mount the
    output differently."""
    if world.size == 1:
        return None
    if world.on_main(lambda: shared_file_writes(world, out_dir)):
        return split_work(last, world.size, grain)[world.rank]
    return split_files(last, world.size)[world.rank]


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


def _existing_parent(path: Path) -> Path:
    """The nearest existing folder above `path`: scratch space on the output's file system."""
    parent = path.resolve().parent
    while not parent.exists():
        parent = parent.parent
    return parent


# -- plan (--dry-run) ---------------------------------------------------------------------------


def plan(request: PredictRequest, run: Run, options: StreamOptions) -> Plan:
    """What `predict` would read and write from the run as opened (so refusing what the real run refuses
    before reading), and its memory plan, without reading any tensor data."""
    anchor = request.anchor
    if request.forecaster_file is not None:
        forecaster = forecaster_for(run, request.forecaster_file, request.horizon)
        offsets, context_end, fits = forecaster.offsets, forecaster.context_end, False
        anchor = forecaster.anchor
    else:
        offsets, context_end, fits = request.offsets, run.steps[-1], True
        _require_three_checkpoints(run)
    first, last = run.checkpoints[0], run.at_step(context_end)
    infos = run.tensor_infos()
    out_bytes = sum(output_info(info, request.dtype).nbytes for info in infos)
    read_bytes, scratch_bytes = predict_bytes(max(1 + (anchor or max(ANCHORS)), *(c.most_inputs for c in baselines())))
    engine = options.engine(read_bytes, scratch_bytes)
    copied, left_out = output_files(last)
    return Plan(
        run=str(run.path),
        steps=run.steps,
        device=str(engine.device),
        forecast_read=Read([first.step, last.step], first.nbytes + last.nbytes),
        sample_coordinates=min(request.settings.sample, sum(i.numel for i in infos if i.is_forecast)) if fits else None,
        backtest_read=_backtest_read(run, offsets[-1], options) if fits else None,
        folder=str(request.out_dir),
        written_steps=[context_end + o for o in offsets],
        written_bytes=out_bytes * len(offsets),
        copied_files=copied,
        left_out_files=[LeftOut(name, why) for name, why in left_out],
        memory=MemoryPlan(
            options.max_memory,
            engine.chunk_elements,
            (engine.depth + 1) * read_bytes * engine.chunk_elements,
            scratch_bytes * engine.chunk_elements,
        ),
    )


def _backtest_read(run: Run, horizon: int, options: StreamOptions) -> BacktestRead:
    """The checkpoints the weight backtest of a fit on the run would read whole."""
    cut = choose_cut(run.steps, horizon / (run.steps[-1] - run.steps[0]))
    if cut is None:
        return BacktestRead(unavailable="too few checkpoints")
    if options.backtest != "full":
        return BacktestRead()
    inputs = {c.step for group in candidate_inputs(run, cut).values() for c in group}
    used = sorted(run.steps.index(step) for step in inputs | {run.steps[-1]})
    return BacktestRead(Read([run.steps[i] for i in used], sum(run.checkpoints[i].nbytes for i in used)))

"""farcast's Python API: one function per command, each its stages in pipeline order (stages.py):
open the run -> fit and backtest -> select -> write -> report (assemble.py). The CLI only turns
arguments into the requests (requests.py) these take.

`predict(run_dir, out_dir, horizon=..., ...)` and `fit(...)` take a request's fields as keywords;
`run_predict`, `plan_predict` and `run_fit` take the request itself.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from farcast_cli.assemble import assemble
from farcast_cli.distributed import ONE_PROCESS, World
from farcast_cli.evaluate.evaluator import EvalOptions as EvalOptions
from farcast_cli.evaluate.report import Inspection, LeftOut, ListedCheckpoint, Plan, Report, SeenForecast, SeenJump
from farcast_cli.io.dcp import describe_dcp
from farcast_cli.io.run import describe_steps, find_run, output_files
from farcast_cli.model.fit import FitSettings as FitSettings
from farcast_cli.model.pairs import max_self_horizon
from farcast_cli.requests import FitRequest, PredictRequest
from farcast_cli.requests import StreamOptions as StreamOptions
from farcast_cli.stages import (
    Session,
    evaluate,
    fit_on_itself,
    fit_reference,
    open_for_fit,
    open_for_predict,
    plan,
    select,
    write,
)


def predict(run_dir: Path, out_dir: Path, *, dry_run: bool = False, world: World = ONE_PROCESS, **fields: Any) -> Report | Plan:
    """`farcast predict` from keywords: the fields of `PredictRequest` (checked there). With `dry_run`,
    only the plan (`plan_predict`): what it would read and write, and its memory."""
    request = PredictRequest(run_dir, out_dir, **fields)
    return plan_predict(request) if dry_run else run_predict(request, world)


def run_predict(request: PredictRequest, world: World = ONE_PROCESS) -> Report:
    """`farcast predict`: fit (unless given a forecaster), backtest, then stream the chosen checkpoint.

    The backtest decides by the user's loss when the request has an evaluator, else by weight error.
    The backtest's winner is written where the request asks for it (`fallback`, by default with an
    evaluator): the forecast, the last checkpoint, the straight line, the average of the last
    checkpoints; else the forecast, whatever the backtest says. A `resumable` output is a checkpoint the
    trainer resumes from (io/resume.py). Under torchrun (`world`) every streaming pass divides its
    tensors among the ranks; rank 0 fits, runs any eval commands and publishes."""
    session = Session.for_rank(request.options, world)
    opened = open_for_predict(request, session)
    with session.judging(request.evaluation, opened.run, request.out_dir):
        found = evaluate(request, opened.run, session)
        selection = select(request, opened.run, found)
        return write(request, opened, found, selection, session)


def plan_predict(request: PredictRequest) -> Plan:
    """`farcast predict --dry-run`: what `run_predict` would read and write, and its memory plan, from
    the run as opened (refusing what the real run refuses), without reading any tensor data."""
    session = Session.for_rank(request.options)
    return plan(request, open_for_predict(request, session).run, session.options)


def fit(run_dir: Path, out_file: Path, *, world: World = ONE_PROCESS, **fields: Any) -> Report:
    """`farcast fit` from keywords: the fields of `FitRequest` (checked there)."""
    return run_fit(FitRequest(run_dir, out_file, **fields), world)


def run_fit(request: FitRequest, world: World = ONE_PROCESS) -> Report:
    """`farcast fit`: fit on a reference run (with context_end) or on the run itself; save the forecaster
    with its evaluation. Under torchrun (`world`) the ranks share the reads; rank 0 fits, runs any eval
    commands and saves."""
    session = Session.for_rank(request.options, world)
    run = open_for_fit(request, session)
    with session.judging(request.evaluation, run, request.out_file):
        found = fit_on_itself(run, request, session) if request.context_end is None else fit_reference(run, request, session)
        saved = session.outcome()
    forecaster = found.forecaster
    forecaster.report = assemble("fit", run, found, saved).to_json()
    world.on_main(lambda: forecaster.save(request.out_file))
    return assemble("fit", run, found, replace(saved, output=[str(request.out_file)]))


def inspect_run(run_dir: Path, skip_damaged: bool = False) -> Inspection:
    """`farcast inspect`: the run's checkpoints, tensors, parameters and bytes, and what an output
    copies and leaves out; no tensor data is read."""
    run = find_run(run_dir, skip_damaged=skip_damaged)
    infos = run.tensor_infos()
    forecast = [i for i in infos if i.is_forecast]
    copied, left_out = output_files(run.last)
    return Inspection(
        run=str(run.path),
        layout=run.layout.name,
        steps=run.steps,
        steps_summary=describe_steps(run.steps),
        checkpoints=[
            ListedCheckpoint(
                c.step, c.saved_step, str(c.path), sorted(c.files) if c.dcp is None else [p.name for p in c.dcp.files], c.nbytes
            )
            for c in run.checkpoints
        ],
        forecasts=[SeenForecast(c.saved_step, str(c.path)) for c in run.forecasts],
        jumps=[SeenJump(j.at_step, j.horizon) for j in run.jumps],
        copied_files=copied,
        left_out_files=[LeftOut(name, why) for name, why in left_out],
        tensors=len(infos),
        forecast_tensors=len(forecast),
        copied_dtypes=sorted({i.dtype for i in infos if not i.is_forecast}),
        parameters=sum(i.numel for i in infos),
        forecast_parameters=sum(i.numel for i in forecast),
        dtypes=sorted({i.dtype for i in infos}),
        bytes_per_checkpoint=run.last.nbytes,
        total_bytes=sum(c.nbytes for c in run.checkpoints),
        max_horizon=max_self_horizon(run.steps) if len(run.steps) > 2 else 0,
        skipped_checkpoints=run.skipped,
        warnings=run.warnings,
        distributed=None if run.last.dcp is None else describe_dcp(run.last),
    )

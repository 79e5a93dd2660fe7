"""The report stage: the typed findings the other stages hand on, and `assemble`, which builds every
`Report` from them in this one place (the provisional one a choice is made on, the final one, and the
one a forecaster file keeps).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from farcast_cli.errors import named, parameter
from farcast_cli.evaluate.loss import LossBacktest
from farcast_cli.evaluate.report import Backtest, Context, FittedMap, Report, Written, headline
from farcast_cli.forecast.candidates import line_tested
from farcast_cli.io.resume import Resume
from farcast_cli.io.run import Run
from farcast_cli.model.forecaster import Forecaster


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
class EvalCounts:
    """How the evaluator was used: evaluations run, scores from the cache, seconds in eval commands."""

    evaluations: int
    cache_hits: int
    seconds: float
    wall_seconds: float


@dataclass(frozen=True)
class Outcome:
    """What predict wrote (or fit saved): the candidate and why, the paths, the trainer's state, with an
    evaluator the loss of what was written and of the last checkpoint; and once the work is done, the
    evaluator's use and the seconds per phase."""

    written: Written | None = None
    output: list[str] = field(default_factory=list)
    resume: Resume | None = None
    written_loss: float | None = None
    last_checkpoint_loss: float | None = None
    notes: tuple[str, ...] = ()
    counts: EvalCounts | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def assemble(command: str, run: Run, found: Evaluation, outcome: Outcome = Outcome()) -> Report:
    """The report, built in this one place from what the stages found: the evaluation, and once
    something is written, the outcome, the evaluator's use and the seconds per phase."""
    forecaster, backtest, loss, counts = found.forecaster, found.backtest, found.loss, outcome.counts
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
        context=Context(forecaster.first_step, forecaster.context_end),
        horizon=forecaster.horizon,
        target_steps=forecaster.target_steps,
        forecaster=FittedMap(forecaster.anchor, weight, bias, forecaster.as_dict()["per_tensor"], forecaster.fit_info),
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
        seconds={phase: round(value, 4) for phase, value in outcome.seconds.items()},
        skipped_checkpoints=run.skipped,
        **headline(backtest, found.backtest_unavailable, loss, forecaster.horizon, _line_tested(run, forecaster, backtest)),
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
    if forecaster.settings.shrink is not None:
        how = named(f"set by {parameter('shrink')}")
    elif forecaster.fit_info.chosen_by == "validation loss":
        how = "chosen by your loss in the backtest"
    else:
        how = "chosen by a backtest on the run's history (weight error)"
    return [f"the forecast is shrunk towards the last checkpoint: last + {alpha:.2f} x (2-point forecast - last), {how}"]


def _fit_warnings(forecaster: Forecaster) -> list[str]:
    fit = forecaster.fit_info
    if fit.stopped != "budget":
        return []
    return [
        f"the forecaster's fit stopped at its budget of {fit.updates} updates before the held-out pairs "
        f"stopped improving (best at update {fit.best_update}): it may be under-fitted; raise the update budget"
    ]


def _line_tested(run: Run, forecaster: Forecaster, backtest: Backtest | None) -> bool:
    """Whether the weight backtest's straight line extrapolated as far as the one the forecast would write."""
    if backtest is None or forecaster.mode == "reference":
        return True
    plan, steps = backtest.plan, run.steps
    end = steps.index(forecaster.context_end)
    return line_tested(plan.line_from_step, plan.last_step, plan.target_step, forecaster.horizon, steps[end] - steps[end - 1])

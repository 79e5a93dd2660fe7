"""The report for a person: on a terminal with a table of the weight backtest; in a batch log as plain
lines, each starting with what it is, that grep and tail can read."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from farcast_cli.evaluate.evaluator import format_loss
from farcast_cli.evaluate.report import ErrorTable, Report

TENSOR_ROWS = 15
COLUMNS = ("tensor", "numel", "MAE", "RMSE", "MAE last", "MAE line", "MAE lawa", "skill vs last", "skill vs line", "skill vs lawa")


def _skill(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def _cells(stats: ErrorTable) -> list[str]:
    return [
        f"{stats.numel:,}",
        f"{stats.forecast.mae:.3e}",
        f"{stats.forecast.rmse:.3e}",
        f"{stats.last.mae:.3e}",
        f"{stats.line.mae:.3e}",
        f"{stats.lawa.mae:.3e}",
        _skill(stats.skill_vs_last),
        _skill(stats.skill_vs_line),
        _skill(stats.skill_vs_lawa),
    ]


def _tensor_rows(report: Report) -> list[tuple[str, ErrorTable]]:
    tensors = sorted(report.backtest.tensors.items(), key=lambda item: -item[1].numel)
    return tensors[:TENSOR_ROWS]


def _head(report: Report) -> list[str]:
    fit = report.forecaster
    lines = [
        f"farcast {report.command}: {report.run} ({len(report.steps)} checkpoints, steps {report.steps[0]}..{report.steps[-1]}), "
        f"mode {report.mode}",
        f"forecast: step {', '.join(map(str, report.target_steps))} from steps {report.context['first_step']} and "
        f"{report.context['last_step']} (horizon {report.horizon}), anchor {fit['anchor']}, shrink {fit['fit'].get('shrink', 1.0):g}",
    ]
    if report.backtest is not None:
        plan = report.backtest.plan
        lines.append(
            f"backtest (weight error): steps {plan.first_step} and {plan.last_step} -> step {plan.target_step:g}, "
            f"over {report.backtest.scope}"
        )
    return lines


def _loss_lines(report: Report) -> list[str]:
    loss = report.loss
    if loss is None:
        return [f"loss backtest: unavailable ({report.loss_unavailable})"] if report.loss_unavailable else []
    curve = ", ".join(f"{step} {format_loss(value)}" for step, value in loss.curve)
    lines = [f"loss backtest: steps {loss.cut_step} -> {loss.target_step}, by {loss.evaluator}: the run's loss {curve}"]
    for point in sorted(loss.points, key=lambda p: p.loss):
        how = " (extrapolated)" if point.extrapolated else ""
        lines.append(f"loss candidate: {point.label}: loss {format_loss(point.loss)}, saves {point.steps_saved:+.2f} of the jump{how}")
    lines.append(
        f"loss chosen: {loss.chosen.label}; {loss.evaluations} evaluations in {loss.eval_wall_seconds:.1f} s "
        f"({loss.eval_seconds:.1f} s summed over them), {loss.cache_hits} from the cache"
    )
    return lines


def _tail(report: Report) -> list[str]:
    lines = [f"verdict: {report.verdict}"]
    if report.written is not None:
        written = report.written
        lines.append(f"written: {written.label}, from steps {', '.join(map(str, written.from_steps))}: {written.why}")
    if report.written_loss is not None:
        lines.append(
            f"written loss: {format_loss(report.written_loss)}; last checkpoint's loss: {format_loss(report.last_checkpoint_loss)}"
        )
    if report.resume is not None:
        lines += [f"resume: {advice}" for advice in report.resume.advice]
    lines += [f"note: {note}" for note in report.notes]
    lines += [f"wrote: {path}" for path in report.output]
    return lines


def plain_lines(report: Report) -> list[str]:
    lines = _head(report)
    if report.backtest is not None:
        named = ", ".join(column.lower().replace(" ", "_") for column in COLUMNS[1:])
        for name, stats in [*_tensor_rows(report), ("overall", report.backtest.overall)]:
            lines.append(
                f"backtest {'tensor ' + name if name != 'overall' else 'overall'}: "
                + ", ".join(f"{key} {value}" for key, value in zip(named.split(", "), _cells(stats)))
            )
    return lines + _loss_lines(report) + _tail(report)


def render(report: Report, console: Console) -> None:
    """The report on a terminal: the same lines, with the weight backtest as a table."""
    for line in _head(report):
        console.print(escape(line))
    if report.backtest is not None:
        table = Table()
        for column in COLUMNS:
            table.add_column(column, justify="left" if column == "tensor" else "right")
        for name, stats in _tensor_rows(report):
            table.add_row(escape(name), *_cells(stats))
        if len(report.backtest.tensors) > TENSOR_ROWS:
            table.add_row(f"... {len(report.backtest.tensors) - TENSOR_ROWS} more in the JSON report", *[""] * 9)
        table.add_row("[bold]overall[/bold]", *_cells(report.backtest.overall))
        console.print(table)
    for line in _loss_lines(report) + _tail(report):
        console.print(f"[bold]{escape(line)}[/bold]" if line.startswith(("verdict:", "written:")) else escape(line))

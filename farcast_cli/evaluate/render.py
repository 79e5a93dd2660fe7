"""The report for a person: what was forecast, the backtest table, the verdict and what was written."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from farcast_cli.evaluate.report import NAMES, ErrorTable, Report

TENSOR_ROWS = 15
COLUMNS = ("tensor", "numel", "MAE", "RMSE", "MAE last", "MAE line", "MAE lawa", "skill vs last", "skill vs line", "skill vs lawa")


def _row(name: str, stats: ErrorTable) -> list[str]:
    skill = lambda s: "n/a" if s is None else f"{s:+.3f}"  # noqa: E731
    return [
        name,
        f"{stats.numel:,}",
        f"{stats.forecast.mae:.3e}",
        f"{stats.forecast.rmse:.3e}",
        f"{stats.last.mae:.3e}",
        f"{stats.line.mae:.3e}",
        f"{stats.lawa.mae:.3e}",
        skill(stats.skill_vs_last),
        skill(stats.skill_vs_line),
        skill(stats.skill_vs_lawa),
    ]


def render(report: Report, console: Console) -> None:
    targets = ", ".join(map(str, report.target_steps))
    console.print(
        f"[bold]farcast {report.command}[/bold]: {report.run} "
        f"({len(report.steps)} checkpoints, steps {report.steps[0]}..{report.steps[-1]}), mode {report.mode}"
    )
    console.print(
        f"forecast of step {targets} from steps {report.context['first_step']} and {report.context['last_step']} (horizon {report.horizon})"
    )
    backtest = report.backtest
    if backtest is not None:
        plan = backtest.plan
        table = Table(title=f"backtest: steps {plan.first_step} and {plan.last_step} -> step {plan.target_step:g}, over {backtest.scope}")
        for column in COLUMNS:
            table.add_column(column, justify="left" if column == "tensor" else "right")
        tensors = sorted(backtest.tensors.items(), key=lambda item: -item[1].numel)
        for name, stats in tensors[:TENSOR_ROWS]:
            table.add_row(*_row(name, stats))
        if len(tensors) > TENSOR_ROWS:
            table.add_row(f"... {len(tensors) - TENSOR_ROWS} more in the JSON report", *[""] * 9)
        table.add_row(*_row("[bold]overall[/bold]", backtest.overall))
        console.print(table)
        evaluation = backtest.eval or {}
        if "steps_saved" in evaluation:
            saved = ", ".join(f"{NAMES[m]} {v:+.2f} (loss {evaluation['losses'][m]:.4g})" for m, v in evaluation["steps_saved"].items())
            console.print(f"steps saved in the backtest, by --eval-cmd: {saved}")
    if report.written_loss is not None:
        console.print(
            f"loss of the written checkpoint: {report.written_loss:.4g}; of the last checkpoint: {report.last_checkpoint_loss:.4g}"
        )
    console.print(f"[bold]{report.verdict}[/bold]")
    if report.written is not None:
        console.print(f"[bold]{report.written.why}[/bold]")
    for note in report.notes:
        console.print(f"note: {note}")
    for path in report.output:
        console.print(f"wrote {path}")

"""Say how good the forecast is, in plain words, a table and JSON."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

REPORT_FILE = "farcast_report.json"
TENSOR_ROWS = 15


def _percent(skill: float) -> str:
    return f"{abs(skill) * 100:.1f}%"


def verdict(backtest: dict) -> dict:
    """The headline: does the forecast beat keeping the last checkpoint, and a straight line?"""
    if "unavailable" in backtest:
        return {
            "skill_vs_last": None,
            "skill_vs_line": None,
            "beats_last": None,
            "beats_line": None,
            "verdict": f"UNVERIFIED: no backtest was possible ({backtest['unavailable']}). Nothing shows this forecast beats keeping the last checkpoint.",
        }
    overall = backtest["overall"]
    vs_last, vs_line = overall["skill_vs_last"], overall["skill_vs_line"]
    beats_last = vs_last is not None and vs_last > 0
    beats_line = vs_line is not None and vs_line > 0
    target = backtest["plan"]["target_step"]
    if not beats_last:
        words = (
            f"The forecast does NOT beat keeping the last checkpoint: in the backtest its error at step {target:g} was "
            f"{_percent(vs_last or 0)} {'higher' if (vs_last or 0) < 0 else 'no lower'}. Keeping your last checkpoint is the better estimate."
        )
    elif not beats_line:
        words = f"The forecast beats keeping the last checkpoint by {_percent(vs_last)} but does NOT beat a straight-line extrapolation (error {_percent(vs_line)} higher)."
    else:
        words = f"The forecast beats both baselines in the backtest: error {_percent(vs_last)} lower than keeping the last checkpoint, {_percent(vs_line)} lower than a straight line."
    return {"skill_vs_last": vs_last, "skill_vs_line": vs_line, "beats_last": beats_last, "beats_line": beats_line, "verdict": words}


def _row(name: str, stats: dict) -> list[str]:
    skill = lambda s: "n/a" if s is None else f"{s:+.3f}"  # noqa: E731
    return [
        name, f"{stats['numel']:,}", f"{stats['forecast']['mae']:.3e}", f"{stats['forecast']['rmse']:.3e}",
        f"{stats['last']['mae']:.3e}", f"{stats['line']['mae']:.3e}", skill(stats["skill_vs_last"]), skill(stats["skill_vs_line"]),
    ]


def render(report: dict, console: Console) -> None:
    """The report for a person: what was forecast, the backtest table, the verdict."""
    targets = ", ".join(map(str, report["target_steps"]))
    console.print(f"[bold]farcast {report['command']}[/bold]: {report['run']} ({len(report['steps'])} checkpoints, steps {report['steps'][0]}..{report['steps'][-1]}), mode {report['mode']}")
    console.print(f"forecast of step {targets} from steps {report['context']['first_step']} and {report['context']['last_step']} (horizon {report['horizon']})")
    backtest = report["backtest"]
    if "unavailable" not in backtest:
        plan = backtest["plan"]
        table = Table(title=f"backtest: steps {plan['first_step']} and {plan['last_step']} -> step {plan['target_step']:g}, over {backtest['scope']}")
        for column in ("tensor", "numel", "MAE", "RMSE", "MAE last", "MAE line", "skill vs last", "skill vs line"):
            table.add_column(column, justify="left" if column == "tensor" else "right")
        tensors = sorted(backtest["tensors"].items(), key=lambda item: -item[1]["numel"])
        for name, stats in tensors[:TENSOR_ROWS]:
            table.add_row(*_row(name, stats))
        if len(tensors) > TENSOR_ROWS:
            table.add_row(f"... {len(tensors) - TENSOR_ROWS} more in the JSON report", *[""] * 7)
        table.add_row(*_row("[bold]overall[/bold]", backtest["overall"]))
        console.print(table)
    console.print(f"[bold]{report['verdict']}[/bold]")
    for note in report["notes"]:
        console.print(f"note: {note}")
    for path in report.get("output", []):
        console.print(f"wrote {path}")

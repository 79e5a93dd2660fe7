"""Say how good the forecast is, in plain words, a table and JSON."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

REPORT_FILE = "farcast_report.json"
TENSOR_ROWS = 15


def _percent(skill: float) -> str:
    return f"{abs(skill) * 100:.1f}%"


NAMES = {"forecast": "the forecast", "last": "keeping the last checkpoint", "line": "a straight line", "lawa": "averaging the last checkpoints"}


def best_method(backtest: dict) -> str | None:
    """The candidate with the lowest backtest MAE, or None without a backtest."""
    if "unavailable" in backtest:
        return None
    overall = backtest["overall"]
    return min(("forecast", "last", "line", "lawa"), key=lambda method: (overall[method]["mae"], method != "forecast"))


def verdict(backtest: dict) -> dict:
    """The headline: does the forecast beat keeping the last checkpoint, a straight line, an average?"""
    if "unavailable" in backtest:
        return {
            "skill_vs_last": None, "skill_vs_line": None, "skill_vs_lawa": None,
            "beats_last": None, "beats_line": None, "beats_lawa": None, "best": None,
            "verdict": f"UNVERIFIED: no backtest was possible ({backtest['unavailable']}). Nothing shows this forecast beats keeping the last checkpoint.",
        }
    overall = backtest["overall"]
    skills = {b: overall[f"skill_vs_{b}"] for b in ("last", "line", "lawa")}
    beats = {b: s is not None and s > 0 for b, s in skills.items()}
    target = backtest["plan"]["target_step"]
    if not beats["last"]:
        s = skills["last"] or 0.0
        words = (f"The forecast does NOT beat keeping the last checkpoint: in the backtest its error at step {target:g} was "
                 f"{_percent(s)} {'higher' if s < 0 else 'no lower'}. Keeping your last checkpoint is the better estimate.")
    else:
        parts = [f"The forecast beats keeping the last checkpoint by {_percent(skills['last'])}"]
        for baseline in ("line", "lawa"):
            s = skills[baseline] or 0.0
            parts.append(f"{NAMES[baseline]} by {_percent(s)}" if beats[baseline] else f"but NOT {NAMES[baseline]} (error {_percent(s)} higher)")
        words = ", ".join(parts) + " (backtest MAE)."
    result = {f"skill_vs_{b}": s for b, s in skills.items()}
    result.update({f"beats_{b}": v for b, v in beats.items()})
    result.update({"best": best_method(backtest), "verdict": words})
    return result


def _row(name: str, stats: dict) -> list[str]:
    skill = lambda s: "n/a" if s is None else f"{s:+.3f}"  # noqa: E731
    return [
        name, f"{stats['numel']:,}", f"{stats['forecast']['mae']:.3e}", f"{stats['forecast']['rmse']:.3e}",
        f"{stats['last']['mae']:.3e}", f"{stats['line']['mae']:.3e}", f"{stats['lawa']['mae']:.3e}",
        skill(stats["skill_vs_last"]), skill(stats["skill_vs_line"]), skill(stats["skill_vs_lawa"]),
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
        for column in ("tensor", "numel", "MAE", "RMSE", "MAE last", "MAE line", "MAE lawa", "skill vs last", "skill vs line", "skill vs lawa"):
            table.add_column(column, justify="left" if column == "tensor" else "right")
        tensors = sorted(backtest["tensors"].items(), key=lambda item: -item[1]["numel"])
        for name, stats in tensors[:TENSOR_ROWS]:
            table.add_row(*_row(name, stats))
        if len(tensors) > TENSOR_ROWS:
            table.add_row(f"... {len(tensors) - TENSOR_ROWS} more in the JSON report", *[""] * 9)
        table.add_row(*_row("[bold]overall[/bold]", backtest["overall"]))
        console.print(table)
    evaluation = backtest.get("eval", {})
    if "steps_saved" in evaluation:
        saved = ", ".join(f"{NAMES[m]} {v:+.2f} (loss {evaluation['losses'][m]:.4g})" for m, v in evaluation["steps_saved"].items())
        console.print(f"steps saved in the backtest, by --eval-cmd: {saved}")
    if "written_loss" in report:
        console.print(f"loss of the written checkpoint: {report['written_loss']:.4g}; of the last checkpoint: {report['last_checkpoint_loss']:.4g}")
    console.print(f"[bold]{report['verdict']}[/bold]")
    if "written" in report:
        console.print(f"[bold]{report['written']['why']}[/bold]")
    for note in report["notes"]:
        console.print(f"note: {note}")
    for path in report.get("output", []):
        console.print(f"wrote {path}")

"""`--plot FILE`: the report as a picture (PNG or SVG), drawn only from the Report, as the JSON is.

Three panels: a few sampled weights (history, the backtest's forecast of the held-out checkpoint
against its truth, and the forecast ahead); the weight-error skill against keeping the last checkpoint
per tensor; and, with an eval command, the run's loss curve with each candidate placed at the cut plus
its steps saved times the jump: where the curve reaches its loss. matplotlib is imported
only here, and only when asked (the `plot` extra).
"""

from __future__ import annotations

import os
from pathlib import Path

from farcast_cli.errors import OutputError, UsageError, parameter
from farcast_cli.evaluate.report import Report
from farcast_cli.forecast.candidates import REFERENCE

SUFFIXES = (".png", ".svg")


def check_plot_target(path: Path) -> None:
    """Before any work: a known suffix, and matplotlib installed."""
    if path.suffix.lower() not in SUFFIXES:
        raise UsageError(f"{parameter('plot')} {path}: the file must end in .png or .svg")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(f"{parameter('plot')} needs matplotlib: pip install 'farcast-cli[plot]'") from None


def plot_data(report: Report) -> dict:
    """The numbers the plot draws, every one taken from the report."""
    tensors = {} if report.backtest is None else {n: t.skills[REFERENCE] for n, t in report.backtest.tensors.items()}
    candidates = []
    loss = report.loss
    if loss is not None:
        jump = loss.target_step - loss.cut_step
        for point in loss.points:
            at = loss.cut_step + point.steps_saved * jump
            candidates.append({"label": point.label, "loss": point.loss, "steps_saved": point.steps_saved, "at_step": at})
    return {
        "title": f"farcast {report.command}: {Path(report.run).name}, horizon {report.horizon}",
        "trajectories": report.trajectories,
        "skills": tensors,
        "curve": [] if loss is None else [list(p) for p in [*reversed(loss.earlier), *loss.curve]],
        "cut_step": None if loss is None else loss.cut_step,
        "candidates": candidates,
        "chosen": None if loss is None else loss.chosen.label,
        "verdict": report.verdict,
    }


def write_plot(report: Report, path: Path) -> None:
    """Draw the report into `path` (missing folders made; replaced whole, never left half written)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = plot_data(report)
    panels = 3 if data["curve"] else 2
    figure, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5))
    _draw_trajectories(axes[0], data["trajectories"])
    _draw_skills(axes[1], data["skills"])
    if data["curve"]:
        _draw_loss(axes[2], data)
    figure.suptitle(data["title"])
    figure.tight_layout()
    temporary = path.with_name(f".{path.name}.tmp{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(temporary, format=path.suffix.lower().lstrip("."), dpi=100)
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise OutputError(f"{parameter('plot')} {path}: cannot write: {error.strerror or error}") from None
    finally:
        plt.close(figure)


def _draw_trajectories(axis, trajectories: list[dict]) -> None:
    for number, entry in enumerate(trajectories):
        color = f"C{number % 10}"
        axis.plot(entry["steps"], entry["values"], color=color, linewidth=1, label=f"{entry['tensor']}[{entry['index']}]")
        forecast = entry["forecast"]
        axis.plot([entry["steps"][-1], *forecast["steps"]], [entry["values"][-1], *forecast["values"]], color=color, linestyle="--")
        if entry["backtest"]:
            backtest = entry["backtest"]
            axis.scatter([backtest["target_step"]], [backtest["forecast"]], color=color, marker="x")
    axis.set_title("sampled weights: history, backtest (x), forecast (dashed)")
    axis.set_xlabel("step")
    if trajectories:
        axis.legend(fontsize=6)


def _draw_skills(axis, skills: dict[str, float | None]) -> None:
    names = sorted(skills, key=lambda n: skills[n] or 0.0)[-20:]
    axis.barh(range(len(names)), [skills[n] or 0.0 for n in names], color=["C2" if (skills[n] or 0) > 0 else "C3" for n in names])
    axis.set_yticks(range(len(names)), names, fontsize=6)
    axis.axvline(0, color="black", linewidth=0.5)
    axis.set_title("weight-error skill vs keeping the last checkpoint")


def _draw_loss(axis, data: dict) -> None:
    steps, losses = zip(*data["curve"])
    axis.plot(steps, losses, color="black", marker="o", markersize=3, label="the run")
    axis.axvline(data["cut_step"], color="grey", linestyle=":")
    spread = max(losses) - min(losses) or abs(max(losses)) or 1.0
    low, top = min(min(losses), *(c["loss"] for c in data["candidates"])) - 0.1 * spread, max(losses) + spread
    axis.set_ylim(low, top)
    for candidate in data["candidates"]:
        at = candidate["at_step"]
        style = {"marker": "*", "s": 120} if candidate["label"] == data["chosen"] else {"marker": "."}
        if candidate["loss"] > top:
            style, candidate = {"marker": "^"}, {**candidate, "loss": top}
        axis.scatter([at], [candidate["loss"]], **style)
        if candidate["label"] == data["chosen"]:
            axis.annotate(f"{candidate['label']}: {candidate['steps_saved']:+.2f}", (at, candidate["loss"]), fontsize=7)
    axis.set_title("loss backtest: candidates on the run's loss curve (^: off the scale)")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")

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
GIVEN_UP_FIRST = ("MAE lawa", "MAE line", "RMSE", "skill vs lawa", "skill vs line")  # as the terminal narrows, in this order
NAME_WIDTH = 28  # columns are given up until tensor names have this many characters (or all they need)


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


def _more_rows(report: Report) -> list[str]:
    left_out = len(report.backtest.tensors) - TENSOR_ROWS
    return [f"... {left_out} more in the JSON report"] if left_out > 0 else []


def plain_lines(report: Report) -> list[str]:
    lines = _head(report)
    if report.backtest is not None:
        named = ", ".join(column.lower().replace(" ", "_") for column in COLUMNS[1:])
        for name, stats in [*_tensor_rows(report), ("overall", report.backtest.overall)]:
            lines.append(
                f"backtest {'tensor ' + name if name != 'overall' else 'overall'}: "
                + ", ".join(f"{key} {value}" for key, value in zip(named.split(", "), _cells(stats)))
            )
        lines += [f"backtest tensors: {more}" for more in _more_rows(report)]
    return lines + _loss_lines(report) + _tail(report)


def common_prefix(names: list[str]) -> str:
    """The leading dotted parts every name shares ('transformer.h.'), never a whole name; '' for one name."""
    if len(names) < 2:
        return ""
    shared = []
    for parts in zip(*(name.split(".")[:-1] for name in names)):
        if len(set(parts)) > 1:
            break
        shared.append(parts[0])
    return "".join(f"{part}." for part in shared)


def shorten_middle(text: str, width: int) -> str:
    """Text of at most `width` characters, cut in the middle: a tensor name's layer and its kind both stay."""
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head) :]


def _widths(columns: list[str], cells: list[list[str]]) -> list[int]:
    """Each number column's narrowest width that cuts neither a number nor a word of its heading."""
    return [
        max(max(len(row[COLUMNS.index(column) - 1]) for row in cells), *(len(word) for word in column.split())) for column in columns[1:]
    ]


def _table(columns: list[str], widths: list[int], rows: list[tuple[str, list[str]]]) -> Table:
    """The table with each column exactly as wide as given (the tensor's first): headings wrap, nothing is cut."""
    table = Table()
    for column, width in zip(columns, widths):
        table.add_column(column, justify="left" if column == "tensor" else "right", no_wrap=column == "tensor", width=width)
    for name, cells in rows:
        table.add_row(name, *[cells[COLUMNS.index(column) - 1] for column in columns[1:]])
    return table


def _fitted_table(report: Report, width: int) -> tuple[Table, list[str]]:
    """The weight backtest's table within `width` characters: tensor names without their common prefix,
    the columns of GIVEN_UP_FIRST left out until the names have NAME_WIDTH characters (or their whole
    length), names still too long shortened in the middle, and what room is left spent on one-line
    headings. Also the lines that say what was done."""
    rows = _tensor_rows(report)
    prefix = common_prefix([name for name, _ in rows])
    names = [name[len(prefix) :] for name, _ in rows]
    cells = [_cells(stats) for _, stats in rows] + [_cells(report.backtest.overall)]
    longest = max(len(name) for name in [*names, "overall"])
    columns, given_up = list(COLUMNS), []
    room = lambda: width - sum(_widths(columns, cells)) - 3 * len(columns) - 1  # noqa: E731 (borders and padding: 3 a column)
    while room() < min(longest, NAME_WIDTH) and len(given_up) < len(GIVEN_UP_FIRST):
        given_up.append(GIVEN_UP_FIRST[len(given_up)])
        columns.remove(given_up[-1])
    name_width = max(min(room(), longest), len("overall"))
    spare = room() - name_width
    widths = [name_width]
    for column, narrowest in zip(columns[1:], _widths(columns, cells)):
        widths.append(narrowest + max(0, min(len(column) - narrowest, spare)))
        spare -= widths[-1] - narrowest
    shown = [(escape(shorten_middle(name, name_width)), row) for name, row in zip(names, cells)] + [("[bold]overall[/bold]", cells[-1])]
    notes = [f"tensor names without their common prefix {prefix!r}"] if prefix else []
    notes += [f"left out to fit: {', '.join(given_up)}"] if given_up else []
    return _table(columns, widths, shown), notes


def render(report: Report, console: Console) -> None:
    """The report on a terminal: the same lines, with the weight backtest as a table that fits the width."""
    for line in _head(report):
        console.print(escape(line))
    if report.backtest is not None:
        table, notes = _fitted_table(report, console.width)
        for note in notes:
            console.print(escape(f"backtest table: {note}"))
        console.print(table)
        for more in _more_rows(report):
            console.print(escape(more))
    for line in _loss_lines(report) + _tail(report):
        console.print(f"[bold]{escape(line)}[/bold]" if line.startswith(("verdict:", "written:")) else escape(line))

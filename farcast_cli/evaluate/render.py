"""What farcast prints for a person: the report, on a terminal with a table of the weight backtest and
in a batch log as plain lines, each starting with what it is, that grep and tail can read; and as plain
lines, what `inspect` found and what `predict --dry-run` would do. Options named in a line are marked
parameters (errors.parameter), printed as the CLI's flags within errors.flag_names."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from farcast_cli.errors import named, parameter
from farcast_cli.evaluate.evaluator import format_loss
from farcast_cli.evaluate.report import ErrorTable, Inspection, LeftOut, Plan, Report
from farcast_cli.forecast.candidates import FORECAST, REFERENCE

TENSOR_ROWS = 15
NAME_WIDTH = 28  # columns are given up until tensor names have this many characters (or all they need)


def column_names(table: ErrorTable) -> list[str]:
    """The weight backtest's columns: the forecast's errors, then each alternative's MAE, then the
    forecast's skill against each (forecast/candidates.py, CANDIDATES)."""
    alternatives = [key for key in table.errors if key != FORECAST.key]
    return ["tensor", "numel", "MAE", "RMSE", *(f"MAE {key}" for key in alternatives), *(f"skill vs {key}" for key in table.skills)]


def given_up_first(table: ErrorTable) -> list[str]:
    """The columns left out as the terminal narrows, in this order: the alternatives' MAE (the last
    registered first) but keeping the last checkpoint's, RMSE, then the skills against them."""
    others = [key for key in reversed(table.skills) if key != REFERENCE]
    return [*(f"MAE {key}" for key in others), "RMSE", *(f"skill vs {key}" for key in others)]


def _skill(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def _cells(stats: ErrorTable) -> list[str]:
    forecast = stats.errors[FORECAST.key]
    alternatives = [f"{error.mae:.3e}" for key, error in stats.errors.items() if key != FORECAST.key]
    return [f"{stats.numel:,}", f"{forecast.mae:.3e}", f"{forecast.rmse:.3e}", *alternatives, *map(_skill, stats.skills.values())]


def _tensor_rows(report: Report) -> list[tuple[str, ErrorTable]]:
    tensors = sorted(report.backtest.tensors.items(), key=lambda item: -item[1].numel)
    return tensors[:TENSOR_ROWS]


def _head(report: Report) -> list[str]:
    fitted, context = report.forecaster, report.context
    lines = [
        f"farcast {report.command}: {report.run} ({len(report.steps)} checkpoints, steps {report.steps[0]}..{report.steps[-1]}), "
        f"mode {report.mode}",
        f"forecast: step {', '.join(map(str, report.target_steps))} from steps {context.first_step} and "
        f"{context.last_step} (horizon {report.horizon}), anchor {fitted.anchor}, shrink {fitted.fit.shrink:g}",
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
        keys = [column.lower().replace(" ", "_") for column in column_names(report.backtest.overall)[1:]]
        for name, stats in [*_tensor_rows(report), ("overall", report.backtest.overall)]:
            lines.append(
                f"backtest {'tensor ' + name if name != 'overall' else 'overall'}: "
                + ", ".join(f"{key} {value}" for key, value in zip(keys, _cells(stats)))
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


def _widths(columns: list[str], cells: list[list[str]], every: list[str]) -> list[int]:
    """Each number column's narrowest width that cuts neither a number nor a word of its heading
    (`every`: all the columns, whose order the cells follow)."""
    return [max(max(len(row[every.index(column) - 1]) for row in cells), *(len(word) for word in column.split())) for column in columns[1:]]


def _table(columns: list[str], widths: list[int], rows: list[tuple[str, list[str]]], every: list[str]) -> Table:
    """The table with each column exactly as wide as given (the tensor's first): headings wrap, nothing is cut."""
    table = Table()
    for column, width in zip(columns, widths):
        table.add_column(column, justify="left" if column == "tensor" else "right", no_wrap=column == "tensor", width=width)
    for name, cells in rows:
        table.add_row(name, *[cells[every.index(column) - 1] for column in columns[1:]])
    return table


def _fitted_table(report: Report, width: int) -> tuple[Table, list[str]]:
    """The weight backtest's table within `width` characters: tensor names without their common prefix,
    the columns of given_up_first left out until the names have NAME_WIDTH characters (or their whole
    length), names still too long shortened in the middle, and what room is left spent on one-line
    headings. Also the lines that say what was done."""
    rows = _tensor_rows(report)
    prefix = common_prefix([name for name, _ in rows])
    names = [name[len(prefix) :] for name, _ in rows]
    cells = [_cells(stats) for _, stats in rows] + [_cells(report.backtest.overall)]
    longest = max(len(name) for name in [*names, "overall"])
    every, optional = column_names(report.backtest.overall), given_up_first(report.backtest.overall)
    columns, given_up = list(every), []
    room = lambda: width - sum(_widths(columns, cells, every)) - 3 * len(columns) - 1  # noqa: E731 (borders and padding: 3 a column)
    while room() < min(longest, NAME_WIDTH) and len(given_up) < len(optional):
        given_up.append(optional[len(given_up)])
        columns.remove(given_up[-1])
    name_width = max(min(room(), longest), len("overall"))
    spare = room() - name_width
    widths = [name_width]
    for column, narrowest in zip(columns[1:], _widths(columns, cells, every)):
        widths.append(narrowest + max(0, min(len(column) - narrowest, spare)))
        spare -= widths[-1] - narrowest
    shown = [(escape(shorten_middle(name, name_width)), row) for name, row in zip(names, cells)] + [("[bold]overall[/bold]", cells[-1])]
    notes = [f"tensor names without their common prefix {prefix!r}"] if prefix else []
    notes += [f"left out to fit: {', '.join(given_up)}"] if given_up else []
    return _table(columns, widths, shown, every), notes


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


def inspection_lines(info: Inspection, every: bool = False) -> list[str]:
    """What `inspect` found; with `every`, each checkpoint (and each distributed tensor's chunks)."""
    more = "" if every else f" ({parameter('every')} lists them)"
    lines = [f"run: {info.run} ({info.layout} layout)", f"checkpoints: {info.steps_summary}{more}"]
    for checkpoint in info.checkpoints if every else []:
        saved = "" if checkpoint.saved_step == checkpoint.step else f", saved as step {checkpoint.saved_step}"
        lines.append(f"  step {checkpoint.step}{saved}: {checkpoint.path} ({len(checkpoint.files)} file(s), {checkpoint.bytes:,} bytes)")
    lines += [f"forecast farcast wrote (not history): {forecast.path}" for forecast in info.forecasts]
    lines += [f"jump farcast made in the training loop: at step {jump.at_step}, {jump.horizon} steps ahead" for jump in info.jumps]
    copied = info.tensors - info.forecast_tensors
    kinds = (
        f"all {info.tensors} forecast"
        if not copied
        else f"{info.forecast_tensors} forecast, {copied} copied unchanged ({', '.join(info.copied_dtypes)})"
    )
    lines.append(f"tensors: {kinds}; dtypes {', '.join(info.dtypes)}")
    lines.append(f"parameters: {info.parameters:,} ({info.forecast_parameters:,} forecast)")
    lines.append(f"bytes: {info.bytes_per_checkpoint:,} per checkpoint, {info.total_bytes:,} in all")
    if info.distributed:
        lines += _distributed_lines(info.distributed, more)
    lines += _file_lines(info.copied_files, info.left_out_files)
    lines.append(f"largest {parameter('horizon')} when fitting on this run: {info.max_horizon} steps")
    return [named(line) for line in lines]


def _distributed_lines(found: dict, more: str) -> list[str]:
    """A DCP checkpoint's files, chunks (each listed where `more` is empty), and the entries that are
    not model weights."""
    chunks = sum(len(t["chunks"]) for t in found["tensors"])
    place = "the checkpoint folder" if found["folder"] == "." else f"{found['folder']}/"
    lines = [
        f"distributed checkpoint in {place}: .metadata and {len(found['files'])} .distcp file(s), {found['bytes']:,} bytes; "
        f"{len(found['tensors'])} model tensors in {chunks} chunks{more}"
    ]
    for tensor in found["tensors"] if not more else []:
        boxes = ", ".join(f"{offsets}+{sizes}" for offsets, sizes in tensor["chunks"])
        lines.append(f"  {tensor['name']} {tensor['dtype']} {tensor['shape']}: {len(tensor['chunks'])} chunk(s) at {boxes}")
    reasons: dict[str, list[str]] = {}
    for entry in found["left_out_entries"]:
        reasons.setdefault(entry["why"], []).append(entry["name"])
    for why, names in reasons.items():
        shown = ", ".join(names[:3] if more else names) + (", ..." if more and len(names) > 3 else "")
        lines.append(f"left out of outputs: {len(names)} entries, {why}: {shown}")
    return lines


def _file_lines(copied: list[str], left_out: list[LeftOut]) -> list[str]:
    return [f"copied into outputs: {', '.join(copied) or 'nothing beside the weights'}"] + [
        f"left out of outputs: {left.name}: {left.why}" for left in left_out
    ]


def plan_lines(plan: Plan) -> list[str]:
    """What `predict --dry-run` would read and write, and its memory."""
    memory, backtest = plan.memory, plan.backtest_read
    lines = [f"dry run: {plan.run} ({len(plan.steps)} checkpoints), device {plan.device}"]
    if plan.sample_coordinates is not None:
        lines.append(f"read: {plan.sample_coordinates:,} sampled coordinates from each of {len(plan.steps)} checkpoints")
    if backtest is not None and backtest.read is not None:
        lines.append(f"read for the backtest: checkpoints {backtest.read.checkpoints}, {backtest.read.bytes:,} bytes")
    elif backtest is not None:
        lines.append(f"read for the backtest: {backtest.unavailable or 'only the sampled coordinates'}")
    lines.append(f"read for the forecast: checkpoints {plan.forecast_read.checkpoints}, {plan.forecast_read.bytes:,} bytes")
    lines.append(f"write: {plan.folder}: step(s) {plan.written_steps}, {plan.written_bytes:,} bytes")
    lines += _file_lines(plan.copied_files, plan.left_out_files)
    lines.append(
        f"memory: chunks of {memory.chunk_elements:,} elements; read buffers {memory.read_buffers_bytes:,} bytes, "
        f"scratch {memory.scratch_bytes:,} bytes, within {parameter('max_memory')} {memory.max_memory:,}"
    )
    return [named(line) for line in lines]

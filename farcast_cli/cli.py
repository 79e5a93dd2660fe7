"""The `farcast` command line: parse arguments, call farcast_cli.commands, print the result, map errors to exit codes.

Each option is declared once, in an OptionGroup that also builds the settings object the commands take
(FitSettings, StreamOptions); `with_options` adds a group's options to every command that uses it.
"""

import functools
import inspect
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from farcast_cli import __version__, commands
from farcast_cli.errors import EXIT_INTERNAL, EXIT_SIGINT, FarcastError, sigterm_as_interrupt
from farcast_cli.evaluate.render import render
from farcast_cli.evaluate.report import Report
from farcast_cli.io.device import parse_size
from farcast_cli.model.fit import FitSettings

app = typer.Typer(
    name="farcast",
    help="Forecast a training run's far-future weights from its safetensors checkpoints, with an honest error report.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
_debug = {"on": os.environ.get("FARCAST_DEBUG", "") not in ("", "0")}

FITTING, EVALUATION, STREAMING = "Fitting", "Evaluation", "Streaming and devices"


class Scope(str, Enum):
    full = "full"
    sample = "sample"


class OutputDtype(str, Enum):
    bf16 = "bf16"
    f16 = "f16"
    f32 = "f32"
    f64 = "f64"


@dataclass(frozen=True)
class OptionGroup:
    """Options declared once: `build` turns their values into the object passed as `param`."""

    param: str
    options: tuple[inspect.Parameter, ...]
    build: Callable[..., Any]


def _option(name: str, kind: Any, default: Any, *declarations: str, help: str, panel: str | None = None) -> inspect.Parameter:
    annotation = Annotated[kind, typer.Option(*declarations, help=help, rich_help_panel=panel)]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def with_options(*groups: OptionGroup) -> Callable[[Callable], Callable]:
    """Add each group's options to a command's signature; the command receives the built objects."""

    def decorate(command: Callable) -> Callable:
        signature = inspect.signature(command)
        own = [p for p in signature.parameters.values() if p.name not in {g.param for g in groups}]
        added = [option for group in groups for option in group.options]

        @functools.wraps(command)
        def wrapper(**values: Any) -> Any:
            try:
                for group in groups:
                    values[group.param] = group.build(**{option.name: values.pop(option.name) for option in group.options})
            except FarcastError as error:
                _fail(error)
            return command(**values)

        wrapper.__signature__ = signature.replace(parameters=own + added)
        wrapper.__annotations__ = {p.name: p.annotation for p in own + added}
        return wrapper

    return decorate


def _fit_settings(
    sample: int, seed: int, lam: float, lr: float, batch_size: int, max_epochs: int, patience: int, shrink: str, per_tensor: bool
) -> FitSettings:
    if sample < 2 or batch_size < 1 or max_epochs < 1 or patience < 1 or lr <= 0 or lam < 0:
        raise typer.BadParameter(
            "--sample must be at least 2; --batch-size, --max-epochs, --patience and --lr positive; --lambda not negative"
        )
    return FitSettings(
        sample=sample,
        seed=seed,
        lam=lam,
        lr=lr,
        batch_size=batch_size,
        max_epochs=max_epochs,
        patience=patience,
        shrink=_shrink(shrink),
        per_tensor=per_tensor,
    )


def _shrink(text: str) -> float | None:
    if text == "auto":
        return None
    if text == "none":
        return 1.0
    try:
        value = float(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r}: expected auto, none or a number", param_hint="--shrink") from None
    if not 0.0 <= value <= 10.0:
        raise typer.BadParameter(f"{text!r}: expected a factor between 0 and 10", param_hint="--shrink")
    return value


FIT_OPTIONS = OptionGroup(
    "settings",
    (
        _option("sample", int, FitSettings.sample, help="Weight coordinates sampled to fit the forecaster.", panel=FITTING),
        _option("seed", int, FitSettings.seed, help="Seed for sampling and fitting.", panel=FITTING),
        _option("lam", float, FitSettings.lam, "--lambda", help="Weight of the first-order-optimality regulariser.", panel=FITTING),
        _option("lr", float, FitSettings.lr, "--lr", help="Adam learning rate.", panel=FITTING),
        _option("batch_size", int, FitSettings.batch_size, help="Adam batch size.", panel=FITTING),
        _option("max_epochs", int, FitSettings.max_epochs, help="Most epochs of Adam.", panel=FITTING),
        _option("patience", int, FitSettings.patience, help="Epochs without validation gain before stopping.", panel=FITTING),
        _option(
            "shrink",
            str,
            "auto",
            help="Move the forecast towards the last checkpoint by a factor: auto (chosen by a backtest on the run), "
            "none, or a number (0 = keep last, 1 = unshrunk).",
            panel=FITTING,
        ),
        _option(
            "per_tensor",
            bool,
            FitSettings.per_tensor,
            "--per-tensor/--shared",
            help="Coefficients for each tensor with enough sampled "
            "coordinates (the rest share one set), or one shared set for all (the paper's model).",
            panel=FITTING,
        ),
    ),
    _fit_settings,
)


def _stream_options(
    device: str, max_memory: str, backtest: Scope, use_mmap: bool, eval_cmd: str | None, quiet: bool
) -> commands.StreamOptions:
    return commands.StreamOptions(
        device=device, max_memory=parse_size(max_memory), backtest=backtest.value, quiet=quiet, use_mmap=use_mmap, eval_cmd=eval_cmd
    )


STREAM_OPTIONS = OptionGroup(
    "options",
    (
        _option(
            "eval_cmd",
            str | None,
            None,
            "--eval-cmd",
            help="A command that prints a checkpoint folder's loss, with {checkpoint} for the folder: adds steps saved to the backtest.",
        ),
        _option("device", str, "auto", help="auto (a GPU when one is visible), cpu, cuda or cuda:N.", panel=STREAMING),
        _option("max_memory", str, "1GiB", help="Memory for tensor data, host and device (e.g. 512MB, 4GiB).", panel=STREAMING),
        _option(
            "backtest",
            Scope,
            Scope.full,
            "--backtest",
            help="Score the backtest on all coordinates (full) or on the fitting sample (sample, fast).",
            panel=EVALUATION,
        ),
        _option(
            "use_mmap",
            bool,
            False,
            "--mmap",
            help="Read through memory maps instead of positional reads (slow on network file systems).",
            panel=STREAMING,
        ),
        _option("quiet", bool, False, "--quiet", "-q", help="No progress messages."),
    ),
    _stream_options,
)

RunDir = Annotated[
    Path, typer.Argument(help="Folder of the run's checkpoints: checkpoint-<step>/ folders or <name><step>.safetensors files.")
]
Horizon = Annotated[int | None, typer.Option("--horizon", "-H", help="Training steps to jump past the last checkpoint.")]
Emit = Annotated[list[int] | None, typer.Option("--emit", help="Also forecast this many steps ahead (repeatable, each below the horizon).")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output (only once the new one is complete).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")]


def _stderr(message: str) -> None:
    print(f"farcast: {message}".replace("\n", " "), file=sys.stderr, flush=True)


def _show_report(as_json: bool) -> Callable[[Report], None]:
    def show(report: Report) -> None:
        for warning in report.warnings:
            _stderr(f"warning: {warning}")
        if as_json:
            print(json.dumps(report.to_json(), indent=1))
        else:
            render(report, Console(file=sys.stdout, width=None if sys.stdout.isatty() else 160))

    return show


def _fail(error: FarcastError) -> None:
    if _debug["on"]:
        raise error
    _stderr(f"error: {error}")
    raise typer.Exit(error.exit_code) from None


def _run(action: Callable[[], Any], show: Callable[[Any], None]) -> None:
    """Run one command; every failure becomes a one-line message and its documented exit code."""
    try:
        with sigterm_as_interrupt():
            result = action()
    except FarcastError as error:
        if error.report is not None:
            show(error.report)
        _fail(error)
    except KeyboardInterrupt:
        _stderr("interrupted by SIGINT; temporary files removed")
        raise typer.Exit(EXIT_SIGINT) from None
    except Exception as error:
        if _debug["on"]:
            raise
        _stderr(f"internal error: {type(error).__name__}: {error} (rerun with --debug for the traceback)")
        raise typer.Exit(EXIT_INTERNAL) from None
    show(result)


def _version(value: bool) -> None:
    if value:
        print(f"farcast {__version__}")
        raise typer.Exit()


@app.callback()
def _global(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks (also FARCAST_DEBUG=1).")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    _debug["on"] = debug or os.environ.get("FARCAST_DEBUG", "") not in ("", "0")


@app.command(name="inspect")
def inspect_command(run_dir: RunDir, as_json: AsJson = False) -> None:
    """List the checkpoints, files, tensors, parameters and bytes of a run."""
    _run(lambda: commands.inspect_run(run_dir), lambda info: _show_inspection(info, as_json))


def _show_inspection(info: dict, as_json: bool) -> None:
    for warning in info["warnings"]:
        _stderr(f"warning: {warning}")
    if as_json:
        print(json.dumps(info, indent=1))
        return
    print(f"run: {info['run']} ({info['layout']} layout)")
    print(f"checkpoints: {len(info['steps'])} at steps {', '.join(map(str, info['steps']))}")
    for checkpoint in info["checkpoints"]:
        print(f"  step {checkpoint['step']}: {checkpoint['path']} ({len(checkpoint['files'])} file(s), {checkpoint['bytes']:,} bytes)")
    print(f"tensors: {info['tensors']} ({info['forecast_tensors']} forecast, the rest copied), dtypes {', '.join(info['dtypes'])}")
    print(f"parameters: {info['parameters']:,} ({info['forecast_parameters']:,} forecast)")
    print(f"bytes: {info['bytes_per_checkpoint']:,} per checkpoint, {info['total_bytes']:,} in all")
    print(f"largest --horizon when fitting on this run: {info['max_horizon']} steps")


@app.command()
@with_options(FIT_OPTIONS, STREAM_OPTIONS)
def fit(
    run_dir: RunDir,
    output: Annotated[Path, typer.Option("--output", "-o", help="Forecaster file to write (JSON).")],
    horizon: Horizon = None,
    context_end: Annotated[
        int | None, typer.Option(help="Fit on a complete reference run: learn (step s_0, this step) -> this step + horizon.")
    ] = None,
    emit: Emit = None,
    force: Force = False,
    as_json: AsJson = False,
    settings: FitSettings = None,
    options: commands.StreamOptions = None,
) -> None:
    """Fit the forecaster and save it, with its evaluation, for `predict --forecaster`."""
    if horizon is None:
        raise typer.BadParameter("--horizon is required", param_hint="--horizon")
    action = lambda: commands.fit(
        run_dir, output, horizon=horizon, context_end=context_end, emit=emit or [], settings=settings, options=options, force=force
    )  # noqa: E731
    _run(action, _show_report(as_json))


@app.command()
@with_options(FIT_OPTIONS, STREAM_OPTIONS)
def predict(
    run_dir: RunDir,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Folder to write the forecast checkpoint into (must not exist, unless --force).")
    ],
    horizon: Horizon = None,
    forecaster: Annotated[
        Path | None, typer.Option(help="Apply a forecaster saved by `farcast fit` instead of fitting on this run.")
    ] = None,
    emit: Emit = None,
    dtype: Annotated[OutputDtype | None, typer.Option(help="Store forecast tensors in this dtype instead of the input's.")] = None,
    min_skill: Annotated[
        float | None,
        typer.Option(
            help="Exit 4 and write nothing if the backtest skill against keeping the last checkpoint is below this.",
            rich_help_panel=EVALUATION,
        ),
    ] = None,
    fallback: Annotated[
        bool,
        typer.Option(
            "--fallback",
            help="Write the candidate with the lowest backtest error (forecast, last checkpoint, "
            "straight line, average of the last checkpoints), saying which.",
        ),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print what would be read and written and the memory plan; do nothing.")
    ] = False,
    force: Force = False,
    as_json: AsJson = False,
    settings: FitSettings = None,
    options: commands.StreamOptions = None,
) -> None:
    """Forecast the weights HORIZON steps past the last checkpoint and write them as a checkpoint."""
    out_dtype = None if dtype is None else dtype.value.upper()
    given = dict(horizon=horizon, forecaster_file=forecaster, emit=emit or [], settings=settings, options=options, dtype=out_dtype)
    if dry_run:
        _run(lambda: commands.dry_run(run_dir, output, **given), lambda plan: _show_plan(plan, as_json))
        return
    _run(lambda: commands.predict(run_dir, output, **given, force=force, min_skill=min_skill, fallback=fallback), _show_report(as_json))


def _show_plan(plan: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(plan, indent=1))
        return
    reads, writes, memory = plan["reads"], plan["writes"], plan["memory"]
    print(f"dry run: {plan['run']} ({len(plan['steps'])} checkpoints), device {plan['device']}")
    if "sample" in reads:
        print(f"read: {reads['sample']['coordinates']:,} sampled coordinates from each of {reads['sample']['checkpoints']} checkpoints")
    backtest = reads.get("backtest", {})
    if "checkpoints" in backtest:
        print(f"read for the backtest: checkpoints {backtest['checkpoints']}, {backtest['bytes']:,} bytes")
    elif backtest:
        print(f"read for the backtest: {backtest.get('unavailable', 'only the sampled coordinates')}")
    print(f"read for the forecast: checkpoints {reads['forecast']['checkpoints']}, {reads['forecast']['bytes']:,} bytes")
    print(f"write: {writes['folder']}: step(s) {writes['checkpoints']}, {writes['bytes']:,} bytes")
    print(
        f"memory: chunks of {memory['chunk_elements']:,} elements; read buffers {memory['read_buffers_bytes']:,} bytes, "
        f"scratch {memory['scratch_bytes']:,} bytes, within --max-memory {memory['max_memory']:,}"
    )


def main() -> None:
    app()

"""The `farcast` command line: parse arguments, call farcast_cli.commands, print the result, map errors to exit codes.

Each option is declared once, in an OptionGroup that also builds the settings object the commands take
(FitSettings, StreamOptions, EvalOptions); `with_options` adds a group's options to every command that
uses it. Help panels order the options from what most people need to what few do.
"""

import contextlib
import functools
import inspect
import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from typer import rich_utils
from typer._click import exceptions as click_errors
from typer.core import TyperCommand, TyperGroup, TyperOption

from farcast_cli import __version__, commands
from farcast_cli.distributed import ONE_PROCESS, World, join_world, launched_rank, launched_size
from farcast_cli.errors import (
    EXIT_INTERNAL,
    DamagedCheckpoint,
    FarcastError,
    InterruptedAfterPublishing,
    LostContact,
    UsageError,
    flag_names,
    interrupted_by,
    signals_as_interrupt,
)
from farcast_cli.evaluate.evaluator import EVAL_TIMEOUT_SECONDS, EvalCommand, EvalOptions, EvalServer
from farcast_cli.evaluate.plot import check_plot_target, write_plot
from farcast_cli.evaluate.render import inspection_lines, plain_lines, plan_lines, render
from farcast_cli.evaluate.report import Inspection, Plan, Report
from farcast_cli.io.device import parse_size
from farcast_cli.io.resume import SCHEDULES
from farcast_cli.model.fit import FitSettings
from farcast_cli.requests import OUTPUT_DTYPES, OUTPUT_FORMATS


class _PlainHelp:
    """Help as a person reads it: no type shown after on/off flags, and arguments in the usage line as
    RUN_DIR rather than {run_dir}."""

    def get_params(self, ctx: Any) -> list:
        params = super().get_params(ctx)
        for param in params:
            if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
                param.metavar = ""
        return params

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return [re.sub(r"^\{(\w+)\}", lambda m: m.group(1).upper(), piece) for piece in super().collect_usage_pieces(ctx)]


class _Command(_PlainHelp, TyperCommand):
    pass


class _Commands(_PlainHelp, TyperGroup):
    """The `farcast` command group. A usage error (a bad value, a missing option, an unknown command) is
    one line, `farcast: error: ...`, exit 2, like every other error."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:  # fmt: skip
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except click_errors.NoArgsIsHelpError as error:
            rich_utils.rich_format_error(error)
            code = error.exit_code
        except click_errors.ClickException as error:
            context = getattr(error, "ctx", None)
            hint = f" (see {context.command_path} --help)" if context is not None else ""
            _stderr(f"error: {error.format_message().rstrip('.')}{hint}")
            code = error.exit_code
        except typer.Abort:
            code = EXIT_INTERNAL
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="farcast",
    cls=_Commands,
    help="Forecast a training run's far-future weights from its safetensors checkpoints, with an honest error report.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
)
_debug = {"on": os.environ.get("FARCAST_DEBUG", "") not in ("", "0")}

EVALUATION, FITTING, STREAMING, OUTPUT = "Evaluation by your loss", "Fitting", "Streaming and devices", "Output"
RESUMING = "Resuming training from the forecast"


class Scope(str, Enum):
    full = "full"
    sample = "sample"


Schedule = Enum("Schedule", {name: name for name in SCHEDULES}, type=str)


OutputFormat = Enum("OutputFormat", {name: name for name in OUTPUT_FORMATS}, type=str)
OutputDtype = Enum("OutputDtype", {name.lower(): name.lower() for name in OUTPUT_DTYPES}, type=str)


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
                _fail(error, launched_rank() == 0)
            return command(**values)

        wrapper.__signature__ = signature.replace(parameters=own + added)
        wrapper.__annotations__ = {p.name: p.annotation for p in own + added}
        return wrapper

    return decorate


def _fit_settings(shrink: str, **values: Any) -> FitSettings:
    return FitSettings(shrink=_shrink(shrink), **values)


def _shrink(text: str) -> float | None:
    if text == "auto":
        return None
    if text == "none":
        return 1.0
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"--shrink {text!r}: expected auto, none or a number") from None


FIT_OPTIONS = OptionGroup(
    "settings",
    (
        _option("shrink", str, "auto", help="Move the forecast towards the last checkpoint by a factor: auto (chosen by the "
                "backtest: by your loss with --eval-cmd, else by weight error), none, or a number (0 = keep last, 1 = unshrunk).",
                panel=FITTING),
        _option("per_tensor", bool, FitSettings.per_tensor, "--per-tensor/--shared", help="Coefficients for each tensor with enough "
                "sampled coordinates (the rest share one set), or one shared set for all (the paper's model).", panel=FITTING),
        _option("sample", int, FitSettings.sample, help="Weight coordinates sampled to fit the forecaster.", panel=FITTING),
        _option("seed", int, FitSettings.seed, help="Seed for sampling and fitting.", panel=FITTING),
        _option("lam", float, FitSettings.lam, "--lambda", help="Weight of the first-order-optimality regulariser.", panel=FITTING),
        _option("lr", float, FitSettings.lr, "--lr", help="Adam learning rate.", panel=FITTING),
        _option("batch_size", int, FitSettings.batch_size, help="Adam batch size.", panel=FITTING),
        _option("max_updates", int, FitSettings.max_updates, help="Most Adam updates (the report says when a fit stopped there).",
                panel=FITTING),
        _option("patience", int, FitSettings.patience, help="Held-out checks (every 20 updates, or every epoch when shorter) "
                "without gain before the fit counts as converged.", panel=FITTING),
        _option("objective", str, FitSettings.objective, help="l1: the paper's L1 + regulariser, by Adam from the least-squares "
                "solution; l2: the exact least-squares solution alone (instant, deterministic).", panel=FITTING),
    ),
    _fit_settings,
)  # fmt: skip


def _stream_options(device: str, max_memory: str, backtest: Scope, use_mmap: bool, quiet: bool) -> commands.StreamOptions:
    return commands.StreamOptions(device=device, max_memory=parse_size(max_memory), backtest=backtest.value, quiet=quiet, use_mmap=use_mmap)


STREAM_OPTIONS = OptionGroup(
    "options",
    (
        _option("device", str, "auto", help="auto (a GPU when one is visible), cpu, cuda or cuda:N.", panel=STREAMING),
        _option("max_memory", str, "1GiB", help="Memory for tensor data, host and device (e.g. 512MB, 4GiB).", panel=STREAMING),
        _option("backtest", Scope, Scope.full, "--backtest", help="Score the weight backtest on all coordinates (full) or on the "
                "fitting sample (sample, fast).", panel=STREAMING),
        _option("use_mmap", bool, False, "--mmap", help="Read through memory maps instead of positional reads (slow on network file "
                "systems).", panel=STREAMING),
        _option("quiet", bool, False, "--quiet", "-q", help="No progress messages on stderr.", panel=OUTPUT),
    ),
    _stream_options,
)  # fmt: skip


def _eval_options(eval_cmd: str | None, eval_server: str | None, eval_jobs: int, eval_timeout: float, eval_cache: bool) -> EvalOptions:
    if eval_timeout <= 0:
        raise UsageError(f"--eval-timeout {eval_timeout:g}: must be above 0 seconds")
    if eval_cmd is not None and eval_server is not None:
        raise UsageError("--eval-cmd and --eval-server: give one of them")
    if eval_server is not None:
        return EvalOptions(EvalServer(eval_server, eval_timeout), eval_jobs, eval_cache)
    return EvalOptions(None if eval_cmd is None else EvalCommand(eval_cmd, eval_timeout), eval_jobs, eval_cache)


EVAL_OPTIONS = OptionGroup(
    "evaluation",
    (
        _option("eval_cmd", str | None, None, "--eval-cmd", help="A command that prints a checkpoint's loss (the last number on its "
                "stdout), with {checkpoint} for its folder: the backtest then decides by your loss."),
        _option("eval_server", str | None, None, "--eval-server", help="Like --eval-cmd, but started once (--eval-jobs of them): "
                "reads one checkpoint path per line on stdin, prints one line holding its loss per path.", panel=EVALUATION),
        _option("eval_jobs", int, 1, "--eval-jobs", help="Evaluations to run at once.", panel=EVALUATION),
        _option("eval_timeout", float, EVAL_TIMEOUT_SECONDS, "--eval-timeout", help="Seconds one checkpoint's evaluation may take.",
                panel=EVALUATION),
        _option("eval_cache", bool, True, "--eval-cache/--no-eval-cache", help="Remember losses by checkpoint content, across runs "
                "(in $FARCAST_CACHE_DIR, else ~/.cache/farcast).", panel=EVALUATION),
    ),
    _eval_options,
)  # fmt: skip


@dataclass(frozen=True)
class Writing:
    """How a command's result is written and shown: replace an existing output, JSON on stdout, a plot."""

    force: bool
    as_json: bool
    plot: Path | None


def _writing(force: bool, as_json: bool, plot: Path | None) -> Writing:
    if plot is not None:
        check_plot_target(plot)
    return Writing(force, as_json, plot)


WRITING_OPTIONS = OptionGroup(
    "writing",
    (
        _option("as_json", bool, False, "--json", help="Print the report as JSON on stdout."),
        _option("force", bool, False, "--force", help="Replace an existing output (only once the new one is complete).", panel=OUTPUT),
        _option("plot", Path | None, None, "--plot", help="Also draw the report into this PNG or SVG file (needs the plot extra: "
                "matplotlib).", panel=OUTPUT),
    ),
    _writing,
)  # fmt: skip

RunDir = Annotated[
    Path, typer.Argument(help="Folder of the run's checkpoints: checkpoint-<step>/ folders or <name><step>.safetensors files.")
]
Horizon = Annotated[int | None, typer.Option("--horizon", "-H", help="Training steps to jump past the last checkpoint (required unless "
                    "--forecaster is given).")]  # fmt: skip
Emit = Annotated[list[int] | None, typer.Option("--emit", help="Also forecast this many steps ahead (repeatable, each below the horizon).",
                 rich_help_panel=OUTPUT)]  # fmt: skip
Anchor = Annotated[int | None, typer.Option("--anchor", help="Average the last K checkpoints as the forecast's second input (default 1; "
                   "with --eval-cmd, 1 and 5 are tried and your loss decides).", rich_help_panel=FITTING)]  # fmt: skip
AsJson = Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")]
SkipDamaged = Annotated[bool, typer.Option("--skip-damaged", help="Skip checkpoints that cannot be read anywhere in the run, "
                        "not only the newest ones still being written (each is named in a warning and the report).")]  # fmt: skip


def _request(build: Callable[[], Any]) -> Any:
    """The command's request: every check of the values given is made in its constructor, and a failed
    one is this command's error, before any rank joins the others."""
    try:
        return build()
    except FarcastError as error:
        _fail(error, launched_rank() == 0)


def _stderr(message: str) -> None:
    print(f"farcast: {message}".replace("\n", " "), file=sys.stderr, flush=True)


def _show_report(writing: Writing) -> Callable[[Report], None]:
    def show(report: Report) -> None:
        for warning in report.warnings:
            _stderr(f"warning: {warning}")
        if writing.as_json:
            print(json.dumps(report.to_json(), indent=1))
        elif sys.stdout.isatty():
            render(report, Console(file=sys.stdout))
        else:
            print("\n".join(plain_lines(report)))
        if writing.plot is not None and report.output:
            try:
                write_plot(report, writing.plot)
            except Exception as error:
                _stderr(f"warning: --plot {writing.plot}: not drawn ({type(error).__name__}: {error}); the output is written")

    return show


API_NAMES = {"forecaster_file": "forecaster", "jobs": "eval_jobs", "evaluation": "eval_cmd"}
"""The Python API's parameters that the CLI names otherwise."""


@functools.cache
def _flags() -> dict[str, str]:
    """Each parameter's flag as the commands declare it, for errors that name the parameter
    (errors.flag_names): `name` and `name=True` its flag, `name=False` its negation."""
    group = typer.main.get_command(app)
    options = [*group.params, *(param for command in group.commands.values() for param in command.params)]
    flags: dict[str, str] = {}
    for option in options:
        if option.param_type_name != "option":
            continue
        flags[option.name] = flags[f"{option.name}=True"] = max(option.opts, key=len)
        if option.secondary_opts:
            flags[f"{option.name}=False"] = max(option.secondary_opts, key=len)
    for api, cli in API_NAMES.items():
        flags[api] = flags[cli]
    return flags


def _fail(error: FarcastError, speaks: bool = True) -> None:
    """Exit with the error's code, printing it where this process speaks for all (rank 0 under
    torchrun; a rank that lost contact with the others speaks for itself)."""
    if _debug["on"]:
        raise error
    with flag_names(_flags()):
        lines = error.lines()
    if isinstance(error, DamagedCheckpoint):
        lines[-1] += "; --skip-damaged skips it"
    if speaks or isinstance(error, LostContact):
        for line in lines:
            _stderr(f"error: {line}")
    _tell_launcher(lines)
    raise typer.Exit(error.exit_code) from None


def _tell_launcher(lines: list[str]) -> None:
    """Under torchrun, the error for its failure summary (TORCHELASTIC_ERROR_FILE), in place of a pointer
    to its docs: every rank's exit code and why, in the launcher's log."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    message = "farcast: error: " + " | ".join(lines)
    record = {"message": {"message": message, "extraInfo": {"py_callstack": message, "timestamp": str(int(time.time()))}}}
    with contextlib.suppress(OSError):
        Path(path).write_text(json.dumps(record))


def _run(action: Callable[[World], Any], show: Callable[[Any], None], join: Callable[[], World] | None = None) -> None:
    """Run one command and show its outcome; every failure becomes a one-line message and its documented
    exit code. A signal after the output was published stops farcast with exit 0 and a line saying so.
    With `join`, the command runs on every rank torchrun started, and rank 0 alone shows its outcome;
    without, under torchrun each process runs it alone and RANK 0 shows it. Errors name the flags
    (errors.flag_names)."""
    with flag_names(_flags()):
        _run_command(action, show, join)


def _run_command(action: Callable[[World], Any], show: Callable[[Any], None], join: Callable[[], World] | None) -> None:
    world = None
    speaks = launched_rank() == 0
    try:
        with signals_as_interrupt() as done:
            try:
                world = join() if join is not None else ONE_PROCESS
                speaks = world.is_main if join is not None else speaks
                result = action(world)
            finally:
                if world is not None:
                    world.close()
            done()
            if speaks:
                show(result)
    except InterruptedAfterPublishing as stopped:
        if speaks:
            _stderr(str(stopped))
    except FarcastError as error:
        if error.report is not None and speaks:
            show(error.report)
        _fail(error, speaks)
    except KeyboardInterrupt:
        _fail(interrupted_by(signal.SIGINT), speaks)
    except BrokenPipeError:
        raise
    except Exception as error:
        if _debug["on"]:
            raise
        where = "" if speaks else f"[rank {launched_rank()}] "
        message = f"internal error: {where}{type(error).__name__}: {error} (rerun with --debug for the traceback)"
        _stderr(message)
        _tell_launcher([message])
        raise typer.Exit(EXIT_INTERNAL) from None


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


INSPECT_EXAMPLES = """Examples:

farcast inspect sample_checkpoints/digits-mlp

farcast inspect runs/bert --json | jq .max_horizon"""


@app.command(name="inspect", epilog=INSPECT_EXAMPLES, cls=_Command)
def inspect_command(
    run_dir: RunDir,
    every: Annotated[bool, typer.Option("--all", help="List every checkpoint, not a summary of their steps.")] = False,
    as_json: AsJson = False,
    skip_damaged: SkipDamaged = False,
) -> None:
    """List the checkpoints, tensors, parameters and bytes of a run, and what an output copies and leaves out."""
    _run(lambda world: commands.inspect_run(run_dir, skip_damaged), lambda info: _show_inspection(info, as_json, every))


def _show_inspection(info: Inspection, as_json: bool, every: bool) -> None:
    for warning in info.warnings:
        _stderr(f"warning: {warning}")
    print(json.dumps(info.to_json(), indent=1) if as_json else "\n".join(inspection_lines(info, every)))


FIT_EXAMPLES = """Examples:

farcast fit runs/sweep-a --context-end 1000 --horizon 4000 -o sweep.json   (a reference run: the paper's protocol)

farcast predict runs/sweep-b --forecaster sweep.json -o sweep-b-at-5000   (applied to another run)"""


@app.command(epilog=FIT_EXAMPLES, cls=_Command)
@with_options(WRITING_OPTIONS, EVAL_OPTIONS, FIT_OPTIONS, STREAM_OPTIONS)
def fit(
    run_dir: RunDir,
    output: Annotated[Path, typer.Option("--output", "-o", help="Forecaster file to write (JSON).")],
    horizon: Horizon = None,
    context_end: Annotated[
        int | None, typer.Option(help="Fit on a complete reference run: learn (step s_0, this step) -> this step + horizon.")
    ] = None,  # fmt: skip
    validation_run: Annotated[
        Path | None,
        typer.Option(
            help="With --context-end: a second complete run whose pairs decide when the fit has converged "
            "(the paper's protocol), instead of held-out coordinates of the reference run.",
            rich_help_panel=FITTING,
        ),
    ] = None,  # fmt: skip
    emit: Emit = None,
    anchor: Anchor = None,
    skip_damaged: SkipDamaged = False,
    writing: Writing = None,
    settings: FitSettings = None,
    options: commands.StreamOptions = None,
    evaluation: EvalOptions = None,
) -> None:
    """Fit the forecaster and save it, with its evaluation, for `predict --forecaster`."""
    request = _request(
        lambda: commands.FitRequest(
            run_dir, output, horizon=horizon, context_end=context_end, emit=emit or (), settings=settings, options=options,
            evaluation=evaluation, anchor=anchor, force=writing.force, skip_damaged=skip_damaged, validation_run=validation_run,
        )
    )  # fmt: skip
    _run(lambda world: commands.run_fit(request, world), _show_report(writing), join=lambda: join_world(options.device))


PREDICT_EXAMPLES = """Examples:

farcast predict sample_checkpoints/digits-mlp -H 300 -o forecast   (decided by weight error)

farcast predict sample_checkpoints/digits-mlp -H 300 -o forecast --eval-cmd "python sample_checkpoints/eval_digits.py {checkpoint}"
  (decided by your loss)

farcast predict runs/bert -H 2000 -o bert-forecast --emit 500 --emit 1000 --json > report.json"""


@app.command(epilog=PREDICT_EXAMPLES, cls=_Command)
@with_options(WRITING_OPTIONS, EVAL_OPTIONS, FIT_OPTIONS, STREAM_OPTIONS)
def predict(
    run_dir: RunDir,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write the checkpoint into (must not exist, unless --force).")],
    horizon: Horizon = None,
    fallback: Annotated[
        bool | None,
        typer.Option(
            "--fallback/--no-fallback",
            help="Write whichever candidate won the backtest (the "
            "forecast, the last checkpoint, a straight line, an average of the last checkpoints), saying which; default: on "
            "with --eval-cmd, off without.",
        ),
    ] = None,  # fmt: skip
    forecaster: Annotated[
        Path | None, typer.Option(help="Apply a forecaster saved by `farcast fit` instead of fitting on this run.", rich_help_panel=FITTING)
    ] = None,  # fmt: skip
    anchor: Anchor = None,
    last_step: Annotated[
        int | None,
        typer.Option(
            "--last-step", help="Forecast from this checkpoint step, ignoring the run's later checkpoints.", rich_help_panel=FITTING
        ),
    ] = None,  # fmt: skip
    min_skill: Annotated[
        float | None,
        typer.Option(
            help="Exit 4 and write nothing if the forecast's backtest figure is below this: "
            "steps saved with --eval-cmd, else the weight skill against keeping the last checkpoint.",
            rich_help_panel=EVALUATION,
        ),
    ] = None,  # fmt: skip
    emit: Emit = None,
    dtype: Annotated[
        OutputDtype | None, typer.Option(help="Store forecast tensors in this dtype instead of the input's.", rich_help_panel=OUTPUT)
    ] = None,  # fmt: skip
    output_format: Annotated[
        OutputFormat,
        typer.Option(
            "--output-format",
            help="same: the run's own format (a distributed checkpoint for a DCP run); "
            "safetensors: whole tensors in a Hugging Face layout (model.safetensors, or shards and an index).",
            rich_help_panel=OUTPUT,
        ),
    ] = OutputFormat("same"),
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print what would be read and written and the memory plan; do nothing.", rich_help_panel=OUTPUT),
    ] = False,  # fmt: skip
    resumable: Annotated[
        bool,
        typer.Option(
            "--resumable",
            help="Write a checkpoint the trainer resumes from: the forecast with the "
            "last checkpoint's optimizer, RNG and training-arguments files and its trainer_state.json advanced by the horizon; "
            "OUT may be the run's own checkpoint-<last + horizon>. Needs --schedule.",
            rich_help_panel=RESUMING,
        ),
    ] = False,  # fmt: skip
    schedule: Annotated[
        Schedule | None,
        typer.Option(
            "--schedule",
            help="With --resumable: keep the learning-rate schedule where the run "
            "left it, or advance it by the horizon (LambdaLR schedules, as transformers builds).",
            rich_help_panel=RESUMING,
        ),
    ] = None,  # fmt: skip
    skip_damaged: SkipDamaged = False,
    writing: Writing = None,
    settings: FitSettings = None,
    options: commands.StreamOptions = None,
    evaluation: EvalOptions = None,
) -> None:
    """Forecast the weights HORIZON steps past the last checkpoint and write them as a checkpoint."""
    request = _request(
        lambda: commands.PredictRequest(
            run_dir, output, horizon=horizon, forecaster_file=forecaster, emit=emit or (), settings=settings, options=options,
            evaluation=evaluation, anchor=anchor, last_step=last_step, dtype=None if dtype is None else dtype.value.upper(),
            force=writing.force, min_skill=min_skill, fallback=fallback, resumable=resumable,
            schedule=None if schedule is None else schedule.value, skip_damaged=skip_damaged, output_format=output_format.value,
        )
    )  # fmt: skip
    if dry_run:
        _run(lambda world: commands.plan_predict(request), lambda plan: _show_plan(plan, writing.as_json))
        return
    _run(lambda world: commands.run_predict(request, world), _show_report(writing), join=lambda: join_world(options.device))


def _show_plan(plan: Plan, as_json: bool) -> None:
    print(json.dumps(plan.to_json(), indent=1) if as_json else "\n".join(plan_lines(plan)))


def main() -> None:
    """Under torchrun, ranks other than 0 keep usage errors and help to themselves: rank 0 prints them.
    torchrun SIGTERMs the ranks still running once one has exited non-zero: outside the command itself
    (where SIGTERM interrupts it and cleans up), that must not cut short a rank's error line or exit code."""
    if launched_size() > 1:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if launched_rank() == 0:
        app(prog_name="farcast")
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        try:
            code = app(standalone_mode=False)
        except Exception as error:
            code = getattr(error, "exit_code", EXIT_INTERNAL)
    sys.exit(code if isinstance(code, int) else 0)

"""The `farcast` command line: parse arguments, call the pipeline, print the result, map errors to exit codes."""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.console import Console

from farcast_cli import __version__, commands as pipeline
from farcast_cli.io.device import parse_size
from farcast_cli.errors import EXIT_INTERNAL, EXIT_SIGINT, FarcastError, sigterm_as_interrupt
from farcast_cli.model.forecaster import FitSettings
from farcast_cli.evaluate.report import render

app = typer.Typer(
    name="farcast",
    help="Forecast a training run's far-future weights from its safetensors checkpoints, with an honest error report.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
_debug = {"on": os.environ.get("FARCAST_DEBUG", "") not in ("", "0")}


class Scope(str, Enum):
    full = "full"
    sample = "sample"


class OutputDtype(str, Enum):
    bf16 = "bf16"
    f16 = "f16"
    f32 = "f32"
    f64 = "f64"


RunDir = Annotated[Path, typer.Argument(help="Folder of the run's checkpoints: checkpoint-<step>/ folders or <name><step>.safetensors files.")]
Horizon = Annotated[Optional[int], typer.Option("--horizon", "-H", help="Training steps to jump past the last checkpoint.")]
Emit = Annotated[Optional[list[int]], typer.Option("--emit", help="Also forecast this many steps ahead (repeatable, each below the horizon).")]
Sample = Annotated[int, typer.Option(help="Weight coordinates sampled to fit the forecaster.")]
Seed = Annotated[int, typer.Option(help="Seed for sampling and fitting.")]
Lambda = Annotated[float, typer.Option("--lambda", help="Weight of the first-order-optimality regulariser.")]
BatchSize = Annotated[int, typer.Option(help="Adam batch size.")]
LearningRate = Annotated[float, typer.Option("--lr", help="Adam learning rate.")]
MaxEpochs = Annotated[int, typer.Option(help="Most epochs of Adam.")]
Patience = Annotated[int, typer.Option(help="Epochs without validation gain before stopping.")]
Shrink = Annotated[str, typer.Option(help="Move the forecast towards the last checkpoint by a factor: auto (chosen by a backtest on the run), none, or a number (0 = keep last, 1 = unshrunk).")]
PerTensor = Annotated[bool, typer.Option("--per-tensor/--shared", help="Coefficients for each tensor with enough sampled coordinates (the rest share one set), or one shared set for all.")]
Device = Annotated[str, typer.Option(help="auto (a GPU when one is visible), cpu, cuda or cuda:N.")]
MaxMemory = Annotated[str, typer.Option(help="Memory for tensor data, host and device (e.g. 512MB, 4GiB).")]
BacktestScope = Annotated[Scope, typer.Option("--backtest", help="Score the backtest on all coordinates (full) or on the fitting sample (sample, fast).")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output (only once the new one is complete).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress messages.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")]
EvalCmd = Annotated[Optional[str], typer.Option("--eval-cmd", help="Command printing a checkpoint's loss, with {checkpoint} for its folder: adds steps saved to the backtest.")]
UseMmap = Annotated[bool, typer.Option("--mmap", help="Read through memory maps instead of positional reads (slow on network file systems).")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Print what would be read and written and the memory plan; do nothing.")]


def _settings(sample: int, seed: int, lam: float, lr: float, batch_size: int, max_epochs: int, patience: int, shrink: str, per_tensor: bool) -> FitSettings:
    if sample < 2 or batch_size < 1 or max_epochs < 1 or patience < 1 or lr <= 0 or lam < 0:
        raise typer.BadParameter("--sample must be at least 2; --batch-size, --max-epochs, --patience and --lr positive; --lambda not negative")
    return FitSettings(sample=sample, seed=seed, lam=lam, lr=lr, batch_size=batch_size, max_epochs=max_epochs, patience=patience, shrink=_shrink(shrink), per_tensor=per_tensor)


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


def _stderr(message: str) -> None:
    print(f"farcast: {message}".replace("\n", " "), file=sys.stderr, flush=True)


def _show_report(as_json: bool) -> Callable[[dict], None]:
    def show(report: dict) -> None:
        for warning in report.get("warnings", []):
            _stderr(f"warning: {warning}")
        if as_json:
            print(json.dumps(report, indent=1))
        else:
            render(report, Console(file=sys.stdout, width=None if sys.stdout.isatty() else 160))

    return show


def _run(action: Callable[[], dict], show: Callable[[dict], None]) -> None:
    """Run one command; every failure becomes a one-line message and its documented exit code."""
    try:
        with sigterm_as_interrupt():
            result = action()
    except FarcastError as error:
        if error.report is not None:
            show(error.report)
        if _debug["on"]:
            raise
        _stderr(f"error: {error}")
        raise typer.Exit(error.exit_code) from None
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


@app.command()
def inspect(run_dir: RunDir, as_json: AsJson = False) -> None:
    """List the checkpoints, files, tensors, parameters and bytes of a run."""
    _run(lambda: pipeline.inspect_run(run_dir), lambda info: _show_inspection(info, as_json))


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
def fit(
    run_dir: RunDir,
    output: Annotated[Path, typer.Option("--output", "-o", help="Forecaster file to write (JSON).")],
    horizon: Horizon = None,
    context_end: Annotated[Optional[int], typer.Option(help="Fit on a complete reference run: learn (step s_0, this step) -> this step + horizon.")] = None,
    emit: Emit = None,
    sample: Sample = FitSettings.sample,
    seed: Seed = FitSettings.seed,
    lam: Lambda = FitSettings.lam,
    lr: LearningRate = FitSettings.lr,
    batch_size: BatchSize = FitSettings.batch_size,
    max_epochs: MaxEpochs = FitSettings.max_epochs,
    patience: Patience = FitSettings.patience,
    shrink: Shrink = "auto",
    per_tensor: PerTensor = FitSettings.per_tensor,
    device: Device = "auto",
    max_memory: MaxMemory = "1GiB",
    backtest: BacktestScope = Scope.full,
    use_mmap: UseMmap = False,
    eval_cmd: EvalCmd = None,
    force: Force = False,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Fit the forecaster and save it, with its evaluation, for `predict --forecaster`."""
    settings = _settings(sample, seed, lam, lr, batch_size, max_epochs, patience, shrink, per_tensor)
    if horizon is None:
        raise typer.BadParameter("--horizon is required", param_hint="--horizon")

    def action() -> dict:
        options = pipeline.StreamOptions(device, parse_size(max_memory), backtest.value, quiet, use_mmap, eval_cmd)
        return pipeline.fit(run_dir, output, horizon, context_end, emit or [], settings, options, force)

    _run(action, _show_report(as_json))


@app.command()
def predict(
    run_dir: RunDir,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write the forecast checkpoint into (must not exist, unless --force).")],
    horizon: Horizon = None,
    forecaster: Annotated[Optional[Path], typer.Option(help="Apply a forecaster saved by `farcast fit` instead of fitting on this run.")] = None,
    emit: Emit = None,
    dtype: Annotated[Optional[OutputDtype], typer.Option(help="Store forecast tensors in this dtype instead of the input's.")] = None,
    min_skill: Annotated[Optional[float], typer.Option(help="Exit 4 and write nothing if the backtest skill against keeping the last checkpoint is below this.")] = None,
    fallback: Annotated[bool, typer.Option("--fallback", help="Write the candidate with the lowest backtest error (forecast, last checkpoint, straight line, average of the last checkpoints), saying which.")] = False,
    sample: Sample = FitSettings.sample,
    seed: Seed = FitSettings.seed,
    lam: Lambda = FitSettings.lam,
    lr: LearningRate = FitSettings.lr,
    batch_size: BatchSize = FitSettings.batch_size,
    max_epochs: MaxEpochs = FitSettings.max_epochs,
    patience: Patience = FitSettings.patience,
    shrink: Shrink = "auto",
    per_tensor: PerTensor = FitSettings.per_tensor,
    device: Device = "auto",
    max_memory: MaxMemory = "1GiB",
    backtest: BacktestScope = Scope.full,
    use_mmap: UseMmap = False,
    eval_cmd: EvalCmd = None,
    dry_run: DryRun = False,
    force: Force = False,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Forecast the weights HORIZON steps past the last checkpoint and write them as a checkpoint."""
    settings = _settings(sample, seed, lam, lr, batch_size, max_epochs, patience, shrink, per_tensor)
    out_dtype = None if dtype is None else dtype.value.upper()

    def options() -> pipeline.StreamOptions:
        return pipeline.StreamOptions(device, parse_size(max_memory), backtest.value, quiet, use_mmap, eval_cmd)

    if dry_run:
        _run(lambda: pipeline.dry_run(run_dir, output, horizon, forecaster, emit or [], settings, options(), out_dtype), lambda plan: _show_plan(plan, as_json))
        return
    _run(lambda: pipeline.predict(run_dir, output, horizon, forecaster, emit or [], settings, options(), out_dtype, force, min_skill, fallback), _show_report(as_json))


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
    print(f"memory: chunks of {memory['chunk_elements']:,} elements; read buffers {memory['read_buffers_bytes']:,} bytes, "
          f"scratch {memory['scratch_bytes']:,} bytes, within --max-memory {memory['max_memory']:,}")


def main() -> None:
    app()

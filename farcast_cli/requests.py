"""What a command is asked to do, checked once: `PredictRequest` and `FitRequest`.

A request's constructor makes every check of the values alone that a user can fail (a bad horizon, an
option that does not go with another), raising an error that names the parameter (errors.parameter):
a Python caller reads `horizon`, the CLI prints `--horizon`. What can only be checked against the run
(its steps, its layout, the output's place) is checked when the run is opened (stages.py).
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from pathlib import Path

from farcast_cli.errors import UsageError, parameter
from farcast_cli.evaluate.evaluator import EvalOptions
from farcast_cli.io.device import resolve_device
from farcast_cli.io.engine import EngineSettings, plan_chunk_elements
from farcast_cli.io.resume import SCHEDULES
from farcast_cli.model.fit import FitSettings

OUTPUT_DTYPES = ("BF16", "F16", "F32", "F64")
OUTPUT_FORMATS = ("same", "safetensors")


@dataclass(frozen=True)
class StreamOptions:
    """How tensors are streamed: device, memory, backtest scope, progress, reads."""

    device: str = "auto"
    max_memory: int = 1 << 30
    backtest: str = "full"
    quiet: bool = False
    use_mmap: bool = False

    def engine(self, input_bytes: int, scratch_bytes: int, advance=lambda n: None) -> EngineSettings:
        """Engine settings whose buffers for one pass fit in max_memory."""
        chunk = plan_chunk_elements(self.max_memory, input_bytes, scratch_bytes)
        return EngineSettings(resolve_device(self.device), chunk, use_mmap=self.use_mmap, advance=advance)


@dataclass(frozen=True)
class _Forecasting:
    """What both requests share, given by name after each request's own paths: the steps to forecast
    (`horizon`, and the `emit` ones below it), the fit, the streaming, the user's loss, the `anchor`
    (checkpoints averaged as the forecast's second input), whether an existing output may be replaced
    (`force`) and damaged checkpoints skipped (`skip_damaged`)."""

    _: KW_ONLY
    horizon: int | None = None
    emit: tuple[int, ...] = ()
    settings: FitSettings = FitSettings()
    options: StreamOptions = StreamOptions()
    evaluation: EvalOptions = EvalOptions()
    anchor: int | None = None
    force: bool = False
    skip_damaged: bool = False

    @property
    def judged(self) -> bool:
        """Whether the user's loss decides (an evaluator was given)."""
        return self.evaluation.evaluator is not None

    @property
    def offsets(self) -> list[int]:
        """The steps past the context end to forecast: each emitted one, and the horizon."""
        return sorted(set(self.emit)) + [self.horizon]


@dataclass(frozen=True)
class PredictRequest(_Forecasting):
    """`farcast predict`: forecast `horizon` steps past the run's newest checkpoint (or apply the
    forecaster saved in `forecaster_file`) and write the chosen candidate into `out_dir`.

    `emit`: more steps to forecast, each below the horizon. `anchor`: checkpoints averaged as the
    forecast's second input (None: 1, or 1 and 5 tried by the loss). `last_step`: forecast from this
    checkpoint, ignoring later ones. `dtype`: the forecast tensors' dtype (one of OUTPUT_DTYPES; None:
    the input's). `min_skill`: write nothing below this backtest figure. `fallback`: write the
    backtest's winner (None: when the loss decides). `resumable` with `schedule` ("keep" or "advance"):
    a checkpoint the trainer resumes from. `output_format`: "same" or "safetensors" (a DCP run's
    forecast as whole tensors)."""

    run_dir: Path
    out_dir: Path
    _: KW_ONLY
    forecaster_file: Path | None = None
    last_step: int | None = None
    dtype: str | None = None
    min_skill: float | None = None
    fallback: bool | None = None
    resumable: bool = False
    schedule: str | None = None
    output_format: str = "same"

    def __post_init__(self) -> None:
        object.__setattr__(self, "emit", tuple(self.emit))
        if self.schedule is not None and not self.resumable:
            raise UsageError(
                f"{parameter('schedule')} {self.schedule} applies only to a {parameter('resumable=True')} output; "
                f"add {parameter('resumable=True')} or drop {parameter('schedule')}"
            )
        _check_horizon(self.horizon, self.forecaster_file)
        _check_anchor(self.anchor)
        self._check_saved_forecaster_options()
        if self.resumable:
            self._check_resumable()
        if self.forecaster_file is None:
            _check_emit(self.horizon, self.emit)
        _check_choice("dtype", self.dtype, (None, *OUTPUT_DTYPES))
        _check_choice("output_format", self.output_format, OUTPUT_FORMATS)

    @property
    def writes_winner(self) -> bool:
        """Whether the backtest's winner is written rather than the forecast (`fallback`, by default
        when the loss decides)."""
        return self.judged if self.fallback is None else self.fallback

    def _check_saved_forecaster_options(self) -> None:
        """A saved forecaster fixed its steps, anchor and shrink when it was fitted: options that would
        change them are refused rather than ignored."""
        given = [
            parameter(name)
            for name, value in (("emit", self.emit), ("anchor", self.anchor), ("shrink", self.settings.shrink))
            if value not in (None, [], ())
        ]
        if self.forecaster_file is not None and given:
            raise UsageError(
                f"{self.forecaster_file}: a saved forecaster keeps the {', '.join(given)} it was fitted with; give them to farcast fit"
            )

    def _check_resumable(self) -> None:
        if self.last_step is not None or self.emit:
            raise UsageError(
                f"{parameter('resumable=True')} writes one checkpoint past the run's newest: "
                f"it takes neither {parameter('last_step')} nor {parameter('emit')}"
            )
        if self.schedule not in SCHEDULES:
            raise UsageError(
                f"{parameter('resumable=True')} needs {parameter('schedule')} keep or {parameter('schedule')} advance: "
                "farcast does not choose what the learning-rate schedule does"
            )


@dataclass(frozen=True)
class FitRequest(_Forecasting):
    """`farcast fit`: fit a forecaster of `horizon` steps (and `emit` ones) and save it to `out_file`;
    on a complete reference run when `context_end` is given (stopping early on `validation_run` where
    given, the paper's protocol), else on the run itself."""

    run_dir: Path
    out_file: Path
    _: KW_ONLY
    context_end: int | None = None
    validation_run: Path | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "emit", tuple(self.emit))
        if self.horizon is None:
            raise UsageError(f"{parameter('horizon')} is required: how many steps past the run's newest checkpoint to forecast")
        if self.validation_run is not None and self.context_end is None:
            raise UsageError(f"{parameter('validation_run')} is for fitting on a reference run: give {parameter('context_end')} too")
        _check_horizon(self.horizon)
        _check_emit(self.horizon, self.emit)
        _check_anchor(self.anchor)


def _check_horizon(horizon: int | None, forecaster_file: Path | None = None) -> None:
    if horizon is None and forecaster_file is None:
        raise UsageError(f"give {parameter('horizon')} (training steps to jump ahead) or {parameter('forecaster_file')}")
    if horizon is not None and horizon <= 0:
        raise UsageError(f"{parameter('horizon')} must be a positive number of steps, not {horizon}")


def _check_emit(horizon: int, emit: tuple[int, ...]) -> None:
    bad = [e for e in emit if not 0 < e < horizon]
    if bad:
        raise UsageError(f"{parameter('emit')} {bad[0]}: each emitted step must lie between 0 and the horizon {horizon}")


def _check_anchor(anchor: int | None) -> None:
    if anchor is not None and anchor < 1:
        raise UsageError(f"{parameter('anchor')} {anchor}: the number of checkpoints averaged must be at least 1")


def _check_choice(name: str, value: object, choices: tuple) -> None:
    if value not in choices:
        shown = ", ".join(str(choice) for choice in choices if choice is not None)
        raise UsageError(f"{parameter(name)} {value!r}: expected one of {shown}")

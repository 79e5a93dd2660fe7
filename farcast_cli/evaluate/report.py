"""The report: what was forecast, how well each candidate did in the backtest, and the verdict in words.

These dataclasses are the one definition of the JSON report (`--json`, and farcast_report.json in every
output); the README's "The JSON report" documents it. SCHEMA_VERSION changes when a key changes meaning
or goes away; new keys may appear within a version.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from farcast_cli import __version__
from farcast_cli.errors import named, parameter
from farcast_cli.evaluate.evaluator import format_loss
from farcast_cli.evaluate.loss import LossBacktest
from farcast_cli.forecast.candidates import CANDIDATES, FORECAST, REFERENCE, baselines
from farcast_cli.io.resume import Resume
from farcast_cli.model.fit import FitInfo

SCHEMA_VERSION = 1
REPORT_FILE = "farcast_report.json"
SKILL = "skill_vs_"
BEATS = "beats_"


@dataclass(frozen=True)
class MethodError:
    mae: float
    rmse: float


@dataclass(frozen=True)
class ErrorTable:
    """One tensor's (or all tensors') backtest errors: each candidate's by key, and the forecast's skill
    against each alternative, 1 - MAE(forecast) / MAE(alternative), None where that MAE is 0. In JSON,
    flat: `numel`, then each candidate's {mae, rmse} under its key, then `skill_vs_<key>`."""

    numel: int
    errors: dict[str, MethodError]
    skills: dict[str, float | None]

    def to_json(self) -> dict:
        errors = {key: asdict(error) for key, error in self.errors.items()}
        return {"numel": self.numel, **errors, **{SKILL + key: value for key, value in self.skills.items()}}

    @classmethod
    def from_json(cls, data: dict) -> ErrorTable:
        errors = {key: MethodError(**value) for key, value in data.items() if isinstance(value, dict)}
        skills = {key.removeprefix(SKILL): value for key, value in data.items() if key.startswith(SKILL)}
        return cls(data["numel"], errors, skills)


@dataclass(frozen=True)
class BacktestPlan:
    """The backtest forecast target_step from first_step and last_step; the line ran through line_from_step."""

    first_step: int
    line_from_step: int
    last_step: int
    target_step: float


@dataclass
class Backtest:
    scope: str
    plan: BacktestPlan
    tensors: dict[str, ErrorTable]
    overall: ErrorTable

    def to_json(self) -> dict:
        tensors = {name: table.to_json() for name, table in self.tensors.items()}
        return {"scope": self.scope, "plan": asdict(self.plan), "tensors": tensors, "overall": self.overall.to_json()}

    @classmethod
    def from_json(cls, data: dict) -> Backtest:
        tensors = {name: ErrorTable.from_json(table) for name, table in data["tensors"].items()}
        return cls(data["scope"], BacktestPlan(**data["plan"]), tensors, ErrorTable.from_json(data["overall"]))


@dataclass(frozen=True)
class Written:
    """What predict wrote: which candidate, from which checkpoints, and why."""

    method: str
    label: str
    from_steps: list[int]
    why: str


@dataclass(frozen=True)
class Context:
    """The checkpoints the forecast starts from: the first one and the last (the context end)."""

    first_step: int
    last_step: int


@dataclass(frozen=True)
class FittedMap:
    """The forecaster as the report shows it: its anchor, the shared map (weight: 1 + anchor inputs x
    the forecast steps; bias), the per-tensor maps ([weight, bias] by tensor) and how it was fitted."""

    anchor: int
    weight: list[list[float]]
    bias: list[float]
    per_tensor: dict[str, list]
    fit: FitInfo

    def to_json(self) -> dict:
        return {**asdict(self), "fit": self.fit.to_json()}

    @classmethod
    def from_json(cls, data: dict) -> FittedMap:
        return cls(**{**data, "fit": FitInfo.from_json(data["fit"])})


@dataclass
class Report:
    command: str
    run: str
    layout: str
    steps: list[int]
    mode: str
    context: Context
    horizon: int
    target_steps: list[int]
    forecaster: FittedMap
    backtest: Backtest | None
    backtest_unavailable: str | None
    loss: LossBacktest | None
    loss_unavailable: str | None
    criterion: str
    tested: bool | None
    skills: dict[str, float | None]
    steps_saved: float | None
    beats: dict[str, bool | None]
    best: str | None
    verdict: str
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    skipped_checkpoints: list[dict] = field(default_factory=list)
    written: Written | None = None
    written_loss: float | None = None
    last_checkpoint_loss: float | None = None
    resume: Resume | None = None
    trajectories: list[dict] = field(default_factory=list)
    output: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    farcast_version: str = __version__

    def to_json(self) -> dict:
        """The JSON report: the fields in order, `skills` and `beats` flat as `skill_vs_<key>` and
        `beats_<key>` for each alternative (forecast/candidates.py)."""
        data = {}
        for key, value in asdict(self).items():
            if key == "skills":
                data.update({SKILL + candidate: skill for candidate, skill in value.items()})
            elif key == "beats":
                data.update({BEATS + candidate: beats for candidate, beats in value.items()})
            else:
                data[key] = value
        data["backtest"] = None if self.backtest is None else self.backtest.to_json()
        data["forecaster"] = self.forecaster.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict) -> Report:
        """The report back from its JSON (a farcast_report.json, --json, a forecaster file's report)."""
        fields = {key: value for key, value in data.items() if not key.startswith((SKILL, BEATS))}
        fields["skills"] = {key.removeprefix(SKILL): value for key, value in data.items() if key.startswith(SKILL)}
        fields["beats"] = {key.removeprefix(BEATS): value for key, value in data.items() if key.startswith(BEATS)}
        fields["context"] = Context(**data["context"])
        fields["forecaster"] = FittedMap.from_json(data["forecaster"])
        fields["backtest"] = Backtest.from_json(data["backtest"]) if data.get("backtest") else None
        fields["loss"] = LossBacktest.from_json(data["loss"]) if data.get("loss") else None
        fields["written"] = Written(**data["written"]) if data.get("written") else None
        fields["resume"] = Resume(**data["resume"]) if data.get("resume") else None
        return cls(**fields)


@dataclass(frozen=True)
class LeftOut:
    """A file an output does not copy from the last checkpoint, and why."""

    name: str
    why: str


@dataclass(frozen=True)
class ListedCheckpoint:
    step: int
    saved_step: int
    path: str
    files: list[str]
    bytes: int


@dataclass(frozen=True)
class SeenForecast:
    """A forecast farcast wrote inside the run: not history."""

    saved_step: int
    path: str


@dataclass(frozen=True)
class SeenJump:
    """A jump farcast made in the training loop."""

    at_step: int
    horizon: int


@dataclass(frozen=True)
class Inspection:
    """What `farcast inspect` found (`inspect --json`, in field order): the checkpoints, tensors,
    parameters and bytes of a run, what an output copies and leaves out, and for a distributed
    checkpoint its files and chunks (io/dcp.py, describe_dcp)."""

    run: str
    layout: str
    steps: list[int]
    steps_summary: str
    checkpoints: list[ListedCheckpoint]
    forecasts: list[SeenForecast]
    jumps: list[SeenJump]
    copied_files: list[str]
    left_out_files: list[LeftOut]
    tensors: int
    forecast_tensors: int
    copied_dtypes: list[str]
    parameters: int
    forecast_parameters: int
    dtypes: list[str]
    bytes_per_checkpoint: int
    total_bytes: int
    max_horizon: int
    skipped_checkpoints: list[dict]
    warnings: list[str]
    distributed: dict | None

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Read:
    """Checkpoints read whole for a pass, and their bytes."""

    checkpoints: list[int]
    bytes: int


@dataclass(frozen=True)
class BacktestRead:
    """What the weight backtest would read: checkpoints whole (`read`), the sampled coordinates only,
    or nothing and why (`unavailable`)."""

    read: Read | None = None
    unavailable: str | None = None

    def to_json(self) -> dict:
        if self.unavailable is not None:
            return {"unavailable": self.unavailable}
        return {"sampled coordinates only": True, "bytes": 0} if self.read is None else asdict(self.read)


@dataclass(frozen=True)
class MemoryPlan:
    max_memory: int
    chunk_elements: int
    read_buffers_bytes: int
    scratch_bytes: int


@dataclass(frozen=True)
class Plan:
    """What `predict --dry-run` would read and write, and its memory (`--dry-run --json`): the forecast's
    inputs, and when fitting the sample (`sample_coordinates` from each checkpoint) and the backtest."""

    run: str
    steps: list[int]
    device: str
    forecast_read: Read
    sample_coordinates: int | None
    backtest_read: BacktestRead | None
    folder: str
    written_steps: list[int]
    written_bytes: int
    copied_files: list[str]
    left_out_files: list[LeftOut]
    memory: MemoryPlan

    def to_json(self) -> dict:
        reads: dict = {"forecast": asdict(self.forecast_read)}
        if self.sample_coordinates is not None:
            reads["sample"] = {"coordinates": self.sample_coordinates, "checkpoints": len(self.steps)}
        if self.backtest_read is not None:
            reads["backtest"] = self.backtest_read.to_json()
        return {
            "run": self.run,
            "steps": self.steps,
            "device": self.device,
            "reads": reads,
            "writes": {"folder": self.folder, "checkpoints": self.written_steps, "bytes": self.written_bytes},
            "copied_files": self.copied_files,
            "left_out_files": [asdict(left) for left in self.left_out_files],
            "memory": asdict(self.memory),
        }


TESTED_FRACTION = 0.5
WEIGHT_CAVEAT = (
    "This backtest measures weight error, not your loss: on the benchmark workloads a lower weight error went with a "
    f"lower validation loss on some runs and not on others (benchmarks/RESULTS.md); give {parameter('evaluation')} to decide by your loss."
)


def best_method(backtest: Backtest, line_tested: bool = True) -> str:
    """The candidate with the lowest backtest MAE (the forecast wins ties), an extrapolating one (the
    straight line) only where the backtest extrapolated it as far as the jump asked for
    (forecast/candidates.py, line_tested)."""
    errors = backtest.overall.errors
    keys = [key for key in errors if line_tested or not _extrapolates(key)]
    return min(keys, key=lambda key: (errors[key].mae, key != FORECAST.key))


def name_of(key: str) -> str:
    """A candidate's name in prose ("a straight line"); its key where it is not registered."""
    return CANDIDATES[key].name if key in CANDIDATES else key


def _extrapolates(key: str) -> bool:
    return key in CANDIDATES and CANDIDATES[key].extrapolates


def tested(plan: BacktestPlan | None, horizon: int) -> bool | None:
    """Whether the backtest's jump is long enough to speak for the one asked: at least TESTED_FRACTION of it."""
    return None if plan is None else plan.target_step - plan.last_step >= TESTED_FRACTION * horizon


def headline(backtest: Backtest | None, unavailable: str | None, loss: LossBacktest | None, horizon: int, line_tested: bool = True) -> dict:
    """The headline fields, by the user's loss when there is a loss backtest, else by weight error."""
    nothing = {candidate.key: None for candidate in baselines()}
    result: dict = {"skills": dict(nothing), "beats": dict(nothing)}
    result.update({"criterion": "validation loss" if loss else "weight error", "steps_saved": None, "best": None})
    if backtest is not None:
        result["skills"] = dict(backtest.overall.skills)
    if backtest is None and loss is None:
        result["tested"] = None
        result["verdict"] = (
            f"UNVERIFIED: no backtest was possible ({unavailable}). Nothing shows this forecast beats keeping the last checkpoint."
        )
        return result
    plan = backtest.plan if backtest else BacktestPlan(0, 0, loss.cut_step, loss.target_step)
    result["tested"] = tested(plan, horizon)
    if loss is not None:
        result.update(_loss_verdict(loss))
    else:
        result.update(_weight_verdict(backtest, line_tested))
    if not result["tested"]:
        jump = plan.target_step - plan.last_step
        result["beats"] = dict.fromkeys(result["beats"])
        result["verdict"] = (
            f"UNTESTED at this size: the history can test a jump of only {jump:g} steps (from step {plan.last_step} to "
            f"{plan.target_step:g}), under half the {horizon} asked, so nothing shows a jump of {horizon} helps. "
            f"On the {jump:g}-step jump: {result['verdict']}"
        )
    return result


def _weight_verdict(backtest: Backtest, line_tested: bool) -> dict:
    skills = backtest.overall.skills
    beats = {key: s is not None and s > 0 for key, s in skills.items()}
    target = backtest.plan.target_step
    if not beats[REFERENCE]:
        s = skills[REFERENCE] or 0.0
        words = (
            f"The forecast does NOT beat keeping the last checkpoint: in the backtest its weight error at step {target:g} was "
            f"{_percent(s)} {'higher' if s < 0 else 'no lower'}. Keeping your last checkpoint is the better estimate."
        )
    else:
        parts = [f"In weight error, the forecast beats keeping the last checkpoint by {_percent(skills[REFERENCE])}"]
        for key in [key for key in skills if key != REFERENCE]:
            s = skills[key] or 0.0
            parts.append(f"{name_of(key)} by {_percent(s)}" if beats[key] else f"but NOT {name_of(key)} (error {_percent(s)} higher)")
        words = ", ".join(parts) + " (backtest MAE)."
    return {"beats": beats, "best": best_method(backtest, line_tested), "verdict": f"{words} {named(WEIGHT_CAVEAT)}"}


def _loss_verdict(loss: LossBacktest) -> dict:
    forecast, chosen = loss.best_forecast, loss.chosen
    where = f"in the backtest from step {loss.cut_step} to {loss.target_step}"
    result: dict = {"best": chosen.method, "steps_saved": None if forecast is None else forecast.steps_saved}
    alternatives = [point.method for point in loss.points if point.method != FORECAST.key]
    if forecast is None:
        result["beats"] = dict.fromkeys(alternatives)
        result["verdict"] = f"By your loss, {where}, {chosen.label} did best; no forecast could be fitted at the cut."
        return result
    result["beats"] = {key: forecast.loss < loss.point(key).loss - (loss.noise if key == REFERENCE else 0.0) for key in alternatives}
    tried = sum(p.method == FORECAST.key for p in loss.points)
    jitter = f"the run's own jitter of {format_loss(loss.noise)} from checkpoint to checkpoint"
    figure = (
        f"saving {forecast.steps_saved:+.2f} of the jump (loss {format_loss(forecast.loss)}, "
        f"the best of {tried} forecasts tried there, so optimistic)"
    )
    if chosen.method == FORECAST.key:
        others = ", ".join(f"{name_of(key)} {loss.point(key).steps_saved:+.2f}" for key in alternatives)
        result["verdict"] = f"By your loss, {where}, the {forecast.label} beats keeping the last checkpoint, {figure}; {others}."
    elif chosen.method == REFERENCE:
        margin = f", a margin within {jitter}" if forecast.loss < chosen.loss else ""
        result["verdict"] = (
            f"By your loss, {where}, the forecast does NOT beat keeping the last checkpoint: its best, the {forecast.label}, "
            f"scored {forecast.steps_saved:+.2f} of the jump (loss {format_loss(forecast.loss)} against "
            f"{format_loss(chosen.loss)}{margin}). Keeping your last checkpoint is the better choice."
        )
    else:
        result["verdict"] = (
            f"By your loss, {where}, {name_of(chosen.method)} did best ({chosen.steps_saved:+.2f} of the jump, loss "
            f"{format_loss(chosen.loss)}); the best forecast, the {forecast.label}, scored {forecast.steps_saved:+.2f} "
            f"(loss {format_loss(forecast.loss)}, the best of {tried} tried there)."
        )
    return result


def _percent(skill: float) -> str:
    return f"{abs(skill) * 100:.1f}%"

"""The report: what was forecast, how well each candidate did in the backtest, and the verdict in words.

These dataclasses are the one definition of the JSON report (`--json`, and farcast_report.json in every
output); the README's "The JSON report" documents it. SCHEMA_VERSION changes when a key changes meaning
or goes away; new keys may appear within a version.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from farcast_cli import __version__
from farcast_cli.evaluate.evaluator import format_loss
from farcast_cli.evaluate.loss import LossBacktest
from farcast_cli.forecast.candidates import BASELINES, METHODS
from farcast_cli.io.resume import Resume

SCHEMA_VERSION = 1
REPORT_FILE = "farcast_report.json"
NAMES = {
    "forecast": "the forecast",
    "last": "keeping the last checkpoint",
    "line": "a straight line",
    "lawa": "averaging the last checkpoints",
}
WRITTEN_NAMES = {
    "last": "the last checkpoint, unchanged",
    "line": "the straight line through the last two checkpoints",
    "lawa": "the average of the last checkpoints",
}


@dataclass(frozen=True)
class MethodError:
    mae: float
    rmse: float


@dataclass(frozen=True)
class ErrorTable:
    """One tensor's (or all tensors') backtest errors: each candidate's, and the forecast's skill
    against each alternative, 1 - MAE(forecast) / MAE(alternative), None where that MAE is 0."""

    numel: int
    forecast: MethodError
    last: MethodError
    line: MethodError
    lawa: MethodError
    skill_vs_last: float | None
    skill_vs_line: float | None
    skill_vs_lawa: float | None

    @classmethod
    def from_json(cls, data: dict) -> ErrorTable:
        methods = {m: MethodError(**data[m]) for m in METHODS}
        return cls(numel=data["numel"], **methods, **{f"skill_vs_{b}": data[f"skill_vs_{b}"] for b in BASELINES})


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


@dataclass
class Report:
    command: str
    run: str
    layout: str
    steps: list[int]
    mode: str
    context: dict
    horizon: int
    target_steps: list[int]
    forecaster: dict
    backtest: Backtest | None
    backtest_unavailable: str | None
    loss: LossBacktest | None
    loss_unavailable: str | None
    criterion: str
    tested: bool | None
    skill_vs_last: float | None
    skill_vs_line: float | None
    skill_vs_lawa: float | None
    steps_saved: float | None
    beats_last: bool | None
    beats_line: bool | None
    beats_lawa: bool | None
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
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Report:
        """The report back from its JSON (a farcast_report.json, --json, a forecaster file's report)."""
        fields = dict(data)
        fields["backtest"] = Backtest.from_json(data["backtest"]) if data.get("backtest") else None
        fields["loss"] = LossBacktest.from_json(data["loss"]) if data.get("loss") else None
        fields["written"] = Written(**data["written"]) if data.get("written") else None
        fields["resume"] = Resume(**data["resume"]) if data.get("resume") else None
        return cls(**fields)


TESTED_FRACTION = 0.5
WEIGHT_CAVEAT = (
    "This backtest measures weight error, not your loss: on the benchmark workloads a lower weight error went with a "
    "lower validation loss on some runs and not on others (benchmarks/RESULTS.md); give --eval-cmd to decide by your loss."
)


def best_method(backtest: Backtest, line_tested: bool = True) -> str:
    """The candidate with the lowest backtest MAE (the forecast wins ties), the straight line only where
    the backtest extrapolated it as far as the jump asked for (forecast/candidates.py, line_tested)."""
    overall = backtest.overall
    methods = [m for m in METHODS if line_tested or m != "line"]
    return min(methods, key=lambda method: (getattr(overall, method).mae, method != "forecast"))


def tested(plan: BacktestPlan | None, horizon: int) -> bool | None:
    """Whether the backtest's jump is long enough to speak for the one asked: at least TESTED_FRACTION of it."""
    return None if plan is None else plan.target_step - plan.last_step >= TESTED_FRACTION * horizon


def headline(backtest: Backtest | None, unavailable: str | None, loss: LossBacktest | None, horizon: int, line_tested: bool = True) -> dict:
    """The headline fields, by the user's loss when there is a loss backtest, else by weight error."""
    result: dict = {f"skill_vs_{b}": None for b in BASELINES} | {f"beats_{b}": None for b in BASELINES}
    result.update({"criterion": "validation loss" if loss else "weight error", "steps_saved": None, "best": None})
    if backtest is not None:
        result.update({f"skill_vs_{b}": getattr(backtest.overall, f"skill_vs_{b}") for b in BASELINES})
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
        result.update({f"beats_{b}": None for b in BASELINES})
        result["verdict"] = (
            f"UNTESTED at this size: the history can test a jump of only {jump:g} steps (from step {plan.last_step} to "
            f"{plan.target_step:g}), under half the {horizon} asked, so nothing shows a jump of {horizon} helps. "
            f"On the {jump:g}-step jump: {result['verdict']}"
        )
    return result


def _weight_verdict(backtest: Backtest, line_tested: bool) -> dict:
    overall = backtest.overall
    skills = {b: getattr(overall, f"skill_vs_{b}") for b in BASELINES}
    beats = {b: s is not None and s > 0 for b, s in skills.items()}
    target = backtest.plan.target_step
    if not beats["last"]:
        s = skills["last"] or 0.0
        words = (
            f"The forecast does NOT beat keeping the last checkpoint: in the backtest its weight error at step {target:g} was "
            f"{_percent(s)} {'higher' if s < 0 else 'no lower'}. Keeping your last checkpoint is the better estimate."
        )
    else:
        parts = [f"In weight error, the forecast beats keeping the last checkpoint by {_percent(skills['last'])}"]
        for baseline in ("line", "lawa"):
            s = skills[baseline] or 0.0
            parts.append(
                f"{NAMES[baseline]} by {_percent(s)}" if beats[baseline] else f"but NOT {NAMES[baseline]} (error {_percent(s)} higher)"
            )
        words = ", ".join(parts) + " (backtest MAE)."
    return {f"beats_{b}": v for b, v in beats.items()} | {"best": best_method(backtest, line_tested), "verdict": f"{words} {WEIGHT_CAVEAT}"}


def _loss_verdict(loss: LossBacktest) -> dict:
    forecast, chosen = loss.best_forecast, loss.chosen
    where = f"in the backtest from step {loss.cut_step} to {loss.target_step}"
    result: dict = {"best": chosen.method, "steps_saved": None if forecast is None else forecast.steps_saved}
    if forecast is None:
        result.update({f"beats_{b}": None for b in BASELINES})
        result["verdict"] = f"By your loss, {where}, {chosen.label} did best; no forecast could be fitted at the cut."
        return result
    result["beats_last"] = forecast.loss < loss.point("last").loss - loss.noise
    result.update({f"beats_{b}": forecast.loss < loss.point(b).loss for b in ("line", "lawa")})
    tried = sum(p.method == "forecast" for p in loss.points)
    jitter = f"the run's own jitter of {format_loss(loss.noise)} from checkpoint to checkpoint"
    figure = (
        f"saving {forecast.steps_saved:+.2f} of the jump (loss {format_loss(forecast.loss)}, "
        f"the best of {tried} forecasts tried there, so optimistic)"
    )
    if chosen.method == "forecast":
        others = ", ".join(f"{NAMES[b]} {loss.point(b).steps_saved:+.2f}" for b in BASELINES)
        result["verdict"] = f"By your loss, {where}, the {forecast.label} beats keeping the last checkpoint, {figure}; {others}."
    elif chosen.method == "last":
        margin = f", a margin within {jitter}" if forecast.loss < chosen.loss else ""
        result["verdict"] = (
            f"By your loss, {where}, the forecast does NOT beat keeping the last checkpoint: its best, the {forecast.label}, "
            f"scored {forecast.steps_saved:+.2f} of the jump (loss {format_loss(forecast.loss)} against "
            f"{format_loss(chosen.loss)}{margin}). Keeping your last checkpoint is the better choice."
        )
    else:
        result["verdict"] = (
            f"By your loss, {where}, {NAMES[chosen.method]} did best ({chosen.steps_saved:+.2f} of the jump, loss "
            f"{format_loss(chosen.loss)}); the best forecast, the {forecast.label}, scored {forecast.steps_saved:+.2f} "
            f"(loss {format_loss(forecast.loss)}, the best of {tried} tried there)."
        )
    return result


def _percent(skill: float) -> str:
    return f"{abs(skill) * 100:.1f}%"

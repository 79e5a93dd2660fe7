"""The report: what was forecast, how well each candidate did in the backtest, and the verdict in words.

These dataclasses are the one definition of the JSON report (`--json`, and farcast_report.json in every
output); the README's "The JSON report" documents it. SCHEMA_VERSION changes when a key changes meaning
or goes away; new keys may appear within a version.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from farcast_cli import __version__
from farcast_cli.forecast.candidates import BASELINES, METHODS

SCHEMA_VERSION = 1
REPORT_FILE = "farcast_report.json"
NAMES = {
    "forecast": "the forecast",
    "last": "keeping the last checkpoint",
    "line": "a straight line",
    "lawa": "averaging the last checkpoints",
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
    eval: dict | None = None

    @classmethod
    def from_json(cls, data: dict) -> Backtest:
        tensors = {name: ErrorTable.from_json(table) for name, table in data["tensors"].items()}
        return cls(data["scope"], BacktestPlan(**data["plan"]), tensors, ErrorTable.from_json(data["overall"]), data.get("eval"))


@dataclass(frozen=True)
class Written:
    """What predict wrote when it was not the forecast: the candidate and why."""

    method: str
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
    skill_vs_last: float | None
    skill_vs_line: float | None
    skill_vs_lawa: float | None
    beats_last: bool | None
    beats_line: bool | None
    beats_lawa: bool | None
    best: str | None
    verdict: str
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    written: Written | None = None
    written_loss: float | None = None
    last_checkpoint_loss: float | None = None
    output: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    farcast_version: str = __version__

    def to_json(self) -> dict:
        return asdict(self)


def best_method(backtest: Backtest) -> str:
    """The candidate with the lowest backtest MAE; the forecast wins ties."""
    overall = backtest.overall
    return min(METHODS, key=lambda method: (getattr(overall, method).mae, method != "forecast"))


def verdict(backtest: Backtest | None, unavailable: str | None) -> dict:
    """The headline fields: does the forecast beat keeping the last checkpoint, a straight line, an average?"""
    if backtest is None:
        return {
            "skill_vs_last": None,
            "skill_vs_line": None,
            "skill_vs_lawa": None,
            "beats_last": None,
            "beats_line": None,
            "beats_lawa": None,
            "best": None,
            "verdict": f"UNVERIFIED: no backtest was possible ({unavailable}). "
            "Nothing shows this forecast beats keeping the last checkpoint.",
        }
    overall = backtest.overall
    skills = {b: getattr(overall, f"skill_vs_{b}") for b in BASELINES}
    beats = {b: s is not None and s > 0 for b, s in skills.items()}
    target = backtest.plan.target_step
    if not beats["last"]:
        s = skills["last"] or 0.0
        words = (
            f"The forecast does NOT beat keeping the last checkpoint: in the backtest its error at step {target:g} was "
            f"{_percent(s)} {'higher' if s < 0 else 'no lower'}. Keeping your last checkpoint is the better estimate."
        )
    else:
        parts = [f"The forecast beats keeping the last checkpoint by {_percent(skills['last'])}"]
        for baseline in ("line", "lawa"):
            s = skills[baseline] or 0.0
            parts.append(
                f"{NAMES[baseline]} by {_percent(s)}" if beats[baseline] else f"but NOT {NAMES[baseline]} (error {_percent(s)} higher)"
            )
        words = ", ".join(parts) + " (backtest MAE)."
    result: dict = {f"skill_vs_{b}": s for b, s in skills.items()}
    result.update({f"beats_{b}": v for b, v in beats.items()})
    result.update({"best": best_method(backtest), "verdict": words})
    return result


def _percent(skill: float) -> str:
    return f"{abs(skill) * 100:.1f}%"

"""A jump made in memory: fit from the observed history (model/observed.py) with the fit `farcast
predict` uses, gate it, and apply it to the model in place, one tensor at a time.

The jump is the forecaster's map per tensor, `a * w_first + c * w_now + b`, computed as the written
forecast is computed (model/linear.py, in float32, float64 for float64 tensors) in one tensor's scratch
on the model's device; the same inputs give the same bits `farcast predict` writes. Where the jump must
be verified by the user's loss, each tensor's weights are copied to the CPU before it changes, so that a
losing jump is undone exactly.

Under torch.distributed (DDP: a process group with more than one rank), rank 0 observes, fits,
decides and jumps, and sends its weights to every rank after a jump it keeps: every rank ends with
identical weights, and only rank 0 keeps a history or calls the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from farcast_cli.evaluate.report import BacktestPlan, tested
from farcast_cli.model.fit import FitSettings
from farcast_cli.model.forecaster import SHRINK_GRID, Forecaster, SelfFit, fit_on_run, kept_column_sums
from farcast_cli.model.observed import ObservedRun, distinct, forecast_tensors

REUSE_SHRINK = 0.75
"""The weight verdict's trial is shrunk by the last fit's factor where that fit saw at least this share
of the observations: on the digits MLP and the CNN every 50/75 steps it is most jumps after the first
few; at the 0.5 x-elapsed rhythm only the last. Taken for every jump, the factor chosen on half the
history refused one of the CNN's jumps in twelve that the verdict made otherwise."""


@dataclass(frozen=True)
class WeightVerdict:
    """The weight backtest on the sampled coordinates: the held-out fit's skill against keeping the
    last checkpoint (1 - MAE ratio; above 0 beats it), and whether its jump was long enough to speak
    for the one asked (evaluate/report.py's `tested`)."""

    skill: float | None
    tested: bool | None

    @property
    def beats_last(self) -> bool:
        return self.skill is not None and self.skill > 0


@dataclass(frozen=True)
class KeptFit:
    """A fit the Farcaster may reuse (`fit_share`): its forecaster, the observations it saw, and the weight
    gate's verdict on its jump and the reason (True and empty where `loss_fn` decides, True without a
    gate)."""

    forecaster: Forecaster
    observations: int
    why: str
    verdict: bool


def fit_in_memory(observed: ObservedRun, horizon: int, settings: FitSettings, scored: bool = True) -> SelfFit:
    """The fit `farcast predict` makes on the same history: on the run itself, one forecast `horizon` on;
    without the backtest's scored trial where `scored` is False: a jump verified by the user's loss, or
    not gated, needs no weight verdict. The scored trial is shrunk by a factor chosen without the newest
    checkpoint, which the verdict scores: `farcast predict` chooses it from another trial, fitted on the
    history up to the scored trial's cut; here, while the history has grown by at most a third since
    the last fit with a trial (REUSE_SHRINK), that fit's factor is taken instead: one fit of three
    fewer a jump (benchmarks/RESULTS.md, "A jump's own cost, fifth session"). The closed form's column
    sums are kept on `observed` for the next jump, as is the shrink choice's working array (31 floats a
    sampled coordinate), and its held-out L1 (a figure for reports) is not measured."""
    history = observed.history()
    sums = kept_column_sums(observed.sums, history, settings) if settings.objective == "l2" else None
    chosen = observed.shrink
    reused = chosen[0] if chosen is not None and chosen[1] >= REUSE_SHRINK * len(observed) else None
    if observed.shrink_scratch is None:
        observed.shrink_scratch = np.empty((len(SHRINK_GRID), len(history.values)))
    fitted = fit_on_run(
        history, horizon, [horizon], settings, scored=scored, sums=sums, scored_shrink=reused, shrink_scratch=observed.shrink_scratch
    )
    if fitted.trial is not None:
        observed.shrink = (fitted.forecaster.shrink, len(observed))
    return fitted


def weight_verdict(observed: ObservedRun, fitted: SelfFit, horizon: int) -> WeightVerdict:
    """As `farcast predict --backtest sample` scores the forecast against keeping the last checkpoint."""
    if fitted.scored is None:
        return WeightVerdict(None, None)
    history = observed.history()
    scored = fitted.scored
    cut = history.column(scored.context_end)
    truth = history.values[:, -1]
    forecast_error = np.abs(scored.on_history(history, cut, 0) - truth).mean()
    last_error = np.abs(history.values[:, cut] - truth).mean()
    skill = None if last_error == 0 else float(1.0 - forecast_error / last_error)
    plan = BacktestPlan(int(history.steps[0]), int(history.steps[cut - 1]), int(history.steps[cut]), float(history.steps[-1]))
    return WeightVerdict(skill, tested(plan, horizon))


def apply_jump(
    model: torch.nn.Module, observed: ObservedRun, forecaster: Forecaster, backup: dict[str, torch.Tensor] | None = None
) -> None:
    """Replace the model's forecast tensors by the forecast, in place; with `backup`, copy each
    tensor's weights there (on the CPU) before it changes."""
    with torch.no_grad():
        for name, tensor in distinct(forecast_tensors(model.state_dict())).items():
            if backup is not None:
                backup[name] = tensor.to("cpu", copy=True)
            compute = torch.float64 if tensor.dtype == torch.float64 else torch.float32
            scratch = observed.first[name].to(tensor.device, compute, copy=True)
            tensor.copy_(forecaster.map_for(name).apply([scratch, tensor], 0, out=scratch))


def restore(model: torch.nn.Module, backup: dict[str, torch.Tensor]) -> None:
    """Put back, bit for bit, the weights `apply_jump` copied."""
    state = model.state_dict()
    with torch.no_grad():
        for name, saved in backup.items():
            state[name].copy_(saved)


def world() -> tuple[int, int]:
    """(rank, ranks) of torch.distributed's default group; (0, 1) outside one."""
    distributed = torch.distributed
    if distributed.is_available() and distributed.is_initialized():
        return distributed.get_rank(), distributed.get_world_size()
    return 0, 1


def from_rank_zero(value):
    """Rank 0's `value` on every rank."""
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def share_weights(model: torch.nn.Module) -> None:
    """Rank 0's forecast tensors copied into every rank's model, in place, tensor by tensor."""
    with torch.no_grad():
        for tensor in distinct(forecast_tensors(model.state_dict())).values():
            torch.distributed.broadcast(tensor, src=0)

"""The forecaster: one linear layer shared by every weight, y = first * A[0] + last * A[1] + b.

Fitted with the L1 loss plus the first-order-optimality regulariser of PAPER.md, by Adam with early
stopping on held-out coordinates. Internally the layer is written as
    y = last + s * (p * last / s_last + q * (last - first) / s_change + c)
with p = q = c = 0 at the start (the "keep the last checkpoint" forecast) and each input scaled to
unit size. That is the same 3m-parameter linear map, only better conditioned for Adam, because the
two raw inputs are nearly equal and so nearly collinear.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from farcast_cli import __version__
from farcast_cli.errors import InputError, OutputError
from farcast_cli.model.pairs import Pairs

FORMAT = "farcast-forecaster/1"


@dataclass(frozen=True)
class FitSettings:
    sample: int = 8192
    seed: int = 0
    lam: float = 1e-5
    lr: float = 1e-2
    batch_size: int = 256
    max_epochs: int = 100
    patience: int = 5
    validation_fraction: float = 0.2
    shrink: float | None = None
    per_tensor: bool = True


@dataclass
class Forecaster:
    """A fitted forecaster with everything needed to apply it again."""

    mode: str
    first_step: int
    context_end: int
    offsets: list[int]
    weight: list[list[float]]
    bias: list[float]
    settings: dict
    fit_info: dict = field(default_factory=dict)
    report: dict | None = None
    version: str = __version__
    per_tensor: dict[str, list] = field(default_factory=dict)

    @property
    def horizon(self) -> int:
        return self.offsets[-1]

    @property
    def target_steps(self) -> list[int]:
        return [self.context_end + o for o in self.offsets]

    def coefficients(self, name: str | None = None) -> tuple[list[list[float]], list[float]]:
        """(A, b) for a tensor: its own where it was fitted per tensor, else the shared ones."""
        if name is not None and name in self.per_tensor:
            weight, bias = self.per_tensor[name]
            return weight, bias
        return self.weight, self.bias

    def apply(self, first: torch.Tensor, last: torch.Tensor, output: int, out: torch.Tensor | None = None, name: str | None = None) -> torch.Tensor:
        """Forecast output number `output` of tensor `name` from its first and last context values, into `out` if given."""
        weight, bias = self.coefficients(name)
        out = torch.mul(last, weight[1][output], out=out)
        out.add_(first, alpha=weight[0][output])
        return out.add_(bias[output])

    def shrunk(self, alpha: float) -> Forecaster:
        """The forecast moved towards the last checkpoint: last + alpha * (forecast - last), still linear."""
        weight, bias = _shrink(self.weight, self.bias, alpha)
        per_tensor = {name: list(_shrink(w, b, alpha)) for name, (w, b) in self.per_tensor.items()}
        return replace(self, weight=weight, bias=bias, per_tensor=per_tensor, fit_info={**self.fit_info, "shrink": alpha})

    def save(self, path: Path) -> None:
        data = {"format": FORMAT, **asdict(self)}
        temporary = Path(path).with_name(f".{Path(path).name}.tmp")
        try:
            temporary.write_text(json.dumps(data, indent=1))
            temporary.replace(path)
        except OSError as error:
            temporary.unlink(missing_ok=True)
            raise OutputError(f"{path}: cannot write: {error.strerror}") from None

    @classmethod
    def load(cls, path: Path) -> Forecaster:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise InputError(f"{path}: cannot read a forecaster: {error}") from None
        if not isinstance(data, dict) or data.pop("format", None) != FORMAT:
            raise InputError(f"{path}: not a farcast forecaster file (expected format {FORMAT})")
        try:
            return cls(**data)
        except TypeError as error:
            raise InputError(f"{path}: forecaster file is incomplete or from another version ({error})") from None


def _shrink(weight: list[list[float]], bias: list[float], alpha: float) -> tuple[list[list[float]], list[float]]:
    return [[alpha * a for a in weight[0]], [alpha * a + (1.0 - alpha) for a in weight[1]]], [alpha * b for b in bias]


def _split_coordinates(pairs: Pairs, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out whole coordinates, so validation measures generalisation to unseen weights."""
    coordinates = np.unique(pairs.coordinate)
    rng = np.random.default_rng(seed + 1)
    held = rng.permutation(coordinates)[: max(1, int(round(len(coordinates) * fraction)))]
    is_held = np.isin(pairs.coordinate, held)
    if is_held.all():
        return np.nonzero(is_held)[0], np.nonzero(is_held)[0]
    return np.nonzero(~is_held)[0], np.nonzero(is_held)[0]


def _scale(values: np.ndarray) -> float:
    scale = float(np.mean(np.abs(values)))
    return scale if scale > 0 else 1.0


class _Adam:
    """Adam (torch's defaults, betas 0.9/0.999, eps 1e-8) on the three coefficient vectors.

    Written out because these are 3m numbers: torch.optim's first use imports torch._dynamo
    (1.3 s measured), more than the whole fit costs."""

    def __init__(self, parameters: np.ndarray, lr: float) -> None:
        self.parameters, self.lr, self.t = parameters, lr, 0
        self.m, self.v = np.zeros_like(parameters), np.zeros_like(parameters)

    def step(self, gradient: np.ndarray) -> None:
        self.t += 1
        self.m = 0.9 * self.m + 0.1 * gradient
        self.v = 0.999 * self.v + 0.001 * gradient * gradient
        denominator = np.sqrt(self.v) / np.sqrt(1 - 0.999**self.t) + 1e-8
        self.parameters -= (self.lr / (1 - 0.9**self.t)) * self.m / denominator


def fit_coefficients(pairs: Pairs, settings: FitSettings) -> tuple[list[list[float]], list[float], dict]:
    """Fit A (2 x m) and b (m) by Adam on L1 + lam * L_grad, restoring the best validation weights."""
    train, held = _split_coordinates(pairs, settings.validation_fraction, settings.seed)
    s_level = _scale(pairs.last)
    s_change = _scale(pairs.last - pairs.first)
    s_out = _scale(pairs.targets - pairs.last[:, None])
    inputs = np.stack([pairs.last / s_level, (pairs.last - pairs.first) / s_change, np.ones(len(pairs.last))], axis=1)
    residual = (pairs.targets - pairs.last[:, None]) / s_out
    rate_bound = pairs.first_rate / s_out

    coefficients = np.zeros((3, pairs.targets.shape[1]))
    optimizer = _Adam(coefficients, settings.lr)
    generator = torch.Generator().manual_seed(settings.seed)

    def loss_and_gradient(index: np.ndarray, gradient: bool = True) -> tuple[float, np.ndarray | None]:
        x = inputs[index]
        predicted = x @ coefficients
        error = predicted - residual[index]
        before_last = predicted[:, -2] if predicted.shape[1] > 1 else 0.0
        step = predicted[:, -1] - before_last
        last_dt = pairs.last_dt[index]
        excess = np.abs(step) / last_dt - rate_bound[index]
        loss = float(np.abs(error).mean() + settings.lam * np.maximum(excess, 0.0).mean())
        if not gradient:
            return loss, None
        d_predicted = np.sign(error) / error.size
        d_step = settings.lam * (excess > 0) * np.sign(step) / last_dt / len(index)
        d_predicted[:, -1] += d_step
        if predicted.shape[1] > 1:
            d_predicted[:, -2] -= d_step
        return loss, x.T @ d_predicted

    def validation_loss() -> float:
        return loss_and_gradient(held, gradient=False)[0]

    best_loss, best, best_epoch, epoch = validation_loss(), coefficients.copy(), 0, 0
    for epoch in range(1, settings.max_epochs + 1):
        order = train[torch.randperm(len(train), generator=generator).numpy()]
        for start in range(0, len(order), settings.batch_size):
            optimizer.step(loss_and_gradient(order[start : start + settings.batch_size])[1])
        loss = validation_loss()
        if loss < best_loss:
            best_loss, best, best_epoch = loss, coefficients.copy(), epoch
        elif epoch - best_epoch >= settings.patience:
            break
    p, q, c = best
    a_first = -s_out * q / s_change
    a_last = 1.0 + s_out * (p / s_level + q / s_change)
    weight = [a_first.tolist(), a_last.tolist()]
    info = {"pairs": len(pairs.first), "held_out_pairs": len(held), "epochs": epoch, "best_epoch": best_epoch, "validation_l1": best_loss * s_out}
    return weight, (s_out * c).tolist(), info

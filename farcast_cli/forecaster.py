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
from farcast_cli.training_data import Pairs

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


class _Model(torch.nn.Module):
    def __init__(self, outputs: int) -> None:
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(outputs, dtype=torch.float64))
        self.q = torch.nn.Parameter(torch.zeros(outputs, dtype=torch.float64))
        self.c = torch.nn.Parameter(torch.zeros(outputs, dtype=torch.float64))

    def forward(self, level: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
        return level[:, None] * self.p + change[:, None] * self.q + self.c


def fit_coefficients(pairs: Pairs, settings: FitSettings) -> tuple[list[list[float]], list[float], dict]:
    """Fit A (2 x m) and b (m) by Adam on L1 + lam * L_grad, restoring the best validation weights."""
    torch.manual_seed(settings.seed)
    train, held = _split_coordinates(pairs, settings.validation_fraction, settings.seed)
    s_level = _scale(pairs.last)
    s_change = _scale(pairs.last - pairs.first)
    s_out = _scale(pairs.targets - pairs.last[:, None])
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))  # noqa: E731
    level = as_tensor(pairs.last / s_level)
    change = as_tensor((pairs.last - pairs.first) / s_change)
    residual = as_tensor((pairs.targets - pairs.last[:, None]) / s_out)
    rate_bound = as_tensor(pairs.first_rate / s_out)
    last_dt = as_tensor(pairs.last_dt)

    model = _Model(pairs.targets.shape[1])
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    generator = torch.Generator().manual_seed(settings.seed)
    train_index = torch.from_numpy(train)
    held_index = torch.from_numpy(held)

    def loss_on(index: torch.Tensor) -> torch.Tensor:
        predicted = model(level[index], change[index])
        prediction_loss = (predicted - residual[index]).abs().mean()
        before_last = predicted[:, -2] if predicted.shape[1] > 1 else torch.zeros_like(predicted[:, -1])
        last_rate = (predicted[:, -1] - before_last).abs() / last_dt[index]
        gradient_loss = torch.relu(last_rate - rate_bound[index]).mean()
        return prediction_loss + settings.lam * gradient_loss

    def validation_loss() -> float:
        with torch.no_grad():
            return float(loss_on(held_index))

    best_loss, best_state, best_epoch, epoch = validation_loss(), _snapshot(model), 0, 0
    for epoch in range(1, settings.max_epochs + 1):
        order = train_index[torch.randperm(len(train_index), generator=generator)]
        for batch in order.split(settings.batch_size):
            optimizer.zero_grad()
            loss_on(batch).backward()
            optimizer.step()
        loss = validation_loss()
        if loss < best_loss:
            best_loss, best_state, best_epoch = loss, _snapshot(model), epoch
        elif epoch - best_epoch >= settings.patience:
            break
    p, q, c = (best_state[name].numpy() for name in ("p", "q", "c"))
    a_first = -s_out * q / s_change
    a_last = 1.0 + s_out * (p / s_level + q / s_change)
    weight = [a_first.tolist(), a_last.tolist()]
    info = {"pairs": len(pairs.first), "held_out_pairs": len(held), "epochs": epoch, "best_epoch": best_epoch, "validation_l1": best_loss * s_out}
    return weight, (s_out * c).tolist(), info


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}

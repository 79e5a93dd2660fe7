"""A few weights' histories with the forecasts made of them, for the report and its plot: for the first
few sampled coordinates of the largest tensors, the value at every checkpoint, the backtest's forecast
of the last checkpoint against its true value, and the forecast ahead."""

from __future__ import annotations

from farcast_cli.model.forecaster import Forecaster
from farcast_cli.model.history import History

TENSORS = 3
COORDINATES = 3


def sampled_trajectories(history: History, sizes: dict[str, int], scored: Forecaster | None, forecaster: Forecaster) -> list[dict]:
    """One entry per coordinate: tensor, index (flat element), steps and values, backtest, forecast."""
    largest = sorted(range(len(history.tensor_names)), key=lambda i: -sizes.get(history.tensor_names[i], 0))[:TENSORS]
    last = len(history.steps) - 1
    ahead = [forecaster.on_history(history, last, output) for output in range(len(forecaster.offsets))]
    cut = None if scored is None else history.column(scored.context_end)
    backtest = None if scored is None else scored.on_history(history, cut, 0)
    entries = []
    for tensor in largest:
        for row in history.rows_of(tensor)[:COORDINATES]:
            entry = {
                "tensor": history.tensor_names[tensor],
                "index": int(row if history.indices is None else history.indices[row]),
                "steps": [int(s) for s in history.steps],
                "values": [float(v) for v in history.values[row]],
                "backtest": None,
                "forecast": {"steps": forecaster.target_steps, "values": [float(values[row]) for values in ahead]},
            }
            if backtest is not None:
                entry["backtest"] = {"from_step": int(history.steps[cut]), "target_step": int(history.steps[-1]),
                                     "forecast": float(backtest[row]), "truth": float(history.values[row, -1])}  # fmt: skip
            entries.append(entry)
    return entries

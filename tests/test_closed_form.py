"""The closed-form fit (objective "l2") from sums of the history's columns: the same maps as from the
training rows, the same whether its sums were kept from earlier fits of a shorter history or not, and the
in-loop jump made with it is what `farcast predict --objective l2` writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SHAPES, trajectories
from safetensors.torch import load_file
from test_loop import regression_data, save

from farcast_cli.integrations import Farcaster, memory
from farcast_cli.model.fit import FitSettings, fit_linear_map, fit_pair_sums, map_of
from farcast_cli.model.forecaster import _own, column_sums, fit_on_run
from farcast_cli.model.history import History
from farcast_cli.model.pairs import self_pair_sums, self_pairs

L2 = FitSettings(objective="l2", sample=2000)


def a_history(steps: list[int]) -> History:
    weights = trajectories(steps, seed=4, noise=1e-3)
    values = np.stack([torch.cat([weights[s][name].reshape(-1) for name in SHAPES]).double().numpy() for s in steps], axis=1)
    tensor_index = np.concatenate([np.full(int(np.prod(shape)), i) for i, shape in enumerate(SHAPES.values())])
    return History(np.array(steps, dtype=float), values, tensor_index, list(SHAPES))


@pytest.mark.parametrize(("anchor", "offsets"), [(1, [40]), (2, [20, 40]), (3, [40])])
def test_the_closed_form_from_column_sums_is_the_one_from_the_rows(anchor, offsets):
    history = a_history(list(range(0, 201, 10)))
    own = _own(history, L2)
    assert own == [0, 2]
    pairs = self_pairs(history, offsets[-1], offsets, anchor)
    owner = history.tensor_index[pairs.coordinate]
    shared = fit_linear_map(pairs, L2)[0]
    by_rows = {i: fit_linear_map(pairs.subset(owner == i), L2)[0] for i in own}
    summed, by_sums = fit_pair_sums(self_pair_sums(history, offsets[-1], offsets, column_sums(history, L2), anchor), own)
    for rows, sums in [(shared, map_of(summed)), *((by_rows[i], map_of(by_sums[i])) for i in own)]:
        assert np.allclose(rows.weight, sums.weight, rtol=1e-9, atol=1e-12) and np.allclose(rows.bias, sums.bias, rtol=1e-9, atol=1e-14)
    assert not np.allclose(map_of(by_sums[0]).weight, map_of(summed).weight, rtol=1e-3)


def test_column_sums_kept_from_a_shorter_history_give_the_same_fit_bit_for_bit():
    history = a_history(list(range(0, 301, 10)))
    kept = column_sums(history, L2)
    for end in (12, 20, 30):
        shorter = history.truncated(end)
        again = fit_on_run(shorter, 60, [60], L2, sums=kept)
        fresh = fit_on_run(shorter, 60, [60], L2)
        assert again.forecaster.as_dict() == fresh.forecaster.as_dict()
        assert again.scored.as_dict() == fresh.scored.as_dict()


def test_the_closed_form_jump_in_memory_is_what_farcast_predict_writes(tmp_path, farcast):
    run, (x, y) = tmp_path / "run", regression_data()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    farcaster = Farcaster(run, every=40, jump=0.5, settings=L2, gate=False)
    for step in range(0, 41):
        if step:
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
        if step % 5 == 0:
            save(run, model, step)
            if step == 25:
                memory.fit_in_memory(farcaster.observed, 12, L2)
            if step == 40:
                out = tmp_path / "forecast"
                farcast("predict", run, "-H", 20, "-o", out, "--objective", "l2", "--sample", 2000, "--no-fallback", "--quiet")
            result = farcaster.step(model, step)
    assert result.applied and result.horizon == 20 and len(farcaster.observed.sums) == 1
    written = load_file(tmp_path / "forecast" / "model.safetensors")
    last = load_file(run / "checkpoint-40" / "model.safetensors")
    for name, tensor in model.state_dict().items():
        assert torch.allclose(tensor, written[name], rtol=1e-6, atol=1e-7), name
        assert not torch.allclose(tensor, last[name], rtol=1e-4, atol=1e-5), name

"""A plain PyTorch training loop that farcast can resume, or that farcasts as it trains.

    python examples/pytorch/train.py --run runs/mlp --stop-at 200                       # train (or resume) to step 200
    python examples/pytorch/train.py --run runs/mlp --stop-at 600 --farcast-every 200   # farcast in-process

A small MLP classifies points of a synthetic, seeded data set with Adam. Every --save-steps it saves
checkpoint-<step>/ with model.safetensors, optimizer.pt (the optimizer's state) and trainer_state.json
({"global_step": step}): the three files `farcast predict --resumable` needs. It resumes from the newest
checkpoint: weights from model.safetensors (a forecast farcast wrote there included), the optimizer's
state from optimizer.pt, the step from trainer_state.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, 16, generator=generator)
    y = (x @ torch.randn(16, 4, generator=generator)).argmax(dim=1)
    return x, y


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))


def save(run: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    folder = run / f"checkpoint-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    save_file({name: value.detach().contiguous() for name, value in model.state_dict().items()}, folder / "model.safetensors")
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))


def newest(run: Path) -> Path | None:
    folders = [p for p in run.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)] if run.exists() else []
    return max(folders, key=lambda p: int(p.name.split("-")[1]), default=None)


def resume(run: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Load the newest checkpoint into the model and optimizer; its global step (0 with none)."""
    folder = newest(run)
    if folder is None:
        return 0
    model.load_state_dict(load_file(folder / "model.safetensors"))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    return json.loads((folder / "trainer_state.json").read_text())["global_step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--stop-at", type=int, required=True)
    parser.add_argument("--save-steps", type=int, default=10)
    parser.add_argument("--farcast-every", type=int, help="farcast in-process every this many steps")
    args = parser.parse_args()
    torch.set_num_threads(1)
    x, y = data()
    model = build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    step = resume(args.run, model, optimizer)
    if step == 0:
        save(args.run, 0, model, optimizer)
    farcaster = None
    if args.farcast_every:
        from farcast_cli.integrations import Farcaster

        farcaster = Farcaster(args.run, every=args.farcast_every, jump=0.5)
        logging.basicConfig(format="%(message)s")
        logging.getLogger("farcast").setLevel(logging.INFO)
        farcaster.step(model, step)
    batches = torch.Generator().manual_seed(step)
    while step < args.stop_at:
        rows = torch.randint(len(x), (64,), generator=batches)
        loss = torch.nn.functional.cross_entropy(model(x[rows]), y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if step % args.save_steps == 0 or step == args.stop_at:
            save(args.run, step, model, optimizer)
            if farcaster is not None:
                farcaster.step(model, step)


if __name__ == "__main__":
    main()

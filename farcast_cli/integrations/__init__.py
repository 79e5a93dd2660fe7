"""farcast inside a training loop: every few hundred steps, forecast from the run's checkpoints and, where
the backtest (or the user's loss) says the forecast wins, copy it into the model being trained.

`Farcaster` (loop.py) serves any PyTorch loop; `FarcastCallback` (trainer.py) is a transformers.Trainer
callback built on it, imported only when asked for, so that transformers stays optional.
"""

from farcast_cli.integrations.loop import Farcaster, JumpResult

__all__ = ["Farcaster", "FarcastCallback", "JumpResult"]


def __getattr__(name: str):
    if name == "FarcastCallback":
        from farcast_cli.integrations.trainer import FarcastCallback

        return FarcastCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""farcast: forecast a training run's far-future weights from its safetensors checkpoints."""

__version__ = "0.1.0"

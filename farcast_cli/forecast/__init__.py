"""Applying a linear map to whole checkpoints: the candidates farcast can write, each a combination
of the run's checkpoints (candidates.py), streamed into a checkpoint laid out like the last (write.py)."""

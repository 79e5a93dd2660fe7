"""Resolve --device (auto, cpu, cuda, cuda:N) and read --max-memory sizes."""

from __future__ import annotations

import torch

from farcast_cli.errors import UsageError, parameter


def resolve_device(name: str) -> torch.device:
    """`auto` is the first GPU when one is visible, else the CPU; an explicit GPU must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"{parameter('device')} {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{parameter('device')} {name}: no CUDA GPU is visible on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"{parameter('device')} {name}: only {torch.cuda.device_count()} GPU(s) visible")
    elif device.type != "cpu":
        raise UsageError(f"{parameter('device')} {name!r}: expected auto, cpu, cuda or cuda:N")
    return device


def parse_size(text: str) -> int:
    """'512MB', '2GiB', '1e9' -> bytes (decimal units as huggingface_hub counts them, binary with 'i')."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    cleaned = text.strip().upper().replace(" ", "")
    number = cleaned.rstrip("KMGTIB")
    unit = cleaned[len(number) :]
    try:
        value = float(number)
    except ValueError:
        raise UsageError(f"cannot read size {text!r}; try 512MB or 2GiB") from None
    if unit not in units or not 0 < value < float("inf"):
        raise UsageError(f"cannot read size {text!r}; try 512MB or 2GiB")
    return int(value * units[unit])

"""Host-to-device copy speed from pinned and from ordinary memory, the figures the GPU path relies on.

python benchmarks/gpu_transfer.py
"""

from __future__ import annotations

import time

import torch


def gb_per_second(source: torch.Tensor, repeats: int = 5) -> float:
    target = torch.empty_like(source, device="cuda")
    target.copy_(source, non_blocking=True)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source, non_blocking=True)
    torch.cuda.synchronize()
    return source.numel() * source.element_size() * repeats / (time.perf_counter() - started) / 1e9


def main() -> None:
    size = 1 << 30
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    pinned = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    pageable = torch.empty(size, dtype=torch.uint8)
    pinned_rate, pageable_rate = gb_per_second(pinned), gb_per_second(pageable)
    print(
        f"host-to-device, 1 GiB: pinned {pinned_rate:.1f} GB/s, ordinary {pageable_rate:.1f} GB/s, ratio {pinned_rate / pageable_rate:.1f}"
    )


if __name__ == "__main__":
    main()

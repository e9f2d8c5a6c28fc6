"""Timing on a shared machine: every call of a cell in one round-robin, medians reported."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import torch

__all__ = ["round_robin", "sync", "timed"]


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a timer sees it finish."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes, the device synchronised on both sides."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def round_robin(
    calls: Mapping[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Warm every call up, then time one call of each per round, so that load changes on a shared
    machine hit all alike."""
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            times[name].append(timed(fn, device))
    return times

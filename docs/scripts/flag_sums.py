"""The cost of the finiteness flags an aggregator's result check reads, against the alternatives.

For one Llama-3-70B MLP factor at R = 320 (28672 × 320) in bfloat16 and float16, on one thread
of torch's pool: the time (median of 15) and the call's peak memory growth (``VmHWM`` after
resetting it, Linux) of ``t.sum()``, ``t.sum(dtype=torch.float32)``, ``torch.aminmax(t)`` and
``t.float().sum()``. ``lorafair``'s result check (``fits_dtype``) reads the native sum, and
for float16 ``aminmax`` (a float16 sum overflows at 65504).

    python docs/scripts/flag_sums.py
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable

import torch


def _hwm_mib() -> float:
    with open("/proc/self/status") as f:
        match = re.search(r"VmHWM:\s+(\d+)", f.read())
    assert match is not None
    return int(match.group(1)) / 1024


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _measure(fn: Callable[[], object]) -> tuple[float, float]:
    fn()
    _reset_peak()
    before = _hwm_mib()
    fn()
    peak = _hwm_mib() - before
    times = []
    for _ in range(15):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, peak


def main() -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        t = (torch.randn(28672, 320, generator=g) * 0.01).to(dtype)
        ways: dict[str, Callable[[torch.Tensor], object]] = {
            "t.sum()": torch.sum,
            "t.sum(dtype=torch.float32)": lambda t: t.sum(dtype=torch.float32),
            "torch.aminmax(t)": torch.aminmax,
            "t.float().sum()": lambda t: t.float().sum(),
        }
        for name, way in ways.items():
            ms, mib = _measure(lambda way=way, t=t: way(t))
            print(f"{dtype!s:15s} {name:28s} {ms:7.2f} ms  peak growth {mib:6.1f} MiB")


if __name__ == "__main__":
    main()

"""Which general float64 product ``benchmarks/llm_cells.py`` times for its compute floor.

Its floor is the Grams' essential flops at the machine's dgemm rate on all of the process's
threads. This script times, in one run, alternating, on ``X Yᵀ`` with X, Y of R × 14336
float64 (``2 R² d`` flops, the probe's shape), each after a pause:

- ``torch``: torch's product (MKL in the x86 wheels), on one and on all of torch's threads;
- ``numpy``: NumPy's product (OpenBLAS), on one and on all of its BLAS threads;

and then what each all-thread product leaves behind: ``fedit`` on one Llama-3-8B block (bf16,
K = 20, r = 16; its weighted sums run on torch's threads) timed right after it, and after a
pause with no product. OpenBLAS's workers spin for a while after a threaded call, so a
torch kernel on the same cores right after it competes with them.

    python docs/scripts/dgemm_probe.py [-R 160 320 1280] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.llm_cells import make_cell, one_thread
from lorafair import aggregate

_PAUSE = 0.3
"""Seconds of rest before a timed call: longer than OpenBLAS's workers spin after a call
(2²⁸ cycles by default, about 0.1 s here)."""


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _one_thread_numpy(fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        with threadpool_limits(limits=1, user_api="blas"):
            return fn()

    return run


def rates(R: int, repeats: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(R, 14336, dtype=torch.float64, generator=g)
    y = torch.randn(R, 14336, dtype=torch.float64, generator=g)
    out = torch.empty(R, R, dtype=torch.float64)
    xn, yn, on = x.numpy(), y.numpy(), out.numpy()

    def torch_all() -> object:
        return torch.matmul(x, y.mT, out=out)

    def numpy_all() -> object:
        return np.matmul(xn, yn.T, out=on)

    probes = {
        "torch, all threads": torch_all,
        "torch, one thread": one_thread(torch_all),
        "numpy, all threads": numpy_all,
        "numpy, one thread": _one_thread_numpy(numpy_all),
    }
    for fn in probes.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in probes}
    for _ in range(repeats):
        for k, fn in probes.items():
            time.sleep(_PAUSE)  # no BLAS worker of the probe before still spinning
            times[k].append(_timed(fn))
    flops = 2.0 * R * R * x.shape[1]
    rate = {k: flops / statistics.median(v) / 1e9 for k, v in times.items()}
    line = "  ".join(f"{k} {v:6.1f}" for k, v in rate.items())
    numpy_over_torch = rate["numpy, all threads"] / rate["torch, all threads"]
    print(f"R = {R:5d}, GFLOP/s: {line}  (numpy / torch, all threads: {numpy_over_torch:.2f})")


def after(repeats: int) -> None:
    cell = make_cell(1, 20, 16, torch.bfloat16)
    R = 320
    x = np.random.default_rng(0).standard_normal((R, 14336))
    tx = torch.from_numpy(x)

    def fedit() -> object:
        return aggregate.fedit(cell)

    before = {
        "after numpy's product": lambda: np.matmul(x, x.T),
        "after torch's product": lambda: torch.matmul(tx, tx.mT),
        "after a pause": lambda: time.sleep(_PAUSE),
    }
    fedit()
    times: dict[str, list[float]] = {k: [] for k in before}
    for _ in range(repeats):
        for k, fn in before.items():
            fn()
            times[k].append(_timed(fedit))
    rest = statistics.median(times["after a pause"])
    threads = torch.get_num_threads()
    print(f"fedit, one Llama-3-8B block, bf16, K = 20, r = 16, torch threads {threads}:")
    for k, v in times.items():
        t = statistics.median(v)
        print(f"  {k:24s} {t * 1e3:6.1f} ms  ({t / rest:.2f}× the time after the pause)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-R", type=int, nargs="+", default=[160, 320, 1280])
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    for R in a.R:
        rates(R, a.repeats)
    after(a.repeats)


if __name__ == "__main__":
    main()

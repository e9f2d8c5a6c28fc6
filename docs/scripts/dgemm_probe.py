"""Which general float64 product ``benchmarks/llm_cells.py`` times for its compute floor.

Its floor is the Grams' essential flops at the machine's dgemm rate on all of the process's
threads. This script times, in one run, alternating, on ``X Yᵀ`` with X, Y of R × 14336
float64 (``2 R² d`` flops, the probe's shape), each after a pause:

- ``torch``: torch's product (MKL in the x86 wheels), on all of torch's threads and on one
  (``llm_cells``' probes);
- ``numpy``: NumPy's (OpenBLAS) on OpenBLAS's own threads, with the product's columns in one
  block per thread side by side on worker threads (one BLAS thread each, as lorafair runs its
  NumPy kernels), and on one thread;

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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.llm_cells import make_cell, measure_floors
from lorafair import aggregate

_PAUSE = 0.3
"""Seconds of rest before a timed call: longer than OpenBLAS's workers spin after a call
(2²⁸ cycles by default, about 0.1 s here)."""


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def rates(R: int, repeats: int) -> None:
    """``benchmarks/llm_cells.py``'s dgemm probes (torch's product on all threads and on one)
    and NumPy's product three ways, each after a pause, in GFLOP/s."""
    probes = {f"torch {k[6:] or 'all'}": p for k, p in measure_floors(4, R).items() if "dgemm" in k}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(R, 14336, dtype=torch.float64, generator=g).numpy()
    y = torch.randn(R, 14336, dtype=torch.float64, generator=g).numpy()
    out = np.empty((R, R))
    flops = 2.0 * R * R * x.shape[1]
    n = torch.get_num_threads()
    cuts = [(R * i // n, R * (i + 1) // n) for i in range(n)]
    workers = ThreadPoolExecutor(max_workers=n)

    def columns(cut: tuple[int, int]) -> None:
        np.matmul(x, y[cut[0] : cut[1]].T, out=out[:, cut[0] : cut[1]])

    def threaded() -> float:
        t = time.perf_counter()
        np.matmul(x, y.T, out=out)
        return flops / (time.perf_counter() - t)

    def side_by_side() -> float:
        with threadpool_limits(limits=1, user_api="blas"):
            t = time.perf_counter()
            list(workers.map(columns, cuts))
            return flops / (time.perf_counter() - t)

    def one() -> float:
        with threadpool_limits(limits=1, user_api="blas"):
            return threaded()

    probes["numpy, OpenBLAS's threads"] = threaded
    probes["numpy, side by side"] = side_by_side
    probes["numpy, 1 thread"] = one
    for probe in probes.values():
        probe()
    got: dict[str, list[float]] = {k: [] for k in probes}
    for _ in range(repeats):
        for k, probe in probes.items():
            time.sleep(_PAUSE)  # no BLAS worker of the probe before still spinning
            got[k].append(probe())
    workers.shutdown()
    rate = {k: statistics.median(v) / 1e9 for k, v in got.items()}
    print(f"R = {R:5d}, GFLOP/s: " + "  ".join(f"{k} {v:6.1f}" for k, v in rate.items()))


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

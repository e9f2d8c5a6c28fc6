"""How close the float64 Gram kernels this CPU offers come to the Gram methods' compute floor.

``lorafair bench``'s compute floor for ``lora_fair`` and ``flexlora`` is the two float64
R × R Grams per layer, ``(d_in + d_out) R²`` essential flops (one triangle each), at the rate
of torch's general dgemm on the cell's shapes with all of torch's threads. This script times,
in one run, alternating, on float64 stacks of one ``lorafair bench`` cell's shapes:

- ``floor``: half the time of torch's general products ``X Xᵀ`` on all threads: the floor;
- ``syrk``: NumPy's ``X Xᵀ`` (BLAS ``syrk``: one triangle), one single-thread call per stack,
  on one worker thread per core side by side, largest first: how ``lorafair._stacks`` runs
  the Grams, without its cast-copies from the inputs' dtype;
- ``syrk, threaded``: the same calls one at a time, each on all of the BLAS pool's threads;
- ``cast``: the one-thread cast-copies of the inputs (``--dtype``) into float64, side by side.

It prints each as a multiple of the floor. ``syrk`` over ``floor`` is what the Grams alone
cost against the floor with these kernels, before any other work of the method.

    python docs/scripts/gram_kernels.py --preset llama3_8b --blocks 1 -K 20 -r 16
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from lorafair.bench import preset
from lorafair.bench.cli import add_cell_arguments


def _timed(fn: Callable[[], object], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_cell_arguments(ap)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    R = args.K * args.r
    shapes = preset(args.preset, blocks=args.blocks)
    widths = sorted((d for s in shapes.layers for d in (s.d_in, s.d_out)), reverse=True)
    g = torch.Generator().manual_seed(0)
    stacks = [torch.randn(R, d, generator=g, dtype=torch.float64) for d in widths]
    narrow = [x.to(getattr(torch, args.dtype)) for x in stacks]
    outs = [torch.empty(R, R, dtype=torch.float64) for _ in stacks]
    cores = torch.get_num_threads()
    pool = ThreadPoolExecutor(cores)

    def side_by_side(fn: Callable[[int], object]) -> Callable[[], object]:
        order = iter(range(len(stacks)))

        def worker() -> None:
            torch.set_num_threads(1)
            with threadpool_limits(1):
                for i in order:  # largest first; the iterator is shared (GIL-atomic next)
                    fn(i)

        def run() -> None:
            nonlocal order
            order = iter(range(len(stacks)))
            for f in [pool.submit(worker) for _ in range(cores)]:
                f.result()

        return run

    def floor() -> None:
        for x, o in zip(stacks, outs, strict=True):
            torch.matmul(x, x.mT, out=o)

    def syrk_threaded() -> None:
        for x, o in zip(stacks, outs, strict=True):
            np.matmul(x.numpy(), x.numpy().T, out=o.numpy())

    def one_syrk(i: int) -> None:
        x = stacks[i].numpy()
        np.matmul(x, x.T, out=outs[i].numpy())

    casts = [torch.empty_like(x) for x in stacks]
    syrk = side_by_side(one_syrk)
    cast = side_by_side(lambda i: casts[i].copy_(narrow[i]))
    calls = {"floor": floor, "syrk": syrk, "syrk, threaded": syrk_threaded, "cast": cast}
    for fn in calls.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(args.repeats):  # alternating: the machine's load hits every probe alike
        for k, fn in calls.items():
            times[k] += _timed(fn, 1)
    med = {k: statistics.median(v) for k, v in times.items()}
    med["floor"] /= 2  # the essential flops: one triangle of each Gram
    flops = sum(widths) * R * R
    print(
        f"{shapes.name}, {len(shapes.layers)} layers, R = {R}, {args.dtype} inputs; "
        f"{cores} threads; medians of {args.repeats}, alternating"
    )
    for k, t in med.items():
        rate = "" if k == "cast" else f"  ({flops / t / 1e9:6.1f} essential GFLOP/s)"
        print(f"  {k:16s} {t * 1e3:8.1f} ms  {t / med['floor']:5.2f}x the floor{rate}")
    print(f"  syrk + cast      {(med['syrk'] + med['cast']) / med['floor']:5.2f}x the floor")


if __name__ == "__main__":
    main()

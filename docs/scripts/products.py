"""Two ways to form the thin float64 products with the clients' stacked factors.

``lora_fair`` and ``flexlora`` (the Gram route) end with ``out = C X`` (k × d) per layer, where
``X`` is the clients' stack: ``A_u = cat_k A_k`` (R × d_in) or ``B_sᵀ`` (R × d_out, from the
``B_k`` of d_out × r_k), C a small float64 k × R matrix, and the factors in a narrow dtype.
This script times both ways on one thread, on one wide layer, in one run, alternating:

- ``column blocks``: the stack cast into a float64 buffer 4096 columns at a time (fewer past
  R = 640: a buffer of 640 × 4096), one cast-copy per client and block (for B a transposing
  copy, ``B_k[cols]ᵀ``), then one NumPy ``gemm`` per block (``lorafair._stacks.products``
  until this comparison);
- ``per client``: each client's factor cast whole into a float64 buffer as it is laid out
  (no transpose), then ``out += C[:, rows_k] X_k``, one torch ``addmm`` per client
  (``lorafair._stacks.products`` since).

Both results are checked against each other (float64, relative 1e-12).

    python docs/scripts/products.py [-d 14336] [--dtype bfloat16] [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from threadpoolctl import threadpool_limits


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def column_blocks(factors: list[torch.Tensor], side: str, coef_t: np.ndarray) -> np.ndarray:
    """``coef_t @ X`` by column blocks of the float64 stack (the earlier way)."""
    R = coef_t.shape[1]
    d = factors[0].shape[1] if side == "A" else factors[0].shape[0]
    step = max(512, min(4096, 640 * 4096 // R))
    buf = np.empty(R * min(d, step))
    out = np.empty((coef_t.shape[0], d))
    for start in range(0, d, step):
        stop = min(d, start + step)
        x = buf[: R * (stop - start)].reshape(R, stop - start)
        tx = torch.from_numpy(x)
        row = 0
        for f in factors:
            rk = f.shape[0] if side == "A" else f.shape[1]
            tx[row : row + rk].copy_(f[:, start:stop] if side == "A" else f[start:stop].mT)
            row += rk
        np.matmul(coef_t, x, out=out[:, start:stop])
    return out


def per_client(factors: list[torch.Tensor], side: str, coef_t: np.ndarray) -> np.ndarray:
    """``coef_t @ X`` client by client, each factor cast whole (the way now)."""
    d = factors[0].shape[1] if side == "A" else factors[0].shape[0]
    rmax = max(f.shape[0] if side == "A" else f.shape[1] for f in factors)
    buf = np.empty(rmax * d)
    out = torch.empty(coef_t.shape[0], d, dtype=torch.float64)
    c = torch.from_numpy(coef_t)
    row = 0
    for k, f in enumerate(factors):
        rk = f.shape[0] if side == "A" else f.shape[1]
        if side == "A":
            x = torch.from_numpy(buf[: rk * d].reshape(rk, d)).copy_(f)
        else:
            x = torch.from_numpy(buf[: rk * d].reshape(d, rk)).copy_(f).mT
        if k == 0:
            torch.matmul(c[:, row : row + rk], x, out=out)
        else:
            out.addmm_(c[:, row : row + rk], x)
        row += rk
    return out.numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-d", type=int, default=14336, help="the layer's long side")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--cells", nargs="+", default=["20x8", "20x16", "50x16", "20x64"])
    ap.add_argument("--repeats", type=int, default=15)
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    print(f"one layer {a.d} wide, {a.dtype}, one thread; ms, medians of {a.repeats}")
    with threadpool_limits(limits=1, user_api="blas"):
        for cell in a.cells:
            K, r = (int(v) for v in cell.split("x"))
            coef_t = np.random.default_rng(0).standard_normal((r, K * r))
            for side in ("A", "B"):
                shape = (r, a.d) if side == "A" else (a.d, r)
                factors = [torch.randn(*shape, generator=g).to(dtype) for _ in range(K)]
                old = column_blocks(factors, side, coef_t)
                new = per_client(factors, side, coef_t)
                err = np.abs(old - new).max() / np.abs(old).max()
                assert err < 1e-12, err
                t_old = _median_ms(partial(column_blocks, factors, side, coef_t), a.repeats)
                t_new = _median_ms(partial(per_client, factors, side, coef_t), a.repeats)
                print(
                    f"K = {K:3d}, r = {r:2d}, side {side}: column blocks {t_old:7.2f}  "
                    f"per client {t_new:7.2f}  ({t_old / t_new:.2f}×)"
                )


if __name__ == "__main__":
    main()

"""LoRA-FAIR's column form against its flat form and the re-implementations' SGD, side by side.

One ViT-B/16 layer of each shape (K clients, rank r, fp32): ``lora_fair(similarity="flat")``,
``lora_fair(similarity="columns", norm="fro_squared", lam=1)`` and the public
re-implementations' procedure on that same objective (dense ΔW, SGD lr 0.01 up to 1000 steps,
:func:`benchmarks.references.dense_sgd_lora_fair`), each timed in the same run, with the column
objective of every result evaluated in float64 (:func:`benchmarks.references.fair_objective`).

    python -m benchmarks.columns [--shapes qkv proj fc1 fc2] [--clients 6] [--rank 16]
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.references import dense_sgd_lora_fair, fair_objective, stack64, weighted_mean64
from lorafair.aggregate import lora_fair
from lorafair.types import LoRAFactors

SHAPES = {"qkv": (2304, 768), "proj": (768, 768), "fc1": (3072, 768), "fc2": (768, 3072)}
LAM = 1.0


def _clients(d_out: int, d_in: int, k: int, r: int, seed: int) -> list[dict[str, LoRAFactors]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "layer": LoRAFactors(
                torch.randn(r, d_in, generator=g) * 0.02, torch.randn(d_out, r, generator=g) * 0.02
            )
        }
        for _ in range(k)
    ]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    warm = _clients(8, 8, 2, 2, 0)
    lora_fair(warm, similarity="columns")  # first-call costs (imports, thread-pool lookup)
    print("shape  flat_ms  columns_s  sgd_s  columns/flat  sgd/columns  f_columns  f_sgd")
    for name in args.shapes:
        d_out, d_in = SHAPES[name]
        clients = _clients(d_out, d_in, args.clients, args.rank, args.seed)
        p = [1.0 / len(clients)] * len(clients)
        A_s, B_s = stack64(clients, "layer", p)
        A_bar, B_bar = weighted_mean64(clients, "layer", p)

        t = time.perf_counter()
        lora_fair(clients, lam=LAM, norm="fro_squared")
        t_flat = time.perf_counter() - t
        t = time.perf_counter()
        cols = lora_fair(clients, lam=LAM, norm="fro_squared", similarity="columns")
        t_cols = time.perf_counter() - t
        t = time.perf_counter()
        sgd, _ = dense_sgd_lora_fair(
            clients, lam=LAM, norm="fro_squared", similarity="columns", lr=0.01, max_steps=1000
        )
        t_sgd = time.perf_counter() - t
        f_cols, f_sgd = (
            fair_objective(
                A_s, B_s, A_bar, B_bar, out["layer"].B, lam=LAM, norm="fro_squared",
                similarity="columns",
            )
            for out in (cols, sgd)
        )  # fmt: skip
        print(
            f"{name:5s} {t_flat * 1e3:8.1f} {t_cols:10.2f} {t_sgd:6.2f} {t_cols / t_flat:13.0f} "
            f"{t_sgd / t_cols:12.2f} {f_cols:10.6f} {f_sgd:10.6f}"
        )


if __name__ == "__main__":
    main()

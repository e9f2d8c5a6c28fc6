"""FlexLoRA's routes: the time of each route on one layer, and whether every layer certifies.

Run from the repository root, one thread (as the documented runs)::

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 \\
        python docs/scripts/flexlora_routes.py routes
    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 \\
        python docs/scripts/flexlora_routes.py certified

    python docs/scripts/flexlora_routes.py crossover     # the process's default threads

``routes``: ``flexlora(rank=16)`` on one ViT-B/16 layer of ``lorafair.bench.make_clients``,
once per route with the cost model (``lorafair.aggregate._route``) forced to it; ms per call,
"–" where the route refuses the layer. ``certified``: ``flexlora`` (fixed rank 16) on the first
12 ViT-B/16 layers at each K; counts the layers whose route's own check failed (they are redone
by the next route: "fell back"), by wrapping ``lorafair._average.check``, the one host read of
every route's checks (a redone layer's own check is counted as one more). ``crossover``:
``flexlora`` (rank = r) on one layer of each ``--shapes`` (d_out × d_in) at each ``--cells``
K:r, with the Gram and dense_top routes forced in turn, twice, on the process's default
threads (as the LLM grid runs), in ``--dtype``; the faster of the two medians of 3 calls per
route, and the route the cost model picks: the measurements behind ``_LARGE_CORE``. Both patch
private functions of lorafair for the duration of the script; they measure the library, not an
API.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lorafair import aggregate
from lorafair.bench import PRESETS, LayerShape, make_clients, preset

SHAPE_SETS = {name: list(preset(name).layers) for name in PRESETS}

ROUTES = ("gram", "qr", "dense", "dense_top")
PROBES = (
    ("attn.qkv", 60),
    ("attn.qkv", 100),
    ("attn.proj", 60),
    ("mlp.fc2", 100),
    ("attn.qkv", 30),
)


def _layer(suffix: str) -> Any:
    return next(s for s in SHAPE_SETS["vit_b16"] if s.name.endswith(suffix))


def routes(rank: int) -> None:
    real = aggregate._route
    print("| layer | K | " + " | ".join(ROUTES) + " |")
    print("|---" * (2 + len(ROUTES)) + "|")
    for suffix, K in PROBES:
        shape = _layer(suffix)
        clients = make_clients([shape], K, rank)
        cells = []
        for route in ROUTES:
            aggregate._route = lambda *a, _r=route, **k: _r
            try:
                t0 = time.perf_counter()
                aggregate.flexlora(clients, rank=rank)
                cells.append(f"{1000 * (time.perf_counter() - t0):.0f}")
            except Exception as e:
                cells.append(f"– ({type(e).__name__})")
            finally:
                aggregate._route = real
        name = f"{suffix.split('.')[-1]} {shape.d_out} × {shape.d_in}"
        print(f"| {name} | {K} | " + " | ".join(cells) + " |")


def certified(rank: int, Ks: list[int]) -> None:
    real = aggregate._average.check
    failed: list[int] = []
    checked: list[int] = []

    def wrapped(flags: Any, layers: Any, extra: Any = None) -> list[bool]:
        out = real(flags, layers, extra)
        checked.append(len(out))
        failed.append(out.count(False))
        return out

    aggregate._average.check = wrapped  # type: ignore[assignment]
    try:
        for K in Ks:
            failed.clear()
            checked.clear()
            clients = make_clients(SHAPE_SETS["vit_b16"][:12], K, rank)
            aggregate.flexlora(clients, rank=rank)
            print(
                f"K = {K:3d}: {sum(checked)} layer checks by the route's certificate, "
                f"{sum(failed)} failed (fell back)"
            )
    finally:
        aggregate._average.check = real  # type: ignore[assignment]


CROSSOVER_SHAPES = ("1024x4096", "2304x768", "768x768", "3072x768")
CROSSOVER_CELLS = ("30:16", "40:16", "50:16", "64:16", "100:16", "20:64")


def crossover(shapes: list[str], cells: list[str], dtype: torch.dtype) -> None:
    real = aggregate._route
    print("| layer | K | r | R | gram, ms | dense_top, ms | faster | the model picks |")
    print("|---" * 8 + "|")
    for text in shapes:
        d_out, d_in = (int(x) for x in text.split("x"))
        for cell in cells:
            K, r = (int(x) for x in cell.split(":"))
            clients = make_clients([LayerShape("layer", d_out, d_in)], K, r, dtype=dtype)
            best: dict[str, float] = {}
            try:
                for route in ("gram", "dense_top") * 2:
                    aggregate._route = lambda *a, _r=route, **k: _r
                    aggregate.flexlora(clients, rank=r)
                    times = []
                    for _ in range(3):
                        t0 = time.perf_counter()
                        aggregate.flexlora(clients, rank=r)
                        times.append(time.perf_counter() - t0)
                    best[route] = min(best.get(route, float("inf")), sorted(times)[1])
            finally:
                aggregate._route = real
            picks = real(d_out, d_in, K * r, dtype, r)
            gram, dense = 1000 * best["gram"], 1000 * best["dense_top"]
            faster = "gram" if gram < dense else "dense_top"
            print(
                f"| {d_out} × {d_in} | {K} | {r} | {K * r} | {gram:.0f} | {dense:.0f} | "
                f"{faster} | {picks} |"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["routes", "certified", "crossover"])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--clients", type=int, nargs="+", default=[6, 18, 30, 60, 100])
    p.add_argument("--shapes", nargs="+", default=list(CROSSOVER_SHAPES))
    p.add_argument("--cells", nargs="+", default=list(CROSSOVER_CELLS), help="K:r")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = p.parse_args()
    if args.what != "crossover":
        torch.set_num_threads(1)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}; load {os.getloadavg()[0]:.2f}"
    )
    if args.what == "routes":
        routes(args.rank)
    elif args.what == "crossover":
        crossover(args.shapes, args.cells, getattr(torch, args.dtype))
    else:
        certified(args.rank, args.clients)
    print(f"load average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()

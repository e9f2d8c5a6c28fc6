"""LoRA-FAIR's column form against its flat form and the re-implementations' SGD, in one run.

On ViT-B/16 adapters (``--blocks`` × {qkv 2304×768, proj 768×768, fc1 3072×768, fc2 768×3072},
default 12 blocks = 48 layers; K clients of rank r, fp32), for each of ``--methods`` (registry
names; default: every registered method whose function takes the ``similarity`` option, i.e.
has a column form; today LoRA-FAIR alone):

- ``method(similarity="flat")`` and ``method(similarity="columns")`` on all layers in one
  call each, ``--repeats`` calls run alternately (flat, columns, flat, …); medians;
- the public re-implementations' procedure on the same objective (dense ΔW, SGD lr 0.01 up to
  ``--sgd-steps`` steps, :func:`benchmarks.references.dense_sgd_lora_fair`), timed on the first
  layer of each shape and scaled by that shape's layer count (``Σ_shape t(layer) × blocks``);
- the column objective of every result in float64 (:func:`benchmarks.references.fair_objective`)
  on those layers, columns vs SGD vs FedIT (the registry's first entry, the plain average,
  :data:`lorafair.bench.BASELINE`); the run fails if the column form is worse than FedIT there
  or than SGD by more than 1e-9.

Defaults are the SGD procedure's objective (``λ = 1``, ``norm="fro_squared"``); ``--lam 0.01
--norm fro`` gives the library's defaults. ``--quick`` (1 block, 1 repeat, SGD capped at 20
steps, so its SGD ratio is not the procedure's; about 10 s) checks that the script runs;
``--sgd-steps 0`` leaves SGD out.

    python -m benchmarks.columns [--blocks 12] [--repeats 3] [--lam 1] [--norm fro_squared]
                                 [--threads 1]   # SGD on one thread, as lora_fair runs
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import time
from collections.abc import Callable
from typing import Any, Literal, cast

import torch

from benchmarks.references import (
    SGDInfo,
    dense_sgd_lora_fair,
    fair_objective,
    stack64,
    weighted_mean64,
)
from lorafair import registry
from lorafair.bench import BASELINE
from lorafair.registry import AggregatorSpec
from lorafair.types import LoRAFactors

SHAPES = {"qkv": (2304, 768), "proj": (768, 768), "fc1": (3072, 768), "fc2": (768, 3072)}
Norm = Literal["fro", "fro_squared"]


def random_clients(
    shapes: list[tuple[str, int, int]], k: int, r: int, seed: int
) -> list[dict[str, LoRAFactors]]:
    """``k`` clients' rank-``r`` fp32 adapters with ``N(0, 0.02²)`` factors on the layers
    ``(name, d_out, d_in)`` of ``shapes``, drawn in that order (layer, client, A then B)."""
    g = torch.Generator().manual_seed(seed)
    clients: list[dict[str, LoRAFactors]] = [{} for _ in range(k)]
    for name, d_out, d_in in shapes:
        for c in clients:
            c[name] = LoRAFactors(
                torch.randn(r, d_in, generator=g) * 0.02,
                torch.randn(d_out, r, generator=g) * 0.02,
            )
    return clients


def vit_clients(blocks: int, k: int, r: int, seed: int) -> list[dict[str, LoRAFactors]]:
    """``k`` clients' rank-``r`` fp32 adapters on ``blocks`` ViT-B/16 blocks (N(0, 0.02²))."""
    shapes = [(f"{b}.{name}", *SHAPES[name]) for b in range(blocks) for name in SHAPES]
    return random_clients(shapes, k, r, seed)


def takes(spec: AggregatorSpec, option: str) -> bool:
    """Whether ``spec``'s function accepts the keyword ``option``."""
    return option in inspect.signature(spec.fn).parameters


def _call(spec: AggregatorSpec, **options: Any) -> Callable[[list[dict[str, LoRAFactors]]], Any]:
    """``clients ↦ spec.fn(clients, **defaults, **options)``, without options it does not take."""
    kwargs = {**spec.defaults, **{k: v for k, v in options.items() if takes(spec, k)}}
    return lambda clients: spec.fn(clients, **kwargs)


def main(argv: list[str] | None = None) -> None:
    with_columns = [s.name for s in registry.specs() if takes(s, "similarity")]
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument(
        "--methods",
        nargs="+",
        default=with_columns,
        choices=with_columns,
        metavar="NAME",
        help="registered methods with a column form (default: all of them: "
        + ", ".join(with_columns)
        + ")",
    )
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lam", type=float, default=1.0)
    ap.add_argument("--norm", choices=["fro", "fro_squared"], default="fro_squared")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sgd-steps", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads", type=int, default=0, help="torch.set_num_threads for SGD (0: torch's default)"
    )
    ap.add_argument("--quick", action="store_true", help="1 block, 1 repeat, SGD ≤ 5 steps")
    args = ap.parse_args(argv)
    if args.quick:
        args.blocks, args.repeats, args.sgd_steps = 1, 1, min(args.sgd_steps, 5)
    lam, norm = float(args.lam), cast(Norm, args.norm)
    if args.threads > 0:  # the library pins its own pools to one thread per call either way
        torch.set_num_threads(args.threads)
    clients = vit_clients(args.blocks, args.clients, args.rank, args.seed)
    n_layers = len(clients[0])
    methods = [registry.get(n) for n in args.methods]
    for spec in methods:  # first-call costs
        _call(spec, similarity="columns")(vit_clients(1, 2, 2, 1)[:1] * 2)
    print(
        f"{n_layers} ViT-B/16 layers, K = {args.clients}, r = {args.rank}, fp32, λ = {lam}, "
        f"norm = {norm}; torch {torch.__version__}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch threads (SGD), load average {os.getloadavg()[0]:.1f}"
    )

    base = _call(registry.get(BASELINE))(clients)
    p = [1.0 / len(clients)] * len(clients)
    sgd, info = _sgd(clients, lam, norm, args.sgd_steps)
    failures: list[str] = []
    for spec in methods:
        if len(methods) > 1:
            print(f"{spec.name}:")
        flat = _call(spec, lam=lam, norm=norm)
        columns = _call(spec, lam=lam, norm=norm, similarity="columns")
        t_flat: list[float] = []
        t_cols: list[float] = []
        cols: dict[str, LoRAFactors] = {}
        for _ in range(args.repeats):
            t = time.perf_counter()
            flat(clients)
            t_flat.append(time.perf_counter() - t)
            t = time.perf_counter()
            cols = columns(clients)
            t_cols.append(time.perf_counter() - t)

        print(
            "shape  d_out×d_in   sgd_s(1 layer)  sgd_steps  f_columns      f_sgd          f_fedit"
        )
        t_sgd = 0.0
        worst = 0.0
        for shape, (d_out, d_in) in SHAPES.items():
            name = f"0.{shape}"
            t_sgd += info[name].seconds * args.blocks
            A_s, B_s = stack64(clients, name, p)
            A_bar, B_bar = weighted_mean64(clients, name, p)
            # no SGD: its column shows FedIT's objective
            B_sgd = sgd[name].B if name in sgd else base[name].B
            f_cols, f_sgd, f_fedit = (
                fair_objective(A_s, B_s, A_bar, B_bar, B, lam=lam, norm=norm, similarity="columns")
                for B in (cols[name].B, B_sgd, base[name].B)
            )
            worst = max(worst, f_cols - min(f_sgd, f_fedit))
            print(
                f"{shape:5s} {d_out:5d}×{d_in:<5d} {info[name].seconds:14.2f}  "
                f"{info[name].steps:9d}  {f_cols:.10f}  {f_sgd:.10f}  {f_fedit:.10f}"
            )
        flat_s, cols_s = statistics.median(t_flat), statistics.median(t_cols)
        print(
            f"flat: {flat_s * 1e3:.0f} ms, columns: {cols_s:.2f} s (medians of {args.repeats}, "
            f"alternating; all {n_layers} layers per call)"
        )
        if args.sgd_steps > 0:
            capped = f", capped at {args.sgd_steps} steps" if args.sgd_steps < 1000 else ""
            print(
                f"SGD: {t_sgd:.1f} s (extrapolated: one layer per shape × {args.blocks} layers "
                f"of it{capped})"
            )
        ratio = f"{t_sgd / cols_s:.1f}×" if args.sgd_steps > 0 else "–"
        print(f"columns / flat = {cols_s / flat_s:.1f}×   SGD / columns = {ratio}")
        if worst > 1e-9:
            failures.append(f"{spec.name}: columns objective above SGD's or FedIT's by {worst:.3g}")
    if failures:
        raise SystemExit("; ".join(failures))


def _sgd(
    clients: list[dict[str, LoRAFactors]], lam: float, norm: Norm, steps: int
) -> tuple[dict[str, LoRAFactors], dict[str, SGDInfo]]:
    """The SGD procedure on the first layer of each shape (none: empty factors, zero times)."""
    out: dict[str, LoRAFactors] = {}
    info: dict[str, SGDInfo] = {}
    for shape in SHAPES:
        name = f"0.{shape}"
        if steps > 0:
            res, inf = dense_sgd_lora_fair(
                clients,
                lam=lam,
                norm=norm,
                similarity="columns",
                lr=0.01,
                max_steps=steps,
                layers=[name],
            )
            out.update(res)
            info.update(inf)
        else:
            info[name] = SGDInfo(0, "max_steps", 0.0, 0.0)
    return out, info


if __name__ == "__main__":
    main()

"""Time every aggregator side by side on real model shapes; check each result before timing it.

Usage: ``python -m benchmarks [--shapes vit_b16 ...] [--blocks N] [--ranks 4 8 ...]
[--clients 6 ...] [--grid llm] [--device cpu|cuda] [--dtype float32 bfloat16] [--repeats N]
[--memory] [--out DIR] [--quick]``. See ``benchmarks/README.md`` for the columns, the floors and
the recorded results. The library part of this (shapes, floors, timing, the table) is
:mod:`lorafair.bench`, which ``lorafair bench`` runs on a user's own shapes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from benchmarks import entries
from benchmarks.plots import plot
from benchmarks.tables import report, write
from benchmarks.timing import time_cell
from lorafair.bench import DTYPES, PRESETS, QUICK_NOTE, Row, ShapeSet, environment, preset, progress
from lorafair.bench.cli import GRIDS

__all__ = ["AGGREGATORS", "QUICK_NOTE", "main", "parse_args"]

AGGREGATORS = entries.names()
"""Every registered aggregator, the ``_sq`` variants and the dense references
(see :mod:`benchmarks.entries`)."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument(
        "--shapes",
        nargs="+",
        default=["vit_b16", "mixer_b16", "llm7b_attn"],
        choices=sorted(PRESETS),
    )
    p.add_argument(
        "--blocks",
        type=int,
        default=None,
        help="time only the first N blocks of each shape set; the table extrapolates the whole "
        "model's time by layer count and says so",
    )
    p.add_argument(
        "--max-layers", type=int, default=None, help="use only the first N layers of each shape set"
    )
    p.add_argument("--ranks", nargs="+", type=int, default=[4, 8, 16, 32, 64])
    p.add_argument("--clients", "-K", nargs="+", type=int, default=[6, 18, 30])
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=sorted(DTYPES))
    p.add_argument(
        "--grid",
        choices=sorted(GRIDS),
        default=None,
        help="set --clients, --ranks and --dtype at once (llm: K 10 20 50 100, r 8 16 64, "
        "bfloat16 and float32)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--aggregators", nargs="+", default=list(AGGREGATORS), choices=AGGREGATORS)
    p.add_argument(
        "--library-only",
        action="store_true",
        help="leave out the dense references (they take minutes on large layers)",
    )
    p.add_argument("--repeats", type=int, default=5, help="timed calls per cell (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
    p.add_argument(
        "--ref-layers-per-shape",
        type=int,
        default=1,
        help="dense references run on this many layers of each distinct shape and "
        "are extrapolated to the whole set; 0 = all layers",
    )
    p.add_argument("--lam", type=float, default=0.01)
    p.add_argument("--similarity", default="flat", choices=["flat", "columns"])
    p.add_argument("--sgd-lr", type=float, default=0.01)
    p.add_argument("--sgd-max-steps", type=int, default=1000)
    p.add_argument(
        "--sgd-time-budget",
        type=float,
        default=None,
        help="seconds per layer for the dense SGD reference (then: lower bound)",
    )
    p.add_argument(
        "--memory",
        action="store_true",
        help="measure each call's peak memory growth (VmHWM) in a fresh process",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N)")
    p.add_argument("--out", default=None, help="write results.json, results.md and plots here")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--quick",
        action="store_true",
        help="small CI smoke run (< 2 min on 2 CPU cores); fails on a wrong result",
    )
    args = p.parse_args(argv)
    if args.grid:
        g = GRIDS[args.grid]
        args.clients, args.ranks, args.dtype = list(g.clients), list(g.ranks), list(g.dtypes)
    if args.quick:
        args.shapes, args.max_layers, args.blocks = ["vit_b16"], 2, None
        args.ranks, args.clients, args.dtype = [4, 16], [6], ["float32"]
        args.repeats, args.warmup = 2, 1
        args.sgd_time_budget = 2.0 if args.sgd_time_budget is None else args.sgd_time_budget
    if args.library_only:
        args.aggregators = [n for n in args.aggregators if not entries.get(n).dense]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    return args


def _shapes(name: str, args: argparse.Namespace) -> ShapeSet:
    s = preset(name, blocks=args.blocks)
    if args.max_layers is not None:
        layers = s.layers[: args.max_layers]
        s = s._replace(layers=layers, full_layers=len(layers))
    return s


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sweep; print the table and ratios; exit 1 if any result failed its check."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    env = environment(args.device)
    cells = [
        (s, d, K, r)
        for s in args.shapes
        for d in args.dtype
        for K in args.clients
        for r in args.ranks
    ]
    bar = progress(len(cells), desc="cells", disable=args.no_progress)
    rows: list[Row] = []
    for s, d, K, r in cells:
        if bar is not None:
            bar.set_postfix_str(f"{s} {d} K={K} r={r}")
        elif not args.no_progress:
            print(f"[{len(rows)}] {s} {d} K={K} r={r}", file=sys.stderr, flush=True)
        rows += time_cell(_shapes(s, args), d, K, r, args.aggregators, args)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    text, rs = report(rows, env, quick=args.quick)
    print(text)
    if args.out:
        write(args.out, text, rows, rs, env, args)
        if not args.no_plot:
            plot(rows, args.out)
    failures = [w for w in rows if w.check != "ok"]
    if failures:
        print("CORRECTNESS FAILURES:", file=sys.stderr)
        for w in failures:
            print(
                f"  {w.shape_set} {w.dtype} K={w.K} r={w.r} {w.aggregator}: {w.check}",
                file=sys.stderr,
            )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

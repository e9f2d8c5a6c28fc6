"""``lorafair bench``: time the server step on your own shapes, across methods, ranks and client
counts, against the machine's memory and compute floors measured in the same run.

Shapes come from a peft adapter folder (``--adapter DIR``: its config and tensor header, no
values), a transformers config and target modules (``--config PATH --target-modules ...``: the
model built on the ``meta`` device, no weights), or a preset of a real model (``--preset``). The
clients are synthetic (seeded) factors of rank r on every layer (default: an adapter's largest
rank, and its stored dtype); every result is checked against ``ΔW = Σ p_k B_k A_k`` before it is
timed. Also ``python -m lorafair.bench``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, NamedTuple

import torch

from lorafair import registry
from lorafair.bench import entries
from lorafair.bench.cell import Row, run_cell
from lorafair.bench.cells import DTYPES, make_inputs
from lorafair.bench.memory import measure, spec_for
from lorafair.bench.memory import record as record_memory
from lorafair.bench.report import environment, header, progress, ratio_lines, ratios, table
from lorafair.bench.shapes import PRESETS, ShapeSet, factor_bytes, from_adapter, from_config, preset
from lorafair.errors import LoRAFairError

__all__ = [
    "GRIDS",
    "Grid",
    "add_arguments",
    "add_cell_arguments",
    "add_methods_argument",
    "main",
    "register",
    "run",
    "shapes_from_args",
]


class Grid(NamedTuple):
    """A named sweep of client counts, ranks and dtypes."""

    clients: tuple[int, ...]
    ranks: tuple[int, ...]
    dtypes: tuple[str, ...]


GRIDS: dict[str, Grid] = {
    "llm": Grid((10, 20, 50, 100), (8, 16, 64), ("bfloat16", "float32")),
    "quick": Grid((6,), (4, 16), ("float32",)),
}
"""``llm``: the LLM-scale grid (K ∈ {10, 20, 50, 100}, r ∈ {8, 16, 64}, bf16 and fp32);
``quick``: a smoke run."""


class BadInput(Exception):
    """A problem with what the user passed: one line, exit code 2."""


def add_methods_argument(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    *,
    default: Sequence[str] | None,
    what: str,
    aliases: Sequence[str] = (),
) -> None:
    """``--methods NAME ...``: registry names, ``default`` when absent (``None``: all of them,
    resolved by the caller); ``what`` opens the help line, which lists the default."""
    shown = ", ".join(default if default is not None else registry.names())
    parser.add_argument(
        "--methods",
        *aliases,
        nargs="+",
        default=None if default is None else list(default),
        choices=registry.names(),
        metavar="NAME",
        help=f"{what} (default: {shown})",
    )


def add_cell_arguments(p: argparse.ArgumentParser) -> None:
    """One cell for scripts that time a single one: ``--preset``, ``--blocks``, ``-K``, ``-r``,
    ``--dtype`` (default: the first block of Llama-3-8B, K = 20, r = 16, bfloat16)."""
    p.add_argument("--preset", default="llama3_8b")
    p.add_argument("--blocks", type=int, default=1)
    p.add_argument("-K", type=int, default=20)
    p.add_argument("-r", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The shape-source and sweep options that ``lorafair bench`` takes."""
    src = p.add_argument_group("shapes (one of)")
    src.add_argument("--adapter", metavar="DIR", help="a peft adapter folder")
    src.add_argument("--config", metavar="PATH", help="a transformers config.json or its folder")
    src.add_argument(
        "--target-modules",
        nargs="+",
        default=["all-linear"],
        metavar="NAME",
        help="with --config: module names as peft matches them (default all-linear)",
    )
    src.add_argument("--preset", choices=sorted(PRESETS), help="shapes of a real model")
    src.add_argument(
        "--blocks",
        type=int,
        default=None,
        help="with --preset or --config: time only the first N blocks and extrapolate to the "
        "whole model by layer count (said in the table)",
    )
    g = p.add_argument_group("sweep")
    add_methods_argument(g, default=None, what="registered aggregators")
    g.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a keyword option for every chosen method that takes it (repeatable), e.g. "
        "lam=0.001; typed as `lorafair aggregate --option` types it",
    )
    g.add_argument("--ranks", "-r", nargs="+", type=int, default=None)
    g.add_argument("--clients", "-K", nargs="+", type=int, default=None)
    g.add_argument("--dtype", nargs="+", default=None, choices=sorted(DTYPES))
    g.add_argument(
        "--grid",
        choices=sorted(GRIDS),
        default=None,
        help="llm: K 10 20 50 100, r 8 16 64, bfloat16 and float32; quick: a smoke run",
    )
    g.add_argument("--device", default="cpu")
    g.add_argument("--repeats", type=int, default=5, help="timed calls per cell (median)")
    g.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N)")
    g.add_argument(
        "--check-all-layers",
        action="store_true",
        help="check every layer's result (default: the first layer of each distinct shape)",
    )
    g.add_argument(
        "--memory",
        action="store_true",
        help="also measure each call's peak memory growth (VmHWM) in a fresh process",
    )
    g.add_argument("--out", default=None, help="write results.json and results.md here")
    g.add_argument("--no-progress", action="store_true")


def register(subparsers: Any) -> None:
    """Add the ``bench`` subcommand to ``lorafair``'s subparsers (``run`` set as its default)."""
    p = subparsers.add_parser(
        "bench",
        help="time the server step on your own shapes against the machine's floors",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(run=run)


def shapes_from_args(args: argparse.Namespace) -> tuple[ShapeSet, int | None, str | None]:
    """The shape set the options name, and the rank and dtype an adapter folder was saved with."""
    given = [x for x in (args.adapter, args.config, args.preset) if x is not None]
    if len(given) != 1:
        raise BadInput("give exactly one of --adapter DIR, --config PATH, --preset NAME")
    if args.adapter is not None:
        shapes, rank, dt = from_adapter(args.adapter)
        names = {v: k for k, v in DTYPES.items()}
        return shapes, rank, None if dt is None else names.get(dt)
    if args.config is not None:
        return from_config(args.config, args.target_modules, blocks=args.blocks), None, None
    return preset(args.preset, blocks=args.blocks), None, None


def _first_of_each_shape(shapes: ShapeSet) -> list[str]:
    seen: dict[tuple[int, int], str] = {}
    for s in shapes.layers:
        seen.setdefault((s.d_out, s.d_in), s.name)
    return list(seen.values())


def run(args: argparse.Namespace) -> int:
    """Run ``lorafair bench`` with parsed ``args``; 0, 1 if a result failed its check or a run
    failed inside (one line on stderr), 2 for bad input (one line on stderr)."""
    try:
        return _run(args)
    except (BadInput, OSError, ValueError, ImportError) as e:
        print(f"lorafair bench: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a failure inside (a memory child's): its first and last line
        lines = [line for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        print(
            f"lorafair bench: {' ... '.join(dict.fromkeys([lines[0], lines[-1]]))}", file=sys.stderr
        )
        return 1


def _options(items: Sequence[str], methods: Sequence[str]) -> dict[str, object]:
    """``--option KEY=VALUE`` items, each typed by the first chosen method that takes ``KEY``
    (the cell passes it to every method that takes it); :class:`BadInput` when none does."""
    from lorafair.interop.peft_aggregate import method_options, parse_option

    out: dict[str, object] = {}
    for item in items:
        key = item.partition("=")[0].strip()
        takers = [m for m in methods if key in method_options(m)]
        if not takers:
            raise BadInput(f"option {item!r}: none of {', '.join(methods)} takes {key!r}")
        try:
            name, value = parse_option(takers[0], item)
        except LoRAFairError as e:
            raise BadInput(str(e)) from None
        out[name] = value
    return out


def _run(args: argparse.Namespace) -> int:
    shapes, saved_rank, saved_dtype = shapes_from_args(args)
    grid = GRIDS[args.grid] if args.grid else None
    ranks = args.ranks or (grid.ranks if grid else [saved_rank or 16])
    clients = args.clients or (grid.clients if grid else [10])
    dtypes = args.dtype or (grid.dtypes if grid else [saved_dtype or "float32"])
    if min(ranks) < 1 or min(clients) < 1:
        raise BadInput("ranks and client counts must be at least 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput("--device cuda but torch.cuda.is_available() is False")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    chosen = [entries.get(n) for n in (args.methods or registry.names())]
    options = _options(args.option, [e.name for e in chosen])
    check_layers = None if args.check_all_layers else _first_of_each_shape(shapes)
    env = environment(args.device)
    cells = [(d, K, r) for d in dtypes for K in clients for r in ranks]
    bar = progress(len(cells), desc="cells", disable=args.no_progress)
    rows: list[Row] = []
    for d, K, r in cells:
        if bar is not None:
            bar.set_postfix_str(f"{d} K={K} r={r}")
        inputs = make_inputs(
            shapes,
            K,
            r,
            d,
            args.device,
            seed=args.seed,
            need_shared=any(e.shared_A for e in chosen),
            need_free=any(not e.shared_A for e in chosen),
        )
        cell = run_cell(
            inputs,
            chosen,
            dtype=d,
            K=K,
            r=r,
            options=options,
            warmup=args.warmup,
            repeats=args.repeats,
            check_layers=check_layers,
        )
        if args.memory:
            fb = factor_bytes(inputs.free or inputs.shared)
            del inputs
            for row in cell:
                spec = spec_for(
                    shapes.layers,
                    K=K,
                    r=r,
                    dtype=d,
                    aggregator=row.aggregator,
                    device=args.device,
                    seed=args.seed,
                    provider=entries.__name__,
                    threads=args.threads,
                )
                record_memory(row, measure(spec), fb)
        rows += cell
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    rs = ratios(rows)
    text = f"{header(env)}\nshapes: {shapes.source}\n\n{table(rows)}\n{ratio_lines(rs)}"
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        record = {"environment": env, "args": vars(args), "rows": [asdict(w) for w in rows]}
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({**record, "ratios": rs}, f, indent=1, default=str)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(text)
    failures = [w for w in rows if w.check != "ok"]
    for w in failures:
        print(
            f"lorafair bench: {w.aggregator} K={w.K} r={w.r} {w.dtype}: {w.check}", file=sys.stderr
        )
    return 1 if failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lorafair.bench``: the ``bench`` subcommand on its own."""
    p = argparse.ArgumentParser(
        prog="python -m lorafair.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    return run(p.parse_args(argv))

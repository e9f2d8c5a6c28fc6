"""One cell of ``python -m benchmarks``: the dense references (one layer at a time, extrapolated),
then the library's rows timed with the floors (:func:`lorafair.bench.run_cell`), then each row's
peak memory growth in a fresh process (:func:`lorafair.bench.measure`)."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from benchmarks import entries
from benchmarks.checks import check
from lorafair.bench import (
    Entry,
    Inputs,
    Quality,
    Row,
    ShapeSet,
    factor_bytes,
    make_inputs,
    make_row,
    measure,
    ratio,
    run_cell,
    sync,
)
from lorafair.bench.memory import record, spec_for
from lorafair.types import LoRAFactors

__all__ = ["options", "time_cell"]

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class _Cell:
    inputs: Inputs
    options: dict[str, Any]
    ref_weights: dict[str, float]  # reference layer -> number of layers of its shape it stands for
    all_ref: bool
    K: int
    r: int
    dtype: str

    @property
    def ref_layers(self) -> list[str]:
        return list(self.ref_weights)


def _layer_weights(shapes: ShapeSet, per_shape: int) -> dict[str, float]:
    counts: dict[tuple[int, int], int] = {}
    for s in shapes.layers:
        counts[(s.d_out, s.d_in)] = counts.get((s.d_out, s.d_in), 0) + 1
    taken: dict[tuple[int, int], list[str]] = {}
    for s in shapes.layers:
        names = taken.setdefault((s.d_out, s.d_in), [])
        if len(names) < per_shape:
            names.append(s.name)
    return {n: counts[k] / len(names) for k, names in taken.items() for n in names}


def _run_reference(cell: _Cell, entry: Entry, dense: dict[str, dict[str, LoRAFactors]]) -> Row:
    """A dense reference, one reference layer at a time; its time extrapolated to the set."""
    per_layer: dict[str, float] = {}
    out: dict[str, LoRAFactors] = {}
    infos: dict[str, Any] = {}
    for layer in cell.ref_layers:
        t0 = time.perf_counter()
        res, info = entry.run(cell.inputs, cell.options, [layer])
        sync(cell.inputs.device)
        per_layer[layer] = time.perf_counter() - t0
        out.update(res)
        infos.update(info)
    dense[entry.name] = out
    n_layers = len(cell.inputs.layers)
    total = sum(per_layer[n] * cell.ref_weights[n] for n in cell.ref_layers)
    if cell.all_ref or len(cell.ref_layers) == n_layers:
        timing = "1 run, all layers"
    else:
        timing = f"extrapolated from {len(cell.ref_layers)}/{n_layers} layers"
    if any(i.stop == "time_budget" for i in infos.values()):
        timing = "≥ " + timing + " (SGD time budget hit: lower bound)"
    q = check(entry, out, cell.inputs, cell.options, dense=dense)
    detail: dict[str, Any] = {"per_layer_s": per_layer}
    if infos:
        detail["sgd"] = {n: asdict(i) for n, i in infos.items()}
    return make_row(cell.inputs, cell.dtype, cell.K, cell.r, entry, total, timing, q, detail=detail)


def _checker(cell: _Cell, dense: Mapping[str, Mapping[str, LoRAFactors]]) -> Any:
    def run(entry: Entry, result: Mapping[str, LoRAFactors]) -> Quality:
        q = check(entry, result, cell.inputs, cell.options, dense=dense)
        if entry.norm is not None:
            sub = {n: result[n] for n in cell.ref_layers}
            q.ref_objective = check(entry, sub, cell.inputs, cell.options, dense={}).objective
        return q

    return run


def time_cell(
    shapes: ShapeSet, dtype: str, K: int, r: int, names: Sequence[str], args: argparse.Namespace
) -> list[Row]:
    """Build one cell's inputs, run and check every entry, time the library ones with the floor
    probes in one round-robin, give each reference the floors of the entry it reproduces."""
    chosen = [entries.get(n) for n in names]
    inputs = make_inputs(
        shapes,
        K,
        r,
        dtype,
        args.device,
        seed=args.seed,
        need_shared=any(e.shared_A for e in chosen),
        need_free=any(not e.shared_A for e in chosen),
    )
    all_ref = args.ref_layers_per_shape <= 0
    weights = (
        {s.name: 1.0 for s in inputs.layers}
        if all_ref
        else _layer_weights(shapes, args.ref_layers_per_shape)
    )
    cell = _Cell(inputs, options(args), weights, all_ref, K, r, dtype)
    dense: dict[str, dict[str, LoRAFactors]] = {}
    rows = [_run_reference(cell, e, dense) for e in chosen if e.dense]
    library = [e for e in chosen if not e.dense]
    rows += run_cell(
        inputs,
        library,
        dtype=dtype,
        K=K,
        r=r,
        options=cell.options,
        warmup=args.warmup,
        repeats=args.repeats,
        quick=args.quick,
        check=_checker(cell, dense),
    )
    floors = next((w.detail["floors"] for w in rows if "floors" in w.detail), None)
    for row in rows:  # references: the floors of the entry they reproduce
        if row.reproduces is not None:
            twin = next((w for w in rows if w.aggregator == row.reproduces), None)
            if twin is not None:
                row.floor_memory_s, row.floor_compute_s = twin.floor_memory_s, twin.floor_compute_s
                row.x_memory = ratio(row.time_s, row.floor_memory_s, args.quick)
                row.x_compute = ratio(row.time_s, row.floor_compute_s, args.quick)
            if floors is not None:
                row.detail["floors"] = floors
    if args.memory:
        fb = factor_bytes(inputs.free or inputs.shared)
        del inputs
        _measure_memory(cell, shapes, fb, rows, args)
    return rows


def _measure_memory(
    cell: _Cell, shapes: ShapeSet, fb: int, rows: list[Row], args: argparse.Namespace
) -> None:
    """Peak memory growth of every row's call, each in a fresh process."""
    for row in rows:
        dense = entries.get(row.aggregator).dense
        spec = spec_for(
            shapes.layers,
            K=cell.K,
            r=cell.r,
            dtype=cell.dtype,
            aggregator=row.aggregator,
            device=args.device,
            seed=args.seed,
            provider=entries.__name__,
            # the dense SGD's peak is reached in its first step: 20 steps suffice here
            options={**cell.options, "sgd_max_steps": min(20, int(cell.options["sgd_max_steps"]))},
            ref_layers=cell.ref_layers if dense else None,
            threads=args.threads,
        )
        record(row, measure(spec, pythonpath=_ROOT), fb)
        row.detail["factor_bytes"] = fb


def options(args: argparse.Namespace) -> dict[str, Any]:
    """The aggregators' and references' options from the command line."""
    return {
        "lam": args.lam,
        "similarity": args.similarity,
        "sgd_lr": args.sgd_lr,
        "sgd_max_steps": args.sgd_max_steps,
        "sgd_time_budget": args.sgd_time_budget,
    }

"""Time every aggregator side by side on real model shapes; check each result before timing it.

Usage: ``python -m benchmarks [--shapes vit_b16 ...] [--ranks 4 8 ...] [--clients 6 ...]
[--device cpu|cuda] [--dtype float32 bfloat16] [--repeats N] [--memory] [--out DIR] [--quick]``.
See ``benchmarks/README.md`` for the columns, the floors and the recorded results.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import torch

if __package__ in (None, ""):  # run as ``python benchmarks/run.py``
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import entries, memory
from benchmarks.cells import DTYPES, Inputs, make_inputs
from benchmarks.checks import Quality, check
from benchmarks.entries import Entry
from benchmarks.floors import Floors, factor_bytes, make_probes
from benchmarks.shapes import SHAPE_SETS, LayerShape
from lorafair.types import LoRAFactors

__all__ = ["AGGREGATORS", "Row", "main", "run_cell"]

AGGREGATORS = entries.names()
"""Every registered aggregator, ``lora_fair_sq`` (``norm="fro_squared"``), and the dense
references ``dense_svd`` (FederatedScope-style FlexLoRA), ``dense_sgd`` / ``dense_sgd_sq`` (the
paper-style LoRA-FAIR solver with ``λ‖ΔB‖_F`` / ``λ‖ΔB‖_F²``)."""

QUICK_NOTE = "smoke run (--quick): medians of 2 calls, too few for stable ratios; none printed"


# ---------------------------------------------------------------------------------------------
# Timing.


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def round_robin(
    calls: Mapping[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Warm every call up, then time one call of each per round, so that load changes on a shared
    machine hit all alike."""
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            times[name].append(_timed(fn, device))
    return times


@dataclass
class Row:
    """One (shape set, dtype, K, r, aggregator) cell of the table."""

    shape_set: str
    n_layers: int
    dtype: str
    K: int
    r: int
    aggregator: str
    time_s: float
    timing: str  # "median of N" | "extrapolated ..." | "≥ ... (budget hit)"
    cos_mean: float
    cos_min: float
    objective: float | None
    ref_objective_layers: float | None  # mean objective over the dense-reference layers
    floor_memory_s: float | None = None
    floor_compute_s: float | None = None
    x_memory: float | None = None  # time / memory floor (None in a smoke run)
    x_compute: float | None = None  # time / compute floor (None in a smoke run)
    peak_extra_mib: float | None = None
    mem_ratio: float | None = None
    mem_note: str = ""
    check: str = "ok"
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Cell:
    """One cell's inputs and settings, shared by the steps of :func:`run_cell`."""

    inputs: Inputs
    options: dict[str, Any]
    ref_layers: list[str]
    ref_weights: dict[str, float]  # reference layer -> number of layers of its shape it stands for
    all_ref: bool
    K: int
    r: int
    dtype: str

    def row(self, entry: Entry, time_s: float, timing: str, q: Quality, **kw: Any) -> Row:
        return Row(
            shape_set=self.inputs.shape_set,
            n_layers=len(self.inputs.layers),
            dtype=self.dtype,
            K=self.K,
            r=self.r,
            aggregator=entry.name,
            time_s=time_s,
            timing=timing,
            cos_mean=q.cos_mean,
            cos_min=q.cos_min,
            objective=q.objective,
            ref_objective_layers=kw.pop("ref_objective_layers", q.objective),
            check="; ".join(q.problems) or "ok",
            **kw,
        )


def _layer_weights(layers: Sequence[LayerShape], per_shape: int) -> dict[str, float]:
    counts: dict[tuple[int, int], int] = {}
    for s in layers:
        counts[(s.d_out, s.d_in)] = counts.get((s.d_out, s.d_in), 0) + 1
    taken: dict[tuple[int, int], list[str]] = {}
    for s in layers:
        names = taken.setdefault((s.d_out, s.d_in), [])
        if len(names) < per_shape:
            names.append(s.name)
    return {n: counts[k] / len(names) for k, names in taken.items() for n in names}


def _run_reference(cell: Cell, entry: Entry, dense: dict[str, dict[str, LoRAFactors]]) -> Row:
    """A dense reference, one reference layer at a time; its time extrapolated to the set."""
    per_layer: dict[str, float] = {}
    out: dict[str, LoRAFactors] = {}
    infos: dict[str, Any] = {}
    for layer in cell.ref_layers:
        t0 = time.perf_counter()
        res, info = entry.run(cell.inputs, cell.options, [layer])
        _sync(cell.inputs.device)
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
    return cell.row(entry, total, timing, q, detail=detail)


def _check_library(
    cell: Cell, entry: Entry, dense: Mapping[str, Mapping[str, LoRAFactors]]
) -> tuple[Quality, float | None, int]:
    """Run once and check; also the objective on the reference layers and the output size."""
    result, _ = entry.run(cell.inputs, cell.options, None)
    q = check(entry, result, cell.inputs, cell.options, dense=dense)
    ref_obj = None
    if entry.norm is not None:
        sub = {n: result[n] for n in cell.ref_layers}
        ref_obj = check(entry, sub, cell.inputs, cell.options, dense={}).objective
    return q, ref_obj, factor_bytes(result)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _ratio(x: float, floor: float | None, quick: bool) -> float | None:
    return None if quick or floor is None or floor <= 0 else x / floor


def run_cell(
    shape_set: str,
    max_layers: int | None,
    dtype: str,
    K: int,
    r: int,
    names: Sequence[str],
    args: argparse.Namespace,
) -> list[Row]:
    """Build one cell's inputs, run and check every entry, time the library ones with the floor
    probes in one round-robin, return its rows."""
    chosen = [entries.get(n) for n in names]
    inputs = make_inputs(
        shape_set,
        max_layers,
        K,
        r,
        dtype,
        args.device,
        seed=args.seed,
        need_shared=any(e.shared_A for e in chosen),
    )
    all_ref = args.ref_layers_per_shape <= 0
    weights = (
        {s.name: 1.0 for s in inputs.layers}
        if all_ref
        else _layer_weights(inputs.layers, args.ref_layers_per_shape)
    )
    cell = Cell(inputs, _options(args), list(weights), weights, all_ref, K, r, dtype)
    dense: dict[str, dict[str, LoRAFactors]] = {}
    rows = [_run_reference(cell, e, dense) for e in chosen if e.dense]
    library = [e for e in chosen if not e.dense]
    checked = {e.name: _check_library(cell, e, dense) for e in library}
    probes = make_probes(inputs, gram=any(e.floor == "gram" for e in chosen))
    calls: dict[str, Callable[[], object]] = {
        e.name: partial(e.run, inputs, cell.options, None) for e in library
    }
    calls.update({"floor:" + k: f for k, f in probes.calls.items()})
    times = round_robin(calls, inputs.device, args.warmup, args.repeats)
    probe_times = {k[6:]: statistics.median(v) for k, v in times.items() if k[:6] == "floor:"}
    floors = Floors(probes, probe_times)
    for e in library:
        q, ref_obj, out_bytes = checked[e.name]
        t = statistics.median(times[e.name])
        clients = inputs.shared if e.shared_A else inputs.free
        in_bytes = factor_bytes(clients)
        mem = floors.memory(in_bytes, out_bytes)
        comp = floors.compute(e.floor, in_bytes // _itemsize(inputs.dtype))
        rows.append(
            cell.row(
                e,
                t,
                f"median of {len(times[e.name])}",
                q,
                ref_objective_layers=ref_obj,
                floor_memory_s=mem,
                floor_compute_s=comp,
                x_memory=_ratio(t, mem, args.quick),
                x_compute=_ratio(t, comp, args.quick),
                detail={"times_s": times[e.name], "out_bytes": out_bytes, "in_bytes": in_bytes},
            )
        )
    for row in rows:  # dense references: the floors of the method they reproduce
        if row.floor_memory_s is None:
            of = entries.get(row.aggregator).reproduces
            twin = next((w for w in rows if w.aggregator == of), None)
            if twin is not None:
                row.floor_memory_s, row.floor_compute_s = twin.floor_memory_s, twin.floor_compute_s
                row.x_memory = _ratio(row.time_s, row.floor_memory_s, args.quick)
                row.x_compute = _ratio(row.time_s, row.floor_compute_s, args.quick)
    probe_info = {
        "probe_times_s": floors.times,
        "gemm_gflops": floors.gemm_rate / 1e9,
        "gram_gflops": floors.gram_rate / 1e9,
        "read_gb_s": probes.in_bytes / floors.times["read"] / 1e9,
        "write_gb_s": probes.in_bytes / floors.times["write"] / 1e9,
    }
    for row in rows:
        row.detail["floors"] = probe_info
    if args.memory:
        _measure_memory(cell, rows, max_layers, args)
    return rows


def _measure_memory(
    cell: Cell, rows: list[Row], max_layers: int | None, args: argparse.Namespace
) -> None:
    """Peak extra memory of every row's call, each in a fresh process (:mod:`benchmarks.memory`)."""
    inputs = cell.inputs
    fb = factor_bytes(inputs.free if inputs.free else inputs.shared)
    for row in rows:
        dense = entries.get(row.aggregator).dense
        spec = memory.MemorySpec(
            shape_set=inputs.shape_set,
            max_layers=max_layers,
            K=cell.K,
            r=cell.r,
            dtype=cell.dtype,
            device=args.device,
            seed=args.seed,
            aggregator=row.aggregator,
            # the dense SGD's peak is reached in its first step: 20 steps suffice here
            options={**cell.options, "sgd_max_steps": min(20, int(cell.options["sgd_max_steps"]))},
            ref_layers=cell.ref_layers if dense else None,
            threads=args.threads,
        )
        rep = memory.measure(spec)
        row.peak_extra_mib = rep["peak_extra_bytes"] / 2**20
        row.mem_ratio = rep["peak_extra_bytes"] / fb
        row.mem_note = rep["method"] + ("" if rep["new_peak"] else " (upper bound)")
        row.detail["factor_bytes"] = fb


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "lam": args.lam,
        "similarity": args.similarity,
        "sgd_lr": args.sgd_lr,
        "sgd_max_steps": args.sgd_max_steps,
        "sgd_time_budget": args.sgd_time_budget,
    }


# ---------------------------------------------------------------------------------------------
# Output.


def _fmt_time(t: float) -> str:
    return f"{t * 1e3:.3g} ms" if t < 1 else f"{t:.3g} s"


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def table(rows: Sequence[Row]) -> str:
    """The Markdown table of all rows."""
    head = (
        "| shapes | dtype | K | r | aggregator | time | timing | × memory floor "
        "| × compute floor | cos(BA, ΔW) mean / min | objective | peak extra | × factor bytes "
        "| check |\n" + "|---" * 14 + "|\n"
    )
    lines = []
    for w in rows:
        mem = "–" if w.peak_extra_mib is None else f"{w.peak_extra_mib:.1f} MiB"
        if "upper bound" in w.mem_note:
            mem = "≤ " + mem
        lines.append(
            f"| {w.shape_set} ({w.n_layers}) | {w.dtype} | {w.K} | {w.r} | {w.aggregator} "
            f"| {_fmt_time(w.time_s)} | {w.timing} | {_fmt(w.x_memory, '.2f')} "
            f"| {_fmt(w.x_compute, '.3g')} | {w.cos_mean:.6f} / {w.cos_min:.6f} "
            f"| {_fmt(w.objective, '.6f')} | {mem} | {_fmt(w.mem_ratio, '.2f')} "
            f"| {'ok' if w.check == 'ok' else 'FAIL'} |"
        )
    return head + "\n".join(lines) + "\n"


BASELINE = "fedit"


def ratios(rows: Sequence[Row], *, quick: bool = False) -> list[dict[str, Any]]:
    """Per cell and same run: every method / FedIT, every dense reference / the method it
    reproduces, the floors' probes; nothing in a smoke run."""
    if quick:
        return []
    cells: dict[tuple[str, str, int, int], dict[str, Row]] = {}
    for w in rows:
        cells.setdefault((w.shape_set, w.dtype, w.K, w.r), {})[w.aggregator] = w
    out = []
    for (s, d, K, r), c in cells.items():
        entry: dict[str, Any] = {"shape_set": s, "dtype": d, "K": K, "r": r}
        pairs = [(n, BASELINE) for n in c if n != BASELINE and not entries.get(n).dense]
        pairs += [(n, of) for n in c if (of := entries.get(n).reproduces) is not None]
        for num, den in pairs:
            if num in c and den in c and c[den].time_s > 0:
                lower = c[num].timing.startswith("≥")
                entry[f"{num} / {den}"] = {
                    "ratio": c[num].time_s / c[den].time_s,
                    "lower_bound": lower,
                }
        for num, den in pairs:
            if den in c and entries.get(num).dense and entries.get(num).norm is not None:
                entry[f"objective {den} vs {num} (reference layers)"] = [
                    c[den].ref_objective_layers,
                    c[num].ref_objective_layers,
                ]
        floors = next(iter(c.values())).detail.get("floors")
        if floors:
            entry["floors"] = floors
        out.append(entry)
    return out


def ratio_lines(rs: Iterable[dict[str, Any]], *, quick: bool = False) -> str:
    if quick:
        return f"- {QUICK_NOTE}\n"
    lines = []
    for e in rs:
        parts = []
        for k, v in e.items():
            if k == "floors":
                t = v["probe_times_s"]
                parts.append(
                    f"floors: read {v['read_gb_s']:.3g} GB/s, write {v['write_gb_s']:.3g} GB/s "
                    f"(memory floor of the input {_fmt_time(t['read'])}; one sum per input "
                    f"tensor {_fmt_time(t['read_per_tensor'])}), "
                    f"GEMM {v['gemm_gflops']:.3g} GFLOP/s"
                    + (
                        f", Grams {_fmt_time(t['gram'])} ({v['gram_gflops']:.3g} GFLOP/s)"
                        if "gram" in t
                        else ""
                    )
                    + (f", dense ΔW {_fmt_time(t['dense'])}" if "dense" in t else "")
                    + (f", cheaper route {_fmt_time(t['route'])}" if "route" in t else "")
                )
            elif isinstance(v, dict):
                parts.append(f"{k} = {'≥ ' if v['lower_bound'] else ''}{v['ratio']:.3g}×")
            elif isinstance(v, list):
                parts.append(f"{k}: {_fmt(v[0], '.6f')} vs {_fmt(v[1], '.6f')}")
        if parts:
            lines.append(
                f"- {e['shape_set']} {e['dtype']} K={e['K']} r={e['r']}: " + "; ".join(parts)
            )
    return "\n".join(lines) + ("\n" if lines else "")


def environment(device: str) -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    env: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "loadavg_1_5_15": list(os.getloadavg()),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def plot(rows: Sequence[Row], out_dir: str) -> list[str]:
    """Time vs rank per aggregator (log scale), one figure per shape set, K and dtype."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install 'lorafair[bench]')", file=sys.stderr)
        return []
    groups: dict[tuple[str, int, str], list[Row]] = {}
    for w in rows:
        groups.setdefault((w.shape_set, w.K, w.dtype), []).append(w)
    paths = []
    for (s, K, d), ws in groups.items():
        if len({w.r for w in ws}) < 2:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for agg in AGGREGATORS:
            pts = sorted((w.r, w.time_s) for w in ws if w.aggregator == agg)
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=agg)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("rank r")
        ax.set_ylabel("server time [s]")
        ax.set_title(f"{s}, K={K}, {d}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, f"time_vs_rank_{s}_K{K}_{d}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# CLI.


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument(
        "--shapes",
        nargs="+",
        default=["vit_b16", "mixer_b16", "llm7b_attn"],
        choices=sorted(SHAPE_SETS),
    )
    p.add_argument(
        "--max-layers", type=int, default=None, help="use only the first N layers of each shape set"
    )
    p.add_argument("--ranks", nargs="+", type=int, default=[4, 8, 16, 32, 64])
    p.add_argument("--clients", "-K", nargs="+", type=int, default=[6, 18, 30])
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=sorted(DTYPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--aggregators", nargs="+", default=list(AGGREGATORS), choices=AGGREGATORS)
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
        help="measure peak extra memory of each cell in a fresh process",
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
    if args.quick:
        args.shapes, args.max_layers = ["vit_b16"], 2
        args.ranks, args.clients, args.dtype = [4, 16], [6], ["float32"]
        args.repeats, args.warmup = 2, 1
        args.sgd_time_budget = 2.0 if args.sgd_time_budget is None else args.sgd_time_budget
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    return args


def _progress(total: int, disable: bool) -> Any:
    if disable:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="cells", file=sys.stderr)


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
    bar = _progress(len(cells), args.no_progress)
    rows: list[Row] = []
    for s, d, K, r in cells:
        if bar is not None:
            bar.set_postfix_str(f"{s} {d} K={K} r={r}")
        elif not args.no_progress:
            print(f"[{len(rows)}] {s} {d} K={K} r={r}", file=sys.stderr, flush=True)
        rows += run_cell(s, args.max_layers, d, K, r, args.aggregators, args)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    rs = ratios(rows, quick=args.quick)
    md = table(rows)
    load_start = ", ".join(f"{x:.2f}" for x in env["loadavg_1_5_15"])
    load_end = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    header = (
        f"{env['date_utc']}; {env['cpu']} ({env['cpu_count']} cores, "
        f"{env['torch_threads']} torch threads); torch {env['torch']}; device {env['device']}"
        + (f" ({env['gpu']})" if "gpu" in env else "")
        + f"; load average (1/5/15 min) at start {load_start}"
        + f", at end {load_end}"
    )
    text = f"{header}\n\n{md}\n{ratio_lines(rs, quick=args.quick)}"
    print(text)
    failures = [w for w in rows if w.check != "ok"]
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(
                {
                    "environment": env,
                    "args": vars(args),
                    "rows": [asdict(w) for w in rows],
                    "ratios": rs,
                },
                f,
                indent=1,
            )
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(text)
        if not args.no_plot:
            plot(rows, args.out)
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

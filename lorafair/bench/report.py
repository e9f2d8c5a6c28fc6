"""The printed report: the environment line, the Markdown table and the same-run ratios."""

from __future__ import annotations

import datetime
import math
import os
import platform
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from lorafair import registry
from lorafair.bench.cell import Row

__all__ = [
    "BASELINE",
    "QUICK_NOTE",
    "environment",
    "fmt_time",
    "header",
    "progress",
    "ratio_lines",
    "ratios",
    "table",
]

BASELINE = registry.names()[0]
"""Every method's time is also given over the registry's first entry, the plain average."""

QUICK_NOTE = "smoke run (--quick): medians of 2 calls, too few for stable ratios; none printed"


def fmt_time(t: float) -> str:
    return f"{t * 1e3:.3g} ms" if t < 1 else f"{t:.3g} s"


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _timing(w: Row) -> str:
    full = w.full_time_s
    if full is None:
        return w.timing
    return f"{w.timing}; {w.full_layers} layers ≈ {fmt_time(full)} (extrapolated)"


def table(rows: Sequence[Row]) -> str:
    """The Markdown table of all rows. Where a cell ran a subset of a model's blocks, the timing
    column also gives the whole model's time, extrapolated by layer count (and says so)."""
    head = (
        "| shapes | dtype | K | r | aggregator | time | timing | × memory floor "
        "| × compute floor | cos(BA, ΔW) mean / min | objective | peak extra | × input bytes "
        "| check |\n" + "|---" * 14 + "|\n"
    )
    lines = []
    for w in rows:
        mem = "–" if w.peak_extra_mib is None else f"{w.peak_extra_mib:.1f} MiB"
        if "upper bound" in w.mem_note:
            mem = "≤ " + mem
        lines.append(
            f"| {w.shape_set} ({w.n_layers}) | {w.dtype} | {w.K} | {w.r} | {w.aggregator} "
            f"| {fmt_time(w.time_s)} | {_timing(w)} | {_fmt(w.x_memory, '.2f')} "
            f"| {_fmt(w.x_compute, '.3g')} | {w.cos_mean:.6f} / {w.cos_min:.6f} "
            f"| {_fmt(w.objective, '.6f')} | {mem} | {_fmt(w.mem_ratio, '.2f')} "
            f"| {'ok' if w.check == 'ok' else 'FAIL'} |"
        )
    return head + "\n".join(lines) + "\n"


def ratios(rows: Sequence[Row], *, quick: bool = False) -> list[dict[str, Any]]:
    """Per cell and same run: every method / the baseline, every reference / the entry it
    reproduces, the objectives of both on the reference layers, the floors' probes; nothing in a
    smoke run."""
    if quick:
        return []
    cells: dict[tuple[str, str, int, int], dict[str, Row]] = {}
    for w in rows:
        cells.setdefault((w.shape_set, w.dtype, w.K, w.r), {})[w.aggregator] = w
    out = []
    for (s, d, K, r), c in cells.items():
        entry: dict[str, Any] = {"shape_set": s, "dtype": d, "K": K, "r": r}
        pairs = [(n, BASELINE) for n, w in c.items() if n != BASELINE and w.reproduces is None]
        pairs += [(n, w.reproduces) for n, w in c.items() if w.reproduces is not None]
        for num, den in pairs:
            if den in c and c[den].time_s > 0:
                entry[f"{num} / {den}"] = {
                    "ratio": c[num].time_s / c[den].time_s,
                    "lower_bound": c[num].timing.startswith("≥"),
                }
        for num, den in pairs:
            if den in c and c[num].reproduces is not None and c[num].objective is not None:
                entry[f"objective {den} vs {num} (reference layers)"] = [
                    c[den].ref_objective_layers,
                    c[num].ref_objective_layers,
                ]
        floors = next(iter(c.values())).detail.get("floors")
        if floors:
            entry["floors"] = floors
        out.append(entry)
    return out


def _floor_line(v: dict[str, Any]) -> str:
    t = v["probe_times_s"]
    return (
        f"floors ({v.get('threads', '?')} threads): read {v['read_gb_s']:.3g} GB/s, "
        f"write {v['write_gb_s']:.3g} GB/s (one sum per input tensor "
        f"{fmt_time(t['read_per_tensor'])}), GEMM {v['gemm_gflops']:.3g} GFLOP/s"
        + (
            f", dgemm {v['gram_gflops']:.3g} GFLOP/s on the Grams' shapes, Grams' essential"
            f" flops at it {fmt_time(t['gram_floor'])}"
            if "gram" in t
            else ""
        )
        + (f", dense ΔW {fmt_time(t['dense'])} (the shapes where probed)" if "dense" in t else "")
        + (
            f", compute floor {fmt_time(t['route'])} (per shape the cheaper)"
            if "route" in t
            else ""
        )
    )


def ratio_lines(rs: Iterable[dict[str, Any]], *, quick: bool = False) -> str:
    """One line per cell of :func:`ratios`."""
    if quick:
        return f"- {QUICK_NOTE}\n"
    lines = []
    for e in rs:
        parts = []
        for k, v in e.items():
            if k == "floors":
                parts.append(_floor_line(v))
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
    """The machine and load a run was measured on."""
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


def header(env: dict[str, Any]) -> str:
    """One line naming the machine, the date and the load at the start and the end of a run."""
    load_start = ", ".join(f"{x:.2f}" for x in env["loadavg_1_5_15"])
    load_end = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{env['date_utc']}; {env['cpu']} ({env['cpu_count']} cores, "
        f"{env['torch_threads']} torch threads); torch {env['torch']}; device {env['device']}"
        + (f" ({env['gpu']})" if "gpu" in env else "")
        + f"; load average (1/5/15 min) at start {load_start}, at end {load_end}"
    )


def progress(total: int, *, desc: str, disable: bool = False, mininterval: float = 0.1) -> Any:
    """A tqdm bar on stderr for ``total`` steps, or ``None`` when ``disable`` or tqdm is missing
    (tqdm is in the ``bench`` extra; without it a run prints no bar)."""
    if disable:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, file=sys.stderr, mininterval=mininterval)

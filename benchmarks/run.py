"""Time every aggregator side by side on real model shapes; check each result before timing it.

Usage: ``python -m benchmarks [--shapes vit_b16 ...] [--ranks 4 8 ...] [--clients 6 ...]
[--device cpu|cuda] [--dtype float32 bfloat16] [--repeats N] [--memory] [--out DIR] [--quick]``.
See ``benchmarks/README.md`` for the columns and the recorded results.
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
from typing import Any

import torch

if __package__ in (None, ""):  # run as ``python benchmarks/run.py``
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import new_methods
from benchmarks import references as ref
from benchmarks.shapes import SHAPE_SETS, LayerShape, factor_bytes, make_clients
from lorafair.aggregate import fedit, ffa_lora, flexlora, flora, lora_fair
from lorafair.types import LoRAFactors

__all__ = ["AGGREGATORS", "Inputs", "Row", "call_aggregator", "layers_for", "main", "make_inputs"]

LIBRARY = ("fedit", "ffa_lora", "flora", "flexlora", "lora_fair", "lora_fair_sq")
LIBRARY += new_methods.NAMES  # issue 16's methods, through the registry
DENSE = ("dense_svd", "dense_sgd", "dense_sgd_sq")
AGGREGATORS = LIBRARY + DENSE
"""``lora_fair``: ``norm="fro"``; ``lora_fair_sq``: ``norm="fro_squared"``; ``dense_svd``: the
FederatedScope-style FlexLoRA; ``dense_sgd`` / ``dense_sgd_sq``: the paper-style LoRA-FAIR solver
with ``λ‖ΔB‖_F`` / ``λ‖ΔB‖_F²``."""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}

# Correctness tolerances per dtype (relative errors of factored products; output rounding of
# bfloat16 alone is ~4e-3). The objective tolerance is absolute, on an objective of order 1e-2.
REL_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2}
OBJ_TOL = {torch.float64: 1e-9, torch.float32: 1e-6, torch.bfloat16: 1e-3}


@dataclass
class Inputs:
    """The clients of one cell: ``free`` (A_k differ) and ``shared`` (A_k equal, for FFA-LoRA)."""

    shape_set: str
    layers: list[LayerShape]
    free: list[dict[str, LoRAFactors]]
    shared: list[dict[str, LoRAFactors]]
    dtype: torch.dtype
    device: torch.device


def layers_for(shape_set: str, max_layers: int | None) -> list[str]:
    """Layer names of a shape set, truncated to the first ``max_layers``."""
    return [s.name for s in SHAPE_SETS[shape_set][:max_layers]]


def make_inputs(
    shape_set: str,
    max_layers: int | None,
    K: int,
    r: int,
    dtype: str,
    device: str,
    *,
    seed: int = 0,
    need_shared: bool = True,
    need_free: bool = True,
) -> Inputs:
    """Build the synthetic clients of one cell (deterministic in ``seed``)."""
    layers = SHAPE_SETS[shape_set][:max_layers]
    dt = DTYPES[dtype]
    free = make_clients(layers, K, r, dtype=dt, device=device, seed=seed) if need_free else []
    shared = (
        make_clients(layers, K, r, dtype=dt, device=device, seed=seed + 1, shared_A=True)
        if need_shared
        else []
    )
    return Inputs(shape_set, list(layers), free, shared, dt, torch.device(device))


def call_aggregator(
    name: str,
    inputs: Inputs,
    options: Mapping[str, Any],
    *,
    ref_layers: Sequence[str] | None,
) -> tuple[dict[str, LoRAFactors], dict[str, ref.SGDInfo]]:
    """Run aggregator ``name`` once (dense references only on ``ref_layers``)."""
    lam = float(options.get("lam", 0.01))
    similarity = options.get("similarity", "flat")
    sync = inputs.device.type == "cuda"
    if name == "fedit":
        return fedit(inputs.free), {}
    if name == "ffa_lora":
        return ffa_lora(inputs.shared), {}
    if name == "flora":
        return flora(inputs.free), {}
    if name == "flexlora":
        return flexlora(inputs.free), {}
    if name in ("lora_fair", "lora_fair_sq"):
        kwargs: dict[str, Any] = {
            "lam": lam,
            "norm": "fro" if name == "lora_fair" else "fro_squared",
        }
        if similarity != "flat":
            kwargs["similarity"] = similarity
        out: dict[str, LoRAFactors] = lora_fair(inputs.free, **kwargs)
        return out, {}
    if name in new_methods.NAMES:
        clients = inputs.shared if new_methods.needs_shared_A(name) else inputs.free
        return new_methods.call(name, clients), {}
    if name == "dense_svd":
        return ref.dense_svd_flexlora(inputs.free, layers=ref_layers), {}
    if name in ("dense_sgd", "dense_sgd_sq"):
        return ref.dense_sgd_lora_fair(
            inputs.free,
            lam=lam,
            norm="fro" if name == "dense_sgd" else "fro_squared",
            similarity=similarity,
            lr=float(options.get("sgd_lr", 0.01)),
            max_steps=int(options.get("sgd_max_steps", 1000)),
            time_budget_s=options.get("sgd_time_budget"),
            layers=ref_layers,
            sync=sync,
        )
    raise ValueError(f"unknown aggregator {name!r}; choose from {AGGREGATORS}")


# ---------------------------------------------------------------------------------------------
# Correctness: independent float64 factored checks of every result.


@dataclass
class Quality:
    cos_mean: float
    cos_min: float
    objective: float | None = None  # mean LoRA-FAIR objective over the checked layers
    problems: list[str] = field(default_factory=list)


def _close(x: torch.Tensor, y: torch.Tensor, tol: float) -> float:
    """Relative Frobenius distance of two tensors (float64)."""
    x64, y64 = x.double(), y.double()
    return float(torch.linalg.norm(x64 - y64) / max(float(torch.linalg.norm(y64)), 1e-300))


def check(
    name: str,
    result: Mapping[str, LoRAFactors],
    inputs: Inputs,
    options: Mapping[str, Any],
    *,
    dense: Mapping[str, Mapping[str, LoRAFactors]],
) -> Quality:
    """Check ``result`` of aggregator ``name``; problems are collected, never ignored."""
    shared = name == "ffa_lora" or (name in new_methods.NAMES and new_methods.needs_shared_A(name))
    clients = inputs.shared if shared else inputs.free
    p = ref.normalised(None, len(clients))
    tol = REL_TOL[inputs.dtype]
    otol = OBJ_TOL[inputs.dtype]
    lam = float(options.get("lam", 0.01))
    similarity = options.get("similarity", "flat")
    cosines: list[float] = []
    objectives: list[float] = []
    problems: list[str] = []
    for layer in result:
        A, B = result[layer]
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            problems.append(f"{layer}: non-finite output")
            continue
        A_s, B_s = ref.stack64(clients, layer, p)
        A_bar, B_bar = ref.weighted_mean64(clients, layer, p)
        ideal = ref.fro_norm(B_s, A_s)
        cos = ref.flat_cosine(B_s, A_s, B.double(), A.double())
        cosines.append(cos)
        if name in ("fedit", "ffa_lora"):
            for label, got, want in (("A", A, A_bar), ("B", B, B_bar)):
                e = _close(got, want, tol)
                if e > tol:
                    problems.append(f"{layer}: {label} differs from Σ p_k {label}_k by {e:.2e}")
        if name in ("ffa_lora", "flora"):
            e = ref.diff_norm(B, A, B_s, A_s) / ideal
            if e > tol:
                problems.append(f"{layer}: ‖BA − ΔW‖/‖ΔW‖ = {e:.2e} > {tol:g} (must be exact)")
        if name == "flexlora":
            r = int(A.shape[0])
            sv = ref.singular_values(B_s, A_s)
            tail = math.sqrt(float((sv[r:] ** 2).sum()))
            err = ref.diff_norm(B, A, B_s, A_s)
            if abs(err - tail) > tol * ideal:
                problems.append(
                    f"{layer}: ‖ΔW − BA‖ = {err:.6e} but the Eckart–Young optimum is {tail:.6e}"
                )
            if layer in dense.get("dense_svd", {}):
                Ad, Bd = dense["dense_svd"][layer]
                e = ref.diff_norm(B, A, Bd, Ad) / ref.fro_norm(Bd, Ad)
                if e > tol:
                    problems.append(f"{layer}: differs from the dense SVD product by {e:.2e}")
        if name in ("lora_fair", "lora_fair_sq", "dense_sgd", "dense_sgd_sq"):
            norm: ref.Norm = "fro" if name in ("lora_fair", "dense_sgd") else "fro_squared"
            obj = ref.fair_objective(
                A_s, B_s, A_bar, B_bar, B, lam=lam, norm=norm, similarity=similarity
            )
            objectives.append(obj)
            if _close(A, A_bar, tol) > tol:
                problems.append(f"{layer}: A is not Ā = Σ p_k A_k")
        if name in ("lora_fair", "lora_fair_sq"):
            norm = "fro" if name == "lora_fair" else "fro_squared"
            base = ref.fair_objective(
                A_s, B_s, A_bar, B_bar, B_bar, lam=lam, norm=norm, similarity=similarity
            )
            if obj > base + otol:
                problems.append(f"{layer}: objective {obj:.8f} worse than FedIT's {base:.8f}")
            sgd = "dense_sgd" if name == "lora_fair" else "dense_sgd_sq"
            if layer in dense.get(sgd, {}):
                B_ref = dense[sgd][layer].B
                o_ref = ref.fair_objective(
                    A_s, B_s, A_bar, B_bar, B_ref, lam=lam, norm=norm, similarity=similarity
                )
                if obj > o_ref + otol:
                    problems.append(
                        f"{layer}: objective {obj:.8f} worse than the dense SGD's {o_ref:.8f}"
                    )
    if name in new_methods.NAMES:
        problems += new_methods.check(name, result, clients, tol)
    return Quality(
        cos_mean=statistics.fmean(cosines) if cosines else float("nan"),
        cos_min=min(cosines) if cosines else float("nan"),
        objective=statistics.fmean(objectives) if objectives else None,
        problems=problems,
    )


# ---------------------------------------------------------------------------------------------
# Timing.


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(
    fn: Callable[[], object], device: torch.device, warmup: int, repeats: int
) -> list[float]:
    """Wall times of ``repeats`` calls after ``warmup`` untimed ones (synchronised on CUDA)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
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
    peak_extra_mib: float | None = None
    mem_ratio: float | None = None
    mem_note: str = ""
    check: str = "ok"
    detail: dict[str, Any] = field(default_factory=dict)


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


def run_cell(
    shape_set: str,
    max_layers: int | None,
    dtype: str,
    K: int,
    r: int,
    aggs: Sequence[str],
    args: argparse.Namespace,
) -> list[Row]:
    """Build one cell's inputs, run and check every aggregator, return its rows."""
    options = _options(args)
    inputs = make_inputs(
        shape_set,
        max_layers,
        K,
        r,
        dtype,
        args.device,
        seed=args.seed,
        need_shared=any(a == "ffa_lora" or a in new_methods.SHARED_A for a in aggs),
    )
    n_layers = len(inputs.layers)
    all_ref = args.ref_layers_per_shape <= 0
    weights = (
        {s.name: 1.0 for s in inputs.layers}
        if all_ref
        else _layer_weights(inputs.layers, args.ref_layers_per_shape)
    )
    ref_names = list(weights)
    rows: list[Row] = []
    dense: dict[str, dict[str, LoRAFactors]] = {}
    # Dense references first (their results are what the library's are checked against).
    for name in [a for a in aggs if a in DENSE]:
        per_layer: dict[str, float] = {}
        out: dict[str, LoRAFactors] = {}
        infos: dict[str, ref.SGDInfo] = {}
        for layer in ref_names:
            _sync(inputs.device)
            t0 = time.perf_counter()
            res, info = call_aggregator(name, inputs, options, ref_layers=[layer])
            _sync(inputs.device)
            per_layer[layer] = time.perf_counter() - t0
            out.update(res)
            infos.update(info)
        dense[name] = out
        total = sum(per_layer[n] * weights[n] for n in ref_names)
        budget_hit = any(i.stop == "time_budget" for i in infos.values())
        if all_ref or len(ref_names) == n_layers:
            timing = "1 run, all layers"
        else:
            timing = f"extrapolated from {len(ref_names)}/{n_layers} layers"
        if budget_hit:
            timing = "≥ " + timing + " (SGD time budget hit: lower bound)"
        q = check(name, out, inputs, options, dense=dense)
        detail: dict[str, Any] = {"per_layer_s": per_layer}
        if infos:
            detail["sgd"] = {n: asdict(i) for n, i in infos.items()}
        rows.append(
            Row(
                shape_set,
                n_layers,
                dtype,
                K,
                r,
                name,
                total,
                timing,
                q.cos_mean,
                q.cos_min,
                q.objective,
                q.objective,
                check="; ".join(q.problems) or "ok",
                detail=detail,
            )
        )
    library = [a for a in aggs if a in LIBRARY]
    quality: dict[str, tuple[Quality, float | None]] = {}
    for name in library:
        result, _ = call_aggregator(name, inputs, options, ref_layers=None)
        q = check(name, result, inputs, options, dense=dense)
        ref_obj = None
        if name.startswith("lora_fair"):
            sub = {n: result[n] for n in ref_names}
            ref_obj = check(name, sub, inputs, options, dense={}).objective
        del result
        quality[name] = (q, ref_obj)
    # Timed round-robin (warm-up of every aggregator first, then one call of each per repeat) so
    # that load changes on a shared machine hit all aggregators alike.
    times: dict[str, list[float]] = {name: [] for name in library}
    for _ in range(args.warmup):
        for name in library:
            call_aggregator(name, inputs, options, ref_layers=None)
    for _ in range(args.repeats):
        for name in library:
            times[name] += time_calls(
                lambda name=name: call_aggregator(name, inputs, options, ref_layers=None),  # type: ignore[misc]
                inputs.device,
                0,
                1,
            )
    for name in library:
        q, ref_obj = quality[name]
        rows.append(
            Row(
                shape_set,
                n_layers,
                dtype,
                K,
                r,
                name,
                statistics.median(times[name]),
                f"median of {len(times[name])}",
                q.cos_mean,
                q.cos_min,
                q.objective,
                ref_obj,
                check="; ".join(q.problems) or "ok",
                detail={"times_s": times[name]},
            )
        )
    if args.memory:
        fb = factor_bytes(inputs.free if inputs.free else inputs.shared)
        for row in rows:
            spec = {
                "shape_set": shape_set,
                "max_layers": max_layers,
                "K": K,
                "r": r,
                "dtype": dtype,
                "device": args.device,
                "seed": args.seed,
                "aggregator": row.aggregator,
                # the dense SGD's peak is reached in its first step: 20 steps suffice here
                "options": {**options, "sgd_max_steps": min(20, int(options["sgd_max_steps"]))},
                "ref_layers": ref_names if row.aggregator in DENSE else None,
                "threads": args.threads,
            }
            rep = _memory_measure(spec)
            row.peak_extra_mib = rep["peak_extra_bytes"] / 2**20
            row.mem_ratio = rep["peak_extra_bytes"] / fb
            row.mem_note = rep["method"] + ("" if rep["new_peak"] else " (upper bound)")
            row.detail["factor_bytes"] = fb
    return rows


def _memory_measure(spec: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.memory import measure

    return measure(spec)


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
        "| shapes | dtype | K | r | aggregator | time | timing | cos(BA, ΔW) mean / min "
        "| objective | peak extra | × factor bytes | check |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for w in rows:
        mem = "–" if w.peak_extra_mib is None else f"{w.peak_extra_mib:.1f} MiB"
        if "upper bound" in w.mem_note:
            mem = "≤ " + mem
        lines.append(
            f"| {w.shape_set} ({w.n_layers}) | {w.dtype} | {w.K} | {w.r} | {w.aggregator} "
            f"| {_fmt_time(w.time_s)} | {w.timing} | {w.cos_mean:.6f} / {w.cos_min:.6f} "
            f"| {_fmt(w.objective, '.6f')} | {mem} | {_fmt(w.mem_ratio, '.2f')} "
            f"| {'ok' if w.check == 'ok' else 'FAIL'} |"
        )
    return head + "\n".join(lines) + "\n"


def ratios(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """Per cell: lora_fair/fedit, dense_sgd/lora_fair, dense_svd/flexlora (same run)."""
    cells: dict[tuple[str, str, int, int], dict[str, Row]] = {}
    for w in rows:
        cells.setdefault((w.shape_set, w.dtype, w.K, w.r), {})[w.aggregator] = w
    out = []
    for (s, d, K, r), c in cells.items():
        entry: dict[str, Any] = {"shape_set": s, "dtype": d, "K": K, "r": r}
        for num, den, label in (
            ("lora_fair", "fedit", "lora_fair / fedit"),
            ("lora_fair_sq", "fedit", "lora_fair_sq / fedit"),
            ("dense_sgd", "lora_fair", "dense_sgd / lora_fair"),
            ("dense_sgd_sq", "lora_fair_sq", "dense_sgd_sq / lora_fair_sq"),
            ("dense_svd", "flexlora", "dense_svd / flexlora"),
        ):
            if num in c and den in c and c[den].time_s > 0:
                lower = c[num].timing.startswith("≥")
                entry[label] = {"ratio": c[num].time_s / c[den].time_s, "lower_bound": lower}
        for fair, sgd in (("lora_fair", "dense_sgd"), ("lora_fair_sq", "dense_sgd_sq")):
            if fair in c and sgd in c:
                entry[f"objective {fair} vs {sgd} (reference layers)"] = [
                    c[fair].ref_objective_layers,
                    c[sgd].ref_objective_layers,
                ]
        out.append(entry)
    return out


def ratio_lines(rs: Iterable[dict[str, Any]]) -> str:
    lines = []
    for e in rs:
        parts = []
        for k, v in e.items():
            if isinstance(v, dict):
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
    rs = ratios(rows)
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
    text = f"{header}\n\n{md}\n{ratio_lines(rs)}"
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

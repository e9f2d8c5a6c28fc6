"""Outputs of a run over seeds: Markdown + JSON with intervals, and plots that do not exaggerate.

``results[model][method]`` is the list of that method's :class:`MethodResult`, one per seed, in
the same seed order for every method (the pairing :mod:`examples.stats` relies on).
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from examples.loop import MethodResult
from examples.stats import paired, summarize, verdict

__all__ = [
    "REFERENCE",
    "accuracy_table",
    "all_finite",
    "bias_table",
    "summary",
    "write_outputs",
]

Results = Mapping[str, Mapping[str, Sequence[MethodResult]]]
REFERENCE = "fedit"
"""The method every other one is compared with (the paper's baseline)."""
LEVEL = 0.95


def _final_avgs(runs: Sequence[MethodResult]) -> list[float]:
    return [r.final["avg"] for r in runs]


def summary(results: Results) -> dict[str, Any]:
    """Per model: each method's mean ± std, its paired difference to FedIT, and the verdict."""
    out: dict[str, Any] = {}
    for model, by_method in results.items():
        runs = {m: _final_avgs(rs) for m, rs in by_method.items()}
        v = verdict(runs, level=LEVEL)
        rows: dict[str, Any] = {}
        for m, xs in runs.items():
            s = summarize(xs)
            row: dict[str, Any] = {"mean": s.mean, "std": s.std, "n": s.n, "per_seed": xs}
            if REFERENCE in runs and m != REFERENCE:
                pr = paired(xs, runs[REFERENCE], level=LEVEL)
                row["vs_" + REFERENCE] = {
                    "mean": pr.mean,
                    "low": None if math.isnan(pr.low) else pr.low,
                    "high": None if math.isnan(pr.high) else pr.high,
                    "level": pr.level,
                    "significant": pr.significant,
                    "tie": pr.tie,
                    "constant": pr.constant,
                }
            rows[m] = row
        out[model] = {
            "methods": rows,
            "verdict": {
                "best": v.best,
                "leader": v.leader,
                "not_separated": list(v.not_separated),
                "level": v.level,
                "text": v.text,
            },
        }
    return out


def _interval(d: Mapping[str, Any]) -> str:
    if d["tie"]:
        return "0.00 (tie: identical on every seed)"
    if d["low"] is None:
        return f"{d['mean']:+.2f} (one seed: no interval)"
    if d["constant"]:
        return f"{d['mean']:+.2f} on every seed (zero variance: no interval) n.s."
    label = "significant" if d["significant"] else "n.s."
    return f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}] {label}"


def accuracy_table(results: Results, domains: Sequence[str]) -> str:
    """Per model: final-round accuracy per domain (mean over seeds), avg mean ± std, Δ vs FedIT."""
    summ = summary(results)
    lines = []
    for model, by_method in results.items():
        s = summ[model]
        n = next(iter(s["methods"].values()))["n"]
        lines += [f"### {model} ({n} seed{'s' if n != 1 else ''})", ""]
        lines.append(
            "| method | "
            + " | ".join(domains)
            + f" | avg (mean ± std) | per seed | Δ avg vs {REFERENCE} [{100 * LEVEL:.0f}% CI] |"
        )
        lines.append("|---" * (len(domains) + 4) + "|")
        best = s["verdict"]["best"]
        for m, runs in by_method.items():
            row = s["methods"][m]
            cells = [f"{summarize([r.final[d] for r in runs]).mean:.2f}" for d in domains]
            avg = f"{row['mean']:.2f} ± {row['std']:.2f}"
            if m == best:
                avg = f"**{avg}**"
            seeds = " / ".join(f"{x:.2f}" for x in row["per_seed"])
            diff = _interval(row["vs_" + REFERENCE]) if "vs_" + REFERENCE in row else "—"
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {avg} | {seeds} | {diff} |")
        lines += ["", f"Verdict: {s['verdict']['text']}.", ""]
    return "\n".join(lines)


def _mean_over_seeds(runs: Sequence[MethodResult], key: str) -> list[float]:
    per_round = zip(*[[d.get(key, math.nan) for d in r.diagnostics] for r in runs], strict=True)
    return [math.fsum(v) / len(v) for v in per_round]


def bias_table(results: Results) -> str:
    """Per model and round: every method's ``cos(BA, ΔW)`` (mean over seeds and layers).

    For a method that reports Table 4's columns (LoRA-FAIR) also ``cos(B', B̄)`` and FedIT's
    ``cos(B̄Ā, ΔW)`` at the same uploads (what FedIT would have sent back from its clients).
    """
    lines = []
    for model, by_method in results.items():
        methods = [m for m, rs in by_method.items() if rs and rs[0].diagnostics[0]]
        if not methods:
            continue
        table4 = [m for m in methods if "cos_B_prime_B_bar" in by_method[m][0].diagnostics[0]]
        lines += [f"### {model}", ""]
        head = "| round | " + " | ".join(methods)
        for m in table4:
            head += f" | {m}: cos(B', B̄) | {m}: FedIT's cos(B̄Ā, ΔW) at its uploads"
        lines += [head + " |", "|---" * (len(methods) + 1 + 2 * len(table4)) + "|"]
        cols = [_mean_over_seeds(by_method[m], "cos_agg_dW") for m in methods]
        for m in table4:
            cols.append(_mean_over_seeds(by_method[m], "cos_B_prime_B_bar"))
            cols.append(_mean_over_seeds(by_method[m], "fedit_cos_B_bar_A_bar_dW"))
        for t in range(len(cols[0])):
            lines.append(f"| {t + 1} | " + " | ".join(f"{c[t]:.6f}" for c in cols) + " |")
        lines.append("")
    return "\n".join(lines)


def _plots(results: Results, out: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = summary(results)
    models = list(results)
    fig, axes = plt.subplots(
        2, len(models), figsize=(6 * len(models), 8), squeeze=False, height_ratios=(3, 2)
    )
    for j, model in enumerate(models):
        ax, fx = axes[0][j], axes[1][j]
        by_method = results[model]
        for m, runs in by_method.items():
            per_round = list(zip(*[[a["avg"] for a in r.accuracy] for r in runs], strict=True))
            xs = range(1, len(per_round) + 1)
            mean = [math.fsum(v) / len(v) for v in per_round]
            line = ax.plot(xs, mean, marker=".", label=m)[0]
            ax.fill_between(
                xs,
                [min(v) for v in per_round],
                [max(v) for v in per_round],
                alpha=0.15,
                color=line.get_color(),
            )
        n = len(next(iter(by_method.values())))
        ax.set_ylim(0, 100)
        ax.set_title(f"{model}: average test accuracy\n(line: mean, band: min–max over {n} seeds)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("round")
        ax.set_ylabel("accuracy (%), full 0–100 scale")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        # Final-round paired differences vs FedIT with their intervals: the honest zoom.
        rows = [
            (m, r["vs_" + REFERENCE])
            for m, r in summ[model]["methods"].items()
            if "vs_" + REFERENCE in r
        ]
        widths = [
            abs(v) for _, d in rows for v in (d["low"], d["high"], d["mean"]) if v is not None
        ]
        span = max([*widths, 1.0]) * 1.15
        for i, (_, d) in enumerate(rows):
            lo, hi = d["low"], d["high"]
            if lo is not None:
                fx.plot([lo, hi], [i, i], color="k", lw=2)
            fx.plot([d["mean"]], [i], "o", color="C0" if not d["significant"] else "C3")
            tag = "tie" if d["tie"] else ("significant" if d["significant"] else "n.s.")
            fx.annotate(tag, (span * 0.98, i), ha="right", va="center", fontsize=8)
        fx.axvline(0.0, color="grey", lw=1)
        fx.set_xlim(-span, span)
        fx.set_yticks(range(len(rows)), [m for m, _ in rows])
        fx.set_ylim(-0.7, len(rows) - 0.3)
        fx.set_xlabel(
            f"final avg accuracy minus {REFERENCE} (points), {100 * LEVEL:.0f}% paired t-CI"
        )
        fx.set_title(textwrap.fill(summ[model]["verdict"]["text"], 80), fontsize=8)
        fx.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    acc_path = out / "accuracy.png"
    fig.savefig(acc_path, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        by_method = results[model]
        names = list(by_method)
        first = [by_method[m][0] for m in names]
        xs = range(len(names))
        up = [sum(r.bytes_up) / len(r.bytes_up) / 2**20 for r in first]
        down = [sum(r.bytes_down) / len(r.bytes_down) / 2**20 for r in first]
        ax.bar([x - 0.2 for x in xs], up, width=0.4, label="upload")
        ax.bar([x + 0.2 for x in xs], down, width=0.4, label="download")
        ax.set_xticks(list(xs), names, rotation=20)
        ax.set_ylabel("MiB per round (all clients)")
        ax.set_title(f"{model}: LoRA communication per round")
        ax.legend()
    fig.tight_layout()
    comm_path = out / "communication.png"
    fig.savefig(comm_path, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for m, runs in results[model].items():
            if not runs[0].diagnostics[0]:
                continue
            per_round = list(
                zip(*[[1.0 - d["cos_agg_dW"] for d in r.diagnostics] for r in runs], strict=True)
            )
            xs = range(1, len(per_round) + 1)
            floor = 1e-16
            mean = [max(math.fsum(v) / len(v), floor) for v in per_round]
            line = ax.plot(xs, mean, marker=".", label=m)[0]
            ax.fill_between(
                xs,
                [max(min(v), floor) for v in per_round],
                [max(max(v), floor) for v in per_round],
                alpha=0.15,
                color=line.get_color(),
            )
        ax.set_yscale("log")
        ax.set_title(f"{model}: aggregation bias of each method's server output")
        ax.set_xlabel("round")
        ax.set_ylabel("1 − cos(BA, ΔW), mean over layers (log; 1e-16 = exact)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    bias_path = out / "bias.png"
    fig.savefig(bias_path, dpi=110)
    plt.close(fig)
    return {"accuracy_plot": acc_path, "communication_plot": comm_path, "bias_plot": bias_path}


def write_outputs(
    results: Results,
    domains: Sequence[str],
    out: Path,
    *,
    config: Mapping[str, Any],
    plots: bool = True,
) -> dict[str, Path]:
    """Write ``results.md``, ``results.json`` (every per-round number of every seed), plots."""
    out.mkdir(parents=True, exist_ok=True)
    seeds = config.get("seed_list", [])
    md = [
        "# Federated LoRA: test accuracy of the global model after the final round (%)",
        "",
        f"Seeds {seeds}: every method runs on the same seeds (LoRA and head initialisation, "
        "client SGD order, FLoRA's re-initialisation); the data split and the pre-trained base "
        f"are fixed by the first seed. Per-domain columns are means over seeds. Δ vs {REFERENCE}: "
        f"mean paired difference over seeds and its two-sided {100 * LEVEL:.0f}% Student-t "
        "interval (n.s. = the interval contains 0). Bold only for a method that beats every "
        "other beyond its Bonferroni-adjusted paired interval.",
        "",
        accuracy_table(results, domains),
    ]
    bias = bias_table(results)
    if bias:
        md += [
            "## Aggregation bias per round: cos(BA, ΔW) of each method's server output",
            "",
            "Mean over seeds and LoRA layers; ΔW = Σ p_k B_k A_k of that method's own uploads. "
            "fedit's column is its cos(B̄Ā, ΔW); ffa_lora and flora are exact (1 up to rounding).",
            "",
            bias,
        ]
    md += ["## Communication per round (LoRA factors, MiB summed over participating clients)", ""]
    md.append("| model | method | upload | download |")
    md.append("|---|---|---|---|")
    for model, by_method in results.items():
        for m, runs in by_method.items():
            r = runs[0]
            u = sum(r.bytes_up) / len(r.bytes_up) / 2**20
            d = sum(r.bytes_down) / len(r.bytes_down) / 2**20
            md.append(f"| {model} | {m} | {u:.3f} | {d:.3f} |")
    md.append("")
    paths = {"markdown": out / "results.md", "json": out / "results.json"}
    paths["markdown"].write_text("\n".join(md))
    payload = {
        "config": dict(config),
        "domains": list(domains),
        "summary": summary(results),
        "results": {
            model: {
                m: [
                    {
                        "seed": r.seed,
                        "final": r.final,
                        "accuracy": r.accuracy,
                        "bytes_up": r.bytes_up,
                        "bytes_down": r.bytes_down,
                        "diagnostics": r.diagnostics,
                        "seconds": r.seconds,
                    }
                    for r in runs
                ]
                for m, runs in by_method.items()
            }
            for model, by_method in results.items()
        },
    }
    text = json.dumps(payload, indent=2, allow_nan=False, default=str)
    paths["json"].write_text(text)
    if plots:
        paths |= _plots(results, out)
    return paths


def all_finite(results: Results) -> bool:
    """Whether every accuracy and diagnostic number is finite."""
    return all(
        math.isfinite(v)
        for by_method in results.values()
        for runs in by_method.values()
        for r in runs
        for d in (*r.accuracy, *r.diagnostics)
        for v in d.values()
    )

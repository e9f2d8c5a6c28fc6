"""Outputs of a run: Table-1-style Markdown + JSON, accuracy and communication plots."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from examples.loop import MethodResult

__all__ = ["accuracy_table", "diagnostics_table", "write_outputs"]


def accuracy_table(results: Mapping[str, Sequence[MethodResult]], domains: Sequence[str]) -> str:
    """One Markdown table per model: final-round accuracy per domain and the average."""
    lines = []
    for model, rows in results.items():
        lines += [f"### {model}", ""]
        lines.append("| method | " + " | ".join(domains) + " | avg |")
        lines.append("|---" * (len(domains) + 2) + "|")
        best = max(r.final["avg"] for r in rows)
        for r in rows:
            cells = [f"{r.final[d]:.2f}" for d in domains]
            avg = f"{r.final['avg']:.2f}"
            lines.append(
                f"| {r.method} | "
                + " | ".join(cells)
                + f" | {'**' + avg + '**' if r.final['avg'] == best else avg} |"
            )
        lines.append("")
    return "\n".join(lines)


def diagnostics_table(results: Mapping[str, Sequence[MethodResult]]) -> str:
    """LoRA-FAIR's Table-4 columns per round (means over layers)."""
    lines = []
    for model, rows in results.items():
        for r in rows:
            if not any(r.diagnostics):
                continue
            lines += [f"### {model} / {r.method}", ""]
            lines.append("| round | cos(B', B̄) | cos(B'Ā, ΔW) | FedIT cos(B̄Ā, ΔW) | avg acc |")
            lines.append("|---|---|---|---|---|")
            for t, (d, acc) in enumerate(zip(r.diagnostics, r.accuracy, strict=True), start=1):
                lines.append(
                    f"| {t} | {d['cos_B_prime_B_bar']:.6f} | {d['cos_B_prime_A_bar_dW']:.6f} | "
                    f"{d['fedit_cos_B_bar_A_bar_dW']:.6f} | {acc['avg']:.2f} |"
                )
            lines.append("")
    return "\n".join(lines)


def _plots(results: Mapping[str, Sequence[MethodResult]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results)
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for r in results[model]:
            xs = range(1, len(r.accuracy) + 1)
            ax.plot(xs, [a["avg"] for a in r.accuracy], marker=".", label=r.method)
        ax.set_title(f"{model}: average test accuracy")
        ax.set_xlabel("round")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    acc_path = out / "accuracy.png"
    fig.savefig(acc_path, dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        rows = results[model]
        xs = range(len(rows))
        up = [sum(r.bytes_up) / len(r.bytes_up) / 2**20 for r in rows]
        down = [sum(r.bytes_down) / len(r.bytes_down) / 2**20 for r in rows]
        ax.bar([x - 0.2 for x in xs], up, width=0.4, label="upload")
        ax.bar([x + 0.2 for x in xs], down, width=0.4, label="download")
        ax.set_xticks(list(xs), [r.method for r in rows], rotation=20)
        ax.set_ylabel("MiB per round (all clients)")
        ax.set_title(f"{model}: LoRA communication per round")
        ax.legend()
    fig.tight_layout()
    comm_path = out / "communication.png"
    fig.savefig(comm_path, dpi=120)
    plt.close(fig)
    return [acc_path, comm_path]


def write_outputs(
    results: Mapping[str, Sequence[MethodResult]],
    domains: Sequence[str],
    out: Path,
    *,
    config: Mapping[str, Any],
    plots: bool = True,
) -> dict[str, Path]:
    """Write ``results.md``, ``results.json`` (every per-round number) and the two plots."""
    out.mkdir(parents=True, exist_ok=True)
    md = ["# Federated LoRA: per-domain test accuracy of the global model (final round, %)", ""]
    md.append(accuracy_table(results, domains))
    diag = diagnostics_table(results)
    if diag:
        md += ["## LoRA-FAIR diagnostics per round (Table 4's columns, mean over layers)", ""]
        md.append(diag)
    md += ["## Communication per round (LoRA factors, MiB summed over participating clients)", ""]
    md.append("| model | method | upload | download |")
    md.append("|---|---|---|---|")
    for model, rows in results.items():
        for r in rows:
            u = sum(r.bytes_up) / len(r.bytes_up) / 2**20
            d = sum(r.bytes_down) / len(r.bytes_down) / 2**20
            md.append(f"| {model} | {r.method} | {u:.3f} | {d:.3f} |")
    md.append("")
    paths = {"markdown": out / "results.md", "json": out / "results.json"}
    paths["markdown"].write_text("\n".join(md))
    payload = {
        "config": dict(config),
        "domains": list(domains),
        "results": {
            model: {
                r.method: {
                    "final": r.final,
                    "accuracy": r.accuracy,
                    "bytes_up": r.bytes_up,
                    "bytes_down": r.bytes_down,
                    "diagnostics": r.diagnostics,
                    "seconds": r.seconds,
                }
                for r in rows
            }
            for model, rows in results.items()
        },
    }
    text = json.dumps(payload, indent=2, allow_nan=False, default=str)
    paths["json"].write_text(text)
    if plots:
        acc, comm = _plots(results, out)
        paths["accuracy_plot"], paths["communication_plot"] = acc, comm
    return paths


def all_finite(results: Mapping[str, Sequence[MethodResult]]) -> bool:
    """Whether every accuracy and diagnostic number is finite."""
    return all(
        math.isfinite(v)
        for rows in results.values()
        for r in rows
        for d in (*r.accuracy, *r.diagnostics)
        for v in d.values()
    )

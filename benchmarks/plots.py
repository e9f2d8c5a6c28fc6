"""Time vs rank per aggregator, one figure per shape set, K and dtype (needs matplotlib)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from lorafair.bench import Row

__all__ = ["plot"]


def plot(rows: Sequence[Row], out_dir: str) -> list[str]:
    """Write ``time_vs_rank_<shapes>_K<K>_<dtype>.png`` for every group with two ranks or more;
    the paths written (none without matplotlib)."""
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
        for agg in dict.fromkeys(w.aggregator for w in ws):
            pts = sorted((w.r, w.time_s) for w in ws if w.aggregator == agg)
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

"""Time aggregators at an old commit against a newer one, side by side in one process.

Each commit's ``lorafair/`` is exported with ``git archive`` into a temporary folder and
imported under another name (``lorafair_old``, ``lorafair_new``; without ``--new`` the working
tree's ``lorafair``), so both versions run in this process on the same inputs; calls alternate
old, new, old, new, ... and the medians are compared. Run it from the repository root::

    python docs/scripts/side_by_side.py --old 8f2b460 --new d9510d5 --clients 6 --layers 48 \\
        --repeats 5 --aggregators fedit,ffa_lora,flora,flexlora

Inputs: ``lorafair.bench.make_clients`` on the first ``--layers`` layers of ``--shapes``
(``shared_A`` where the registry says the method needs it), or with ``--iid`` i.i.d. Gaussian
factors (no gap in the spectrum of ΔW at the rank). Prints one line per aggregator: the old and
new medians (ms) and new/old, then the load average before and after.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from lorafair.bench import PRESETS, make_clients, preset  # noqa: E402

SHAPE_SETS = {name: list(preset(name).layers) for name in PRESETS}
from lorafair import aggregate, registry  # noqa: E402
from lorafair.types import LoRAFactors  # noqa: E402


def import_at(commit: str, folder: Path, name: str) -> ModuleType:
    """``commit``'s ``lorafair.aggregate``, its package renamed ``name`` so that both can load."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", commit, "lorafair"], check=True, capture_output=True
    ).stdout
    folder.mkdir()
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    (folder / "lorafair").rename(folder / name)
    for path in (folder / name).rglob("*.py"):
        path.write_text(re.sub(r"\blorafair\b", name, path.read_text()))
    sys.path.insert(0, str(folder))
    return importlib.import_module(f"{name}.aggregate")


def iid_clients(
    names: list[tuple[str, int, int]], K: int, r: int, seed: int
) -> list[dict[str, LoRAFactors]]:
    """Clients with i.i.d. N(0, 1/d) factors: ΔW has no gap in its spectrum at the rank."""
    g = torch.Generator().manual_seed(seed)
    out: list[dict[str, LoRAFactors]] = [{} for _ in range(K)]
    for name, d_out, d_in in names:
        for k in range(K):
            A = torch.randn(r, d_in, generator=g) / d_in**0.5
            B = torch.randn(d_out, r, generator=g) / d_out**0.5
            out[k][name] = LoRAFactors(A, B)
    return out


def _in(value: Any, package: ModuleType) -> Any:
    """An option value of this tree's ``lorafair`` (e.g. ``EnergyThreshold``) as ``package``'s."""
    cls = type(value)
    if not cls.__module__.startswith("lorafair."):
        return value
    module = importlib.import_module(package.__name__.split(".")[0] + cls.__module__[8:])
    return getattr(module, cls.__name__)(*value)


def _ms(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old", required=True, help="the older commit")
    p.add_argument("--new", default=None, help="the newer commit (default: the working tree)")
    p.add_argument("--shapes", default="vit_b16", choices=sorted(SHAPE_SETS))
    p.add_argument("--layers", type=int, default=48, help="the first N layers of --shapes")
    p.add_argument("--only", default=None, help="keep layers whose name ends with this")
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5, help="calls of each version")
    p.add_argument("--aggregators", default="fedit,ffa_lora,flora,flexlora")
    p.add_argument("--iid", action="store_true", help="i.i.d. Gaussian clients (no gap)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old = import_at(args.old, Path(tmp) / "old", "lorafair_old")
        new = import_at(args.new, Path(tmp) / "new", "lorafair_new") if args.new else aggregate
        layers = SHAPE_SETS[args.shapes]
        if args.only:
            layers = [s for s in layers if s.name.endswith(args.only)]
        layers = layers[: args.layers]
        print(
            f"old {args.old} vs {args.new or 'the working tree'}; "
            f"{args.shapes} {len(layers)} layers ({layers[0].name}, ...), "
            f"K = {args.clients}, r = {args.rank}, {'iid' if args.iid else 'make_clients'}, "
            f"medians of {args.repeats}, torch threads {torch.get_num_threads()}, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
            f"load {os.getloadavg()[0]:.2f}"
        )
        for name in args.aggregators.split(","):
            spec = registry.get(name)
            if args.iid:
                shapes = [(s.name, s.d_out, s.d_in) for s in layers]
                clients = iid_clients(shapes, args.clients, args.rank, 0)
            else:
                clients = make_clients(layers, args.clients, args.rank, shared_A=spec.shared_A)
            new_fn = getattr(new, spec.fn.__name__)
            old_fn = getattr(old, spec.fn.__name__)
            old_kw = {k: _in(v, old) for k, v in spec.defaults.items()}
            new_kw = {k: _in(v, new) for k, v in spec.defaults.items()}
            times: dict[str, list[float]] = {"old": [], "new": []}
            for _ in range(args.repeats):
                times["old"].append(_ms(lambda: old_fn(clients, **old_kw)))  # noqa: B023
                times["new"].append(_ms(lambda: new_fn(clients, **new_kw)))  # noqa: B023
            o, n = statistics.median(times["old"]), statistics.median(times["new"])
            print(f"{name:16s} old {o:10.1f} ms  new {n:10.1f} ms  new/old {n / o:.3f}")
        print(f"load average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()

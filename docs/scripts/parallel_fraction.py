"""The share of a call's one-thread time that runs layer by layer on ``split_map``'s workers.

Profiles one call of each ``--methods`` on one thread of every pool (``torch.set_num_threads(1)``,
so the thread policy runs everything in the caller) on a ``lorafair.bench`` cell, and prints the
time inside the functions whose per-layer work ``split_map`` splits (by name, from the profile:
the Grams with their cast-copies, the products with the stacked factors, FlexLoRA's stacks and
its per-group R × R cores) against the whole call. By Amdahl's law a fraction ``p`` of the time
split over ``n`` threads gives at most ``1 / (1 − p + p / n)``: printed for 2 and 32 threads (a
model has 32 layers of each shape in Llama-3-8B, 80 in -70B, so 32 workers have work).

    python docs/scripts/parallel_fraction.py --preset llama3_8b --blocks 1 -K 20 -r 16 \\
        --dtype bfloat16 --methods lora_fair flexlora
"""

from __future__ import annotations

import argparse
import cProfile
import pstats

import torch

import lorafair
from lorafair.bench.cells import make_inputs
from lorafair.bench.cli import add_cell_arguments
from lorafair.bench.shapes import preset

SPLIT = {
    ("_stacks.py", "grams"),
    ("_stacks.py", "products"),
    ("_linalg.py", "_syrks"),
    ("aggregate.py", "core"),
}
"""The functions (file, name) whose per-layer or per-group work split_map runs side by side;
none calls another."""


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_cell_arguments(ap)
    ap.add_argument("--methods", nargs="+", default=["lora_fair", "flexlora"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    inp = make_inputs(preset(args.preset, blocks=args.blocks), args.K, args.r, args.dtype, "cpu")
    for name in args.methods:
        fn = getattr(lorafair, name)
        fn(inp.free)
        prof = cProfile.Profile()
        prof.enable()
        fn(inp.free)
        prof.disable()
        stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
        total = max(v[3] for v in stats.values())
        split = sum(
            v[3] for (path, _, func), v in stats.items() if (path.rsplit("/", 1)[-1], func) in SPLIT
        )
        p = split / total
        print(
            f"{name}: {total * 1e3:.0f} ms on one thread, {split * 1e3:.0f} ms of it split by "
            f"layer (p = {p:.2f}); Amdahl: at most {1 / (1 - p + p / 2):.2f}x on 2 threads, "
            f"{1 / (1 - p + p / 32):.2f}x on 32"
        )


if __name__ == "__main__":
    main()

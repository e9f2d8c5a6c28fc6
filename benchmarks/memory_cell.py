"""Peak memory of one aggregator call on a whole LLM adapter set, each in a fresh process.

``lorafair bench --memory`` measures the same way, but its parent process holds the cell's
inputs for the timing too, so a cell as large as Llama-3-70B at K = 20 (8.3 GB of bfloat16
input) needs the memory twice. This runs only the measurements: for each method, a child
process builds the clients' factors, resets the kernel's peak (``/proc/self/clear_refs``),
calls the aggregator once and reports ``VmHWM − VmRSS`` (:mod:`lorafair.bench.memory`).

    python -m benchmarks.memory_cell --preset llama3_70b -K 20 -r 16 --dtype bfloat16 \\
        --methods fedit lora_fair flexlora
"""

from __future__ import annotations

import argparse

from lorafair import registry
from lorafair.bench import DTYPES, PRESETS, preset
from lorafair.bench.cli import add_methods_argument
from lorafair.bench.memory import measure, spec_for


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), required=True)
    ap.add_argument("-K", "--clients", type=int, default=20)
    ap.add_argument("-r", "--rank", type=int, default=16)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    add_methods_argument(ap, default=registry.names(), what="registered methods")
    args = ap.parse_args(argv)
    shapes = preset(args.preset)
    n = sum(s.d_in + s.d_out for s in shapes.layers) * args.rank * args.clients
    size = DTYPES[args.dtype].itemsize
    print(
        f"{shapes.source}: {len(shapes.layers)} layers, K = {args.clients}, r = {args.rank}, "
        f"{args.dtype}: {n * size / 1e9:.2f} GB of input (each layer's r (d_in + d_out) per client)"
    )
    for name in args.methods:
        spec = spec_for(
            shapes.layers, K=args.clients, r=args.rank, dtype=args.dtype, aggregator=name
        )
        rep = measure(spec)
        grow = rep["peak_extra_bytes"]
        print(f"{name}: peak growth {grow / 1e9:.2f} GB = {grow / (n * size):.2f}× the input")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

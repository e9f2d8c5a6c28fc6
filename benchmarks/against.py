"""This checkout's aggregators against an earlier commit's, timed in alternating processes.

Exports ``--commit`` with ``git archive`` into a temporary folder, then for each of
``--methods`` (registry names of this checkout) runs one process per tree in turn, ``--rounds``
times: each process builds the same ``lorafair.bench`` cell (``--preset``, ``--blocks``, ``-K``,
``-r``, ``--dtype``; the clients that share A for methods that need them), calls the method once
to warm up, then ``--repeats`` times, and prints the median. Alternating the trees makes the
machine's load hit both alike; compare the medians of the same round.

    python -m benchmarks.against --commit 2c6f175 --methods lora_fair flexlora fedit \\
        --preset llama3_8b --blocks 1 -K 20 -r 16 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile

from lorafair import registry
from lorafair.bench.cli import add_cell_arguments, add_methods_argument

_CHILD = """
import statistics, sys, time
from lorafair import registry
from lorafair.bench.cells import make_inputs
from lorafair.bench.shapes import preset
name, shapes, blocks, K, r, dtype, repeats = sys.argv[1:8]
spec = registry.get(name)
shared = bool(getattr(spec, "shared_A", False))
inp = make_inputs(preset(shapes, blocks=int(blocks)), int(K), int(r), dtype, "cpu",
                  need_shared=shared, need_free=not shared)
clients = inp.shared if shared else inp.free
def fn(c):
    return spec.fn(c, **spec.defaults)  # a registry variant (flexlora_energy) has its options
fn(clients)
times = []
for _ in range(int(repeats)):
    t = time.perf_counter()
    fn(clients)
    times.append(time.perf_counter() - t)
print(f"{statistics.median(times) * 1e3:.1f}")
"""


def _export(commit: str, folder: str) -> None:
    archive = subprocess.run(
        ["git", "archive", "--format=tar", commit], capture_output=True, check=True
    ).stdout
    with tempfile.TemporaryFile() as f:
        f.write(archive)
        f.seek(0)
        with tarfile.open(fileobj=f) as tar:
            tar.extractall(folder, filter="data")


def _time(tree: str, args: argparse.Namespace, name: str) -> str:
    env = {**os.environ, "PYTHONPATH": tree}
    argv = [name, args.preset, str(args.blocks), str(args.K), str(args.r), args.dtype]
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, *argv, str(args.repeats)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tree,
        check=True,
    )
    return out.stdout.strip().splitlines()[-1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--commit", required=True, help="the earlier commit (any git revision)")
    gram = [s.name for s in registry.specs() if s.floor == "gram"]
    add_methods_argument(ap, default=gram, what="registered methods to time")
    add_cell_arguments(ap)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as old:
        _export(args.commit, old)
        print(f"load {os.getloadavg()[0]:.2f}; median ms of {args.repeats} calls per process")
        for k in range(args.rounds):
            for name in args.methods:
                before = _time(old, args, name)
                now = _time(here, args, name)
                print(f"round {k + 1}  {name:10s}  {args.commit}: {before} ms  here: {now} ms")
        print(f"load {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Thread pools: a method in the default environment against every pool pinned to one thread.

For each of ``--methods`` (registry names; default: every registered method whose function takes
the ``--similarity`` option this studies, today LoRA-FAIR alone), two worker processes run the
same calls on the same inputs, one with the environment as it
comes (``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS`` and ``MKL_NUM_THREADS`` removed, so torch and
NumPy size their pools themselves) and one with every pool pinned (those three set to 1 and
``torch.set_num_threads(1)``). The parent alternates them call by call (default, pinned,
default, …), so both see the same load, and reports per case the medians and their ratio
``default / pinned``. Cases (K = 6 clients of rank 16, fp32, ``N(0, 0.02²)`` factors):

- ``qkv seed s``: one ViT-B ``attn.qkv`` layer (2304 × 768), for each ``--seeds`` value; the
  issue that asked for one pool measured 8–60 ms here by seed with the two pools contending;
- ``proj × 12``: twelve 768 × 768 layers in one call;
- ``vit_b16``: the whole 48-layer ViT-B/16 step (:func:`benchmarks.columns.vit_clients`).

Correctness: both workers must return the same factors to the bit (the library pins its own
pools for the call, so the environment must not change its arithmetic); the run exits 1 if
they differ, or if any ratio exceeds ``--limit`` (1.5). ``--quick``: one seed, 3 repeats.

    python -m benchmarks.threads [--seeds 0 1 2 3 4] [--repeats 7] [--similarity flat]
                                 [--methods NAME ...]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import time
from typing import IO, cast

import torch

from benchmarks.columns import random_clients, takes, vit_clients
from benchmarks.references import Similarity
from lorafair import registry
from lorafair.bench.cli import add_methods_argument
from lorafair.registry import AggregatorSpec
from lorafair.types import LoRAFactors

PINNED = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _clients(case: str) -> list[dict[str, LoRAFactors]]:
    """The K = 6, r = 16 fp32 clients of one case (deterministic in the case's name)."""
    if case == "vit_b16":
        return vit_clients(12, 6, 16, 0)
    if case.startswith("qkv seed "):
        return random_clients([("qkv", 2304, 768)], 6, 16, int(case.removeprefix("qkv seed ")))
    return random_clients([(f"{i}.proj", 768, 768) for i in range(12)], 6, 16, 0)  # proj × 12


def _options(spec: AggregatorSpec, similarity: Similarity) -> dict[str, object]:
    """The registry's defaults and ``similarity`` where the method takes it."""
    return {**spec.defaults, **({"similarity": similarity} if takes(spec, "similarity") else {})}


def _tensors(out: object) -> list[torch.Tensor]:
    """Every tensor of a method's result, in a fixed order (dicts by sorted key)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _tensors(out[k])]
    if isinstance(out, (tuple, list)):
        return [t for x in out for t in _tensors(x)]
    return []


def _worker(pinned: bool, similarity: Similarity) -> None:
    """Answer each ``method<TAB>case`` line on stdin with ``seconds digest`` of one call."""
    if pinned:
        torch.set_num_threads(1)
    cache: dict[str, list[dict[str, LoRAFactors]]] = {}
    warm: set[str] = set()
    for line in sys.stdin:
        method, case = line.rstrip("\n").split("\t")
        spec = registry.get(method)
        options = _options(spec, similarity)
        if case not in cache:
            cache[case] = _clients(case)
        if line not in warm:
            warm.add(line)
            spec.fn(cache[case], **options)  # warm-up
        t = time.perf_counter()
        out = spec.fn(cache[case], **options)
        dt = time.perf_counter() - t
        h = hashlib.sha256()
        for x in _tensors(out):
            h.update(x.contiguous().numpy().tobytes())
        print(f"{dt!r} {h.hexdigest()[:16]}", flush=True)


def _start(pinned: bool, similarity: Similarity) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in PINNED}
    if pinned:
        env.update(dict.fromkeys(PINNED, "1"))
    cmd = [sys.executable, "-m", "benchmarks.threads", "--worker", "--similarity", similarity]
    if pinned:
        cmd.append("--pinned")
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


def _ask(proc: subprocess.Popen[str], method: str, case: str) -> tuple[float, str]:
    stdin, stdout = cast(IO[str], proc.stdin), cast(IO[str], proc.stdout)
    stdin.write(f"{method}\t{case}\n")
    stdin.flush()
    reply = stdout.readline().split()
    if len(reply) != 2:
        raise RuntimeError(
            f"worker gave no answer for {method} on {case!r} (exit status {proc.poll()})"
        )
    return float(reply[0]), reply[1]


def _compare(
    procs: dict[str, subprocess.Popen[str]],
    method: str,
    cases: list[str],
    similarity: Similarity,
    repeats: int,
    limit: float,
) -> list[str]:
    """One method's table: per case the medians of both workers, alternating, and their ratio;
    what failed (different factors, a ratio above ``limit``)."""
    spec = registry.get(method)
    shown = ", ".join(
        f"{k}={v!r}" for k, v in _options(spec, similarity).items() if k not in spec.defaults
    )
    failures: list[str] = []
    print(
        f"{method}({shown}), K = 6, r = 16, fp32; {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}; medians of {repeats}, default and pinned "
        "alternating"
    )
    print(f"{'case':<12} {'default':>10} {'pinned':>10} {'ratio':>7}  same factors")
    for case in cases:
        times: dict[str, list[float]] = {k: [] for k in procs}
        digests: set[str] = set()
        for _ in range(repeats):
            for kind, proc in procs.items():
                dt, digest = _ask(proc, method, case)
                times[kind].append(dt)
                digests.add(digest)
        d, p = (statistics.median(times[k]) for k in ("default", "pinned"))
        ratio = d / p
        same = len(digests) == 1
        print(f"{case:<12} {d * 1e3:>8.1f}ms {p * 1e3:>8.1f}ms {ratio:>6.2f}×  {same}")
        if not same:
            failures.append(f"{method}, {case}: the two environments returned different factors")
        if ratio > limit:
            failures.append(f"{method}, {case}: default/pinned {ratio:.2f}× > {limit}×")
    return failures


def main(argv: list[str] | None = None) -> int:
    studied = [s.name for s in registry.specs() if takes(s, "similarity")]
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_methods_argument(ap, default=studied, what="registered methods that take --similarity")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--similarity", choices=["flat", "columns"], default="flat")
    ap.add_argument("--limit", type=float, default=1.5)
    ap.add_argument("--quick", action="store_true", help="one seed, 3 repeats")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--pinned", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    similarity = cast(Similarity, args.similarity)
    if args.worker:
        _worker(args.pinned, similarity)
        return 0
    if args.quick:
        args.seeds, args.repeats = args.seeds[:1], 3
    cases = [f"qkv seed {s}" for s in args.seeds] + ["proj × 12", "vit_b16"]
    procs = {"default": _start(False, similarity), "pinned": _start(True, similarity)}
    failures: list[str] = []
    try:
        for method in args.methods:
            failures += _compare(procs, method, cases, similarity, args.repeats, args.limit)
    finally:
        for proc in procs.values():
            cast(IO[str], proc.stdin).close()
            proc.wait(timeout=60)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    for f in failures:
        print("FAIL", f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())

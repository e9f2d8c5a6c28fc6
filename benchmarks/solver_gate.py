"""The LoRA-FAIR solver's refactoring gate: every output bit, recorded once and compared.

A change to the solver that is meant to keep its results (a rename, a split, a new type between
steps) must leave every output factor, residual, objective, cosine, iteration count and
convergence flag as it was, bit for bit. This script runs :func:`lorafair.aggregate.lora_fair`
and :func:`lorafair.aggregate.solve_residual` on

- the ViT-B/16 step: 12 blocks × {qkv 2304×768, proj 768×768, fc1 3072×768, fc2 768×3072},
  K = 6 clients of rank 16, fp32 (:func:`benchmarks.columns.vit_clients`, seed 0), and
- ``--problems`` (default 200) seeded random problems: 1–3 layers of small shapes (some
  shared, so layers batch), K = 1–5 clients of equal or different ranks 1–6, fp32 or fp64
  (one in eight bf16), some with identical clients or a zero client,

each with ``similarity`` ∈ {flat, columns}, ``λ`` ∈ {0, 0.01, 1}, ``norm`` ∈ {fro, fro_squared}
and ``residual_on`` ∈ {B, A} (24 option sets per problem), and saves every output to ``--save``
(a call that raises is recorded by its error). ``--compare FILE`` re-runs and fails (exit 1,
naming the first difference) unless every tensor is ``torch.equal`` byte for byte, every float
has the same bits and every call that raised raises the same error (a run with fewer
``--problems`` or ``--no-vit`` is compared on the outputs it makes). Run it before the change
(``--save``) and after (``--compare``):

    python -m benchmarks.solver_gate --save /tmp/gate.pt        # ~8 min on one idle CPU core
    python -m benchmarks.solver_gate --compare /tmp/gate.pt
    python -m benchmarks.solver_gate --problems 20 --no-vit --save /tmp/quick.pt   # seconds
"""

from __future__ import annotations

import argparse
import itertools
import struct
import sys
import time
from typing import Any, Literal, cast

import torch

from benchmarks.columns import vit_clients
from lorafair.aggregate import lora_fair, solve_residual
from lorafair.types import LoRAFactors

Norm = Literal["fro", "fro_squared"]
Similarity = Literal["flat", "columns"]
ResidualOn = Literal["B", "A"]

_SIMS: tuple[Similarity, ...] = ("flat", "columns")
_NORMS: tuple[Norm, ...] = ("fro", "fro_squared")
_SIDES: tuple[ResidualOn, ...] = ("B", "A")
OPTIONS = list(itertools.product(_SIMS, (0.0, 0.01, 1.0), _NORMS, _SIDES))
"""The 24 option sets every problem is solved with."""

_SHAPES = [(6, 5), (5, 7), (8, 8), (12, 4), (3, 9), (16, 10), (2, 3)]

Clients = list[dict[str, LoRAFactors]]


def random_problem(seed: int) -> tuple[Clients, list[float] | None]:
    """One seeded random problem: clients and weights (``None`` for equal weights)."""
    g = torch.Generator().manual_seed(seed)

    def pick(n: int) -> int:
        return int(torch.randint(n, (1,), generator=g))

    k = 1 + pick(5)
    n_layers = 1 + pick(3)
    dtype = (torch.float32, torch.float64)[pick(2)]
    if pick(8) == 0:
        dtype = torch.bfloat16
    hetero = pick(2) == 1
    base_rank = 1 + pick(6)
    ranks = [1 + pick(6) if hetero else base_rank for _ in range(k)]
    shapes = [_SHAPES[pick(len(_SHAPES))] for _ in range(n_layers)]
    if n_layers > 1 and pick(2) == 0:
        shapes[1] = shapes[0]  # two layers of one shape: a batch of two
    twins = k > 1 and pick(6) == 0  # every client the same: a zero residual
    zero = k > 1 and pick(8) == 0  # one client all zero
    clients: Clients = [{} for _ in range(k)]
    for li, (d_out, d_in) in enumerate(shapes):
        for ci, c in enumerate(clients):
            r = ranks[ci]
            if twins and ci > 0:
                src = clients[0][f"l{li}"]
                c[f"l{li}"] = LoRAFactors(src.A.clone(), src.B.clone())
                continue
            scale = 0.0 if zero and ci == k - 1 else 1.0
            A = torch.randn(r, d_in, generator=g, dtype=torch.float64) * scale
            B = torch.randn(d_out, r, generator=g, dtype=torch.float64) * scale
            c[f"l{li}"] = LoRAFactors(A.to(dtype), B.to(dtype))
    weights = None if pick(2) == 0 else [0.5 + float(torch.rand(1, generator=g)) for _ in range(k)]
    return clients, weights


def _solve(clients: Clients, weights: list[float] | None, tag: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for sim, lam, norm, side in OPTIONS:
        kw: dict[str, Any] = {
            "lam": lam,
            "norm": norm,
            "similarity": sim,
            "residual_on": side,
            "allow_excess_rank": True,
        }
        key = f"{tag}|{sim}|{lam}|{norm}|{side}"
        try:
            for name, (A, B) in lora_fair(clients, weights, **kw).items():
                out[f"{key}|{name}|A"] = A
                out[f"{key}|{name}|B"] = B
            for name, s in solve_residual(clients, weights, **kw).items():
                out[f"{key}|{name}|delta"] = s.delta
                out[f"{key}|{name}|stats"] = (s.objective, s.cosine, s.iterations, s.converged)
        except Exception as exc:  # recorded: the same call must fail the same way
            out[f"{key}|error"] = f"{type(exc).__name__}: {exc}"
    return out


def record(problems: int, vit: bool) -> dict[str, Any]:
    """Every output of the gate's runs, keyed ``problem|options|layer|field``."""
    out: dict[str, Any] = {}
    if vit:
        out.update(_solve(vit_clients(12, 6, 16, 0), None, "vit"))
    for seed in range(problems):
        clients, weights = random_problem(seed)
        out.update(_solve(clients, weights, f"rand{seed}"))
        if (seed + 1) % 25 == 0:
            print(f"{seed + 1} random problems", file=sys.stderr, flush=True)
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bytes (so ``-0.0`` differs from ``0.0`` and a NaN equals itself)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(_bits(a), _bits(b))
        )
    if isinstance(a, float):
        return isinstance(b, float) and struct.pack("<d", a) == struct.pack("<d", b)
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and bool(a == b)


def compare(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The keys of ``new`` whose values differ from ``old``'s in any bit (or that ``old`` lacks).
    A run with fewer problems (or without the ViT step) is compared on the outputs it has."""
    return [k for k in new if k not in old or not _same(old[k], new[k])]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--save", metavar="FILE", help="record every output to FILE")
    what.add_argument("--compare", metavar="FILE", help="fail unless every output equals FILE's")
    ap.add_argument("--problems", type=int, default=200, help="random problems (default 200)")
    ap.add_argument("--no-vit", action="store_true", help="leave the ViT-B/16 step out")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    new = record(args.problems, not args.no_vit)
    took = time.perf_counter() - t0
    for key, err in new.items():
        if key.endswith("|error"):
            print(f"{key}: {err}", file=sys.stderr)
    if args.save:
        torch.save(new, args.save)
        print(f"recorded {len(new)} outputs in {took:.0f} s")
        return 0
    old = cast(dict[str, Any], torch.load(args.compare, weights_only=False))
    bad = compare(old, new)
    if bad:
        print(f"{len(bad)} of {len(new)} outputs differ, first {bad[0]!r}", file=sys.stderr)
        return 1
    print(f"all {len(new)} outputs bit-identical ({len(old)} recorded; {took:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

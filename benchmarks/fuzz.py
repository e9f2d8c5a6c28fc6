"""Fuzz every registered aggregator: finite output in the input dtype, or a ``LoRAFairError``.

``python -m benchmarks.fuzz --calls N --seed S`` makes N calls. Call ``i`` draws its input from
``random.Random(f"{S}:{i}")`` alone, so ``--seed S --case i`` replays it (with the traceback).
Calls cycle through :func:`lorafair.registry.specs` (each run with its ``defaults``) and draw:

- a dtype (float16, bfloat16, float32, float64) and, per factor, a magnitude log-uniform from the
  dtype's smallest subnormal to 90% of its largest value (a quarter of the draws), from 1e-30 to
  1e30 clipped to the dtype (a quarter), or near 1 (the rest); entries are clipped to the
  dtype's range, so every input is finite;
- 1 to 4 clients, 1 or 2 layers of 1 to 10 rows and columns, ranks 1 to 4 (different per
  client where the spec has ``equal_ranks=False``, and rarely where it does, to check the error);
- structure: zero factors, duplicated clients, cancelling clients (``B_1 = −B_0``, equal
  weights), rank-deficient factors, an ``A`` shared by every client (always for ``shared_A``
  methods) or a shared ``B``; weights ``None`` or random non-negative with some zeros.

Each call passes when the method returns finite tensors in the input dtype and device, of the
right shapes (every layer's ``A`` is ``(r', d_in)`` and ``B`` ``(d_out, r')`` and the update's
layers are the input's, via the spec's ``update_factors``; a personalised result has one
adapter per client), or raises a :class:`~lorafair.errors.LoRAFairError`; a
:class:`~lorafair.errors.DtypeOverflowError` passes only if the value it reports (computed in
float64) really exceeds the dtype's largest finite value. Any other exception, a mutated input
(compared bitwise with a clone taken before the call), or an unjustified overflow error (for
float64 input, one that vanishes when every factor is halved: the rounding of a value at the
limit) is a defect. The run prints one line per defect with the command that replays it, the
count of each error raised per method and dtype, and exits 1 if there was any defect.
"""

from __future__ import annotations

import argparse
import math
import random
import signal
import sys
import time
import traceback
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lorafair.bench import progress
from lorafair.errors import DtypeOverflowError, LoRAFairError
from lorafair.registry import AggregatorSpec, specs
from lorafair.types import LoRAFactors

__all__ = ["Case", "Outcome", "main", "make_case", "run_case"]

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


class Case(NamedTuple):
    """One fuzzed call: the method, the clients' factors and weights it receives."""

    number: int
    spec: AggregatorSpec
    dtype: torch.dtype
    clients: list[dict[str, LoRAFactors]]
    weights: list[float] | None
    structure: tuple[str, ...]


class Outcome(NamedTuple):
    """What one call did: ``"ok"``, ``"error:<LoRAFairError subclass>"`` or ``"defect"``."""

    kind: str
    detail: str


def _magnitude(rng: random.Random, dtype: torch.dtype) -> float:
    info = torch.finfo(dtype)
    low, high = math.log10(info.smallest_normal * info.eps), math.log10(0.9 * info.max)
    u = rng.random()
    if u < 0.25:
        return 10 ** rng.uniform(low, high)
    if u < 0.5:
        return 10 ** rng.uniform(max(low, -30.0), min(high, 30.0))
    return 10 ** rng.uniform(-2.0, 2.0)


def _factor(
    rng: random.Random, gen: torch.Generator, shape: tuple[int, int], dtype: torch.dtype
) -> Tensor:
    """Finite entries of one magnitude; sometimes zero or of rank one."""
    limit = float(torch.finfo(dtype).max)
    u = rng.random()
    if u < 0.08:
        return torch.zeros(shape, dtype=dtype)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    if u < 0.2:  # rank-deficient: an outer product
        x = torch.randn(shape[0], 1, generator=gen, dtype=torch.float64) @ x[:1]
    x = x * _magnitude(rng, dtype)
    return x.nan_to_num(posinf=limit, neginf=-limit).clamp(-limit, limit).to(dtype)


def make_case(seed: int, index: int) -> Case:
    """Call ``index`` of the run seeded ``seed`` (depends on nothing else)."""
    rng = random.Random(f"{seed}:{index}")
    gen = torch.Generator().manual_seed(rng.getrandbits(63))
    every = specs()
    spec = every[index % len(every)]
    dtype = rng.choice(DTYPES)
    n_clients = rng.randint(1, 4)
    structure: list[str] = []
    layers = []
    for j in range(rng.randint(1, 2)):
        d_out, d_in = rng.randint(1, 10), rng.randint(1, 10)
        top = max(1, min(4, max(d_in, d_out)))
        r = rng.randint(1, top)
        mixed = (not spec.equal_ranks and rng.random() < 0.5) or rng.random() < 0.03
        ranks = [rng.randint(1, top) if mixed else r for _ in range(n_clients)]
        layers.append((f"l{j}", d_out, d_in, ranks))
    if hetero := any(len(set(rs)) > 1 for *_, rs in layers):
        structure.append("hetero-ranks")
    share_A = spec.shared_A or rng.random() < 0.15
    share_B = rng.random() < 0.08
    clients: list[dict[str, LoRAFactors]] = [{} for _ in range(n_clients)]
    for name, d_out, d_in, ranks in layers:
        A0 = _factor(rng, gen, (ranks[0], d_in), dtype)
        B0 = _factor(rng, gen, (d_out, ranks[0]), dtype)
        for k, r_k in enumerate(ranks):
            same = r_k == ranks[0]
            A = A0.clone() if share_A and same else _factor(rng, gen, (r_k, d_in), dtype)
            B = B0.clone() if share_B and same else _factor(rng, gen, (d_out, r_k), dtype)
            clients[k][name] = LoRAFactors(A, B)
    if share_A:
        structure.append("shared-A")
    if share_B:
        structure.append("shared-B")
    weights: list[float] | None = None
    if n_clients > 1 and not hetero and rng.random() < 0.15:
        structure.append("duplicated")
        src = clients[0]
        clients[rng.randrange(1, n_clients)] = {
            n: LoRAFactors(A.clone(), B.clone()) for n, (A, B) in src.items()
        }
    if n_clients > 1 and not hetero and rng.random() < 0.15:
        structure.append("cancelling")
        clients[1] = {n: LoRAFactors(A.clone(), -B) for n, (A, B) in clients[0].items()}
        weights = [1.0] * n_clients
    elif rng.random() < 0.5:
        weights = [rng.choice([0.0, 1e-6, 1.0, rng.uniform(0.0, 100.0)]) for _ in range(n_clients)]
        if sum(weights) == 0:
            weights[0] = 1.0
    return Case(index, spec, dtype, clients, weights, tuple(structure))


def _bits(t: Tensor) -> Tensor:
    return t.detach().clone().view(_BITS[t.element_size()])


def _tensors(value: object) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)


def _factor_pairs(value: object) -> Iterator[tuple[str, LoRAFactors]]:
    """Every ``layer -> LoRAFactors`` entry anywhere in a result."""
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, LoRAFactors):
                yield str(key), item
            else:
                yield from _factor_pairs(item)
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _factor_pairs(item)


def _check_output(case: Case, out: object) -> str | None:
    """Why the result breaks the promise, or ``None``."""
    first = case.clients[0]
    for t in _tensors(out):
        if t.dtype != case.dtype:
            return f"a {t.dtype} tensor in the result of {case.dtype} input"
        if not bool(torch.isfinite(t).all()):
            return f"non-finite output (max |x| {float(t.double().abs().max()):.4g})"
    pairs = list(_factor_pairs(out))
    if not pairs:
        return "no LoRAFactors in the result"
    for name, (A, B) in pairs:
        if name not in first:
            return f"unknown layer {name!r} in the result"
        d_in, d_out = first[name].A.shape[1], first[name].B.shape[0]
        if A.ndim != 2 or B.ndim != 2 or A.shape[1] != d_in or B.shape[0] != d_out:
            shapes = f"A {tuple(A.shape)}, B {tuple(B.shape)}"
            return f"layer {name!r}: {shapes} for d_in={d_in}, d_out={d_out}"
        if A.shape[0] != B.shape[1]:
            return f"layer {name!r}: A has {A.shape[0]} rows but B {B.shape[1]} columns"
    if case.spec.update_factors is not None:
        update = case.spec.update_factors(out)
        if list(update) != list(first):
            return f"update layers {list(update)} != input layers {list(first)}"
    else:
        per_client = getattr(out, "adapters", None)
        if not isinstance(per_client, tuple) or len(per_client) != len(case.clients):
            return "a personalised result without one adapter per client"
    return None


def _halved(case: Case) -> Case:
    half = [{n: LoRAFactors(A / 2, B / 2) for n, (A, B) in c.items()} for c in case.clients]
    return case._replace(clients=half)


def _unjustified(case: Case, e: DtypeOverflowError) -> str | None:
    """Why an overflow error is not justified, or ``None``.

    The value it reports (computed in float64) must exceed the dtype's largest finite value.
    float64 input has no wider check, so there the same call with every factor halved (exact
    for normal numbers; the update shrinks 4×) must fail too: an error that vanishes was the
    rounding of a value within a few ulps of the limit, which fits.
    """
    limit = float(torch.finfo(case.dtype).max)
    if e.value is None or not e.value >= limit:
        return "DtypeOverflowError for a value that fits"
    if case.dtype == torch.float64:
        try:
            out = _call(_halved(case))
        except LoRAFairError:
            return None
        if all(bool(torch.isfinite(t).all()) for t in _tensors(out)):
            return (
                "DtypeOverflowError in float64, but the input halved fits (rounding at the limit)"
            )
    return None


def _call(case: Case) -> Any:
    return case.spec.fn(case.clients, case.weights, **dict(case.spec.defaults))


def run_case(case: Case) -> Outcome:
    """Call the method on the case's input and judge the result."""
    before = [_bits(t) for t in _tensors(case.clients)]
    weights_before = None if case.weights is None else list(case.weights)
    try:
        out = _call(case)
    except DtypeOverflowError as e:
        why = _unjustified(case, e)
        if why:
            return Outcome("defect", f"{why}: {e}")
        outcome = Outcome("error:DtypeOverflowError", str(e))
    except LoRAFairError as e:
        outcome = Outcome(f"error:{type(e).__name__}", str(e))
    except Exception as e:
        return Outcome("defect", f"{type(e).__name__}: {e}".splitlines()[0])
    else:
        why = _check_output(case, out)
        outcome = Outcome("defect", why) if why else Outcome("ok", "")
    after = [_bits(t) for t in _tensors(case.clients)]
    if any(not torch.equal(x, y) for x, y in zip(before, after, strict=True)):
        return Outcome("defect", "an input tensor was mutated")
    if case.weights != weights_before:
        return Outcome("defect", "the weights list was mutated")
    return outcome


def _describe(case: Case) -> str:
    shapes = ", ".join(
        f"{n}: A{tuple(A.shape)} B{tuple(B.shape)}" for n, (A, B) in case.clients[0].items()
    )
    dt = str(case.dtype).removeprefix("torch.")
    return (
        f"{case.spec.name} {dt}, K={len(case.clients)}, {shapes}, "
        f"structure={list(case.structure)}, weights={case.weights}"
    )


def _stop(signum: int, frame: object) -> None:
    """SIGTERM (e.g. ``timeout``) ends the run like Ctrl-C: the summary of the calls made."""
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run the fuzz; print defects and a summary; exit 1 if any call broke the promise."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.fuzz", description=__doc__.splitlines()[0]
    )
    p.add_argument("--calls", type=int, default=2000, help="number of calls (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="run seed (default 0)")
    p.add_argument("--start", type=int, default=0, help="first call index (to split a run)")
    p.add_argument("--case", type=int, default=None, help="replay one call with its traceback")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.case is not None:
        case = make_case(args.seed, args.case)
        print(_describe(case))
        try:
            _call(make_case(args.seed, args.case))
        except Exception:
            traceback.print_exc(file=sys.stdout)
        outcome = run_case(case)
        print(f"{outcome.kind}: {outcome.detail}")
        return int(outcome.kind == "defect")
    kinds: Counter[str] = Counter()
    raised: Counter[str] = Counter()
    defects: list[str] = []
    bar = progress(
        args.calls, desc="fuzz", disable=args.no_progress or args.calls < 2000, mininterval=2.0
    )
    start = time.perf_counter()
    done = 0
    signal.signal(signal.SIGTERM, _stop)
    try:
        for i in range(args.start, args.start + args.calls):
            case = make_case(args.seed, i)
            outcome = run_case(case)
            done += 1
            kinds[outcome.kind] += 1
            if outcome.kind.startswith("error:"):
                dt = str(case.dtype).removeprefix("torch.")
                raised[f"{outcome.kind.removeprefix('error:')} {case.spec.name} {dt}"] += 1
            if outcome.kind == "defect":
                defects.append(
                    f"case {i} (python -m benchmarks.fuzz --seed {args.seed} --case {i}): "
                    f"{_describe(case)}: {outcome.detail}"
                )
                print(defects[-1], flush=True)
            if bar is not None:
                bar.update(1)
    except KeyboardInterrupt:
        print(f"stopped after {done} of {args.calls} calls", flush=True)
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - start
    for what, n in sorted(raised.items()):
        print(f"raised {what}: {n}")
    counts = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
    calls = f"calls {args.start}..{args.start + done - 1}" if args.start else f"{done} calls"
    print(
        f"{calls} over {len(specs())} methods, seed {args.seed}, {elapsed:.0f} s: "
        f"{len(defects)} defects ({counts})"
    )
    return 1 if defects else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The Llama-3-8B cell: each aggregator's time against its floors, measured in one run.

Builds the first ``--blocks`` blocks of Llama-3-8B with LoRA on all seven linears (q 4096²,
k/v 1024×4096, o 4096², gate/up 14336×4096, down 4096×14336), K clients of rank r,
``N(0, 0.02²)`` factors in ``--dtype``, in this process. Then, round-robin (each round runs every
probe and every method once; medians over ``--repeats`` rounds, so all see the same load):

- **memory floor** = input bytes / read bandwidth, the bandwidth from one ``torch.sum`` over a
  contiguous buffer as large as the input, on all of torch's threads and on one (the faster;
  on a busy machine a pool that waits for cores is the slower);
- **compute floor** = the two float64 R × R Grams per layer, ``(d_in + d_out) R²`` flops (the
  symmetric products they are, R = K r), at the dgemm rate of one general torch product
  ``X Yᵀ`` (X, Y of R × 14336 float64, ``2 R² d`` flops; MKL here, as in
  :mod:`lorafair.bench.floors`) on all of torch's threads or on one, the faster (both printed,
  and the scaling from one to all);
- each of ``--methods`` (registry names, default every registered method; ``--only`` is the
  same option), called with the registry's defaults on clients that share ``A`` where the
  registry says ``shared_A``: its ratio to the memory floor, or to the compute floor where the
  registry's ``floor`` is ``"gram"``.
- ``fp32 acc``: a plain float32 accumulation of the same inputs (``acc.add_(x.float(), alpha=p)``
  per factor, what any averaging costs) and ``convert``: the bf16 → float32 conversion of every
  input alone (``x.float()``), both against the memory floor, to say what conversion costs.

``--memory`` instead measures each method's peak RSS growth in this process: ``VmHWM`` after
resetting it (``echo 5 > /proc/self/clear_refs``, written from the process) minus ``VmRSS``
before the call, as a ratio to the input bytes.

Run it as the environment comes and pinned, and compare (the load is printed), or in one
process with ``--pinned-too`` (each method also run with torch's pool at one thread, which the
thread policy reads as the process's pool, alternating with the default in the same rounds):

    python -m benchmarks.llm_cells [--blocks 4] [--K 20] [--r 16] [--dtype bfloat16]
                                   [--methods NAME ...]
    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 python -m benchmarks.llm_cells
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import statistics
import time
from collections.abc import Callable
from typing import TypeVar

import torch
from threadpoolctl import threadpool_info

from lorafair import registry
from lorafair.bench.cli import add_methods_argument
from lorafair.types import LoRAFactors

__all__ = ["LLAMA3_8B_BLOCK", "make_cell", "measure_floors", "one_thread"]

LLAMA3_8B_BLOCK = [
    ("self_attn.q_proj", 4096, 4096),
    ("self_attn.k_proj", 1024, 4096),
    ("self_attn.v_proj", 1024, 4096),
    ("self_attn.o_proj", 4096, 4096),
    ("mlp.gate_proj", 14336, 4096),
    ("mlp.up_proj", 14336, 4096),
    ("mlp.down_proj", 4096, 14336),
]
"""One Llama-3-8B decoder block's linears: (name, d_out, d_in)."""

Clients = list[dict[str, LoRAFactors]]
_R = TypeVar("_R")


def make_cell(
    blocks: int, K: int, r: int, dtype: torch.dtype, *, shared_A: bool = False, seed: int = 0
) -> Clients:
    """K clients on the first ``blocks`` blocks; ``shared_A``: every client has client 0's A."""
    g = torch.Generator().manual_seed(seed)
    clients: Clients = [{} for _ in range(K)]
    for b in range(blocks):
        for name, d_out, d_in in LLAMA3_8B_BLOCK:
            layer = f"model.layers.{b}.{name}"
            A0 = None
            for k in range(K):
                A = (torch.randn(r, d_in, generator=g) * 0.02).to(dtype)
                if shared_A:
                    A = A if A0 is None else A0.clone()
                    A0 = A if A0 is None else A0
                B = (torch.randn(d_out, r, generator=g) * 0.02).to(dtype)
                clients[k][layer] = LoRAFactors(A, B)
    return clients


def input_bytes(clients: Clients) -> int:
    return sum(t.numel() * t.element_size() for c in clients for f in c.values() for t in f)


def gram_flops(clients: Clients) -> float:
    """``Σ_layers (d_in + d_out) R²``: the two symmetric R × R Grams (syrk flops)."""
    R = sum(f.A.shape[0] for f in (c[next(iter(c))] for c in clients))
    return float(sum((f.A.shape[1] + f.B.shape[0]) * R * R for f in clients[0].values()))


def measure_floors(n_bytes: int, R: int) -> dict[str, Callable[[], float]]:
    """Probes returning a rate: read bandwidth (bytes/s) and the dgemm rate (flop/s) of a
    general float64 product ``X Yᵀ`` (R × 14336 each, ``2 R² d`` flops): the rate the Grams'
    essential ``R² d`` flops each are counted at (a ``syrk`` runs them at a lower rate). Each
    on all of torch's threads and on one.

    The product is torch's (MKL in the x86 wheels), as :mod:`lorafair.bench.floors` times it.
    NumPy's (OpenBLAS) was the slower here: 0.55–0.82× as fast at R = 160 to 1280 with its
    columns split side by side over worker threads, one BLAS thread each, and 0.78–0.88× at
    R = 320 and 1280 on OpenBLAS's own threads (at R = 160 it was the faster in two runs of
    four, 1.25–1.36×; ``python docs/scripts/dgemm_probe.py``). Until commit d2c48e7 this was
    NumPy's product on OpenBLAS's threads, whose workers then spin for a while (about 0.1 s
    here): a torch kernel on two threads right after it competes with them, and ``fedit``
    on one Llama-3-8B block took 1.8–10.8× its time after a pause."""
    buf = torch.ones(n_bytes // 4, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(R, 14336, dtype=torch.float64, generator=g)
    y = torch.randn(R, 14336, dtype=torch.float64, generator=g)
    out = torch.empty(R, R, dtype=torch.float64)

    def read() -> float:
        t = time.perf_counter()
        buf.sum()
        return n_bytes / (time.perf_counter() - t)

    def dgemm() -> float:
        t = time.perf_counter()
        torch.matmul(x, y.mT, out=out)  # a general product (two buffers): gemm, 2 R² d flops
        return float(2 * R * R * x.shape[1]) / (time.perf_counter() - t)

    return {
        "read": read,
        "read 1 thread": one_thread(read),
        "dgemm": dgemm,
        "dgemm 1 thread": one_thread(dgemm),  # the 1 → pool scaling
    }


def one_thread(fn: Callable[[], _R]) -> Callable[[], _R]:
    """``fn`` with torch's pool, hence the thread policy's pool, at one thread (restored
    after)."""

    def run() -> _R:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn()
        finally:
            torch.set_num_threads(before)

    return run


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _conversions(free: Clients) -> dict[str, Callable[[], object]]:
    """What any averaging costs, timed against the memory floor: ``fp32 acc`` (a plain float32
    accumulation of every input) and, for narrower inputs, ``convert`` (``x.float()`` of each)."""
    K = len(free)

    def acc() -> None:
        for name in free[0]:
            for i in range(2):
                a = free[0][name][i].to(torch.float32, copy=True)  # never the input itself
                for c in free[1:]:
                    a.add_(c[name][i].float(), alpha=1.0)
                a.mul_(1.0 / K)

    def convert() -> None:
        for c in free:
            for f in c.values():
                f.A.float()
                f.B.float()

    out: dict[str, Callable[[], object]] = {"fp32 acc": acc}
    if free[0][next(iter(free[0]))].A.dtype != torch.float32:
        out["convert"] = convert
    return out


def _methods(free: Clients, shared: Clients, names: list[str]) -> dict[str, Callable[[], object]]:
    """Each registered method ``names`` names, on its inputs with the registry's defaults."""
    out: dict[str, Callable[[], object]] = {}
    for name in names:
        spec = registry.get(name)
        clients = shared if spec.shared_A else free
        out[name] = functools.partial(spec.fn, clients, **spec.defaults)
    return out


def _vm(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def memory(free: Clients, shared: Clients, names: list[str]) -> None:
    n = input_bytes(free)
    for name, fn in _methods(free, shared, names).items():
        fn()  # warm-up: code pages and pools resident
        gc.collect()
        before = _vm("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        out = fn()
        peak = _vm("VmHWM")
        del out
        print(f"{name:10s} peak RSS growth {(peak - before) / n:5.2f}× input ({n / 1e6:.0f} MB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--K", type=int, default=20)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--repeats", type=int, default=5)
    add_methods_argument(
        ap, default=registry.names(), what="registered methods to time", aliases=["--only"]
    )
    ap.add_argument("--memory", action="store_true", help="peak RSS growth instead of time")
    ap.add_argument(
        "--pinned-too",
        action="store_true",
        help="also time each method with torch.set_num_threads(1) (the policy then gives every "
        "kernel one thread), alternating with the default in the same rounds",
    )
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    free = make_cell(a.blocks, a.K, a.r, dtype)
    shared = make_cell(a.blocks, a.K, a.r, dtype, shared_A=True, seed=1)
    n = input_bytes(free)
    env = {k: os.environ.get(k, "-") for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    blas = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
    print(
        f"Llama-3-8B × {a.blocks} blocks ({len(free[0])} layers), K={a.K}, r={a.r}, {a.dtype}, "
        f"{n / 1e6:.0f} MB in; torch threads {torch.get_num_threads()}, BLAS {blas}, env {env}; "
        f"load {os.getloadavg()[0]:.2f}"
    )
    if a.memory:
        memory(free, shared, a.methods)
        return
    probes = measure_floors(n, a.K * a.r)
    methods = {**_methods(free, shared, a.methods), **_conversions(free)}
    floor_of = {k: registry.get(k).floor if k in a.methods else "memory" for k in methods}
    if a.pinned_too:  # each method also with the process pinned, alternating in this run
        for k in list(methods):
            methods[f"{k} pinned"] = one_thread(methods[k])
            floor_of[f"{k} pinned"] = floor_of[k]
    for fn in methods.values():
        fn()  # warm-up
    rates: dict[str, list[float]] = {k: [] for k in probes}
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(a.repeats):
        for k, p in probes.items():
            rates[k].append(p())
        for k, fn in methods.items():
            times[k].append(_timed(fn))
    # a floor is the fastest the machine measured: all threads, or one where a busy machine
    # makes the pool wait for cores
    medians = {k: statistics.median(v) for k, v in rates.items()}
    bw = max(medians["read"], medians["read 1 thread"])
    rate = max(medians["dgemm"], medians["dgemm 1 thread"])
    mem_floor = n / bw
    comp_floor = gram_flops(free) / rate
    one, pool = medians["dgemm 1 thread"], medians["dgemm"]
    print(
        f"read {bw / 1e9:.1f} GB/s → memory floor {mem_floor * 1e3:.1f} ms; "
        f"dgemm {rate / 1e9:.1f} GFLOP/s → compute floor {comp_floor * 1e3:.0f} ms "
        f"(torch's product: one thread {one / 1e9:.1f} GFLOP/s, {torch.get_num_threads()} "
        f"threads {pool / 1e9:.1f}: {pool / one:.2f}×)"
    )
    med = {k: statistics.median(ts) for k, ts in times.items()}
    for k, t in med.items():
        compute = floor_of[k] == "gram"
        floor, label = (comp_floor, "compute") if compute else (mem_floor, "memory")
        pinned = f"  default / pinned {t / med[k + ' pinned']:.2f}" if k + " pinned" in med else ""
        print(f"{k:17s} {t * 1e3:8.1f} ms  {t / floor:5.2f}× {label} floor{pinned}")
    print(f"load after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

"""Private: the thread policy, one rule by cost (:func:`threads_for`).

Aggregators run two kinds of work in two pools (torch's OpenMP/MKL pool and NumPy's OpenBLAS
pool, the Grams' ``syrk``):

- **small work**: r × r algebra, a few small products, host solves, and at ViT scale the
  averaging methods' memory-bound passes. None gains from a second thread inside one kernel,
  and at the pools' default size each kernel waits for a worker to be scheduled; on a busy
  machine that wait dominates: on a loaded 2-core machine one ViT-B ``attn.qkv`` layer took
  350 to 880 ms by default against 35 to 47 ms with every pool pinned to one thread
  (``docs/validation.md``), and ``fedit`` on ViT-B/16 2.06 s against 32 ms.
- **compute-bound kernels**: the float64 R × R Grams of large layers (``(d_in + d_out) R²``
  flops) and the products with the stacked factors. At LLM scale (a Llama-3-8B MLP layer at
  R = K r = 320: 1.9 GFLOP) one such kernel runs for tens of milliseconds and the pool's start-up
  is noise; a single ``A_s A_sᵀ`` of (320 × 14336) ran 1.66× faster on 2 BLAS threads than on 1.

So every aggregator call pins both pools to one thread (:func:`single_threaded`,
:func:`torch_single_threaded`), and the large work lifts the pin for itself, by one rule,
:func:`threads_for`:

    threads = min(pool, round(free), max(1, ⌊w⌋)),   w = max(flops / 2²⁵, bytes / 2²⁰)

where ``pool`` is the process's pool as it was when the call began (torch's thread count: by
default the number of cores, or what ``OMP_NUM_THREADS`` / ``torch.set_num_threads`` set),
``free`` the cores free for this process (the machine's idle cores plus those this process
kept busy itself, from ``/proc/stat`` over the time since the last estimate; once per call,
and only when some work is large enough to ask) and ``w`` the work in units worth a thread:
2²⁵ flops of a compute-bound kernel (about a millisecond of one core, 30 GFLOP/s), or 2²⁰
bytes read by a memory-bound pass (a weighted sum, a cast-copy: about 0.3 ms of one core,
which an OpenMP fork of torch's pool, microseconds, is worth). Two threads need two units:
no single
ViT-B/16 kernel at K·r ≤ 96 reaches that (its largest ``syrk``, ``mlp.fc1``'s 3072 × 96, is
28 Mflop), every Llama-3-8B linear's Grams at R = 320 exceed it (the smallest, ``k_proj``'s
1024 × 320, is 105 Mflop).

The threads are spent in one of two ways, and only on work whose result does not depend on
how it is split, so every result is the same to the bit whatever the pool or the load:

- :func:`split_map`: independent compute-bound items (the layers of a batch: their
  cast-copies and Grams, their ``P_u coef``; the two column halves of each of FlexLoRA's
  R × R products, :func:`lorafair._linalg.matmul`) on that many worker threads, each on one
  thread of every pool; the threads are counted on all the items' work. Kernels side by side use the
  cores better than one kernel split across them, and a torch copy on 2 threads between
  2-thread OpenBLAS calls competes with OpenBLAS's workers, which spin for a while after each
  call (``lora_fair`` on one Llama-3-8B block ran 2.2× as fast as the code before, which ran
  each layer's Grams on 2 BLAS threads and its copies on 2 torch threads: ``python -m
  benchmarks.against --commit 2c6f175 --methods lora_fair``).
- :func:`torch_pool_for`: one memory-bound elementwise pass (a weighted sum of K tensors, a
  stacking copy) on torch's pool, each output element computed as on one thread.
- :func:`pool_for`: one large kernel alone (a batch of one layer) on NumPy's BLAS pool.
  Only NumPy's OpenBLAS ``syrk`` and ``gemm`` run there: they split their output into blocks
  and sum each entry in the same order on any number of threads; torch's R × R algebra, QRs
  and SVDs (MKL and LAPACK) are not (FlexLoRA's float32 result changed in its last bits on
  two threads), and stay on one.

A process pinned by the environment (``OMP_NUM_THREADS=1``) gets one thread everywhere.
``free`` is there because a thread that waits for a core costs far more than it gives: on the
2-core machine of ``benchmarks/README.md`` at a load average of 14, the Llama-3-8B cell's
``lora_fair`` took 7.7× as long on two threads as pinned (``python -m benchmarks.llm_cells
--blocks 1 --pinned-too --methods lora_fair`` without this term), and a lone (320 × 14336)
``syrk`` 9× as long at a load of 4.6.

The limits are process-wide while the call runs (torch and OpenBLAS have no per-thread
setting): a concurrent torch computation in another Python thread runs on the same pool size
meanwhile. Changing them costs well under a microsecond for torch and a few for OpenBLAS (set
directly, not through threadpoolctl's context manager, about 16 µs).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import cache, wraps
from typing import Any, NamedTuple, ParamSpec, TypeVar

import torch
from threadpoolctl import ThreadpoolController

__all__ = [
    "pool_for",
    "single_threaded",
    "split_map",
    "threads_for",
    "torch_pool_for",
    "torch_single_threaded",
]

_P = ParamSpec("_P")
_T = TypeVar("_T")
_I = TypeVar("_I")
_S = TypeVar("_S")

_FLOPS_PER_THREAD = float(1 << 25)
"""Work per thread below which a thread is not worth waking (about 1 ms on one core)."""

_BYTES_PER_THREAD = float(1 << 20)
"""Bytes of a memory-bound pass worth a thread of torch's pool (about 0.3 ms of one core)."""

_pool = [0]
"""The process's pool size at the start of the outermost pinned call (0: no call running)."""

_inside = threading.local()
"""``item``: this thread is one of :func:`split_map`'s workers."""


@cache
def _controller() -> ThreadpoolController:
    """The process's BLAS/OpenMP libraries (found once; NumPy is imported by then)."""
    return ThreadpoolController()


@cache
def _blas() -> tuple[Any, ...]:
    """NumPy's BLAS libraries' controllers (set directly: a few µs, not threadpoolctl's scan)."""
    return tuple(_controller().select(user_api="blas").lib_controllers)


def _process_pool() -> int:
    """The pool a kernel may use: the size when the outermost pinned call began, else now."""
    return _pool[0] or torch.get_num_threads()


class _CpuSample(NamedTuple):
    wall: float  # time.monotonic()
    idle: int  # the machine's idle + iowait jiffies, all cores (/proc/stat)
    total: int  # all jiffies, all cores
    own: float  # this process's CPU seconds, all its threads


_MIN_WINDOW = 0.1
"""Seconds of history below which the last estimate of the free cores is kept (10 jiffies)."""

_cpu: dict[str, Any] = {"sample": None, "free": math.inf, "call": None}


def _sample() -> _CpuSample | None:
    try:
        with open("/proc/stat", "rb") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return _CpuSample(time.monotonic(), fields[3] + fields[4], sum(fields), time.process_time())


def _free_cores() -> float:
    """Cores this process can use now: the machine's idle cores plus those this process itself
    kept busy, over the time since the last estimate (at least ``_MIN_WINDOW``; the first one:
    the cores above the 1-minute load average, plus one for this thread). ``inf`` where
    ``/proc/stat`` cannot be read (not Linux). Cost: one line of ``/proc/stat``, about 20 µs.
    """
    now = _sample()
    if now is None:
        return math.inf
    last: _CpuSample | None = _cpu["sample"]
    cores = os.cpu_count() or 1
    if last is None:
        _cpu["sample"], _cpu["free"] = now, max(0.0, cores - os.getloadavg()[0]) + 1
    elif now.wall - last.wall >= _MIN_WINDOW and now.total > last.total:
        idle = cores * (now.idle - last.idle) / (now.total - last.total)
        own = (now.own - last.own) / (now.wall - last.wall)
        _cpu["sample"], _cpu["free"] = now, idle + own
    free: float = _cpu["free"]
    return free


def threads_for(flops: float = 0.0, *, nbytes: float = 0.0) -> int:
    """The thread policy: ``min(pool, free, max(1, ⌊w⌋))`` threads for
    ``w = max(flops / 2²⁵, nbytes / 2²⁰)``.

    One thread per 2²⁵ flops of a compute-bound kernel (about a millisecond of one core), or
    per 2²⁰ bytes read by a memory-bound pass (a weighted sum, a cast-copy); at most the
    process's pool and at most the cores free for it (:func:`_free_cores`, rounded; estimated
    once per aggregator call, and only for work large enough to want a second thread). See
    the module's docstring for the measurements behind the rule.
    """
    work = max(flops / _FLOPS_PER_THREAD, nbytes / _BYTES_PER_THREAD)
    n = max(1, min(_process_pool(), int(work)))
    if n == 1:
        return 1
    if _pool[0] == 0:  # outside an aggregator call: estimated now
        free = _free_cores()
    else:
        if _cpu["call"] is None:  # once per call
            _cpu["call"] = _free_cores()
        free = _cpu["call"]
    return max(1, int(min(float(n), free) + 0.5))  # free rounded; inf where unknown


def _blas_threads() -> list[int]:
    return [int(lib.num_threads) for lib in _blas()]


def _set_blas(counts: list[int]) -> None:
    for lib, n in zip(_blas(), counts, strict=True):
        lib.set_num_threads(n)


@contextmanager
def pool_for(flops: float) -> Iterator[int]:
    """Run the body's NumPy BLAS kernels on :func:`threads_for` ``(flops)`` threads.

    Inside a pinned call: sets NumPy's BLAS pool to that many threads and restores it after
    (nested uses restore the outer one's); torch's pool stays pinned, so torch's cast-copies
    between the BLAS calls do not compete with OpenBLAS's workers, which spin for a while after
    each call. A kernel the rule gives one thread costs a division and a
    comparison. ``flops``: one kernel's work. Yields the count. Prefer :func:`split_map` where
    the work is many independent kernels (layers).
    """
    if _pool[0] == 0:  # outside a pinned call the pools are as the process set them
        yield torch.get_num_threads()
        return
    n = threads_for(flops)
    if n == 1:
        yield n
        return
    blas = _blas_threads()
    _set_blas([n] * len(blas))
    try:
        yield n
    finally:
        _set_blas(blas)


@contextmanager
def torch_pool_for(nbytes: float) -> Iterator[int]:
    """Run the body's torch kernels on :func:`threads_for` ``(nbytes=nbytes)`` threads of
    torch's pool: for one memory-bound elementwise pass (a weighted sum, a cast-copy), whose
    every output element is computed the same way however the pass is split.

    Inside a pinned call: sets torch's pool and restores it after; outside, leaves the pool as
    the process set it. An elementwise pass gains from splitting its memory stream, while
    :func:`split_map`'s workers lose to the interpreter's lock between its small kernels
    (``fedit`` on one Llama-3-8B block, bf16: ``python -m benchmarks.against --commit 2c6f175
    --methods fedit``, against the one-thread code). Used
    only where no threaded OpenBLAS call ran just before (its workers spin for a while).
    """
    if _pool[0] == 0:
        yield torch.get_num_threads()
        return
    n = threads_for(nbytes=nbytes)
    if n == 1:
        yield n
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


@cache
def _workers(n: int) -> ThreadPoolExecutor:
    """``n`` worker threads, kept for the process (started on first use)."""
    return ThreadPoolExecutor(max_workers=n, thread_name_prefix="lorafair")


def split_map(
    fn: Callable[[_S, _I], _T],
    items: Sequence[_I],
    *,
    scratch: Callable[[], _S],
    flops: float = 0.0,
    nbytes: float = 0.0,
) -> list[_T]:
    """``[fn(s, x) for x in items]``, the items split over :func:`threads_for` worker threads.

    ``flops`` / ``nbytes``: one item's work. With ``n = threads_for(total work)`` threads and at
    least ``n`` items, ``n`` worker threads take the items in turn, each on one thread of every
    pool (a one-thread BLAS call and torch op in each): independent kernels side by side use
    the cores better than one kernel split across them (see the module's docstring). Fewer
    items than threads: one at a time, each BLAS call on the threads :func:`pool_for` gives
    ``flops``, each torch pass on those :func:`torch_pool_for` gives ``nbytes`` (FlexLoRA's
    cast-copies of a one-layer batch: 61 → 44 ms on one Llama-3-8B block, bf16, once no
    threaded BLAS call ran before them).
    ``scratch()`` makes one worker's reusable state (buffers), once per worker per call.

    Every item's result is what ``fn`` computes alone: the split never changes a bit. Outside
    an aggregator call (no pin), and in one of its own workers (a ``split_map`` inside an item:
    waiting there on the busy workers could deadlock), the items run one at a time where
    called. A lone item run by the caller may split its own work (FlexLoRA's R × R products of
    one large layer: :func:`lorafair._linalg.matmul`). An exception in an item propagates (the
    other items finish first).
    """
    total = len(items)
    nested = getattr(_inside, "item", False)
    n = threads_for(flops * total, nbytes=nbytes * total) if _pool[0] and not nested else 1
    if n == 1 or total == 0:
        state = scratch()
        return [fn(state, x) for x in items]
    if total < n:
        with pool_for(flops), torch_pool_for(nbytes):
            state = scratch()
            return [fn(state, x) for x in items]
    lock = threading.Lock()
    order = iter(range(total))
    out: list[Any] = [None] * total

    def worker() -> None:
        torch.set_num_threads(1)  # torch's pool size is per thread: this worker's own
        _inside.item = True  # a split_map inside an item runs there: no wait on a busy pool
        state = scratch()
        while True:
            with lock:
                i = next(order, None)
            if i is None:
                return
            out[i] = fn(state, items[i])

    blas = _blas_threads()  # a lone item's pool_for may have lifted them: one thread a worker
    _set_blas([1] * len(blas))
    try:
        futures = [_workers(n).submit(worker) for _ in range(n)]
        for f in futures:
            f.result()
    finally:
        _set_blas(blas)
    return out


@contextmanager
def single_threaded() -> Iterator[None]:
    """Pin torch's intra-op pool and NumPy's BLAS pool to one thread; restore them on exit.

    Kernels inside may lift the pin for themselves with :func:`pool_for`.
    """
    before = torch.get_num_threads()
    outer = _pool[0] == 0
    if outer:
        _pool[0], _cpu["call"] = before, None
    if before != 1:
        torch.set_num_threads(1)
    try:
        with _controller().limit(limits=1, user_api="blas"):
            yield
    finally:
        if before != 1:
            torch.set_num_threads(before)
        if outer:
            _pool[0] = 0


def torch_single_threaded(fn: Callable[_P, _T]) -> Callable[_P, _T]:
    """Decorator: run ``fn`` with torch's intra-op pool pinned to one thread, restored after.

    Kernels inside may lift the pin for themselves with :func:`pool_for` (torch's pool; NumPy's
    BLAS pool is then left as the process set it).
    """

    @wraps(fn)
    def pinned(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        before = torch.get_num_threads()
        if before == 1:
            return fn(*args, **kwargs)
        outer = _pool[0] == 0
        if outer:
            _pool[0], _cpu["call"] = before, None
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(before)
            if outer:
                _pool[0] = 0

    return pinned

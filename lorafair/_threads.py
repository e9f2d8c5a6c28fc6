"""Private: the thread policy, one rule by cost (:func:`threads_for`).

Aggregators run two kinds of work in two pools (torch's OpenMP/MKL pool and NumPy's OpenBLAS
pool, the Grams' ``syrk``):

- **small work**: r × r algebra, a few small products, host solves, and the averaging methods'
  memory-bound passes. None gains from a second thread, and at the pools' default size each
  kernel waits for a worker to be scheduled; on a busy machine that wait dominates: on a loaded
  2-core machine one ViT-B ``attn.qkv`` layer took 350 to 880 ms by default against 35 to 47 ms
  with every pool pinned to one thread (``docs/lora_fair.md``, validation history), and ``fedit``
  on ViT-B/16 2.06 s against 32 ms.
- **compute-bound kernels**: the float64 R × R Grams of large layers (``(d_in + d_out) R²``
  flops), their thin QRs, dense products and SVDs. At LLM scale (a Llama-3-8B MLP layer at
  R = K r = 320: 1.9 GFLOP) one such kernel runs for tens of milliseconds and the pool's start-up
  is noise; a single ``A_s A_sᵀ`` of (320 × 14336) ran 1.66× faster on 2 BLAS threads than on 1.

So every aggregator call pins both pools to one thread (:func:`single_threaded`,
:func:`torch_single_threaded`), and the few compute-bound kernels lift the pin for themselves
through :func:`pool_for`, which asks the one rule, :func:`threads_for`:

    threads = min(pool, max(1, ⌊flops / 2²⁵⌋))

where ``pool`` is the process's pool as it was when the call began (torch's thread count: by
default the number of cores, or what ``OMP_NUM_THREADS`` / ``torch.set_num_threads`` set) and
``flops`` the kernel's own work. 2²⁵ flops is about a millisecond on one core (30 GFLOP/s), so
a thread is added only for a millisecond or more of work: two threads need 67 Mflop, which no
ViT-B/16 kernel at K·r ≤ 96 reaches (its largest ``syrk``, ``mlp.fc1``'s 3072 × 96, is
28 Mflop), and every Llama-3-8B linear's Grams at R = 320 exceed (the smallest, ``k_proj``'s
1024 × 320, is 105 Mflop). A process pinned by the environment
(``OMP_NUM_THREADS=1``) gets one thread everywhere, as before; on a machine shared with other
CPU-heavy work that is still the setting to use (threads then wait for cores, see above).

The limits are process-wide while the call runs (torch and OpenBLAS have no per-thread
setting): a concurrent torch computation in another Python thread runs on the same pool size
meanwhile. Changing them costs well under a microsecond for torch and a few for OpenBLAS (set
directly, not through threadpoolctl's context manager, about 16 µs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache, wraps
from typing import Any, ParamSpec, TypeVar

import torch
from threadpoolctl import ThreadpoolController

__all__ = ["pool_for", "single_threaded", "threads_for", "torch_single_threaded"]

_P = ParamSpec("_P")
_T = TypeVar("_T")

_FLOPS_PER_THREAD = float(1 << 25)
"""Work per thread below which a thread is not worth waking (about 1 ms on one core)."""

_pool = [0]
"""The process's pool size at the start of the outermost pinned call (0: no call running)."""


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


def threads_for(flops: float) -> int:
    """The thread policy: ``min(pool, max(1, ⌊flops / 2²⁵⌋))`` threads for a kernel of ``flops``.

    One thread per 2²⁵ flops (about a millisecond of one core's work), at most the process's
    pool (see the module's docstring for the measurements behind the rule).
    """
    return max(1, min(_process_pool(), int(flops // _FLOPS_PER_THREAD)))


def _blas_threads() -> list[int]:
    return [int(lib.num_threads) for lib in _blas()]


def _set_blas(counts: list[int]) -> None:
    for lib, n in zip(_blas(), counts, strict=True):
        lib.set_num_threads(n)


@contextmanager
def pool_for(flops: float) -> Iterator[int]:
    """Run the body on :func:`threads_for` ``(flops)`` threads of torch's and NumPy's pools.

    Inside a pinned call: sets both pools to that many threads and restores them after (nested
    uses restore the outer one's); a kernel the rule gives one thread costs a division and a
    comparison. ``flops``: one kernel's work (one layer's, where a batched kernel runs layer by
    layer). Yields the count.
    """
    n = threads_for(flops)
    if n == 1 or _pool[0] == 0:  # outside a pinned call the pools are as the process set them
        yield n
        return
    before, blas = torch.get_num_threads(), _blas_threads()
    torch.set_num_threads(n)
    _set_blas([n] * len(blas))
    try:
        yield n
    finally:
        torch.set_num_threads(before)
        _set_blas(blas)


@contextmanager
def single_threaded() -> Iterator[None]:
    """Pin torch's intra-op pool and NumPy's BLAS pool to one thread; restore them on exit.

    Kernels inside may lift the pin for themselves with :func:`pool_for`.
    """
    before = torch.get_num_threads()
    outer = _pool[0] == 0
    if outer:
        _pool[0] = before
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
            _pool[0] = before
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(before)
            if outer:
                _pool[0] = 0

    return pinned

"""Private: run a solver on one CPU thread pool of one thread.

LoRA-FAIR's solvers run many small operations (r × r algebra, a few (d × R) products, a host
solve of a few numbers per layer) in two pools: torch's OpenMP/MKL pool and NumPy's OpenBLAS
pool (the flat Grams' ``syrk``). None of them is large enough to gain from a second thread,
but at the pools' default size each one waits for a worker to be scheduled, and on a busy
machine that wait dominates: on a loaded 2-core machine one ViT-B ``attn.qkv`` layer took 350
to 880 ms by default against 35 to 47 ms with every pool pinned to one thread by the
environment (``docs/lora_fair.md``, validation history). :func:`single_threaded` pins both
pools for the call and restores them afterwards, so a call runs as fast as in the pinned
environment.

The limits are process-wide while the call runs (torch and OpenBLAS have no per-thread
setting): a concurrent torch computation in another Python thread runs on one thread meanwhile.

:func:`torch_single_threaded` is the same for aggregators that never call NumPy: a decorator that
pins torch's pool alone (well under a microsecond, against about 30 µs for threadpoolctl's
library scan). Every aggregator is memory-bound or runs many small kernels; on the shared 2-core
machine of ``benchmarks/README.md`` their default two-thread calls were 6 to 64 times slower than
pinned ones (ViT-B/16, K = 6, r = 16; ``fedit`` 2.06 s against 32 ms).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache, wraps
from typing import ParamSpec, TypeVar

import torch
from threadpoolctl import ThreadpoolController

__all__ = ["single_threaded", "torch_single_threaded"]

_P = ParamSpec("_P")
_T = TypeVar("_T")


@cache
def _controller() -> ThreadpoolController:
    """The process's BLAS/OpenMP libraries (found once; NumPy is imported by then)."""
    return ThreadpoolController()


@contextmanager
def single_threaded() -> Iterator[None]:
    """Pin torch's intra-op pool and NumPy's BLAS pool to one thread; restore them on exit."""
    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        with _controller().limit(limits=1, user_api="blas"):
            yield
    finally:
        if before != 1:
            torch.set_num_threads(before)


def torch_single_threaded(fn: Callable[_P, _T]) -> Callable[_P, _T]:
    """Decorator: run ``fn`` with torch's intra-op pool pinned to one thread, restored after."""

    @wraps(fn)
    def pinned(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        before = torch.get_num_threads()
        if before == 1:
            return fn(*args, **kwargs)
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return pinned

"""Private: run a solver on one CPU thread pool of one thread.

LoRA-FAIR's solvers run many small operations (r × r algebra, a few (d × R) products, a NumPy
host solve of a few numbers per layer) in two pools: torch's OpenMP/MKL pool and NumPy's
OpenBLAS pool. None of them is large enough to gain from a second thread, but at the pools'
default size each one waits for a worker to be scheduled, and on a busy machine that wait
dominates: on a loaded 2-core machine one ViT-B ``attn.qkv`` layer took 350 to 880 ms by
default against 35 to 47 ms with every pool pinned to one thread by the environment
(``docs/lora_fair.md``, validation history). :func:`single_threaded` pins both pools for the
call and restores them afterwards, so a call runs as fast as in the pinned environment.

The limits are process-wide while the call runs (torch and OpenBLAS have no per-thread
setting): a concurrent torch computation in another Python thread runs on one thread meanwhile.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import torch
from threadpoolctl import ThreadpoolController

__all__ = ["single_threaded"]


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

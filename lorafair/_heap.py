"""Private: hand the memory one phase of a call freed back to the operating system.

glibc's ``malloc`` keeps freed memory for reuse, and after the first large block is freed it
raises its mmap threshold (up to 32 MB), so later blocks of up to that size come from its
arenas, one per thread, and stay there when freed. A phase that runs on
:func:`lorafair._threads.split_map`'s worker threads (FlexLoRA's Gram route: per worker a
column buffer, the R × R cores) therefore leaves its working set resident in the workers'
arenas, where the caller's thread cannot reuse it; the next phase, on the caller's thread
(FlexLoRA's stacked routes: float64 stacks and a d_out × d_in ΔW), then adds its own working
set on top. On one Llama-3-8B block, bf16, K = 50, r = 16, ``flexlora``'s peak growth was
1.35–1.53× its input (six runs), and 0.88–0.93× (three) with :func:`release` between the two
phases, each call in a fresh process as ``python -m lorafair.bench --preset llama3_8b
--blocks 1 -K 50 -r 16 --dtype bfloat16 --methods flexlora --memory`` measures it.
``malloc_trim(0)`` returns every arena's free pages; it took under a millisecond here, after
400 MB had been freed. Dask's workers call it for the same reason. Elsewhere (no glibc)
:func:`release` does nothing.

The same happens inside the Gram route, between its chunks of layers: a chunk whose R × R
cores run on the caller's thread (one job) leaves their memory in its arena, and the next
chunk whose cores run on the workers (several jobs) cannot use it, nor the reverse.
:func:`release_beyond` hands it back at such a change of thread once the call has grown by a
set share of its input (``lorafair.aggregate._RETAINED``). Not at every chunk: the next chunk
of the same thread reuses that memory, and a trim makes it fault its pages in again (slower at
K = 20, r = 64, where every chunk is one layer on the caller's thread).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from functools import cache

from lorafair._clib import function

__all__ = ["release", "release_beyond", "resident"]


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS, Windows)."""
    return function("malloc_trim", [ctypes.c_size_t], ctypes.c_int)


def release() -> None:
    """Return the memory the C library holds free, in every thread's arena, to the operating
    system (``malloc_trim(0)``). Changes no value; later allocations fault their pages in
    again. A no-op without glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def resident() -> int:
    """The process's resident memory now, in bytes (``/proc/self/statm``, the same count as
    ``VmRSS``; about 10 µs), or 0 where it cannot be read (not Linux)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def release_beyond(limit: int) -> bool:
    """:func:`release` when the process's resident memory exceeds ``limit`` bytes; True if it
    did. A no-op where the resident memory cannot be read."""
    now = resident()
    if now and now > limit:
        release()
        return True
    return False

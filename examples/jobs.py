"""Independent runs on several CPU processes, one progress stream, results in a fixed order.

The offline example's runs (one per model for pre-training, then one per model, seed and
method) share nothing but read-only inputs, and each draws every random number from its own
seeded generator on one torch thread. So they can run in forked worker processes and give the
same floats as in one process, in any order; ``tests/examples/test_ex_timm.py`` checks that
``--jobs 1`` and ``--jobs 2`` write identical results. On a 2-core machine two processes halve
the wall time of the offline default; a GPU run keeps one process (``--jobs 1``).

Workers send two kinds of events to the parent through one queue: a finished round
(``(job index, round)``), which drives the progress bar, and log records, which the parent
writes through its own handlers, so the log file has one writer.
"""

from __future__ import annotations

import logging
import logging.handlers
import multiprocessing as mp
import os
import queue
from collections.abc import Callable, Sequence
from typing import Any, Generic, NamedTuple, TypeVar

import torch

__all__ = ["Job", "available_cpus", "run_jobs"]

J = TypeVar("J")
R = TypeVar("R")

Tick = Callable[[int], None]
"""Called by a job with the index (from 0) of each round it finishes."""


class Job(NamedTuple, Generic[J]):
    """One unit of work: ``fn(payload, tick)``; ``label`` names it in the progress bar."""

    label: str
    payload: J


class _Fork(NamedTuple):
    fn: Callable[[Any, Tick], Any]
    jobs: Sequence[Job[Any]]
    threads: int
    events: Any
    logger: str


# What the forked workers read: set in the parent just before the pool forks, cleared after.
_FORK: _Fork | None = None


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def run_jobs(
    fn: Callable[[J, Tick], R],
    jobs: Sequence[Job[J]],
    *,
    processes: int,
    threads: int,
    on_tick: Callable[[Job[J], int], None],
    logger: logging.Logger,
) -> list[R]:
    """``[fn(job.payload, tick) for job in jobs]``, on up to ``processes`` forked workers.

    ``on_tick(job, t)`` runs in the parent after job's round ``t``. Results come back in the
    order of ``jobs`` whatever order the workers finish in. With ``processes <= 1``, a single
    job, or no ``fork`` start method (macOS/Windows default to spawn, which would re-import
    timm per worker), everything runs in this process. A worker's exception is re-raised here.
    """
    if processes <= 1 or len(jobs) <= 1 or "fork" not in mp.get_all_start_methods():
        return [fn(job.payload, lambda t, job=job: on_tick(job, t)) for job in jobs]  # type: ignore[misc]
    global _FORK
    ctx = mp.get_context("fork")
    with ctx.Manager() as manager:
        events = manager.Queue()
        _FORK = _Fork(fn, jobs, threads, events, logger.name)
        try:
            with ctx.Pool(min(processes, len(jobs)), initializer=_worker_init) as pool:
                pending = {i: pool.apply_async(_worker_call, (i,)) for i in range(len(jobs))}
                done: dict[int, R] = {}
                while pending:
                    _drain(events, jobs, on_tick, logger, wait=0.1)
                    for i in [i for i, r in pending.items() if r.ready()]:
                        done[i] = pending.pop(i).get()
                _drain(events, jobs, on_tick, logger, wait=None)
        finally:
            _FORK = None
    return [done[i] for i in range(len(jobs))]


def _drain(
    events: Any,
    jobs: Sequence[Job[J]],
    on_tick: Callable[[Job[J], int], None],
    logger: logging.Logger,
    *,
    wait: float | None,
) -> None:
    """Handle every queued event; block up to ``wait`` seconds for the first one."""
    block = wait is not None
    while True:
        try:
            event = events.get(block, wait) if block else events.get_nowait()
        except queue.Empty:
            return
        block = False
        if isinstance(event, logging.LogRecord):
            logger.handle(event)
        else:
            i, t = event
            on_tick(jobs[i], t)


def _worker_init() -> None:
    assert _FORK is not None
    torch.set_num_threads(_FORK.threads)
    log = logging.getLogger(_FORK.logger)
    for h in list(log.handlers):  # the parent's file and console handlers: one writer only
        log.removeHandler(h)
    log.addHandler(logging.handlers.QueueHandler(_FORK.events))


def _worker_call(i: int) -> Any:
    assert _FORK is not None
    work = _FORK
    return work.fn(work.jobs[i].payload, lambda t: work.events.put((i, t)))

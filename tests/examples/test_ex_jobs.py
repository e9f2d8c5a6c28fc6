"""``examples.jobs.run_jobs``: results in job order, every tick and log line reach the parent."""

from __future__ import annotations

import logging
import os

import pytest

from examples.jobs import Job, Tick, run_jobs


def _square_after_rounds(n: int, tick: Tick) -> tuple[int, int]:
    for t in range(n):
        tick(t)
    logging.getLogger("test_ex_jobs").info("job %d done", n)
    return n * n, os.getpid()


@pytest.mark.parametrize("processes", [1, 2])
def test_results_ticks_and_logs_come_back_in_job_order(
    processes: int, caplog: pytest.LogCaptureFixture
) -> None:
    jobs = [Job(f"job {n}", n) for n in (3, 1, 4, 1, 5)]
    ticks: list[tuple[str, int]] = []
    log = logging.getLogger("test_ex_jobs")
    with caplog.at_level(logging.INFO, logger="test_ex_jobs"):
        out = run_jobs(
            _square_after_rounds,
            jobs,
            processes=processes,
            threads=1,
            on_tick=lambda job, t: ticks.append((job.label, t)),
            logger=log,
        )
    assert [r for r, _ in out] == [9, 1, 16, 1, 25]
    assert sorted(ticks) == sorted((j.label, t) for j in jobs for t in range(j.payload))
    assert sorted(r.getMessage() for r in caplog.records) == sorted(
        f"job {j.payload} done" for j in jobs
    )
    pids = {pid for _, pid in out}
    if processes == 1:
        assert pids == {os.getpid()}
    else:
        assert os.getpid() not in pids


def _fail_on_two(n: int, tick: Tick) -> int:
    if n == 2:
        raise ValueError(f"bad job {n}")
    return n


@pytest.mark.parametrize("processes", [1, 2])
def test_a_failing_job_raises_in_the_parent(processes: int) -> None:
    with pytest.raises(ValueError, match="bad job 2"):
        run_jobs(
            _fail_on_two,
            [Job(str(n), n) for n in range(4)],
            processes=processes,
            threads=1,
            on_tick=lambda job, t: None,
            logger=logging.getLogger("test_ex_jobs"),
        )

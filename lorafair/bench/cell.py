"""One cell of the table: check every entry's result, then time them all with the floor probes
in one round-robin, and return one :class:`Row` per entry."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from lorafair.bench.cells import Inputs
from lorafair.bench.checks import Quality, check_update
from lorafair.bench.entries import Entry
from lorafair.bench.floors import Floors, make_probes
from lorafair.bench.shapes import factor_bytes
from lorafair.bench.timing import round_robin
from lorafair.types import LoRAFactors

__all__ = ["Check", "Row", "make_row", "ratio", "run_cell"]

Check = Callable[[Entry, Mapping[str, LoRAFactors]], Quality]
"""``check(entry, result) -> Quality``: a cell's correctness check of one entry's result."""


@dataclass
class Row:
    """One (shape set, dtype, K, r, aggregator) cell of the table."""

    shape_set: str
    n_layers: int
    dtype: str
    K: int
    r: int
    aggregator: str
    time_s: float
    timing: str  # "median of N" | "extrapolated ..." | "≥ ... (budget hit)"
    cos_mean: float
    cos_min: float
    objective: float | None
    ref_objective_layers: float | None  # mean objective over the reference layers
    floor_memory_s: float | None = None
    floor_compute_s: float | None = None
    x_memory: float | None = None  # time / memory floor (None in a smoke run)
    x_compute: float | None = None  # time / compute floor (None in a smoke run)
    peak_extra_mib: float | None = None
    mem_ratio: float | None = None  # peak growth / input bytes
    mem_note: str = ""
    check: str = "ok"
    full_layers: int | None = None
    """The whole model's layer count where the cell ran a subset of its blocks."""
    reproduces: str | None = None
    """For a reference row: the entry it computes another way."""
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def full_time_s(self) -> float | None:
        """The time extrapolated to the whole model (by layer count), where a subset ran."""
        if self.full_layers is None or self.full_layers == self.n_layers:
            return None
        return self.time_s * self.full_layers / self.n_layers


def make_row(
    inputs: Inputs,
    dtype: str,
    K: int,
    r: int,
    entry: Entry,
    time_s: float,
    timing: str,
    q: Quality,
    **kw: Any,
) -> Row:
    """A row of ``entry`` in the cell of ``inputs``."""
    full = inputs.shapes.full_layers
    return Row(
        shape_set=inputs.shape_set,
        n_layers=len(inputs.layers),
        dtype=dtype,
        K=K,
        r=r,
        aggregator=entry.name,
        time_s=time_s,
        timing=timing,
        cos_mean=q.cos_mean,
        cos_min=q.cos_min,
        objective=q.objective,
        ref_objective_layers=q.objective if q.ref_objective is None else q.ref_objective,
        check="; ".join(q.problems) or "ok",
        full_layers=full if full != len(inputs.layers) else None,
        reproduces=entry.reproduces,
        **kw,
    )


def ratio(x: float, floor: float | None, quick: bool) -> float | None:
    """``x / floor``; ``None`` in a smoke run or without a floor."""
    return None if quick or floor is None or floor <= 0 else x / floor


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def run_cell(
    inputs: Inputs,
    chosen: Sequence[Entry],
    *,
    dtype: str,
    K: int,
    r: int,
    options: Mapping[str, Any],
    warmup: int,
    repeats: int,
    quick: bool = False,
    check: Check | None = None,
    check_layers: Sequence[str] | None = None,
) -> list[Row]:
    """Run and check every entry of ``chosen`` once, then time them with the floor probes in one
    round-robin; one row each.

    ``check`` defaults to :func:`~lorafair.bench.checks.check_update` on ``check_layers`` (all
    layers when ``None``). Memory: the inputs, one result per entry, and the probes' buffers
    (twice the input bytes, at most 2 GiB, plus at most 256 MiB of float64 stacks).
    """

    def default(entry: Entry, result: Mapping[str, LoRAFactors]) -> Quality:
        clients = inputs.shared if entry.shared_A else inputs.free
        return check_update(entry, result, clients, inputs.dtype, layers=check_layers)

    run_check = check or default
    checked: dict[str, tuple[Quality, int]] = {}
    for e in chosen:
        result, _ = e.run(inputs, options, None)
        checked[e.name] = (run_check(e, result), factor_bytes(result))
        del result
    probes = make_probes(inputs, gram=any(e.floor == "gram" for e in chosen))
    calls: dict[str, Callable[[], object]] = {
        e.name: partial(e.run, inputs, options, None) for e in chosen
    }
    calls.update({"floor:" + k: f for k, f in probes.calls.items()})
    times = round_robin(calls, inputs.device, warmup, repeats)
    probe_times = {k[6:]: statistics.median(v) for k, v in times.items() if k[:6] == "floor:"}
    floors = Floors(probes, probe_times)
    del probes, calls
    rows = []
    for e in chosen:
        q, out_bytes = checked[e.name]
        t = statistics.median(times[e.name])
        in_bytes = factor_bytes(inputs.shared if e.shared_A else inputs.free)
        mem = floors.memory(in_bytes, out_bytes)
        comp = floors.compute(e.floor, in_bytes // _itemsize(inputs.dtype))
        rows.append(
            make_row(
                inputs,
                dtype,
                K,
                r,
                e,
                t,
                f"median of {len(times[e.name])}",
                q,
                floor_memory_s=mem,
                floor_compute_s=comp,
                x_memory=ratio(t, mem, quick),
                x_compute=ratio(t, comp, quick),
                detail={"times_s": times[e.name], "out_bytes": out_bytes, "in_bytes": in_bytes},
            )
        )
    probe_info = {
        "probe_times_s": floors.times,
        "probe_bytes": floors.probes.in_bytes,
        "gemm_gflops": floors.gemm_rate / 1e9,
        "gram_gflops": floors.gram_rate / 1e9,
        "read_gb_s": floors.probes.in_bytes / floors.times["read"] / 1e9,
        "write_gb_s": floors.probes.in_bytes / floors.times["write"] / 1e9,
        "threads": torch.get_num_threads(),
    }
    for row in rows:
        row.detail["floors"] = probe_info
    return rows

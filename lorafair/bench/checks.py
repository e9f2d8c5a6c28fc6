"""Correctness before timing, with the library's public diagnostics.

Every row's result is compared with ``ΔW = Σ p_k B_k A_k`` by
:func:`lorafair.metrics.aggregation_bias` (factored, float64, never forming ΔW): the cosine is
reported, and an entry the registry calls ``exact`` must have ``‖BA − ΔW‖ / ‖ΔW‖`` within its
dtype's rounding. Where the registry links a float64 definition of the factors (``reference``)
or a stated form (``form``), the result must match them to the same tolerance. The
repository's ``benchmarks/`` adds independent float64 references on top.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from lorafair.bench.entries import Entry
from lorafair.metrics import aggregation_bias
from lorafair.types import LoRAFactors

__all__ = ["REL_TOL", "Quality", "check_update"]

REL_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2}
"""Relative error allowed of an exact result, per input dtype (bfloat16's output rounding alone is
about 4e-3)."""


@dataclass
class Quality:
    """How one result compares with ΔW over the checked layers."""

    cos_mean: float
    cos_min: float
    objective: float | None = None
    """The mean LoRA-FAIR objective over the checked layers, where the row reports one."""
    problems: list[str] = field(default_factory=list)
    ref_objective: float | None = None
    """The mean objective over a cell's reference layers only (to compare with a reference)."""


def check_update(
    entry: Entry,
    result: Mapping[str, LoRAFactors],
    clients: Sequence[Mapping[str, LoRAFactors]],
    dtype: torch.dtype,
    *,
    layers: Sequence[str] | None = None,
) -> Quality:
    """Cosines of ``result`` with ΔW on ``layers`` (default: all), and the exactness the entry
    promises. Cost per layer: O((d_out + d_in)(r + R)²) with R = Σ r_k."""
    names = list(result) if layers is None else list(layers)
    problems = [
        f"{n}: non-finite output"
        for n in names
        if not all(bool(torch.isfinite(t).all()) for t in result[n])
    ]
    if problems:
        return Quality(float("nan"), float("nan"), problems=problems)
    sub = [{n: c[n] for n in names} for c in clients]
    bias = aggregation_bias(sub, {n: result[n] for n in names}, allow_excess_rank=True)
    tol = REL_TOL.get(dtype, 1e-5)
    if entry.exact and not entry.personalised:
        problems += [
            f"{n}: ‖BA − ΔW‖/‖ΔW‖ = {b.relative_error:.2e} > {tol:g} (must be exact)"
            for n, b in bias.items()
            if b.relative_error > tol
        ]
    problems += _linked(entry, result, clients, names, tol)
    cosines = [b.cosine for b in bias.values()]
    return Quality(statistics.fmean(cosines), min(cosines), problems=problems)


def _linked(
    entry: Entry,
    result: Mapping[str, LoRAFactors],
    clients: Sequence[Mapping[str, LoRAFactors]],
    names: Sequence[str],
    tol: float,
) -> list[str]:
    """What differs from the registry's ``reference`` (relative Frobenius error of each factor it
    defines, float64) and ``form`` on ``names``. Cost per layer: O(K r (d_in + d_out))."""
    problems: list[str] = []
    for n in names:
        A, B = result[n]
        if entry.reference is not None:
            for label, got, want in zip(
                "AB", (A, B), entry.reference(clients, None, n), strict=True
            ):
                if want is None:
                    continue
                x, y = got.to("cpu", torch.float64), want.to("cpu", torch.float64)
                if x.shape != y.shape:
                    problems.append(
                        f"{n}: {label} has shape {tuple(x.shape)}, its definition {tuple(y.shape)}"
                    )
                    continue
                e = float(torch.linalg.norm(x - y)) / max(float(torch.linalg.norm(y)), 1e-300)
                if e > tol:
                    problems.append(f"{n}: {label} differs from its definition by {e:.2e}")
        if entry.form is not None and (wrong := entry.form(A, B, tol)) is not None:
            problems.append(f"{n}: {wrong}")
    return problems

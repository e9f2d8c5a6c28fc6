"""Correctness before timing: independent float64 factored checks of every result.

What is checked follows each entry's registry fields, not its name: the element-wise float64
definition (``reference``) and the stated form (``form``) where the registry links one,
exactness, Eckart–Young optimality (and, for an energy-threshold rank, that the rank is the
smallest keeping that energy), the LoRA-FAIR objective (never worse than FedIT where promised)
and the agreement with the entry's dense reference on the reference layers.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Mapping
from typing import Any

import torch

from benchmarks import references as ref
from lorafair.aggregate import EnergyThreshold
from lorafair.bench import Entry, Inputs, Quality
from lorafair.types import LoRAFactors

__all__ = ["OBJ_TOL", "REL_TOL", "Quality", "check"]

# Correctness tolerances per dtype (relative errors of factored products; output rounding of
# bfloat16 alone is ~4e-3). The objective tolerance is absolute, on an objective of order 1e-2.
REL_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2}
OBJ_TOL = {torch.float64: 1e-9, torch.float32: 1e-6, torch.bfloat16: 1e-3}


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    """Relative Frobenius distance of two tensors (float64)."""
    x64, y64 = x.double(), y.double()
    return float(torch.linalg.norm(x64 - y64) / max(float(torch.linalg.norm(y64)), 1e-300))


def check(
    entry: Entry,
    result: Mapping[str, LoRAFactors],
    inputs: Inputs,
    options: Mapping[str, Any],
    *,
    dense: Mapping[str, Mapping[str, LoRAFactors]],
) -> Quality:
    """Check ``result`` of ``entry``; problems are collected, never ignored.

    ``dense`` maps each dense reference's name to its results on the reference layers.
    """
    clients = inputs.shared if entry.shared_A else inputs.free
    p = ref.normalised(None, len(clients))
    tol, otol = REL_TOL[inputs.dtype], OBJ_TOL[inputs.dtype]
    lam = float(options.get("lam", 0.01))
    similarity = options.get("similarity", "flat")
    expected, form = entry.reference, entry.form
    energy = entry.defaults.get("rank")
    refs = {
        name: out for name, out in dense.items() if name != entry.name and _reproduces(name, entry)
    }
    cosines: list[float] = []
    objectives: list[float] = []
    problems: list[str] = []
    for layer, (A, B) in result.items():
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            problems.append(f"{layer}: non-finite output")
            continue
        A_s, B_s = ref.stack64(clients, layer, p)
        A_bar, B_bar = ref.weighted_mean64(clients, layer, p)
        ideal = ref.fro_norm(B_s, A_s)
        cosines.append(ref.flat_cosine(B_s, A_s, B.double(), A.double()))
        if expected is not None:
            want_AB = expected(clients, None, layer)  # float64 on the CPU; None: equal weights
            for label, got, want in zip("AB", (A, B), want_AB, strict=True):
                if want is not None and (e := _rel(got.cpu(), want)) > tol:
                    problems.append(f"{layer}: {label} differs from its definition by {e:.2e}")
        if entry.exact and (e := ref.diff_norm(B, A, B_s, A_s) / ideal) > tol:
            problems.append(f"{layer}: ‖BA − ΔW‖/‖ΔW‖ = {e:.2e} > {tol:g} (must be exact)")
        if form is not None and (wrong := form(A, B, tol)) is not None:
            problems.append(f"{layer}: {wrong}")
        if entry.optimal:
            r = int(A.shape[0])
            sv = ref.singular_values(B_s, A_s)
            tail = math.sqrt(float((sv[r:] ** 2).sum()))
            err = ref.diff_norm(B, A, B_s, A_s)
            if abs(err - tail) > tol * ideal:
                problems.append(
                    f"{layer}: ‖ΔW − BA‖ = {err:.6e} but the Eckart–Young optimum is {tail:.6e}"
                )
            if isinstance(energy, EnergyThreshold):
                total = float((sv**2).sum())
                kept = float((sv[:r] ** 2).sum()) / total
                if kept < energy.threshold * (1 - tol):
                    problems.append(
                        f"{layer}: keeps {kept:.6f} of ‖ΔW‖², under the {energy.threshold} asked"
                    )
                if r > 1 and float((sv[: r - 1] ** 2).sum()) / total >= energy.threshold:
                    problems.append(
                        f"{layer}: rank {r} is not the smallest reaching {energy.threshold}"
                    )
        if entry.norm is not None:
            objective = functools.partial(
                ref.fair_objective,
                A_s,
                B_s,
                A_bar,
                B_bar,
                lam=lam,
                norm=entry.norm,
                similarity=similarity,
            )
            obj = objective(B)
            objectives.append(obj)
            if entry.never_worse_than_fedit and obj > (base := objective(B_bar)) + otol:
                problems.append(f"{layer}: objective {obj:.8f} worse than FedIT's {base:.8f}")
        for name, out in refs.items():
            if layer not in out:
                continue
            Ad, Bd = out[layer]
            if entry.norm is not None:
                if obj > (o_ref := objective(Bd)) + otol:
                    problems.append(f"{layer}: objective {obj:.8f} worse than {name}'s {o_ref:.8f}")
            elif (e := ref.diff_norm(B, A, Bd, Ad) / ref.fro_norm(Bd, Ad)) > tol:
                problems.append(f"{layer}: differs from the {name} product by {e:.2e}")
    return Quality(
        cos_mean=statistics.fmean(cosines) if cosines else float("nan"),
        cos_min=min(cosines) if cosines else float("nan"),
        objective=statistics.fmean(objectives) if objectives else None,
        problems=problems,
    )


def _reproduces(name: str, entry: Entry) -> bool:
    from benchmarks.entries import get

    return get(name).reproduces == entry.name

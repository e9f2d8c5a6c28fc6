"""Benchmark rows for issue 16's methods (FedEx-LoRA, FedSA-LoRA, RoLoRA, HetLoRA, FedSVD,
FlexLoRA with an energy threshold), run through :mod:`lorafair.registry` and checked with the
independent float64 formulas of :mod:`benchmarks.references`.

:func:`call` runs the registered function (the timed call) and returns factors whose ``B @ A``
is the global update (FedEx-LoRA: adapters and residual concatenated; FedSA-LoRA, which has no
global update, client 0's personal adapter ``(Ā, B_0)``). :func:`check` lists what is wrong.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from benchmarks import references as ref
from lorafair import registry
from lorafair.types import FedSAResult, LoRAFactors

__all__ = ["NAMES", "SHARED_A", "call", "check", "needs_shared_A"]

NAMES = ("fedex_lora", "fedsa_lora", "rolora", "hetlora", "fedsvd", "flexlora_energy")
SHARED_A = tuple(n for n in NAMES if registry.get(n).shared_A)


def needs_shared_A(name: str) -> bool:
    """Whether ``name`` must be run on the clients that share one frozen ``A``."""
    return registry.get(name).shared_A


def call(name: str, clients: Sequence[Mapping[str, LoRAFactors]]) -> dict[str, LoRAFactors]:
    """Run registered method ``name`` once; the global update's factors (see module doc)."""
    spec = registry.get(name)
    out = spec.fn(clients, **spec.defaults)
    if spec.update_factors is not None:
        return spec.update_factors(out)
    personal: FedSAResult = out
    return dict(personal.adapters[0])


def check(
    name: str,
    result: Mapping[str, LoRAFactors],
    clients: Sequence[Mapping[str, LoRAFactors]],
    tol: float,
) -> list[str]:
    """Problems with ``result`` of ``name`` on ``clients`` (equal weights); empty when right."""
    spec = registry.get(name)
    p = ref.normalised(None, len(clients))
    problems: list[str] = []
    for layer, (A, B) in result.items():
        A_s, B_s = ref.stack64(clients, layer, p)
        A_bar, _ = ref.weighted_mean64(clients, layer, p)
        ideal = ref.fro_norm(B_s, A_s)
        if spec.exact:
            e = ref.diff_norm(B.double(), A.double(), B_s, A_s) / ideal
            if e > tol:
                problems.append(f"{layer}: ‖BA − ΔW‖/‖ΔW‖ = {e:.2e} > {tol:g} (must be exact)")
        if name == "fedsa_lora":
            e = float((A.double() - A_bar).norm() / A_bar.norm())
            if e > tol:
                problems.append(f"{layer}: shared A differs from Σ p_k A_k by {e:.2e}")
            if not torch.equal(B, clients[0][layer].B):
                problems.append(f"{layer}: client 0's B was not kept")
        if name == "fedsvd":
            gram = A.double() @ A.double().T
            e = float((gram - torch.eye(gram.shape[0], dtype=torch.float64)).norm())
            if e > tol * math.sqrt(gram.shape[0]):
                problems.append(f"{layer}: A' A'ᵀ differs from I by {e:.2e}")
        if name == "hetlora":
            norms = [ref.fro_norm(c[layer].B.double(), c[layer].A.double()) for c in clients]
            q = [
                w * n / math.fsum(w * m for w, m in zip(p, norms, strict=True))
                for w, n in zip(p, norms, strict=True)
            ]
            A_ref = sum(w * c[layer].A.double() for w, c in zip(q, clients, strict=True))
            assert isinstance(A_ref, torch.Tensor)
            e = float((A.double() - A_ref).norm() / A_ref.norm())
            if e > tol:
                problems.append(f"{layer}: A differs from Σ q_k A_k (q ∝ p_k ‖B_k A_k‖) by {e:.2e}")
        if name == "flexlora_energy":
            r = int(A.shape[0])
            sv = ref.singular_values(B_s, A_s)
            kept = float((sv[:r] ** 2).sum() / (sv**2).sum())
            tail = math.sqrt(float((sv[r:] ** 2).sum()))
            err = ref.diff_norm(B.double(), A.double(), B_s, A_s)
            if abs(err - tail) > tol * ideal:
                problems.append(f"{layer}: ‖ΔW − BA‖ = {err:.6e}, Eckart–Young {tail:.6e}")
            if kept < 0.99 * (1 - tol):
                problems.append(f"{layer}: keeps {kept:.6f} of ‖ΔW‖², under the 0.99 asked")
            if r > 1 and float((sv[: r - 1] ** 2).sum() / (sv**2).sum()) >= 0.99:
                problems.append(f"{layer}: rank {r} is not the smallest reaching 0.99")
    return problems

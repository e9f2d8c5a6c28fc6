"""Float64 references for :func:`lorafair.testing.check_aggregator` and the registry, plainly.

Nothing here calls an aggregator or lorafair's numerics: a check must not trust the code it
checks. The helpers that form the dense ``d_out × d_in`` matrices (:func:`delta_w`,
:func:`product`, :func:`fair_objective`) are for test-sized layers. The method definitions
(:class:`Definition`: :func:`fedit_factors`, :func:`hetlora_factors`, ...) and the stated forms
(:func:`orthonormal_rows`), which :class:`lorafair.registry.AggregatorSpec` links to each method
as its ``reference`` and ``form``, work on the factors alone (``O(K r (d_in + d_out))`` each), so
the benchmarks check every layer of a real model with them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from lorafair.types import LoRAFactors

_F64 = torch.float64

_Client = Mapping[str, "LoRAFactors | tuple[Tensor, Tensor]"]


class Objective(NamedTuple):
    """The LoRA-FAIR objective a ``never_worse_than_fedit`` claim is checked on (Eq. 8).

    For a result ``(A', B')`` of a layer, with FedIT's ``Ā = Σ p_k A_k``, ``B̄ = Σ p_k B_k``
    (clients zero-padded to the largest rank) and ``ΔW = Σ p_k B_k A_k``::

        f(A', B') = 1 − S(ΔW, B'A') + λ·(reg(B' − B̄) + reg(A' − Ā))

    ``reg`` is ``‖·‖_F`` (``norm="fro"``, the paper) or ``‖·‖_F²`` (``"fro_squared"``); ``S``
    the flattened cosine (``similarity="flat"``) or the mean of the d_in per-column cosines
    (``"columns"``); a cosine with a zero side counts 0. The paper corrects ``B`` only
    (``A' = Ā``), so one of the two ``reg`` terms is zero; the claim is
    ``f(result) ≤ f(Ā, B̄)``, and FedIT's ``f`` is ``1 − S(ΔW, B̄Ā)``.
    """

    lam: float = 0.01
    norm: Literal["fro", "fro_squared"] = "fro"
    similarity: Literal["flat", "columns"] = "flat"


def normalised(weights: Sequence[float] | None, k: int) -> list[float]:
    """``p_k = w_k / Σ w_j``; ``None`` gives ``1/K`` each."""
    if weights is None:
        return [1.0 / k] * k
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def pairs(clients: Sequence[_Client], name: str) -> list[tuple[Tensor, Tensor]]:
    """Every client's ``(A_k, B_k)`` of layer ``name``, in float64 on the CPU."""
    return [(c[name][0].to("cpu", _F64), c[name][1].to("cpu", _F64)) for c in clients]


def delta_w(clients: Sequence[_Client], weights: Sequence[float] | None, name: str) -> Tensor:
    """The ideal update ``ΔW = Σ p_k B_k A_k`` of one layer, dense float64."""
    p = normalised(weights, len(clients))
    ps = pairs(clients, name)
    total = torch.zeros(ps[0][1].shape[0], ps[0][0].shape[1], dtype=_F64)
    for w, (A, B) in zip(p, ps, strict=True):
        total = total + w * (B @ A)
    return total


def input_scale(clients: Sequence[_Client], weights: Sequence[float] | None, name: str) -> float:
    """``Σ p_k ‖B_k‖_F ‖A_k‖_F``: the size of the terms ΔW sums, which bounds its rounding."""
    p = normalised(weights, len(clients))
    return sum(
        w * float(B.norm()) * float(A.norm())
        for w, (A, B) in zip(p, pairs(clients, name), strict=True)
    )


def fedit(
    clients: Sequence[_Client], weights: Sequence[float] | None, name: str
) -> tuple[Tensor, Tensor]:
    """FedIT's ``(Ā, B̄)``, every client zero-padded to the largest rank, float64."""
    p = normalised(weights, len(clients))
    ps = pairs(clients, name)
    r = max(A.shape[0] for A, _ in ps)
    A_bar = torch.zeros(r, ps[0][0].shape[1], dtype=_F64)
    B_bar = torch.zeros(ps[0][1].shape[0], r, dtype=_F64)
    for w, (A, B) in zip(p, ps, strict=True):
        A_bar[: A.shape[0]] += w * A
        B_bar[:, : B.shape[1]] += w * B
    return A_bar, B_bar


def product(A: Tensor, B: Tensor) -> Tensor:
    """``B @ A`` in float64 on the CPU."""
    return B.to("cpu", _F64) @ A.to("cpu", _F64)


def singular_tail(M: Tensor, rank: int) -> float:
    """``sqrt(Σ_{i > rank} σ_i²)`` of the dense ``M``: the least ``‖M − X‖_F`` over rank ≤ rank
    (Eckart–Young), from a full SVD."""
    S = torch.linalg.svdvals(M.to(_F64))
    return float(S[rank:].pow(2).sum().sqrt())


def _similarity(dW: Tensor, Y: Tensor, similarity: str) -> float:
    if similarity == "columns":
        den = Y.norm(dim=0) * dW.norm(dim=0)
        cos = torch.where(den > 0, (Y * dW).sum(dim=0) / torch.where(den > 0, den, 1.0), 0.0)
        return float(cos.mean())
    den = float(Y.norm() * dW.norm())
    return float((Y * dW).sum()) / den if den > 0 else 0.0


def _reg(D: Tensor, norm: str) -> float:
    return float((D * D).sum()) if norm == "fro_squared" else float(D.norm())


def fair_objective(
    clients: Sequence[_Client],
    weights: Sequence[float] | None,
    name: str,
    result: tuple[Tensor, Tensor] | None,
    objective: Objective,
) -> float:
    """``f(A', B')`` of :class:`Objective` for ``result`` (``None``: FedIT's ``(Ā, B̄)``)."""
    A_bar, B_bar = fedit(clients, weights, name)
    A, B = (A_bar, B_bar) if result is None else (t.to("cpu", _F64) for t in result)
    if A.shape != A_bar.shape or B.shape != B_bar.shape:
        raise AssertionError(
            f"layer {name!r}: result A {tuple(A.shape)}, B {tuple(B.shape)} do not have FedIT's "
            f"shapes {tuple(A_bar.shape)}, {tuple(B_bar.shape)}, so the LoRA-FAIR objective "
            "(a correction of FedIT's factors) is not defined for it"
        )
    dW = delta_w(clients, weights, name)
    reg = _reg(B - B_bar, objective.norm) + _reg(A - A_bar, objective.norm)
    return 1.0 - _similarity(dW, B @ A, objective.similarity) + objective.lam * reg


class Definition(NamedTuple):
    """A method's reported factors of one layer by their definition, float64 on the CPU.

    ``None`` where a factor has no element-wise definition (it is checked by the method's claims
    instead: exactness, optimality, the LoRA-FAIR objective)."""

    A: Tensor | None
    B: Tensor | None


def fedit_factors(
    clients: Sequence[_Client], weights: Sequence[float] | None, name: str
) -> Definition:
    """FedIT: ``(Ā, B̄) = (Σ p_k A_k, Σ p_k B_k)`` (zero-padded to the largest rank)."""
    return Definition(*fedit(clients, weights, name))


def ffa_lora_factors(
    clients: Sequence[_Client], weights: Sequence[float] | None, name: str
) -> Definition:
    """FFA-LoRA: the shared frozen ``A`` (client 0's) and ``B̄ = Σ p_k B_k``."""
    return Definition(pairs(clients, name)[0][0], fedit(clients, weights, name)[1])


def flora_factors(
    clients: Sequence[_Client], weights: Sequence[float] | None, name: str
) -> Definition:
    """FLoRA: the clients stacked along the rank axis, the weights on ``A``:
    ``A = [p_1 A_1; …; p_K A_K]``, ``B = [B_1, …, B_K]`` (so ``B A = ΔW``)."""
    p = normalised(weights, len(clients))
    ps = pairs(clients, name)
    A = torch.cat([w * A_k for w, (A_k, _) in zip(p, ps, strict=True)], dim=0)
    return Definition(A, torch.cat([B_k for _, B_k in ps], dim=1))


def lora_fair_factors(
    clients: Sequence[_Client], weights: Sequence[float] | None, name: str
) -> Definition:
    """LoRA-FAIR keeps FedIT's ``Ā``; its ``B`` is checked on the objective (``B = None``)."""
    return Definition(fedit(clients, weights, name)[0], None)


def fedsa_lora_factors(
    clients: Sequence[_Client], weights: Sequence[float] | None, name: str
) -> Definition:
    """FedSA-LoRA has no global update: client 0's adapter, the shared ``Ā`` with its own
    ``B_0`` (what a benchmark row reports for a personalised method)."""
    return Definition(fedit(clients, weights, name)[0], pairs(clients, name)[0][1])


def hetlora_factors(
    clients: Sequence[_Client], weights: Sequence[float] | None, name: str
) -> Definition:
    """HetLoRA: FedIT's zero-padded average with weights ``q_k ∝ p_k ‖B_k A_k‖_F`` (``p_k``
    where every norm is zero). ``‖B_k A_k‖_F² = Σ (B_kᵀB_k) ∘ (A_k A_kᵀ)``, float64, so that
    no ``d_out × d_in`` matrix is formed."""
    p = normalised(weights, len(clients))
    norms = [
        float(((B.mT @ B) * (A @ A.mT)).sum().clamp_min(0).sqrt()) for A, B in pairs(clients, name)
    ]
    raw = [w * n for w, n in zip(p, norms, strict=True)]
    return Definition(*fedit(clients, p if sum(raw) == 0 else raw, name))


def orthonormal_rows(A: Tensor, B: Tensor, tol: float) -> str | None:
    """FedSVD's stated form: ``A`` has orthonormal rows, ``‖A Aᵀ − I‖_F ≤ tol·√r``; what is
    wrong, or ``None``."""
    A64 = A.to("cpu", _F64)
    gram = A64 @ A64.mT
    e = float((gram - torch.eye(gram.shape[0], dtype=_F64)).norm())
    return f"A Aᵀ differs from I by {e:.2e}" if e > tol * gram.shape[0] ** 0.5 else None

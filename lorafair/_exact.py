"""Exact aggregation by re-factoring: FedEx-LoRA's factored residual and FedSVD's orthonormal A.

Both send the exact ``ΔW`` (FedEx-LoRA as FedIT's adapters plus a residual; FedSVD as a new
factorisation of ``B̄ A``), and neither forms a ``d_out × d_in`` matrix: every decomposition runs
on thin QR factors and an (at most) ``R × R`` core.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lorafair import _linalg
from lorafair._fit import fits_dtype
from lorafair._frozen import check_tolerances, shared_factor
from lorafair._threads import torch_single_threaded
from lorafair._validate import accumulation_dtype, prepare, stacked, weighted_sum
from lorafair.errors import LoRAFairError
from lorafair.types import FedExResult, LoRAFactors, ResidualReport

__all__ = ["fedex_lora", "fedsvd"]

_Clients = Sequence[Mapping[str, "LoRAFactors | tuple[Tensor, Tensor]"]]


@torch_single_threaded
@fits_dtype(bounded=lambda kwargs: kwargs.get("residual_rank") is None)
def fedex_lora(
    clients: _Clients,
    weights: Sequence[float] | None = None,
    *,
    residual_rank: int | None = None,
    allow_excess_rank: bool = False,
) -> FedExResult:
    """FedEx-LoRA: FedIT's ``(Ā, B̄)`` plus the residual ``ΔW − B̄ Ā``, factored.

    With ``Ā = Σ p_k A_k``, ``B̄ = Σ p_k B_k`` (as sent, in the output dtype) and the stacked
    factors ``A_s = cat_k(p_k A_k)``, ``B_s = cat_k(B_k)`` (so ``B_s A_s = ΔW``), the residual is

        ``ΔW − B̄ Ā = [B_s, B̄] · [A_s; −Ā]``,

    returned as ``LoRAFactors(A_res, B_res)`` of rank ``Σ r_k + r`` (never ``d_out × d_in``), so
    ``B̄ Ā + B_res A_res = ΔW`` exactly (up to the rounding of ``p_k A_k`` in the output dtype).
    ``residual_rank=q`` sends instead the best rank-q approximation of the residual
    (Eckart–Young, from its factored SVD, split ``B = U_q S_q^{1/2}``, ``A = S_q^{1/2} V_qᵀ``);
    ``report[name].lost`` is what that drops, ``‖residual − sent‖_F = sqrt(Σ_{i>q} σ_i²)``.
    All clients must share the rank r.

    Cost: O(K r (d_in + d_out)) flops for the exact residual (two weighted sums and copies)
    plus one thin QR for its norm, O(d_out (R + r)² + (R + r)² d_in) with R = Σ r_k; truncation
    adds a factored SVD, O((d_out + d_in)(R + r)² + (R + r)³). Memory O((d_out + d_in)(R + r)).
    Download per layer: ``r (d_in + d_out)`` for the adapters plus ``(R + r)(d_in + d_out)`` for
    the exact residual, or ``q (d_in + d_out)`` truncated (the paper sends the dense
    ``d_out × d_in`` residual).

    Clients add ``s · B_res @ A_res`` to their frozen weight (``s`` = peft's ``alpha / r``, the
    same scale as the adapter), load ``(Ā, B̄)`` as their adapter, and train on.
    """
    if residual_rank is not None and (
        isinstance(residual_rank, bool) or not isinstance(residual_rank, int) or residual_rank < 1
    ):
        raise LoRAFairError(f"residual_rank must be a positive int or None, got {residual_rank!r}")
    prep = prepare(clients, weights, equal_ranks=True, allow_excess_rank=allow_excess_rank)
    p = prep.weights
    adapters: dict[str, LoRAFactors] = {}
    residual: dict[str, LoRAFactors] = {}
    report: dict[str, ResidualReport] = {}
    for name, layer in prep.layers.items():
        acc = accumulation_dtype(layer.dtype)
        A_bar = weighted_sum(layer.As, p, acc).to(layer.dtype)
        B_bar = weighted_sum(layer.Bs, p, acc).to(layer.dtype)
        adapters[name] = LoRAFactors(A_bar, B_bar)
        A_s, B_s = stacked(layer, p, torch.float64)
        # The residual cancels the adapters *as sent* (rounded), so the sum is exact.
        A_res = torch.cat([A_s, -A_bar.double()], dim=0)
        B_res = torch.cat([B_s, B_bar.double()], dim=1)
        if residual_rank is None:
            norm = float(_linalg.fro_norm(B_res, A_res))
            residual[name] = LoRAFactors(A_res.to(layer.dtype), B_res.to(layer.dtype))
            report[name] = ResidualReport(rank=A_res.shape[0], norm=norm, lost=0.0)
            continue
        U, S, Vh = _linalg.truncated_svd(B_res, A_res, A_res.shape[0])
        energy = S.pow(2)
        total = math.sqrt(float(energy.sum()))
        lost = math.sqrt(float(energy[residual_rank:].sum()))
        q = min(residual_rank, S.shape[0])
        root = S[:q].sqrt()
        A_q = root.unsqueeze(-1) * Vh[:q]
        B_q = U[:, :q] * root
        if q < residual_rank:  # more rank asked than the residual has: zero components
            A_q = torch.cat([A_q, A_q.new_zeros(residual_rank - q, A_q.shape[1])], dim=0)
            B_q = torch.cat([B_q, B_q.new_zeros(B_q.shape[0], residual_rank - q)], dim=1)
        residual[name] = LoRAFactors(A_q.to(layer.dtype), B_q.to(layer.dtype))
        report[name] = ResidualReport(rank=residual_rank, norm=total, lost=lost)
    return FedExResult(adapters, residual, report)


def _orthonormal_refactor(B: Tensor, A: Tensor) -> LoRAFactors:
    """``B A = B' A'`` with ``A'`` of orthonormal rows (``A' A'ᵀ = I``), from thin QRs.

    ``Aᵀ = Q_a R_a`` (d_in × s, s = min(d_in, r)) and ``B = Q_b R_b`` give ``B A = Q_b C Q_aᵀ``
    with the small core ``C = R_b R_aᵀ``. Its *full* SVD ``C = U_c Σ V_cᵀ`` (``V_c`` s × s, so
    the basis is complete even where ``B`` is rank-deficient, e.g. ``B = 0``) yields
    ``A' = V_cᵀ Q_aᵀ`` and ``B' = Q_b U_c Σ``. ``A'`` spans the row space of ``A``; when
    ``r > d_in`` only ``d_in`` orthonormal rows exist and the rest are zero. float64 in and out.
    """
    r = A.shape[0]
    Q_a, R_a = torch.linalg.qr(A.mT)
    Q_b, R_b = torch.linalg.qr(B)
    U_c, S, Vh_c = torch.linalg.svd(R_b @ R_a.mT, full_matrices=True)
    m = S.shape[0]
    A_new = Vh_c @ Q_a.mT  # (s, d_in), orthonormal rows
    B_new = (Q_b @ U_c[:, :m]) * S  # (d_out, m)
    s = A_new.shape[0]
    if m < s:
        B_new = torch.cat([B_new, B_new.new_zeros(B_new.shape[0], s - m)], dim=1)
    if s < r:
        A_new = torch.cat([A_new, A_new.new_zeros(r - s, A_new.shape[1])], dim=0)
        B_new = torch.cat([B_new, B_new.new_zeros(B_new.shape[0], r - s)], dim=1)
    return LoRAFactors(A_new, B_new)


@torch_single_threaded
@fits_dtype()
def fedsvd(
    clients: _Clients,
    weights: Sequence[float] | None = None,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-8,
    allow_excess_rank: bool = False,
) -> dict[str, LoRAFactors]:
    """FedSVD: clients train B on a shared A; the server re-factors ``B̄ A`` with orthonormal A.

    With the shared ``A`` (checked as in :func:`~lorafair.aggregate.ffa_lora`; raises
    :class:`~lorafair.errors.FrozenAMismatchError` naming the layer and client) and
    ``B̄ = Σ p_k B_k``, ``B̄ A = Σ p_k B_k A = ΔW`` exactly. With the SVD ``B̄ A = U Σ Vᵀ``
    returns ``A' = Vᵀ`` (r × d_in, orthonormal rows: ``A' A'ᵀ = I``) and ``B' = U Σ``
    (d_out × r), so ``B' A' = ΔW`` exactly. The SVD is factored: thin QRs of ``B̄`` and ``Aᵀ``
    and the full SVD of their r × r core, which completes ``A'`` to r orthonormal rows inside
    the row space of ``A`` even when ``B̄`` is rank-deficient (``B̄ = 0`` returns an orthonormal
    basis of A's rows and ``B' = 0``). If ``r > d_in`` the rows beyond ``d_in`` are zero.

    Cost: O(K r d_out) for the average, O((d_out + d_in) r² + r³) for the QRs and the core SVD;
    memory O((d_out + d_in) r); computed in float64, returned in the input dtype.
    Download: ``r (d_in + d_out)`` per layer (A changes every round).

    Clients load ``(A', B')`` as their adapter, freeze ``A'`` and train only ``B`` next round.
    """
    prep = prepare(clients, weights, equal_ranks=True, allow_excess_rank=allow_excess_rank)
    p = prep.weights
    check_tolerances(rtol, atol)
    out: dict[str, LoRAFactors] = {}
    for name, layer in prep.layers.items():
        A = shared_factor(layer, "A", rtol=rtol, atol=atol, method="FedSVD")
        B_bar = weighted_sum(layer.Bs, p, torch.float64)
        # Powers of two scale both factors to a largest entry in [0.5, 1) (exact), so that the
        # QRs and the core neither overflow nor underflow for float64 input near its limits;
        # the scale goes back on B' = UΣ alone (A' is orthonormal whatever the scale).
        A64 = A.double()
        ea, eb = torch.frexp(A64.abs().amax())[1], torch.frexp(B_bar.abs().amax())[1]
        A_new, B_new = _orthonormal_refactor(torch.ldexp(B_bar, -eb), torch.ldexp(A64, -ea))
        B_new = torch.ldexp(B_new, ea + eb)
        out[name] = LoRAFactors(A_new.to(layer.dtype), B_new.to(layer.dtype))
    return out

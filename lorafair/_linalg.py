"""Private factored linear algebra: Frobenius quantities of products ``B @ A`` without forming them.

All functions take float64 tensors (callers cast) and accept leading batch dimensions.
"""

from __future__ import annotations

import torch
from torch import Tensor


def fro_inner(B1: Tensor, A1: Tensor, B2: Tensor, A2: Tensor) -> Tensor:
    """``<B1 A1, B2 A2>_F = tr((B1ᵀ B2)(A2 A1ᵀ))``: O((d_out + d_in) r1 r2), no d_out × d_in."""
    left = B1.mT @ B2  # (r1, r2)
    right = A2 @ A1.mT  # (r2, r1)
    return (left * right.mT).sum(dim=(-2, -1))


def fro_norm(B: Tensor, A: Tensor) -> Tensor:
    """``‖B A‖_F`` via a thin QR ``B = Q R`` (orthonormal Q): ``‖B A‖_F = ‖R A‖_F``.

    Unlike the Gram trace ``tr((BᵀB)(AAᵀ))`` this has no cancellation, so it is accurate even when
    ``B A`` is a difference of nearly equal products. Cost O(d_out r² + r² d_in).
    """
    _, R = torch.linalg.qr(B, mode="r")
    norm: Tensor = torch.linalg.matrix_norm(R @ A)
    return norm


def truncated_svd(B: Tensor, A: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``rank`` SVD ``U S Vᵀ`` of ``B @ A`` without forming it.

    Thin QRs ``B = Q_b R_b`` and ``Aᵀ = Q_a R_a`` give ``B A = Q_b (R_b R_aᵀ) Q_aᵀ``; the SVD of the
    small core ``R_b R_aᵀ`` (at most R × R, R = B.shape[-1]) yields the singular triplets.
    Returns ``U`` (…, d_out, rank), ``S`` (…, rank), ``Vh`` (…, rank, d_in); components beyond the
    numerical rank bound ``min(d_out, d_in, R)`` are zero. Cost O((d_out + d_in) R² + R³).
    """
    Q_b, R_b = torch.linalg.qr(B)
    Q_a, R_a = torch.linalg.qr(A.mT)
    U_c, S, Vh_c = torch.linalg.svd(R_b @ R_a.mT, full_matrices=False)
    k = min(rank, S.shape[-1])
    U = Q_b @ U_c[..., :k]
    Vh = Vh_c[..., :k, :] @ Q_a.mT
    S = S[..., :k]
    if k < rank:
        pad = rank - k
        U = torch.cat([U, U.new_zeros(*U.shape[:-1], pad)], dim=-1)
        Vh = torch.cat([Vh, Vh.new_zeros(*Vh.shape[:-2], pad, Vh.shape[-1])], dim=-2)
        S = torch.cat([S, S.new_zeros(*S.shape[:-1], pad)], dim=-1)
    return U, S, Vh

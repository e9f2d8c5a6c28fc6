"""Private factored linear algebra: quantities of products ``B @ A`` without forming them.

All functions take float64 tensors (callers cast) and accept leading batch dimensions.
``ΔW = B A`` has three ways to its singular triplets (:class:`FactoredSVD`): from the two R × R
Grams (:func:`gram_svd`, the cheapest), from thin QRs (:func:`qr_svd`, accurate however much the
clients cancel) and densely (:func:`dense_svd`, one d_out × d_in layer, cheapest when R is large);
callers choose by the rules stated where they call them.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

_EPS64 = torch.finfo(torch.float64).eps


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


class FactoredSVD(NamedTuple):
    """Every singular triplet of ``ΔW = B A``, in descending order, kept in factored form.

    ``ΔW = U diag(S) Vh`` with ``U = left @ U_core`` and ``Vh = Vh_core @ right``. ``S`` (…, m)
    holds all m values, zeros included, so that a rank policy can cut it first and then form only
    the columns it keeps (:func:`top`, :func:`split`). ``U_core`` is (…, R_left, m) and ``Vh_core``
    (…, m, R_right). The Gram route gives ``left = B`` and ``right = A``; the QR route the two
    orthonormal bases; the dense route ``U`` and ``Vh`` themselves with identity cores.
    """

    S: Tensor
    left: Tensor
    U_core: Tensor
    Vh_core: Tensor
    right: Tensor


def _clip(values: Tensor, rel: float) -> Tensor:
    """``values`` with every entry ≤ ``rel · max`` (negative rounding included) set to zero."""
    floor = values.amax(dim=-1, keepdim=True).clamp_min(0) * rel
    return torch.where(values > floor, values, torch.zeros_like(values))


def _pinv_diag(values: Tensor) -> Tensor:
    """``1 / values`` where positive, 0 elsewhere: the pseudo-inverse of a diagonal."""
    return torch.where(values > 0, 1.0 / values.clamp_min(torch.finfo(values.dtype).tiny), 0.0)


def _gram_host(X: Tensor, left: bool) -> Tensor:
    """``X Xᵀ`` (``left``) or ``Xᵀ X`` of a CPU float64 tensor through NumPy, matrix by matrix:
    NumPy's matmul hands a product of a matrix with its own transpose to BLAS ``syrk``, which
    computes one triangle (half the flops of torch's general product) and mirrors it."""
    x = X.detach().numpy()
    n = x.shape[-2] if left else x.shape[-1]
    out = np.empty((*x.shape[:-2], n, n))
    for idx in np.ndindex(*x.shape[:-2]):
        m = x[idx]
        if left:
            np.matmul(m, m.T, out=out[idx])
        else:
            np.matmul(m.T, m, out=out[idx])
    return torch.from_numpy(out)


def grams(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
    """The two R × R Grams ``G_a = A Aᵀ`` and ``G_b = Bᵀ B``: O((d_in + d_out) R²).

    CPU float64 Grams go through BLAS ``syrk`` (:func:`_gram_host`; callers pin NumPy's BLAS
    pool with torch's, see :mod:`lorafair._threads`); elsewhere torch's product.
    """
    if A.device.type == "cpu" and A.dtype == B.dtype == torch.float64:
        return _gram_host(A, left=True), _gram_host(B, left=False)
    return A @ A.mT, B.mT @ B


def _gram_root(G: Tensor, rel: float) -> Tensor:
    """Some ``P`` with ``P Pᵀ = G`` (G symmetric positive semi-definite, batched).

    On the CPU, Cholesky (R³/3 flops, a tenth of ``eigh``'s time) when every matrix of the batch
    is numerically positive definite (its ``info`` is read on the host at no cost); otherwise,
    and always on accelerators (no host round trip), ``P = V Λ^{1/2}`` from ``eigh`` with
    eigenvalues at most ``rel`` times the largest taken as zero.
    """
    if G.device.type == "cpu":
        L: Tensor
        L, info = torch.linalg.cholesky_ex(G)
        if not bool(info.any()):
            return L
    lam, V = torch.linalg.eigh(G)
    root: Tensor = V * _clip(lam, rel).sqrt().unsqueeze(-2)
    return root


def gram_svd(B: Tensor, A: Tensor, G_a: Tensor, G_b: Tensor) -> FactoredSVD:
    """Every singular triplet of ``B A`` from the Grams ``G_a = A Aᵀ`` and ``G_b = Bᵀ B``.

    With any ``P`` such that ``P Pᵀ = G_a`` (Cholesky, or ``V Λ^{1/2}`` from ``eigh``; then
    ``A = P Qᵀ`` with Q orthonormal on A's row space),
    ``B A = (B P) Qᵀ`` and ``(B P)ᵀ (B P) = Pᵀ G_b P = W Σ² Wᵀ``. Hence ``U = B (P W Σ⁻¹)`` and,
    from ``Vh = Σ⁻¹ Uᵀ B A``, ``Vh = (Σ⁻² Wᵀ Pᵀ G_b) A``: two R × R eigendecompositions, no
    d × R factorisation and no inverse of P. Eigenvalues at most ``R·ε₆₄`` times the largest are
    taken as zero, and so are the triplets they carry.

    Accuracy: the Grams and the core carry a float64 rounding of about ``(d + R)·ε₆₄·κ²`` relative
    to ``‖BA‖_F``, with ``κ = ‖B‖_F ‖A‖_F / ‖BA‖_F`` and d the longer side (the argument of
    ``docs/lora_fair.md`` for LoRA-FAIR's Grams), against ``(d + R)·ε₆₄·κ`` for :func:`qr_svd`.
    Cost O(R³) on top of the Grams.
    """
    R = G_a.shape[-1]
    rel = R * _EPS64
    P = _gram_root(G_a, rel)
    PtGb = P.mT @ G_b
    C = PtGb @ P
    sig2, W = torch.linalg.eigh((C + C.mT) * 0.5)
    sig2, W = sig2.flip(-1), W.flip(-1)
    S = _clip(sig2, rel).sqrt()
    inv = _pinv_diag(S)
    U_core = (P @ W) * inv.unsqueeze(-2)
    Vh_core = (inv * inv).unsqueeze(-1) * (W.mT @ PtGb)
    return FactoredSVD(S, B, U_core, Vh_core, A)


def qr_svd(B: Tensor, A: Tensor) -> FactoredSVD:
    """Every singular triplet of ``B A`` via thin QRs ``B = Q_b R_b``, ``Aᵀ = Q_a R_a``.

    ``B A = Q_b (R_b R_aᵀ) Q_aᵀ``; the SVD of the R × R core gives the triplets. No squared
    condition number, so accurate for float64 inputs and for clients whose updates nearly cancel.
    Cost O((d_out + d_in) R² + R³).
    """
    Q_b, R_b = torch.linalg.qr(B)
    Q_a, R_a = torch.linalg.qr(A.mT)
    U_c, S, Vh_c = torch.linalg.svd(R_b @ R_a.mT, full_matrices=False)
    return FactoredSVD(S, Q_b, U_c, Vh_c, Q_a.mT)


def dense_svd(B: Tensor, A: Tensor) -> FactoredSVD:
    """Every singular triplet of ``B A``, formed densely: one d_out × d_in matrix per layer.

    Cost O(d_out d_in R) to form plus O(d_out d_in min(d_out, d_in)) for the SVD; cheaper than the
    factored routes once R approaches ``d_out d_in / (d_out + d_in)``.
    """
    U, S, Vh = torch.linalg.svd(B @ A, full_matrices=False)
    eye = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device).expand(*S.shape, S.shape[-1])
    return FactoredSVD(S, U, eye, eye, Vh)


def _pad(x: Tensor, dim: int, size: int) -> Tensor:
    missing = size - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def split(svd: FactoredSVD, rank: int, left_power: float) -> tuple[Tensor, Tensor]:
    """``(B, A) = (U_k S_k^p, S_k^{1−p} Vh_k)`` for the top ``k = min(rank, m)`` triplets.

    Zero-padded to ``rank`` columns / rows; ``B @ A`` is the best rank-``rank`` approximation.
    Only the kept columns are formed: one (d × R)(R × k) product per factor.
    """
    k = min(rank, svd.S.shape[-1])
    S = svd.S[..., :k]
    # B as (Mᵀ leftᵀ)ᵀ: BLAS runs the tall-skinny product faster with the long dimension last
    # (the result is a transposed view; callers make their output contiguous)
    B = ((svd.U_core[..., :k] * S.pow(left_power).unsqueeze(-2)).mT @ svd.left.mT).mT
    A = (S.pow(1.0 - left_power).unsqueeze(-1) * svd.Vh_core[..., :k, :]) @ svd.right
    return _pad(B, -1, rank), _pad(A, -2, rank)


def top(svd: FactoredSVD, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """``U`` (…, d_out, rank), ``S`` (…, rank), ``Vh`` (…, rank, d_in): the top triplets, padded."""
    k = min(rank, svd.S.shape[-1])
    U = svd.left @ svd.U_core[..., :k]
    Vh = svd.Vh_core[..., :k, :] @ svd.right
    return _pad(U, -1, rank), _pad(svd.S[..., :k], -1, rank), _pad(Vh, -2, rank)


def truncated_svd(B: Tensor, A: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``rank`` SVD ``U S Vᵀ`` of ``B @ A`` without forming it (the QR route)."""
    return top(qr_svd(B, A), rank)

"""Independent dense float64 references, written plainly (no lorafair code is used here)."""

from __future__ import annotations

import torch
from torch import Tensor


def normalised(weights: list[float] | None, k: int) -> list[float]:
    if weights is None:
        return [1.0 / k] * k
    total = sum(weights)
    return [w / total for w in weights]


def pairs(
    clients: list[dict[str, tuple[Tensor, Tensor]]], name: str
) -> list[tuple[Tensor, Tensor]]:
    return [(c[name][0].double(), c[name][1].double()) for c in clients]


def delta_w(clients, name, weights=None) -> Tensor:
    """ΔW = Σ p_k B_k A_k, dense float64."""
    p = normalised(weights, len(clients))
    total = None
    for w, (A, B) in zip(p, pairs(clients, name), strict=True):
        term = w * (B @ A)
        total = term if total is None else total + term
    return total


def fedit(clients, name, weights=None) -> tuple[Tensor, Tensor]:
    p = normalised(weights, len(clients))
    ps = pairs(clients, name)
    A = sum(w * A for w, (A, _) in zip(p, ps, strict=True))
    B = sum(w * B for w, (_, B) in zip(p, ps, strict=True))
    return A, B


def best_rank_approx(M: Tensor, rank: int) -> Tensor:
    """Dense truncated SVD U_r S_r V_rᵀ of M (float64)."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    r = min(rank, S.numel())
    return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]


def singular_tail(M: Tensor, rank: int) -> float:
    """sqrt(Σ_{i > rank} σ_i²): the Eckart–Young error of the best rank-`rank` approximation."""
    S = torch.linalg.svdvals(M)
    return float(S[rank:].pow(2).sum().sqrt())


def cosine(X: Tensor, Y: Tensor) -> float:
    return float((X * Y).sum() / (X.norm() * Y.norm()))

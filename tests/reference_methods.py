"""Dense float64 references for FedEx-LoRA, FedSA-LoRA, RoLoRA, HetLoRA, FedSVD and the rank
policies, written plainly from the papers' definitions (no lorafair code is used here)."""

from __future__ import annotations

import torch
from torch import Tensor

from tests.reference import delta_w, fedit, normalised, pairs


def fedex(clients, name, weights=None) -> tuple[Tensor, Tensor, Tensor]:
    """(Ā, B̄, dense residual ΔW − B̄Ā)."""
    A, B = fedit(clients, name, weights)
    return A, B, delta_w(clients, name, weights) - B @ A


def fedsa(clients, name, weights=None) -> tuple[Tensor, list[Tensor]]:
    A, _ = fedit(clients, name, weights)
    return A, [B for _, B in pairs(clients, name)]


def frozen_average(clients, name, weights=None, *, frozen="A") -> tuple[Tensor, Tensor]:
    """FFA-LoRA (frozen A) / RoLoRA's A-round (frozen B): client 0's frozen factor, other mean."""
    A_bar, B_bar = fedit(clients, name, weights)
    A0, B0 = pairs(clients, name)[0]
    return (A0, B_bar) if frozen == "A" else (A_bar, B0)


def hetlora(clients, name, weights=None) -> tuple[Tensor, Tensor]:
    """Zero-pad every client to the largest rank, weight by p_k ‖B_k A_k‖_F (dense norms)."""
    p = normalised(weights, len(clients))
    ps = pairs(clients, name)
    norms = [float(torch.linalg.matrix_norm(B @ A)) for A, B in ps]
    raw = [w * n for w, n in zip(p, norms, strict=True)]
    q = p if sum(raw) == 0 else [x / sum(raw) for x in raw]
    r = max(A.shape[0] for A, _ in ps)
    d_in, d_out = ps[0][0].shape[1], ps[0][1].shape[0]
    A_out = torch.zeros(r, d_in, dtype=torch.float64)
    B_out = torch.zeros(d_out, r, dtype=torch.float64)
    for w, (A, B) in zip(q, ps, strict=True):
        A_out[: A.shape[0]] += w * A
        B_out[:, : B.shape[1]] += w * B
    return A_out, B_out


def fedsvd_product(clients, name, weights=None) -> Tensor:
    """B̄ A with the shared A: the product FedSVD's re-factorisation must reproduce."""
    _, B_bar = fedit(clients, name, weights)
    return B_bar @ pairs(clients, name)[0][0]


def energy_rank(M: Tensor, threshold: float) -> int:
    """Fewest singular components of the dense M keeping `threshold` of ‖M‖_F² (at least 1)."""
    S2 = torch.linalg.svdvals(M) ** 2
    total = float(S2.sum())
    if total == 0:
        return 1
    for k in range(1, S2.numel() + 1):
        if float(S2[:k].sum()) >= threshold * total * (1 - 1e-12):
            return k
    return S2.numel()

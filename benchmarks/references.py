"""Reference implementations the library is compared against, and independent quality checks.

Nothing here imports lorafair's numerics: the references are written the way public code does
it (dense ``ΔW``), and the checks use their own float64 factored formulas.

- :func:`dense_svd_flexlora`: FlexLoRA as in FederatedScope's FlexLoRA branch: form
  ``ΔW = Σ p_k B_k A_k`` densely, full ``torch.linalg.svd``, keep the top ``rank`` triplets,
  ``B = U_r S_r``, ``A = V_rᵀ``.
- :func:`dense_sgd_lora_fair`: LoRA-FAIR's server step done the paper's way: dense ``ΔW``, a
  residual ``ΔB`` initialised at zero, SGD (lr 0.01, no momentum) on
  ``1 − cos(ΔW, (B̄ + ΔB)Ā) + λ·reg(ΔB)`` for at most ``max_steps`` steps, stopping early when the
  loss has improved by less than ``min_delta`` over the last ``patience`` steps.

Each method's element-wise definition and stated form are not here but in its registry entry
(:attr:`lorafair.registry.AggregatorSpec.reference` and ``form``), so that the benchmarks
name no method.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lorafair.types import LoRAFactors

__all__ = [
    "SGDInfo",
    "dense_sgd_lora_fair",
    "dense_svd_flexlora",
    "diff_norm",
    "fair_objective",
    "flat_cosine",
    "fro_norm",
    "normalised",
    "singular_values",
    "stack64",
    "weighted_mean64",
]

Norm = Literal["fro", "fro_squared"]
Similarity = Literal["flat", "columns"]
ClientList = Sequence[Mapping[str, LoRAFactors]]


def normalised(weights: Sequence[float] | None, n: int) -> list[float]:
    """``p_k = w_k / Σ w_j`` (equal weights when ``None``)."""
    if weights is None:
        return [1.0 / n] * n
    total = math.fsum(weights)
    return [w / total for w in weights]


def stack64(clients: ClientList, name: str, p: Sequence[float]) -> tuple[Tensor, Tensor]:
    """Stacked float64 factors ``A_s = cat(p_k A_k)``, ``B_s = cat(B_k)`` with ``B_s A_s = ΔW``."""
    A_s = torch.cat([c[name].A.double() * w for c, w in zip(clients, p, strict=True)], dim=0)
    B_s = torch.cat([c[name].B.double() for c in clients], dim=1)
    return A_s, B_s


def _wsum(tensors: Sequence[Tensor], p: Sequence[float], dt: torch.dtype) -> Tensor:
    acc = tensors[0].to(dt) * p[0]
    for t, w in zip(tensors[1:], p[1:], strict=True):
        acc = acc + t.to(dt) * w
    return acc


def weighted_mean64(clients: ClientList, name: str, p: Sequence[float]) -> tuple[Tensor, Tensor]:
    """FedIT's ``(Ā, B̄)`` in float64."""
    A = _wsum([c[name].A for c in clients], p, torch.float64)
    B = _wsum([c[name].B for c in clients], p, torch.float64)
    return A, B


def fro_norm(B: Tensor, A: Tensor) -> float:
    """``‖B A‖_F`` without forming ``B A``: thin QR ``B = Q R``, then ``‖R A‖_F``."""
    _, R = torch.linalg.qr(B.double(), mode="r")
    return float(torch.linalg.matrix_norm(R @ A.double()))


def diff_norm(B1: Tensor, A1: Tensor, B2: Tensor, A2: Tensor) -> float:
    """``‖B1 A1 − B2 A2‖_F = ‖[B1, B2] [A1; −A2]‖_F``, factored and free of cancellation."""
    B = torch.cat([B1.double(), B2.double()], dim=1)
    A = torch.cat([A1.double(), -A2.double()], dim=0)
    return fro_norm(B, A)


def flat_cosine(B1: Tensor, A1: Tensor, B2: Tensor, A2: Tensor) -> float:
    """``<B1A1, B2A2>_F / (‖B1A1‖ ‖B2A2‖)`` via ``tr((B1ᵀB2)(A2A1ᵀ))``, float64."""
    inner = float(((B1.double().mT @ B2.double()) * (A1.double() @ A2.double().mT)).sum())
    denom = fro_norm(B1, A1) * fro_norm(B2, A2)
    return inner / denom if denom > 0 else float("nan")


def singular_values(B: Tensor, A: Tensor) -> Tensor:
    """Singular values of ``B @ A`` (descending, float64) from ``R_b (A Aᵀ) R_bᵀ``'s eigenvalues."""
    _, R = torch.linalg.qr(B.double(), mode="r")
    A64 = A.double()
    M = R @ (A64 @ A64.mT) @ R.mT
    ev: Tensor = torch.linalg.eigvalsh((M + M.mT) / 2).clamp_min(0)
    return ev.flip(0).sqrt()


def _column_cosine_mean(B_s: Tensor, A_s: Tensor, Bp: Tensor, Ab: Tensor) -> float:
    """Mean over columns j of cos(ΔW[:, j], (B'Ā)[:, j]), factored in float64."""
    num = ((B_s.mT @ Bp) @ Ab * A_s).sum(0)
    nx = ((B_s.mT @ B_s) @ A_s * A_s).sum(0)
    ny = ((Bp.mT @ Bp) @ Ab * Ab).sum(0)
    return float((num / (nx * ny).sqrt()).mean())


def fair_objective(
    A_s: Tensor,
    B_s: Tensor,
    A_bar: Tensor,
    B_bar: Tensor,
    B_new: Tensor,
    *,
    lam: float,
    norm: Norm,
    similarity: Similarity = "flat",
) -> float:
    """LoRA-FAIR's objective ``1 − cos(ΔW, B'Ā) + λ·reg(B' − B̄)`` in float64, never forming ΔW.

    ``ΔW = B_s A_s``; ``reg`` is ``‖·‖_F`` (``norm="fro"``) or ``‖·‖_F²`` (``"fro_squared"``);
    ``similarity="flat"`` compares the flattened matrices, ``"columns"`` averages per-column
    cosines (``F.cosine_similarity(ΔW, B'Ā, dim=0).mean()``).
    """
    B_s, A_s, A_bar = B_s.double(), A_s.double(), A_bar.double()
    Bp = B_new.double()
    dB = Bp - B_bar.double()
    reg = float(torch.linalg.matrix_norm(dB))
    if norm == "fro_squared":
        reg = reg * reg
    if similarity == "flat":
        cos = flat_cosine(B_s, A_s, Bp, A_bar)
    else:
        cos = _column_cosine_mean(B_s, A_s, Bp, A_bar)
    return 1.0 - cos + lam * reg


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # torch.linalg.svd and a useful SGD need float32 or float64: narrower inputs are upcast.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dense_delta(clients: ClientList, name: str, p: Sequence[float], dt: torch.dtype) -> Tensor:
    dW = torch.zeros(
        clients[0][name].B.shape[0],
        clients[0][name].A.shape[1],
        dtype=dt,
        device=clients[0][name].A.device,
    )
    for c, w in zip(clients, p, strict=True):
        dW.addmm_(c[name].B.to(dt), c[name].A.to(dt), alpha=w)
    return dW


def dense_svd_flexlora(
    clients: ClientList,
    weights: Sequence[float] | None = None,
    *,
    rank: int | None = None,
    layers: Sequence[str] | None = None,
) -> dict[str, LoRAFactors]:
    """FlexLoRA the dense way: ``ΔW`` (d_out × d_in), full SVD, truncate to ``rank``.

    Returns ``B = U_r S_r``, ``A = V_rᵀ`` in the input dtype for ``layers`` (default all).
    Cost: O(d_out d_in K r) to form ΔW plus O(d_out d_in min(d_out, d_in)) for the SVD, and
    several d_out × d_in buffers.
    """
    p = normalised(weights, len(clients))
    names = list(layers) if layers is not None else list(clients[0])
    out: dict[str, LoRAFactors] = {}
    for name in names:
        dtype = clients[0][name].A.dtype
        r = rank if rank is not None else max(int(c[name].A.shape[0]) for c in clients)
        dW = _dense_delta(clients, name, p, _compute_dtype(dtype))
        U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
        out[name] = LoRAFactors(Vh[:r].to(dtype), (U[:, :r] * S[:r]).to(dtype))
    return out


@dataclass
class SGDInfo:
    """How the dense SGD reference ended on one layer."""

    steps: int
    stop: Literal["early", "max_steps", "time_budget"]
    seconds: float
    final_loss: float


def dense_sgd_lora_fair(
    clients: ClientList,
    weights: Sequence[float] | None = None,
    *,
    lam: float = 0.01,
    norm: Norm = "fro",
    similarity: Similarity = "flat",
    lr: float = 0.01,
    max_steps: int = 1000,
    patience: int = 10,
    min_delta: float = 1e-8,
    time_budget_s: float | None = None,
    layers: Sequence[str] | None = None,
    sync: bool = False,
) -> tuple[dict[str, LoRAFactors], dict[str, SGDInfo]]:
    """LoRA-FAIR's residual the paper's way: dense ΔW and SGD on ΔB, one layer at a time.

    Per layer: ``ΔW = Σ p_k B_k A_k`` dense, ``ΔB = 0``, SGD(lr) on
    ``1 − cos(ΔW, (B̄+ΔB)Ā) + λ·reg(ΔB)`` (``reg`` = ``‖ΔB‖_F`` or ``‖ΔB‖_F²``) for at most
    ``max_steps`` steps; stops early once the loss has not improved by ``min_delta`` over the
    last ``patience`` steps, or when ``time_budget_s`` seconds have been spent on the layer.
    Returns ``(Ā, B̄ + ΔB)`` in the input dtype and an :class:`SGDInfo` per layer.
    Cost per step: O(d_out d_in r) flops and several d_out × d_in buffers.
    """
    p = normalised(weights, len(clients))
    names = list(layers) if layers is not None else list(clients[0])
    out: dict[str, LoRAFactors] = {}
    info: dict[str, SGDInfo] = {}
    for name in names:
        t0 = time.perf_counter()
        dtype = clients[0][name].A.dtype
        dt = _compute_dtype(dtype)
        dW = _dense_delta(clients, name, p, dt)
        A_bar = _wsum([c[name].A for c in clients], p, dt)
        B_bar = _wsum([c[name].B for c in clients], p, dt)
        dB = torch.zeros_like(B_bar, requires_grad=True)
        opt = torch.optim.SGD([dB], lr=lr)
        history: list[float] = []
        stop: Literal["early", "max_steps", "time_budget"] = "max_steps"
        steps = 0
        for _ in range(max_steps):
            opt.zero_grad(set_to_none=True)
            Y = (B_bar + dB) @ A_bar
            if similarity == "flat":
                cos = F.cosine_similarity(dW.reshape(-1), Y.reshape(-1), dim=0)
            else:
                cos = F.cosine_similarity(dW, Y, dim=0).mean()
            reg = torch.linalg.matrix_norm(dB)
            if norm == "fro_squared":
                reg = reg * reg
            loss = 1 - cos + lam * reg
            loss.backward()
            opt.step()
            steps += 1
            history.append(float(loss.detach()))
            if len(history) > patience and history[-1 - patience] - history[-1] < min_delta:
                stop = "early"
                break
            if time_budget_s is not None and time.perf_counter() - t0 > time_budget_s:
                stop = "time_budget"
                break
        if sync and dW.is_cuda:
            torch.cuda.synchronize()
        out[name] = LoRAFactors(A_bar.to(dtype), (B_bar + dB.detach()).to(dtype))
        info[name] = SGDInfo(steps, stop, time.perf_counter() - t0, history[-1] if history else 0.0)
    return out, info

"""Server-side aggregators for federated LoRA.

Every aggregator takes the K clients' adapters ``clients[k][layer] = (A_k, B_k)`` with ``A_k`` of
shape (r_k, d_in) and ``B_k`` of shape (d_out, r_k), optional non-negative ``weights`` (normalised
to ``p_k = w_k / Σ w_j``; ``None`` means ``p_k = 1/K``), keyword-only options, and returns a new
``dict[str, LoRAFactors]`` in the first client's layer order, on the inputs' device and dtype.
Inputs are validated once (see :mod:`lorafair.errors`) and never mutated. A rank above both
``d_in`` and ``d_out`` is rejected as a likely A/B swap (A must be (r, d_in), B (d_out, r));
every aggregator takes ``allow_excess_rank=True`` to accept such a rank on purpose.

The ideal global update of a layer is ``ΔW = Σ_k p_k B_k A_k``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from lorafair import _linalg
from lorafair._fair import ResidualSolution, lora_fair, solve_residual
from lorafair._validate import (
    accumulation_dtype,
    chunked,
    group_by_shape,
    prepare,
    stacked,
    stacked_batch,
    weighted_sum,
)
from lorafair.errors import FrozenAMismatchError, LoRAFairError
from lorafair.types import LoRAFactors

__all__ = [
    "ResidualSolution",
    "fedit",
    "ffa_lora",
    "flexlora",
    "flora",
    "lora_fair",
    "solve_residual",
]

_Clients = Sequence[Mapping[str, "LoRAFactors | tuple[Tensor, Tensor]"]]

# Working-set budget of one batched solve: large enough to amortise per-call overhead over
# many layers, small enough that peak memory does not scale with the number of layers.
_BATCH_BYTES = 1 << 28


def fedit(
    clients: _Clients,
    weights: Sequence[float] | None = None,
    *,
    allow_excess_rank: bool = False,
) -> dict[str, LoRAFactors]:
    """FedIT: average A and B separately (Eq. 5 of LoRA-FAIR).

    Returns ``(Ā, B̄)`` with ``Ā = Σ p_k A_k`` and ``B̄ = Σ p_k B_k``. Biased: in general
    ``B̄ Ā ≠ ΔW = Σ p_k B_k A_k``; exact when all ``A_k`` are equal (or all ``B_k``).
    All clients must share the rank r.

    Cost: O(K r (d_in + d_out)) flops, one output-sized buffer per factor; accumulated in
    float32 (float64 for float64 input). Download: r (d_in + d_out) numbers per layer.

    >>> import torch
    >>> c0 = {"fc": (torch.ones(1, 2), torch.ones(3, 1))}
    >>> c1 = {"fc": (3 * torch.ones(1, 2), torch.zeros(3, 1))}
    >>> A, B = fedit([c0, c1])["fc"]
    >>> A.tolist(), B.flatten().tolist()
    ([[2.0, 2.0]], [0.5, 0.5, 0.5])
    """
    prep = prepare(clients, weights, equal_ranks=True, allow_excess_rank=allow_excess_rank)
    p = prep.weights
    out: dict[str, LoRAFactors] = {}
    for name, layer in prep.layers.items():
        acc = accumulation_dtype(layer.dtype)
        A = weighted_sum(layer.As, p, acc).to(layer.dtype)
        B = weighted_sum(layer.Bs, p, acc).to(layer.dtype)
        out[name] = LoRAFactors(A, B)
    return out


def ffa_lora(
    clients: _Clients,
    weights: Sequence[float] | None = None,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-8,
    allow_excess_rank: bool = False,
) -> dict[str, LoRAFactors]:
    """FFA-LoRA: A is frozen at a shared initialisation; only B is averaged.

    Returns ``(A, Σ p_k B_k)`` where ``A`` is the common ``A_k`` (client 0's, copied). Since every
    client shares A, ``B̄ A = Σ p_k B_k A = ΔW`` exactly. Raises :class:`FrozenAMismatchError`
    naming the layer and client when some ``A_k`` differs from ``A_0`` beyond
    ``|A_k − A_0| ≤ atol + rtol·|A_0|`` elementwise.

    Cost: O(K r (d_in + d_out)) flops (the check reads every A once). Download: r·d_out per layer
    (A need not be sent again).
    """
    prep = prepare(clients, weights, equal_ranks=True, allow_excess_rank=allow_excess_rank)
    p = prep.weights
    if not (rtol >= 0 and atol >= 0):
        raise LoRAFairError(f"rtol and atol must be >= 0, got rtol={rtol}, atol={atol}")
    out: dict[str, LoRAFactors] = {}
    for name, layer in prep.layers.items():
        A0 = layer.As[0]
        for k, A in enumerate(layer.As[1:], start=1):
            if not torch.allclose(A, A0, rtol=rtol, atol=atol):
                diff = (A.double() - A0.double()).abs().max().item()
                raise FrozenAMismatchError(
                    f"layer {name!r}: client {k} has A differing from client 0's by up to "
                    f"{diff:.3g} (rtol={rtol}, atol={atol}); FFA-LoRA needs A frozen and "
                    "shared by every client"
                )
        acc = accumulation_dtype(layer.dtype)
        B = weighted_sum(layer.Bs, p, acc).to(layer.dtype)
        out[name] = LoRAFactors(A0.clone(), B)
    return out


def flora(
    clients: _Clients,
    weights: Sequence[float] | None = None,
    *,
    allow_excess_rank: bool = False,
) -> dict[str, LoRAFactors]:
    """FLoRA: stack all clients' factors along the rank axis.

    Returns ``A = cat_k(p_k A_k)`` of shape (Σ r_k, d_in) and ``B = cat_k(B_k)`` of shape
    (d_out, Σ r_k), so ``B @ A = Σ p_k B_k A_k = ΔW`` exactly (up to rounding of ``p_k A_k``).
    Ranks may differ between clients. Clients merge ``B @ A`` into their frozen weights and
    re-initialise their LoRA factors.

    Cost: O(K r d_in) flops plus copies; download Σ r_k (d_in + d_out) per layer (K× FedIT's).
    """
    prep = prepare(clients, weights, equal_ranks=False, allow_excess_rank=allow_excess_rank)
    p = prep.weights
    out: dict[str, LoRAFactors] = {}
    for name, layer in prep.layers.items():
        A_s, B_s = stacked(layer, p, accumulation_dtype(layer.dtype))
        out[name] = LoRAFactors(A_s.to(layer.dtype), B_s.to(layer.dtype))
    return out


def flexlora(
    clients: _Clients,
    weights: Sequence[float] | None = None,
    *,
    rank: int | None = None,
    split: Literal["balanced", "left"] = "balanced",
    allow_excess_rank: bool = False,
) -> dict[str, LoRAFactors]:
    """FlexLoRA: the best rank-``rank`` approximation of ``ΔW``, as LoRA factors.

    With the truncated SVD ``ΔW ≈ U_r S_r V_rᵀ`` (Eckart–Young optimal in Frobenius and spectral
    norm), returns for ``split="balanced"`` ``B = U_r S_r^{1/2}``, ``A = S_r^{1/2} V_rᵀ`` (both
    factors of equal scale), and for ``split="left"`` FederatedScope's ``B = U_r S_r``,
    ``A = V_rᵀ``. ``B @ A`` is the same either way. ``rank`` defaults to the clients' largest
    rank; ranks may differ between clients. If ``rank`` exceeds ``min(d_out, d_in, Σ r_k)`` the
    extra components are zero rows/columns, so shapes are always (rank, d_in) / (d_out, rank).

    ``ΔW`` is never formed: with the stacked factors ``B_s`` (d_out, R), ``A_s`` (R, d_in),
    R = Σ r_k, thin QRs ``B_s = Q_b R_b``, ``A_sᵀ = Q_a R_a`` give ``ΔW = Q_b (R_b R_aᵀ) Q_aᵀ`` and
    only the R × R core is decomposed. Layers of equal shapes are processed in float64
    batches whose working set is capped at 256 MiB (at least one layer per batch), so peak
    memory does not grow with the number of layers. Cost: O((d_out + d_in) R² + R³) flops and
    O((d_out + d_in) R) memory per layer, against O(d_out d_in min(d_out, d_in)) flops and a
    d_out × d_in buffer for a dense SVD.
    Download: rank·(d_in + d_out) per layer.
    """
    if split not in ("balanced", "left"):
        raise LoRAFairError(f"split must be 'balanced' or 'left', got {split!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise LoRAFairError(f"rank must be a positive int or None, got {rank!r}")
    prep = prepare(clients, weights, equal_ranks=False, allow_excess_rank=allow_excess_rank)
    p = prep.weights
    out: dict[str, LoRAFactors] = {}
    for group in group_by_shape(list(prep.layers.values())):
        first = group[0]
        target = rank if rank is not None else max(first.ranks)
        # float64 stacked factors plus the two thin-QR bases: about 3 copies of the stack.
        per_layer = 3 * 8 * (first.d_out + first.d_in) * sum(first.ranks)
        for batch in chunked(group, per_layer, _BATCH_BYTES):
            A_s, B_s = stacked_batch(batch, p, torch.float64)
            U, S, Vh = _linalg.truncated_svd(B_s, A_s, target)
            del A_s, B_s
            if split == "balanced":
                root = S.sqrt()
                B = U * root.unsqueeze(-2)
                A = root.unsqueeze(-1) * Vh
            else:
                B = U * S.unsqueeze(-2)
                A = Vh
            for i, layer in enumerate(batch):
                out[layer.name] = LoRAFactors(A[i].to(layer.dtype), B[i].to(layer.dtype))
    return {name: out[name] for name in prep.layers}

"""Server-side aggregators for federated LoRA.

Every aggregator takes the K clients' adapters ``clients[k][layer] = (A_k, B_k)`` with ``A_k`` of
shape (r_k, d_in) and ``B_k`` of shape (d_out, r_k), optional non-negative ``weights`` (normalised
to ``p_k = w_k / Σ w_j``; ``None`` means ``p_k = 1/K``), keyword-only options, and returns a new
``dict[str, LoRAFactors]`` in the first client's layer order, on the inputs' device and dtype
(except :func:`fedex_lora`, which returns a :class:`FedExResult` with the residual for the
frozen weights, and the personalised :func:`fedsa_lora`, which returns a :class:`FedSAResult`
with one adapter per client). Inputs are validated once (see :mod:`lorafair.errors`) and never
mutated. A rank above both ``d_in`` and ``d_out`` is rejected as a likely A/B swap (A must be
(r, d_in), B (d_out, r)); every aggregator takes ``allow_excess_rank=True`` to accept such a
rank on purpose.

The ideal global update of a layer is ``ΔW = Σ_k p_k B_k A_k``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from lorafair import _linalg
from lorafair._exact import fedex_lora, fedsvd
from lorafair._fair import ResidualSolution, lora_fair, solve_residual
from lorafair._frozen import check_factor, check_tolerances, shared_factor
from lorafair._hetero import hetlora, hetlora_truncate
from lorafair._personal import fedsa_lora
from lorafair._rank import EnergyThreshold, check_policy, choose_rank, energy_kept
from lorafair._validate import (
    accumulation_dtype,
    chunked,
    group_by_shape,
    prepare,
    stacked,
    stacked_batch,
    weighted_sum,
)
from lorafair.errors import LoRAFairError
from lorafair.types import FedExResult, FedSAResult, FlexLoRAReport, LoRAFactors, RankChoice

__all__ = [
    "EnergyThreshold",
    "FedExResult",
    "FedSAResult",
    "FlexLoRAReport",
    "RankChoice",
    "ResidualSolution",
    "fedex_lora",
    "fedit",
    "fedsa_lora",
    "fedsvd",
    "ffa_lora",
    "flexlora",
    "flexlora_report",
    "flora",
    "hetlora",
    "hetlora_truncate",
    "lora_fair",
    "rolora",
    "rolora_trained",
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
    frozen: Literal["A", "B"] = "A",
    rtol: float = 1e-5,
    atol: float = 1e-8,
    allow_excess_rank: bool = False,
) -> dict[str, LoRAFactors]:
    """FFA-LoRA: one factor is frozen and shared by every client; only the other is averaged.

    With ``frozen="A"`` (FFA-LoRA, the default) returns ``(A, Σ p_k B_k)`` where ``A`` is the
    common ``A_k`` (client 0's, copied), so ``B̄ A = Σ p_k B_k A = ΔW`` exactly. With
    ``frozen="B"`` returns ``(Σ p_k A_k, B)``, and ``B Ā = ΔW`` exactly too. Raises
    :class:`FrozenAMismatchError` (``FrozenBMismatchError`` for ``frozen="B"``) naming the layer
    and client when some client's frozen factor differs from client 0's beyond
    ``|X_k − X_0| ≤ atol + rtol·|X_0|`` elementwise.

    Cost: O(K r (d_in + d_out)) flops (the check reads every frozen factor once). Download:
    the averaged factor only, r·d_out (``frozen="A"``) or r·d_in (``frozen="B"``) per layer;
    clients keep their copy of the frozen one.
    """
    prep = prepare(clients, weights, equal_ranks=True, allow_excess_rank=allow_excess_rank)
    p = prep.weights
    check_tolerances(rtol, atol)
    which = check_factor(frozen)
    out: dict[str, LoRAFactors] = {}
    for name, layer in prep.layers.items():
        shared = shared_factor(layer, which, rtol=rtol, atol=atol, method="FFA-LoRA/RoLoRA")
        acc = accumulation_dtype(layer.dtype)
        if which == "A":
            B = weighted_sum(layer.Bs, p, acc).to(layer.dtype)
            out[name] = LoRAFactors(shared.clone(), B)
        else:
            A = weighted_sum(layer.As, p, acc).to(layer.dtype)
            out[name] = LoRAFactors(A, shared.clone())
    return out


def rolora_trained(round_index: int) -> Literal["A", "B"]:
    """RoLoRA's schedule: the factor clients train in round ``round_index`` (0-based).

    Even rounds train ``B`` (A frozen), odd rounds train ``A`` (B frozen). ``B`` comes first
    because peft initialises ``B = 0``, where the gradient of ``A`` vanishes.
    """
    if isinstance(round_index, bool) or not isinstance(round_index, int) or round_index < 0:
        raise LoRAFairError(f"round_index must be an int >= 0, got {round_index!r}")
    return "B" if round_index % 2 == 0 else "A"


def rolora(
    clients: _Clients,
    weights: Sequence[float] | None = None,
    *,
    trained: Literal["A", "B"] = "B",
    rtol: float = 1e-5,
    atol: float = 1e-8,
    allow_excess_rank: bool = False,
) -> dict[str, LoRAFactors]:
    """RoLoRA: alternating rounds; average the factor trained this round, keep the shared other.

    In a round where clients train ``B`` on a shared frozen ``A`` (``trained="B"``) returns
    ``(A, Σ p_k B_k)``; in a round where they train ``A`` on a shared frozen ``B``
    (``trained="A"``) returns ``(Σ p_k A_k, B)``. Either way ``B @ A = ΔW`` exactly, because the
    frozen factor is common. This is :func:`ffa_lora` with ``frozen`` the other factor;
    :func:`rolora_trained` gives the schedule (B in even rounds, A in odd ones). Raises
    ``FrozenAMismatchError`` / ``FrozenBMismatchError`` when the frozen factor differs between
    clients (tolerances as in :func:`ffa_lora`).

    Cost: O(K r (d_in + d_out)) flops. Download: only the trained factor, r·d_out (B rounds)
    or r·d_in (A rounds) per layer. Clients load it, keep their frozen factor, and train the
    other factor next round.
    """
    which = check_factor(trained)
    return ffa_lora(
        clients,
        weights,
        frozen="A" if which == "B" else "B",
        rtol=rtol,
        atol=atol,
        allow_excess_rank=allow_excess_rank,
    )


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
    rank: int | EnergyThreshold | None = None,
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
    ``rank=EnergyThreshold(τ)`` keeps, per layer, the fewest components whose ``Σ σ_i²`` reaches
    ``τ ‖ΔW‖_F²`` (FLoRIST's rule), so layers may get different ranks;
    :func:`flexlora_report` returns the rank and energy each layer kept.

    ``ΔW`` is never formed: with the stacked factors ``B_s`` (d_out, R), ``A_s`` (R, d_in),
    R = Σ r_k, thin QRs ``B_s = Q_b R_b``, ``A_sᵀ = Q_a R_a`` give ``ΔW = Q_b (R_b R_aᵀ) Q_aᵀ`` and
    only the R × R core is decomposed. Layers of equal shapes are processed in float64
    batches whose working set is capped at 256 MiB (at least one layer per batch), so peak
    memory does not grow with the number of layers. Cost: O((d_out + d_in) R² + R³) flops and
    O((d_out + d_in) R) memory per layer, against O(d_out d_in min(d_out, d_in)) flops and a
    d_out × d_in buffer for a dense SVD.
    Download: rank·(d_in + d_out) per layer.
    """
    return _flexlora(
        clients, weights, rank=rank, split=split, report=False, allow_excess_rank=allow_excess_rank
    ).adapters


def flexlora_report(
    clients: _Clients,
    weights: Sequence[float] | None = None,
    *,
    rank: int | EnergyThreshold | None = None,
    split: Literal["balanced", "left"] = "balanced",
    allow_excess_rank: bool = False,
) -> FlexLoRAReport:
    """:func:`flexlora`'s adapters plus, per layer, the rank it kept and the energy kept.

    ``ranks[name] = RankChoice(rank, energy)`` with ``energy = Σ_{i≤rank} σ_i² / ‖ΔW‖_F²``
    (1.0 for ``ΔW = 0``). Same math and options as :func:`flexlora`; with a fixed int rank it
    computes every singular vector of the R × R core (not only the kept ones) to measure the
    energy, O((d_out + d_in) R²) more flops.
    """
    return _flexlora(
        clients, weights, rank=rank, split=split, report=True, allow_excess_rank=allow_excess_rank
    )


def _flexlora(
    clients: _Clients,
    weights: Sequence[float] | None,
    *,
    rank: int | EnergyThreshold | None,
    split: Literal["balanced", "left"],
    report: bool,
    allow_excess_rank: bool,
) -> FlexLoRAReport:
    if split not in ("balanced", "left"):
        raise LoRAFairError(f"split must be 'balanced' or 'left', got {split!r}")
    check_policy(rank)
    prep = prepare(clients, weights, equal_ranks=False, allow_excess_rank=allow_excess_rank)
    p = prep.weights
    out: dict[str, LoRAFactors] = {}
    chosen: dict[str, RankChoice] = {}
    for group in group_by_shape(list(prep.layers.values())):
        first = group[0]
        fixed = rank if isinstance(rank, int) else max(first.ranks)
        # Every component is needed to choose a rank by energy or to report the energy kept.
        target = sum(first.ranks) if report or isinstance(rank, EnergyThreshold) else fixed
        # float64 stacked factors plus the two thin-QR bases: about 3 copies of the stack.
        per_layer = 3 * 8 * (first.d_out + first.d_in) * sum(first.ranks)
        for batch in chunked(group, per_layer, _BATCH_BYTES):
            A_s, B_s = stacked_batch(batch, p, torch.float64)
            U, S, Vh = _linalg.truncated_svd(B_s, A_s, target)
            del A_s, B_s
            if target == fixed and not isinstance(rank, EnergyThreshold):  # one rank: batched
                A_b, B_b = _split(U, S, Vh, split)
                for i, layer in enumerate(batch):
                    out[layer.name] = LoRAFactors(A_b[i].to(layer.dtype), B_b[i].to(layer.dtype))
                    if report:
                        chosen[layer.name] = RankChoice(fixed, energy_kept(S[i], fixed))
                continue
            for i, layer in enumerate(batch):
                k = choose_rank(rank, S[i]) if isinstance(rank, EnergyThreshold) else fixed
                A_i, B_i = _split(*_keep(U[i], S[i], Vh[i], k), split)
                if report:
                    chosen[layer.name] = RankChoice(k, energy_kept(S[i], k))
                out[layer.name] = LoRAFactors(A_i.to(layer.dtype), B_i.to(layer.dtype))
    adapters = {name: out[name] for name in prep.layers}
    ranks = {name: chosen[name] for name in prep.layers} if report else {}
    return FlexLoRAReport(adapters, ranks)


def _keep(U: Tensor, S: Tensor, Vh: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The leading ``k`` singular triplets, zero-padded when fewer exist."""
    n = S.shape[-1]
    if k <= n:
        return U[..., :k], S[..., :k], Vh[..., :k, :]
    pad = k - n
    return (
        torch.cat([U, U.new_zeros(*U.shape[:-1], pad)], dim=-1),
        torch.cat([S, S.new_zeros(pad)], dim=-1),
        torch.cat([Vh, Vh.new_zeros(pad, Vh.shape[-1])], dim=-2),
    )


def _split(U: Tensor, S: Tensor, Vh: Tensor, split: Literal["balanced", "left"]) -> LoRAFactors:
    """FlexLoRA's factors ``(A, B)`` from ``U S Vh`` (batched or not): balanced or left split."""
    if split == "balanced":
        root = S.sqrt()
        return LoRAFactors(root.unsqueeze(-1) * Vh, U * root.unsqueeze(-2))
    return LoRAFactors(Vh, U * S.unsqueeze(-2))

"""Diagnostics: how far an aggregated adapter is from the ideal update ``ΔW = Σ p_k B_k A_k``."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from lorafair import _linalg
from lorafair._validate import Prepared, prepare, stacked, weighted_sum
from lorafair.errors import (
    DeviceMismatchError,
    LayerKeyError,
    LoRAShapeError,
    NonFiniteError,
)
from lorafair.types import LoRAFactors

__all__ = ["BiasReport", "FairReport", "aggregation_bias", "ideal_update", "lora_fair_report"]

_Clients = Sequence[Mapping[str, "LoRAFactors | tuple[Tensor, Tensor]"]]


class BiasReport(NamedTuple):
    """Per-layer agreement of an aggregated ``B @ A`` with the ideal ``ΔW`` (Python floats).

    ``cosine``: ``<BA, ΔW>_F / (‖BA‖_F ‖ΔW‖_F)``, 1.0 if both are zero, 0.0 if exactly one is.
    ``relative_error``: ``‖BA − ΔW‖_F / ‖ΔW‖_F`` (0.0 if both are zero, ``inf`` if only ΔW is).
    ``error_norm``: ``‖BA − ΔW‖_F``; ``ideal_norm``: ``‖ΔW‖_F``; ``aggregated_norm``: ``‖BA‖_F``.
    """

    cosine: float
    relative_error: float
    error_norm: float
    ideal_norm: float
    aggregated_norm: float


class FairReport(NamedTuple):
    """Table 4's columns for one layer, from the clients and an aggregated ``(A', B')``.

    ``b_cosine``: ``cos(B', B̄)``; ``update_cosine``: ``cos(B'A', ΔW)``; ``fedit_cosine``:
    ``cos(B̄Ā, ΔW)`` (the uncorrected FedIT product); ``delta_b_norm``: ``‖B' − B̄‖_F``;
    ``delta_a_norm``: ``‖A' − Ā‖_F``. Flattened (Frobenius) cosines in float64; 1.0 when both
    sides are zero, 0.0 when exactly one is.
    """

    b_cosine: float
    update_cosine: float
    fedit_cosine: float
    delta_b_norm: float
    delta_a_norm: float


def ideal_update(
    clients: _Clients,
    weights: Sequence[float] | None = None,
    *,
    dtype: torch.dtype | None = None,
    allow_excess_rank: bool = False,
) -> dict[str, Tensor]:
    """The dense ideal update ``ΔW = Σ p_k B_k A_k`` per layer (Eq. 7), for small layers and tests.

    Accumulated in float64 and returned in ``dtype`` (default: the inputs' dtype).
    Cost: O(d_out d_in Σ r_k) flops and a d_out × d_in buffer per layer — this is the one
    function in lorafair that forms ΔW; everything else works on the factors.
    """
    prep = prepare(clients, weights, equal_ranks=False, allow_excess_rank=allow_excess_rank)
    out: dict[str, Tensor] = {}
    for name, layer in prep.layers.items():
        A_s, B_s = stacked(layer, prep.weights, torch.float64)
        out[name] = (B_s @ A_s).to(dtype or layer.dtype)
    return out


def _aggregated_pairs(
    prep: Prepared, aggregated: Mapping[str, LoRAFactors | tuple[Tensor, Tensor]]
) -> dict[str, tuple[Tensor, Tensor]]:
    if not isinstance(aggregated, Mapping):
        raise LayerKeyError("aggregated must be a mapping of layer name to (A, B)")
    missing = [n for n in prep.layers if n not in aggregated]
    if missing:
        raise LayerKeyError(f"aggregated result is missing layer {missing[0]!r}")
    extra = [n for n in aggregated if n not in prep.layers]
    if extra:
        raise LayerKeyError(f"aggregated result has layer {extra[0]!r} that the clients lack")
    pairs: dict[str, tuple[Tensor, Tensor]] = {}
    for name, layer in prep.layers.items():
        value = aggregated[name]
        if not isinstance(value, Sequence) or len(value) != 2:
            raise LoRAShapeError(f"layer {name!r}: aggregated value must be a pair (A, B)")
        A, B = value[0], value[1]
        if not isinstance(A, Tensor) or not isinstance(B, Tensor) or A.ndim != 2 or B.ndim != 2:
            raise LoRAShapeError(f"layer {name!r}: aggregated A and B must be 2-D tensors")
        if A.shape[1] != layer.d_in or B.shape[0] != layer.d_out or A.shape[0] != B.shape[1]:
            raise LoRAShapeError(
                f"layer {name!r}: aggregated A {tuple(A.shape)} and B {tuple(B.shape)} do not "
                f"fit the clients' layer (d_out, d_in) = ({layer.d_out}, {layer.d_in})"
            )
        for label, t in (("A", A), ("B", B)):
            if t.device != layer.device:
                raise DeviceMismatchError(
                    f"layer {name!r}: aggregated {label} is on {t.device}, clients on "
                    f"{layer.device}"
                )
            if not bool(torch.isfinite(t).all()):
                raise NonFiniteError(f"layer {name!r}: aggregated {label} has NaN or Inf")
        pairs[name] = (A, B)
    return pairs


def aggregation_bias(
    clients: _Clients,
    aggregated: Mapping[str, LoRAFactors | tuple[Tensor, Tensor]],
    weights: Sequence[float] | None = None,
    *,
    allow_excess_rank: bool = False,
) -> dict[str, BiasReport]:
    """Server-side aggregation bias of ``aggregated`` against ``ΔW = Σ p_k B_k A_k``, per layer.

    Factored, in float64, never forming a d_out × d_in matrix: with the stacked factors
    ``B_s, A_s`` of ΔW, ``<BA, ΔW> = tr((BᵀB_s)(A_s Aᵀ))``; norms come from thin QRs
    (``‖BA‖ = ‖R_B A‖``) and the error from the QR of ``[B, −B_s]`` applied to ``[A; A_s]``, so a
    relative error of 1e-12 is resolved rather than lost to cancellation.
    Cost: O((d_out + d_in)(r + R)²) per layer with R = Σ r_k.

    ``aggregated`` may have any rank (FLoRA's stacked result included) and must hold the
    clients' layers on their device; see :class:`BiasReport` for zero-norm conventions.
    """
    prep = prepare(clients, weights, equal_ranks=False, allow_excess_rank=allow_excess_rank)
    pairs = _aggregated_pairs(prep, aggregated)
    out: dict[str, BiasReport] = {}
    for name, layer in prep.layers.items():
        A_s, B_s = stacked(layer, prep.weights, torch.float64)
        A, B = (t.to(torch.float64) for t in pairs[name])
        ideal = float(_linalg.fro_norm(B_s, A_s))
        agg = float(_linalg.fro_norm(B, A))
        err = float(_linalg.fro_norm(torch.cat([B, -B_s], dim=1), torch.cat([A, A_s], dim=0)))
        # the inner product only where both norms are non-zero (else _cos does not read it)
        inner = float(_linalg.fro_inner(B, A, B_s, A_s)) if agg and ideal else 0.0
        rel = (0.0 if agg == 0.0 else math.inf) if ideal == 0.0 else err / ideal
        out[name] = BiasReport(_cos(inner, agg, ideal), rel, err, ideal, agg)
    return out


def _cos(inner: float, na: float, nb: float) -> float:
    """The diagnostics' one cosine ``inner / (na nb)``, clipped to [−1, 1]: 1.0 where both norms
    are zero (the same nothing), 0.0 where exactly one is. (The solver's own cosine, 0 where
    either side is zero, is ``lorafair._fair._cosine.cosine``.)"""
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return max(-1.0, min(1.0, inner / (na * nb)))


def _pad_rows(t: Tensor, r: int) -> Tensor:
    """``t`` (…, r_k, n) with zero rows appended up to ``r``."""
    if t.shape[-2] == r:
        return t
    return torch.cat([t, t.new_zeros(*t.shape[:-2], r - t.shape[-2], t.shape[-1])], dim=-2)


def lora_fair_report(
    clients: _Clients,
    aggregated: Mapping[str, LoRAFactors | tuple[Tensor, Tensor]],
    weights: Sequence[float] | None = None,
    *,
    allow_excess_rank: bool = False,
) -> dict[str, FairReport]:
    """Table 4's diagnostics per layer: ``cos(B', B̄)``, ``cos(B'A', ΔW)``, ``‖B' − B̄‖``.

    ``aggregated`` maps every layer to ``(A', B')`` of the largest client rank ``r`` (e.g.
    :func:`lorafair.aggregate.lora_fair`'s output), on the clients' device, finite (validated as
    in :func:`aggregation_bias`); ``Ā``, ``B̄`` (zero-padded to ``r``) and ``ΔW`` come from
    ``clients``. All factored in float64: O((d_out + d_in) R²) flops per layer, R = Σ r_k + r.
    """
    prep = prepare(clients, weights, equal_ranks=False, allow_excess_rank=allow_excess_rank)
    pairs = _aggregated_pairs(prep, aggregated)
    p = prep.weights
    out: dict[str, FairReport] = {}
    for name, layer in prep.layers.items():
        r = max(layer.ranks)
        A1, B1 = pairs[name]
        if A1.shape[0] != r:
            raise LoRAShapeError(
                f"layer {name!r}: aggregated A {tuple(A1.shape)} and B {tuple(B1.shape)}; "
                f"expected ({r}, {layer.d_in}) and ({layer.d_out}, {r})"
            )
        A1, B1 = A1.to(torch.float64), B1.to(torch.float64)
        Abar = weighted_sum([_pad_rows(a, r) for a in layer.As], p, torch.float64)
        Bbar = weighted_sum([_pad_rows(b.mT, r).mT for b in layer.Bs], p, torch.float64)
        A_s, B_s = stacked(layer, p, torch.float64)
        vals = (
            torch.stack(
                [
                    (B1 * Bbar).sum(),
                    torch.linalg.matrix_norm(B1),
                    torch.linalg.matrix_norm(Bbar),
                    _linalg.fro_inner(B1, A1, B_s, A_s),
                    _linalg.fro_norm(B1, A1),
                    _linalg.fro_norm(B_s, A_s),
                    _linalg.fro_inner(Bbar, Abar, B_s, A_s),
                    _linalg.fro_norm(Bbar, Abar),
                    torch.linalg.matrix_norm(B1 - Bbar),
                    torch.linalg.matrix_norm(A1 - Abar),
                ]
            )
            .cpu()
            .tolist()
        )
        out[name] = FairReport(
            _cos(vals[0], vals[1], vals[2]),
            _cos(vals[3], vals[4], vals[5]),
            _cos(vals[6], vals[7], vals[5]),
            vals[8],
            vals[9],
        )
    return out

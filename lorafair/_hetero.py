"""Heterogeneous ranks: HetLoRA's zero-padded, norm-weighted average and per-client truncation."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from lorafair import _linalg
from lorafair._fit import fits_dtype
from lorafair._threads import torch_single_threaded
from lorafair._validate import accumulation_dtype, prepare
from lorafair.errors import LoRAFairError, LoRAShapeError
from lorafair.types import LoRAFactors

__all__ = ["hetlora", "hetlora_truncate"]

_Clients = Sequence[Mapping[str, "LoRAFactors | tuple[Tensor, Tensor]"]]


def _mixing(p: Sequence[float], log_norms: Sequence[float]) -> tuple[float, ...]:
    """``q_k = p_k n_k / Σ_j p_j n_j`` from ``log n_k``; ``p`` itself when every ``p_k n_k`` is 0.

    Shifted by the largest ``log(p_k n_k)`` first, so norms beyond float64's range (float64
    factors near its limit) still give finite weights.
    """
    logs = [math.log(w) + n if w > 0.0 else -math.inf for w, n in zip(p, log_norms, strict=True)]
    top = max(logs)
    if top == -math.inf:
        return tuple(p)
    raw = [math.exp(x - top) for x in logs]
    total = math.fsum(raw)
    return tuple(x / total for x in raw)


def _log_sum_squares(logs: Sequence[float]) -> float:
    """``log sqrt(Σ_i exp(logs_i)²)``, shifted so that it neither overflows nor underflows."""
    top = max(logs)
    if top == -math.inf:
        return -math.inf
    return top + 0.5 * math.log(math.fsum(math.exp(2.0 * (x - top)) for x in logs))


def _log_fro_norm(B: Tensor, A: Tensor) -> Tensor:
    """``log ‖B A‖_F`` (−inf for 0) in float64, with ``B`` and ``A`` first scaled exactly by
    powers of two to a largest entry in [0.5, 1), so the norm neither overflows nor underflows."""
    a, b = A.double(), B.double()
    ea, eb = torch.frexp(a.abs().amax())[1], torch.frexp(b.abs().amax())[1]
    norm = _linalg.fro_norm(torch.ldexp(b, -eb), torch.ldexp(a, -ea))
    return norm.log() + (ea + eb).double() * math.log(2.0)


@torch_single_threaded
@fits_dtype(bounded=True)
def hetlora(
    clients: _Clients,
    weights: Sequence[float] | None = None,
    *,
    norm: Literal["layer", "model"] = "layer",
    allow_excess_rank: bool = False,
) -> dict[str, LoRAFactors]:
    """HetLoRA: zero-pad heterogeneous ranks to the largest, average weighted by update norms.

    With ``r = max_k r_k`` and ``pad(A_k)`` (r × d_in, rows ``r_k:`` zero), ``pad(B_k)``
    (d_out × r, columns ``r_k:`` zero), returns ``Ā = Σ q_k pad(A_k)``, ``B̄ = Σ q_k pad(B_k)``
    with the sparsity weights ``q_k = p_k n_k / Σ_j p_j n_j``, where ``n_k = ‖B_k A_k‖_F`` of the
    layer (``norm="layer"``) or ``sqrt(Σ_layers ‖B_k A_k‖_F²)`` of the whole adapter
    (``norm="model"``). The norms are factored (a thin QR of ``B_k``), in float64. When every
    ``p_k n_k`` is zero (e.g. peft's ``B = 0`` start) ``q = p``: plain zero-padded FedIT.
    Biased like FedIT (``B̄ Ā ≠ ΔW`` in general); the ranks may differ.

    Cost: O(Σ_k r_k² (d_out + d_in)) flops for the norms plus O(K r (d_in + d_out)) for the
    sums; memory one output-sized buffer per factor. Download: ``r (d_in + d_out)`` per layer
    at the largest rank, or ``r_k (d_in + d_out)`` if the server truncates first.

    Clients take their own rank's leading block, ``Ā[:r_k]`` and ``B̄[:, :r_k]``
    (:func:`hetlora_truncate`); the paper's local rank self-pruning is a client-side step and
    not done here.
    """
    if norm not in ("layer", "model"):
        raise LoRAFairError(f"norm must be 'layer' or 'model', got {norm!r}")
    prep = prepare(clients, weights, equal_ranks=False, allow_excess_rank=allow_excess_rank)
    p = prep.weights
    layer_norms: dict[str, list[float]] = {}  # log ‖B_k A_k‖_F per layer and client
    for name, layer in prep.layers.items():
        values = [_log_fro_norm(B, A) for A, B in zip(layer.As, layer.Bs, strict=True)]
        layer_norms[name] = [float(v) for v in torch.stack(values).cpu().tolist()]
    if norm == "model":
        whole = [
            _log_sum_squares([layer_norms[n][k] for n in layer_norms])
            for k in range(prep.n_clients)
        ]
        mixing = {n: _mixing(p, whole) for n in layer_norms}
    else:
        mixing = {n: _mixing(p, v) for n, v in layer_norms.items()}
    out: dict[str, LoRAFactors] = {}
    for name, layer in prep.layers.items():
        q = mixing[name]
        r = max(layer.ranks)
        acc = accumulation_dtype(layer.dtype)
        A = torch.zeros(r, layer.d_in, dtype=acc, device=layer.device)
        B = torch.zeros(layer.d_out, r, dtype=acc, device=layer.device)
        for A_k, B_k, w in zip(layer.As, layer.Bs, q, strict=True):
            r_k = A_k.shape[0]
            A[:r_k].add_(A_k.to(acc), alpha=w)
            B[:, :r_k].add_(B_k.to(acc), alpha=w)
        out[name] = LoRAFactors(A.to(layer.dtype), B.to(layer.dtype))
    return out


@torch_single_threaded
def hetlora_truncate(
    adapters: Mapping[str, LoRAFactors | tuple[Tensor, Tensor]],
    ranks: Sequence[int | Mapping[str, int]],
) -> list[dict[str, LoRAFactors]]:
    """Each client's share of a HetLoRA result: the leading ``r_k`` components of every layer.

    ``ranks[k]`` is client k's rank (an int for every layer, or a mapping layer → rank).
    Returns, per client, ``{name: (A[:r_k], B[:, :r_k])}`` (copies). Raises
    :class:`LoRAShapeError` naming the client and layer when a rank is not in
    ``1 … A.shape[0]``, and :class:`LoRAFairError` when a mapping misses a layer.
    Cost: copies only, ``r_k (d_in + d_out)`` per layer and client.
    """
    out: list[dict[str, LoRAFactors]] = []
    for k, rank in enumerate(ranks):
        client: dict[str, LoRAFactors] = {}
        for name, (A, B) in adapters.items():
            if isinstance(rank, Mapping):
                if name not in rank:
                    raise LoRAFairError(f"client {k} gives no rank for layer {name!r}")
                r_k = rank[name]
            else:
                r_k = rank
            if isinstance(r_k, bool) or not isinstance(r_k, int) or not 1 <= r_k <= A.shape[0]:
                raise LoRAShapeError(
                    f"layer {name!r}: client {k} asks for rank {r_k!r}; the aggregate has rank "
                    f"{A.shape[0]} (need 1 <= rank <= {A.shape[0]})"
                )
            client[name] = LoRAFactors(A[:r_k].clone(), B[:, :r_k].clone())
        out.append(client)
    return out

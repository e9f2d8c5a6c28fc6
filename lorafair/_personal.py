"""Personalised aggregation: FedSA-LoRA shares A and leaves every client its own B."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from lorafair._fit import fits_dtype
from lorafair._threads import torch_single_threaded
from lorafair._validate import accumulation_dtype, prepare, weighted_sum
from lorafair.types import FedSAResult, LoRAFactors

__all__ = ["fedsa_lora"]

_Clients = Sequence[Mapping[str, "LoRAFactors | tuple[Tensor, Tensor]"]]


@torch_single_threaded
@fits_dtype(bounded=True)
def fedsa_lora(
    clients: _Clients,
    weights: Sequence[float] | None = None,
    *,
    allow_excess_rank: bool = False,
) -> FedSAResult:
    """FedSA-LoRA: average A and share it; every client keeps its own B.

    Returns ``shared_A[name] = Ā = Σ p_k A_k`` and, for each client k,
    ``adapters[k][name] = (Ā, B_k)``, every tensor a fresh copy (no client's adapter aliases
    another's or the input). Personalised: client k's update is ``B_k Ā``; there is no single
    global ``B @ A`` and nothing is claimed about ``ΔW = Σ p_k B_k A_k``. All clients must
    share the rank r.

    Cost: O(K r d_in) flops for the average plus copies of each ``B_k``. Download: ``r·d_in``
    per layer (only ``Ā``; clients already hold their ``B_k``). Upload: ``A_k`` only.

    Clients load ``Ā`` as their A, keep their local ``B_k``, train both, and are evaluated
    each with its own adapter.
    """
    prep = prepare(clients, weights, equal_ranks=True, allow_excess_rank=allow_excess_rank)
    p = prep.weights
    shared: dict[str, Tensor] = {}
    for name, layer in prep.layers.items():
        shared[name] = weighted_sum(layer.As, p, accumulation_dtype(layer.dtype)).to(layer.dtype)
    adapters = tuple(
        {
            name: LoRAFactors(shared[name].clone(), layer.Bs[k].clone())
            for name, layer in prep.layers.items()
        }
        for k in range(prep.n_clients)
    )
    return FedSAResult(shared, adapters)

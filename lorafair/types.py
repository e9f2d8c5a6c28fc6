"""Data types shared by every aggregator.

A client's adapter is a mapping ``layer name -> (A, B)`` with ``A`` of shape ``(r, d_in)`` and
``B`` of shape ``(d_out, r)``: exactly peft's ``lora_A.weight`` / ``lora_B.weight``, so that the
layer's update is ``B @ A`` (before peft's ``alpha / r`` scaling).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple, TypeAlias

from torch import Tensor

__all__ = [
    "ClientFactors",
    "Clients",
    "FedExResult",
    "FedSAResult",
    "FlexLoRAReport",
    "LoRAFactors",
    "RankChoice",
    "ResidualReport",
    "Weights",
]


class LoRAFactors(NamedTuple):
    """The two LoRA factors of one layer: ``A`` (r, d_in) and ``B`` (d_out, r); update ``B @ A``."""

    A: Tensor
    B: Tensor


ClientFactors: TypeAlias = Mapping[str, "LoRAFactors | tuple[Tensor, Tensor]"]
"""One client's adapter: layer name to ``(A, B)``; plain 2-tuples are accepted."""

Clients: TypeAlias = Sequence[ClientFactors]
"""The K clients' adapters, in a fixed order (client index = position)."""

Weights: TypeAlias = "Sequence[float] | None"
"""Non-negative client weights (data sizes or proportions), normalised; ``None`` means equal."""


class ResidualReport(NamedTuple):
    """What FedEx-LoRA's residual of one layer costs and, when truncated, what it loses.

    ``rank``: the rank of the residual sent (its factors' inner dimension); ``norm``:
    ``‖ΔW − B̄Ā‖_F`` (float64); ``lost``: ``‖(ΔW − B̄Ā) − sent‖_F``, zero when not truncated
    (the Eckart–Young tail ``sqrt(Σ_{i>q} σ_i²)`` when truncated to rank q).
    """

    rank: int
    norm: float
    lost: float


class FedExResult(NamedTuple):
    """FedEx-LoRA's download: FedIT's adapters, the factored residual, and a per-layer report.

    Clients add ``residual[name].B @ residual[name].A`` to their frozen weight and load
    ``adapters[name]`` as their LoRA factors, so their effective weight moves by exactly ΔW.
    """

    adapters: dict[str, LoRAFactors]
    residual: dict[str, LoRAFactors]
    report: dict[str, ResidualReport]


class FedSAResult(NamedTuple):
    """FedSA-LoRA's output: the shared ``Ā`` per layer, and each client's personal adapter.

    ``adapters[k][name] = (Ā, B_k)``: client k keeps its own ``B_k`` and loads the shared ``Ā``.
    Only ``shared_A`` is downloaded.
    """

    shared_A: dict[str, Tensor]
    adapters: tuple[dict[str, LoRAFactors], ...]


class RankChoice(NamedTuple):
    """The rank a layer kept and the fraction of ``‖ΔW‖_F²`` it keeps (1.0 when ``ΔW = 0``)."""

    rank: int
    energy: float


class FlexLoRAReport(NamedTuple):
    """FlexLoRA's adapters plus, per layer, the rank chosen and the energy it keeps."""

    adapters: dict[str, LoRAFactors]
    ranks: dict[str, RankChoice]

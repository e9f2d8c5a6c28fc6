"""Rank policies for truncated-SVD aggregation: how many singular components a layer keeps."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from lorafair.errors import LoRAFairError

__all__ = ["EnergyThreshold", "choose_rank", "energy_kept"]

# Relative slack on the cumulative energy, so that threshold=1.0 is reached despite rounding
# instead of keeping zero components. The one tolerance of this module.
_ENERGY_RTOL = 1e-12


class EnergyThreshold(NamedTuple):
    """Keep the fewest components whose ``Σ σ_i²`` reaches ``threshold · ‖ΔW‖_F²`` (FLoRIST).

    ``threshold`` in (0, 1]; ``max_rank`` optionally caps the rank chosen.
    """

    threshold: float
    max_rank: int | None = None


def check_policy(rank: object) -> None:
    """Raise unless ``rank`` is None, a positive int, or a valid :class:`EnergyThreshold`."""
    if rank is None:
        return
    if isinstance(rank, EnergyThreshold):
        t, cap = rank
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0.0 < t <= 1.0:
            raise LoRAFairError(f"EnergyThreshold.threshold must be in (0, 1], got {t!r}")
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise LoRAFairError(f"EnergyThreshold.max_rank must be a positive int, got {cap!r}")
        return
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise LoRAFairError(
            f"rank must be a positive int, an EnergyThreshold or None, got {rank!r}"
        )


def energy_kept(S: Tensor, k: int) -> float:
    """``Σ_{i<k} σ_i² / Σ_i σ_i²`` for descending ``S`` (1.0 when every σ is zero)."""
    energy = S.double().pow(2)
    total = float(energy.sum())
    if total == 0.0:
        return 1.0
    return min(1.0, float(energy[:k].sum()) / total)


def choose_rank(policy: EnergyThreshold, S: Tensor) -> int:
    """The rank ``policy`` keeps for descending singular values ``S`` (at least 1)."""
    energy = S.double().pow(2)
    total = float(energy.sum())
    if total == 0.0:
        k = 1
    else:
        cumulative = torch.cumsum(energy, dim=0)
        target = policy.threshold * total * (1.0 - _ENERGY_RTOL)
        k = int((cumulative < target).sum()) + 1
    k = min(k, S.shape[0])
    if policy.max_rank is not None:
        k = min(k, policy.max_rank)
    return max(1, k)

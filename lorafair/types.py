"""Data types shared by every aggregator.

A client's adapter is a mapping ``layer name -> (A, B)`` with ``A`` of shape ``(r, d_in)`` and
``B`` of shape ``(d_out, r)``: exactly peft's ``lora_A.weight`` / ``lora_B.weight``, so that the
layer's update is ``B @ A`` (before peft's ``alpha / r`` scaling).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple, TypeAlias

from torch import Tensor

__all__ = ["ClientFactors", "Clients", "LoRAFactors", "Weights"]


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

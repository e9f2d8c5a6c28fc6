"""The frozen-factor check of FFA-LoRA, RoLoRA and FedSVD: one factor, equal on every client."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lorafair._validate import Layer
from lorafair.errors import FrozenAMismatchError, FrozenBMismatchError, LoRAFairError

Factor = Literal["A", "B"]


def check_tolerances(rtol: float, atol: float) -> None:
    """Raise unless both tolerances are non-negative (NaN fails too)."""
    if not (rtol >= 0 and atol >= 0):
        raise LoRAFairError(f"rtol and atol must be >= 0, got rtol={rtol}, atol={atol}")


def check_factor(factor: object) -> Factor:
    """``factor`` itself when it is ``"A"`` or ``"B"``; a :class:`LoRAFairError` otherwise."""
    if factor == "A":
        return "A"
    if factor == "B":
        return "B"
    raise LoRAFairError(f"frozen factor must be 'A' or 'B', got {factor!r}")


def shared_factor(layer: Layer, frozen: Factor, *, rtol: float, atol: float, method: str) -> Tensor:
    """Client 0's copy of the frozen factor, after checking every client holds the same one.

    Raises :class:`FrozenAMismatchError` / :class:`FrozenBMismatchError` naming the layer and the
    first client whose copy differs from client 0's beyond ``|X_k − X_0| ≤ atol + rtol·|X_0|``.
    Cost: one read of every client's frozen factor.
    """
    copies = layer.As if frozen == "A" else layer.Bs
    first = copies[0]
    for k, X in enumerate(copies[1:], start=1):
        if not torch.allclose(X, first, rtol=rtol, atol=atol):
            diff = (X.double() - first.double()).abs().max().item()
            error = FrozenAMismatchError if frozen == "A" else FrozenBMismatchError
            raise error(
                f"layer {layer.name!r}: client {k} has {frozen} differing from client 0's by up "
                f"to {diff:.3g} (rtol={rtol}, atol={atol}); {method} needs {frozen} frozen and "
                "shared by every client"
            )
    return first

"""One benchmark cell's inputs: synthetic clients on a shape set (see :mod:`benchmarks.shapes`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from benchmarks.shapes import SHAPE_SETS, LayerShape, make_clients
from lorafair.types import LoRAFactors

__all__ = ["DTYPES", "Inputs", "layers_for", "make_inputs"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass
class Inputs:
    """The clients of one cell: ``free`` (A_k differ) and ``shared`` (A_k equal, for FFA-LoRA)."""

    shape_set: str
    layers: list[LayerShape]
    free: list[dict[str, LoRAFactors]]
    shared: list[dict[str, LoRAFactors]]
    dtype: torch.dtype
    device: torch.device


def layers_for(shape_set: str, max_layers: int | None) -> list[str]:
    """Layer names of a shape set, truncated to the first ``max_layers``."""
    return [s.name for s in SHAPE_SETS[shape_set][:max_layers]]


def make_inputs(
    shape_set: str,
    max_layers: int | None,
    K: int,
    r: int,
    dtype: str,
    device: str,
    *,
    seed: int = 0,
    need_shared: bool = True,
    need_free: bool = True,
) -> Inputs:
    """Build the synthetic clients of one cell (deterministic in ``seed``)."""
    layers = SHAPE_SETS[shape_set][:max_layers]
    dt = DTYPES[dtype]
    free = make_clients(layers, K, r, dtype=dt, device=device, seed=seed) if need_free else []
    shared = (
        make_clients(layers, K, r, dtype=dt, device=device, seed=seed + 1, shared_A=True)
        if need_shared
        else []
    )
    return Inputs(shape_set, list(layers), free, shared, dt, torch.device(device))

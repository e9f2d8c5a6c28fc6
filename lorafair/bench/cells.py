"""One benchmark cell's inputs: synthetic clients on a shape set (:mod:`lorafair.bench.shapes`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorafair.bench.shapes import LayerShape, ShapeSet, make_clients
from lorafair.types import LoRAFactors

__all__ = ["DTYPES", "Inputs", "make_inputs"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
"""The dtypes a cell may use, by the name the command line takes."""


@dataclass
class Inputs:
    """The clients of one cell: ``free`` (A_k differ) and ``shared`` (A_k equal, for methods
    whose clients share one frozen ``A``); either is empty when no chosen method needs it."""

    shapes: ShapeSet
    free: list[dict[str, LoRAFactors]]
    shared: list[dict[str, LoRAFactors]]
    dtype: torch.dtype
    device: torch.device

    @property
    def shape_set(self) -> str:
        return self.shapes.name

    @property
    def layers(self) -> tuple[LayerShape, ...]:
        return self.shapes.layers


def make_inputs(
    shapes: ShapeSet,
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
    dt = DTYPES[dtype]
    layers = shapes.layers
    free = make_clients(layers, K, r, dtype=dt, device=device, seed=seed) if need_free else []
    shared = (
        make_clients(layers, K, r, dtype=dt, device=device, seed=seed + 1, shared_A=True)
        if need_shared
        else []
    )
    return Inputs(shapes, free, shared, dt, torch.device(device))

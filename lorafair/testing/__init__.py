"""Helpers for testing aggregators: :func:`check_aggregator` (lorafair's conformance suite and
Hypothesis properties, for any aggregator) and :func:`assert_factors_close` here, Hypothesis
strategies in :mod:`lorafair.testing.strategies` (Hypothesis, the ``test`` extra, is imported
only when you import the strategies or a property runs).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

import torch
from torch import Tensor

from lorafair.testing._check import CheckReport, check_aggregator, check_names
from lorafair.testing._reference import Objective
from lorafair.types import LoRAFactors

__all__ = ["CheckReport", "Objective", "assert_factors_close", "check_aggregator", "check_names"]

_Factors = Mapping[str, "LoRAFactors | tuple[Tensor, Tensor]"]


def _prefix(where: str) -> Callable[[str], str]:
    def message(detail: str) -> str:
        return f"{where}: {detail}"

    return message


def assert_factors_close(
    actual: _Factors,
    expected: _Factors,
    *,
    compare: Literal["product", "factors"] = "product",
    rtol: float | None = None,
    atol: float | None = None,
) -> None:
    """Assert two aggregated adapters agree, layer by layer, naming the first layer that differs.

    ``compare="product"`` (default) compares the dense updates ``B @ A`` (formed in float64, so
    use it on test-sized layers): factorisations that differ only by an invertible ``r × r``
    mix, a sign flip or a different rank, such as FlexLoRA's two splits, compare equal.
    ``compare="factors"`` compares ``A`` and ``B`` elementwise and requires equal shapes.
    Tolerances default to :func:`torch.testing.assert_close`'s for the actual dtype.
    """
    if set(actual) != set(expected):
        only_a = sorted(set(actual) - set(expected))
        only_e = sorted(set(expected) - set(actual))
        raise AssertionError(
            f"layer names differ: only in actual {only_a}, only in expected {only_e}"
        )
    for name in expected:
        A1, B1 = actual[name]
        A2, B2 = expected[name]
        if compare == "factors":
            pairs = [("A", A1, A2), ("B", B1, B2)]
        elif compare == "product":
            prod1 = B1.to(torch.float64) @ A1.to(torch.float64)
            prod2 = (B2.to(torch.float64) @ A2.to(torch.float64)).to(prod1.device)
            if rtol is None and atol is None and A1.dtype != torch.float64:
                # Compare at the precision the actual factors were computed in.
                prod1, prod2 = prod1.to(A1.dtype), prod2.to(A1.dtype)
            pairs = [("B @ A", prod1, prod2)]
        else:
            raise ValueError(f"compare must be 'product' or 'factors', got {compare!r}")
        for label, x, y in pairs:
            torch.testing.assert_close(
                x,
                y.to(device=x.device, dtype=x.dtype),
                rtol=rtol,
                atol=atol,
                msg=_prefix(f"layer {name!r}, {label}"),
            )

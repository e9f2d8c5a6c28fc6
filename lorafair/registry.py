"""One registry of aggregators: name → function, default options, and what each guarantees.

The benchmarks, the conformance suite and the example loop all read this table, so a new
method is added in one place: write the function in :mod:`lorafair.aggregate`, then add one
:class:`AggregatorSpec` to ``_SPECS`` below.

>>> from lorafair.registry import get, names
>>> "lora_fair" in names()
True
>>> get("flora").exact
True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Literal, NamedTuple

from lorafair import aggregate

__all__ = ["AggregatorSpec", "Floor", "get", "names", "specs"]

Floor = Literal["memory", "gram"]
"""What bounds a method's cost from below: one read of its inputs, or the float64 Grams."""


class AggregatorSpec(NamedTuple):
    """One aggregator and what it promises.

    ``fn(clients, weights, **defaults, **overrides)`` runs it. The flags are the guarantees the
    test suite checks for every method that claims them.
    """

    name: str
    fn: Callable[..., Any]
    defaults: Mapping[str, object]
    exact: bool
    """``B @ A == ΔW`` up to the output dtype's rounding."""
    optimal: bool
    """``B @ A`` is the best approximation of ``ΔW`` of its rank (Eckart–Young)."""
    never_worse_than_fedit: bool
    """Its LoRA-FAIR objective never exceeds FedIT's on the same input."""
    shared_A: bool
    """The clients must share one frozen ``A`` (the method checks it)."""
    equal_ranks: bool
    """Every client must have the same rank."""
    floor: Floor
    summary: str


def _spec(
    name: str,
    fn: Callable[..., Any],
    summary: str,
    *,
    defaults: Mapping[str, object] | None = None,
    exact: bool = False,
    optimal: bool = False,
    never_worse_than_fedit: bool = False,
    shared_A: bool = False,
    equal_ranks: bool = True,
    floor: Floor = "memory",
) -> AggregatorSpec:
    return AggregatorSpec(
        name=name,
        fn=fn,
        defaults=MappingProxyType(dict(defaults or {})),
        exact=exact,
        optimal=optimal,
        never_worse_than_fedit=never_worse_than_fedit,
        shared_A=shared_A,
        equal_ranks=equal_ranks,
        floor=floor,
        summary=summary,
    )


_SPECS: tuple[AggregatorSpec, ...] = (
    _spec("fedit", aggregate.fedit, "average A and B separately (biased)"),
    _spec(
        "ffa_lora",
        aggregate.ffa_lora,
        "A frozen and shared; average B (exact)",
        exact=True,
        shared_A=True,
    ),
    _spec(
        "flora",
        aggregate.flora,
        "stack every client's factors along the rank axis (exact, rank Σ r_k)",
        exact=True,
        equal_ranks=False,
    ),
    _spec(
        "flexlora",
        aggregate.flexlora,
        "truncated SVD of ΔW, factored (optimal at its rank)",
        optimal=True,
        equal_ranks=False,
        floor="gram",
    ),
    _spec(
        "lora_fair",
        aggregate.lora_fair,
        "keep Ā, correct B̄ by the residual that best aligns (B̄+ΔB)Ā with ΔW",
        defaults={"lam": 0.01},
        never_worse_than_fedit=True,
        equal_ranks=False,
        floor="gram",
    ),
)

_REGISTRY: Mapping[str, AggregatorSpec] = MappingProxyType({s.name: s for s in _SPECS})


def names() -> tuple[str, ...]:
    """Every registered aggregator's name, in registration order."""
    return tuple(_REGISTRY)


def specs() -> tuple[AggregatorSpec, ...]:
    """Every registered aggregator, in registration order."""
    return tuple(_REGISTRY.values())


def get(name: str) -> AggregatorSpec:
    """The spec registered under ``name``; ``KeyError`` naming the choices otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown aggregator {name!r}; choose from {', '.join(_REGISTRY)}") from None

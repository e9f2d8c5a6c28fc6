"""What a benchmark runs: one :class:`Entry` per registered aggregator, built from its
:class:`~lorafair.registry.AggregatorSpec` alone, so that a new method gets a row by its registry
entry and nothing else.

Each entry's result is the factors of the global update the clients apply (the registry's
``update_factors``: FedEx-LoRA's adapters and residual concatenated), or, for a personalised
method (no global update), client 0's own adapter. The conversion is part of the timed call.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Literal, NamedTuple

from lorafair import registry
from lorafair.bench.cells import Inputs
from lorafair.registry import AggregatorSpec, Floor, Form, Reference
from lorafair.types import LoRAFactors

__all__ = ["Entry", "Norm", "Result", "Runner", "from_spec", "get", "library", "update_of"]

Norm = Literal["fro", "fro_squared"]
"""The LoRA-FAIR objective's regulariser: ``λ‖ΔB‖_F`` or ``λ‖ΔB‖_F²``."""

Result = tuple[dict[str, LoRAFactors], dict[str, Any]]
"""An entry's global-update factors and its per-layer diagnostics (empty for the library)."""

Runner = Callable[[Inputs, Mapping[str, Any], "Sequence[str] | None"], Result]
"""``run(inputs, options, layers)``; ``layers`` limits a slow reference to some layers."""


class Entry(NamedTuple):
    """One benchmark row kind and the guarantees its result is checked against."""

    name: str
    run: Runner
    exact: bool
    optimal: bool
    never_worse_than_fedit: bool
    shared_A: bool
    floor: Floor
    personalised: bool = False
    """No global update: the row shows client 0's adapter."""
    dense: bool = False
    """A slow reference: run one layer at a time on the reference layers only."""
    norm: Norm | None = None
    """The LoRA-FAIR objective's regulariser norm, for methods that minimise it."""
    reproduces: str | None = None
    """For a reference: the entry whose result it computes another way."""
    defaults: Mapping[str, object] = MappingProxyType({})
    """The registry's default options, overrides included."""
    reference: Reference | None = None
    """The registry's float64 definition of the reported factors (a dense reference: that of
    the entry it reproduces)."""
    form: Form | None = None
    """The registry's stated form of the result."""


def update_of(spec: AggregatorSpec, out: Any) -> dict[str, LoRAFactors]:
    """The factors a row reports for ``spec``'s result ``out``: ``spec.update_factors(out)``, or
    for a personalised method client 0's adapter (``out.adapters[0]``)."""
    if spec.update_factors is not None:
        return spec.update_factors(out)
    return dict(out.adapters[0])


def _accepted(fn: Callable[..., Any], options: Mapping[str, Any]) -> dict[str, Any]:
    params = inspect.signature(fn).parameters
    return {k: v for k, v in options.items() if k in params}


def _runner(spec: AggregatorSpec, overrides: Mapping[str, Any]) -> Runner:
    def run(inputs: Inputs, options: Mapping[str, Any], layers: Sequence[str] | None) -> Result:
        clients = inputs.shared if spec.shared_A else inputs.free
        if layers is not None:
            clients = [{n: c[n] for n in layers} for c in clients]
        kwargs = {**spec.defaults, **_accepted(spec.fn, options), **overrides}
        if kwargs.get("similarity") == "flat":
            kwargs.pop("similarity")  # the default; not every version takes it by keyword
        return update_of(spec, spec.fn(clients, **kwargs)), {}

    return run


def from_spec(spec: AggregatorSpec, name: str | None = None, **overrides: Any) -> Entry:
    """The entry of a registered aggregator; ``overrides`` fix options (a variant, then named
    ``name``)."""
    norm: Norm | None = overrides.get("norm", "fro") if spec.never_worse_than_fedit else None
    return Entry(
        name=name or spec.name,
        run=_runner(spec, MappingProxyType(dict(overrides))),
        exact=spec.exact,
        optimal=spec.optimal,
        never_worse_than_fedit=spec.never_worse_than_fedit,
        shared_A=spec.shared_A,
        floor=spec.floor,
        personalised=spec.personalised,
        norm=norm,
        defaults=MappingProxyType({**spec.defaults, **overrides}),
        reference=spec.reference,
        form=spec.form,
    )


def library() -> tuple[Entry, ...]:
    """One entry per registered aggregator, in registration order."""
    return tuple(from_spec(s) for s in registry.specs())


def get(name: str) -> Entry:
    """The entry of registered aggregator ``name``; ``KeyError`` naming the choices otherwise."""
    return from_spec(registry.get(name))

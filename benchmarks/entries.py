"""What the benchmarks run: the registered aggregators, benchmark variants, dense references.

Built from :mod:`lorafair.registry`, so that a new method gets a row by its registry entry alone.
Each :class:`Entry` carries the guarantees its result is checked against (the registry's flags;
the dense references state their own) and the floor its time is compared with.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Literal, NamedTuple

from benchmarks import new_methods
from benchmarks import references as ref
from benchmarks.cells import Inputs
from lorafair import registry
from lorafair.registry import AggregatorSpec, Floor
from lorafair.types import LoRAFactors

__all__ = ["Entry", "Result", "entries", "get", "names"]

Result = tuple[dict[str, LoRAFactors], dict[str, ref.SGDInfo]]
Runner = Callable[[Inputs, Mapping[str, Any], "Sequence[str] | None"], Result]


class Entry(NamedTuple):
    """One benchmark row kind."""

    name: str
    run: Runner
    """``run(inputs, options, ref_layers)``: the result (and SGD diagnostics for references)."""
    exact: bool
    optimal: bool
    never_worse_than_fedit: bool
    shared_A: bool
    floor: Floor
    dense: bool = False
    """A slow reference: run one layer at a time on the reference layers only."""
    norm: ref.Norm | None = None
    """The LoRA-FAIR objective's regulariser norm, for methods that minimise it."""
    reproduces: str | None = None
    """For a dense reference: the library entry it computes the slow way."""


def _accepted(fn: Callable[..., Any], options: Mapping[str, Any]) -> dict[str, Any]:
    params = inspect.signature(fn).parameters
    return {k: v for k, v in options.items() if k in params}


def _library(spec: AggregatorSpec, overrides: Mapping[str, Any]) -> Runner:
    def run(inputs: Inputs, options: Mapping[str, Any], ref_layers: Sequence[str] | None) -> Result:
        clients = inputs.shared if spec.shared_A else inputs.free
        if spec.name in new_methods.NAMES:  # issue 16's: FedEx's residual, FedSA's client 0
            return new_methods.call(spec.name, clients), {}
        kwargs = {**spec.defaults, **_accepted(spec.fn, options), **overrides}
        if kwargs.get("similarity") == "flat":
            kwargs.pop("similarity")  # the default; not every version takes it by keyword
        return spec.fn(clients, **kwargs), {}

    return run


def _from_spec(spec: AggregatorSpec, name: str | None = None, **overrides: Any) -> Entry:
    norm = overrides.get("norm", "fro") if spec.never_worse_than_fedit else None
    return Entry(
        name=name or spec.name,
        run=_library(spec, MappingProxyType(overrides)),
        exact=spec.exact,
        optimal=spec.optimal,
        never_worse_than_fedit=spec.never_worse_than_fedit,
        shared_A=spec.shared_A,
        floor=spec.floor,
        norm=norm,
    )


def _dense_svd(inputs: Inputs, options: Mapping[str, Any], layers: Sequence[str] | None) -> Result:
    return ref.dense_svd_flexlora(inputs.free, layers=layers), {}


def _dense_sgd(norm: ref.Norm) -> Runner:
    def run(inputs: Inputs, options: Mapping[str, Any], layers: Sequence[str] | None) -> Result:
        return ref.dense_sgd_lora_fair(
            inputs.free,
            lam=float(options.get("lam", 0.01)),
            norm=norm,
            similarity=options.get("similarity", "flat"),
            lr=float(options.get("sgd_lr", 0.01)),
            max_steps=int(options.get("sgd_max_steps", 1000)),
            time_budget_s=options.get("sgd_time_budget"),
            layers=layers,
            sync=inputs.device.type == "cuda",
        )

    return run


def _build() -> dict[str, Entry]:
    out = {s.name: _from_spec(s) for s in registry.specs()}
    fair = registry.get("lora_fair")
    sq = _from_spec(fair, "lora_fair_sq", norm="fro_squared")
    out["lora_fair_sq"] = sq
    flex = out["flexlora"]
    out["dense_svd"] = flex._replace(
        name="dense_svd", run=_dense_svd, dense=True, reproduces=flex.name
    )
    norms: tuple[tuple[Entry, Literal["fro", "fro_squared"]], ...] = (
        (out["lora_fair"], "fro"),
        (sq, "fro_squared"),
    )
    for base, norm in norms:
        name = "dense_sgd" + base.name.removeprefix("lora_fair")
        # SGD descends from FedIT's point but promises nothing: no guarantee is claimed for it
        out[name] = base._replace(
            name=name,
            run=_dense_sgd(norm),
            never_worse_than_fedit=False,
            dense=True,
            reproduces=base.name,
        )
    return out


_TABLE: dict[str, Entry] = _build()
_ENTRIES: Mapping[str, Entry] = MappingProxyType(_TABLE)


def names() -> tuple[str, ...]:
    """Every entry: the registry's aggregators, ``lora_fair_sq``, then the dense references."""
    return tuple(_ENTRIES)


def entries() -> tuple[Entry, ...]:
    return tuple(_ENTRIES.values())


def get(name: str) -> Entry:
    try:
        return _ENTRIES[name]
    except KeyError:
        raise KeyError(f"unknown aggregator {name!r}; choose from {', '.join(_ENTRIES)}") from None

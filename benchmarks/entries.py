"""What the benchmarks run: the registered aggregators, their variants and the dense references.

All read off :mod:`lorafair.registry` by its fields, so that a new method gets its rows by its
registry entry alone:

- every registered aggregator (:func:`lorafair.bench.library`);
- ``<name>_sq`` for every method that is ``never_worse_than_fedit`` (the LoRA-FAIR objective),
  with ``norm="fro_squared"``;
- ``dense_svd``: the dense truncated SVD of ΔW, reproducing the first ``optimal`` method with a
  fixed rank (no ``rank`` policy among its defaults);
- ``dense_sgd`` / ``dense_sgd_sq``: the paper-style SGD on the objective, reproducing each
  ``never_worse_than_fedit`` method and its ``_sq`` variant.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from benchmarks import references as ref
from lorafair import registry
from lorafair.bench import Entry, Inputs, Norm, Result, Runner, from_spec, library

__all__ = ["Entry", "Result", "entries", "get", "names"]

_SQUARED: Norm = "fro_squared"


def _dense_svd(inputs: Inputs, options: Mapping[str, Any], layers: Sequence[str] | None) -> Result:
    out = ref.dense_svd_flexlora(inputs.free, layers=layers)
    return out, {}


def _dense_sgd(norm: Norm) -> Runner:
    def run(inputs: Inputs, options: Mapping[str, Any], layers: Sequence[str] | None) -> Result:
        out, info = ref.dense_sgd_lora_fair(
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
        return out, dict(info)

    return run


def _build() -> dict[str, Entry]:
    out = {e.name: e for e in library()}
    fair = [s for s in registry.specs() if s.never_worse_than_fedit]
    for spec in fair:
        sq = from_spec(spec, spec.name + "_sq", norm=_SQUARED)
        out[sq.name] = sq
    svd = next(s for s in registry.specs() if s.optimal and "rank" not in s.defaults)
    out["dense_svd"] = out[svd.name]._replace(
        name="dense_svd", run=_dense_svd, dense=True, reproduces=svd.name
    )
    for spec in fair:
        for base in (out[spec.name], out[spec.name + "_sq"]):
            assert base.norm is not None
            name = "dense_sgd" + base.name.removeprefix(spec.name)
            # SGD descends from FedIT's point but promises nothing: no guarantee is claimed for it
            out[name] = base._replace(
                name=name,
                run=_dense_sgd(base.norm),
                never_worse_than_fedit=False,
                dense=True,
                reproduces=base.name,
            )
    return out


_TABLE: dict[str, Entry] = _build()
_ENTRIES: Mapping[str, Entry] = MappingProxyType(_TABLE)


def names() -> tuple[str, ...]:
    """Every entry: the registry's aggregators, the ``_sq`` variants, then the dense references."""
    return tuple(_ENTRIES)


def entries() -> tuple[Entry, ...]:
    return tuple(_ENTRIES.values())


def get(name: str) -> Entry:
    try:
        return _ENTRIES[name]
    except KeyError:
        raise KeyError(f"unknown aggregator {name!r}; choose from {', '.join(_ENTRIES)}") from None

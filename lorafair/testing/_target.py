"""What :func:`lorafair.testing.check_aggregator` checks: the function, its claims, its update.

Shared by the conformance checks (:mod:`lorafair.testing._conformance`) and the Hypothesis
properties (:mod:`lorafair.testing._properties`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lorafair.testing._reference import Objective, input_scale
from lorafair.types import LoRAFactors

Adapter = Mapping[str, "LoRAFactors | tuple[Tensor, Tensor]"]
Update = Callable[[Any], "Adapter | Sequence[Adapter]"]

# Every tolerance of the checks, relative to the size of the terms ΔW sums
# (Σ p_k ‖B_k‖_F ‖A_k‖_F, see _reference.input_scale), by the dtype the function computed in:
# about 10⁷ float64 roundings and 100 of the narrower dtypes, so that a correct method that
# forms products, QRs or SVDs passes and a biased one (off by O(1) of ΔW) does not.
RTOL: Mapping[torch.dtype, float] = {
    torch.float64: 1e-9,
    torch.float32: 1e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 1e-1,
}
# Objective values (cosines in [−1, 1] plus λ·reg) compared absolutely, relative to 1 + |f|:
# never worse than FedIT within OBJECTIVE_SLACK; equal (invariances) within OBJECTIVE_RTOL,
# looser, since a solver's iterates may stop at a different point of a flat minimum.
OBJECTIVE_SLACK = 1e-9
OBJECTIVE_RTOL = 1e-7
# A LoRAFairError stands in for a finite result only where the result may honestly overflow the
# dtype: Σ p_k ‖B_k‖_F ‖A_k‖_F (which bounds ‖ΔW‖_2, hence the SVD factors a method may
# return) of some layer above this fraction of the dtype's largest finite value.
OVERFLOW_FRACTION = 2.0**-8


class Claims(NamedTuple):
    """What the function promises (named like :class:`lorafair.registry.AggregatorSpec`)."""

    exact: bool
    optimal: bool
    never_worse_than_fedit: bool
    shared_A: bool
    equal_ranks: bool
    personalised: bool


class Target(NamedTuple):
    """The function under test, called as ``fn(clients, weights)``, and what it claims."""

    name: str
    fn: Callable[..., Any]
    claims: Claims
    update: Update | None
    objective: Objective


def tensors(x: object) -> Iterator[Tensor]:
    """Every tensor in a result: NamedTuples, mappings, tuples and lists walked; numbers skipped."""
    if isinstance(x, Tensor):
        yield x
    elif isinstance(x, Mapping):
        for v in x.values():
            yield from tensors(v)
    elif isinstance(x, tuple | list):
        for v in x:
            yield from tensors(v)


def _adapter(x: object, where: str) -> dict[str, tuple[Tensor, Tensor]]:
    if not isinstance(x, Mapping):
        raise AssertionError(
            f"{where} is a {type(x).__name__}, not a mapping of layer name to (A, B); "
            "pass update= to say how to read the update from the result"
        )
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for name, value in x.items():
        ok = isinstance(value, Sequence) and len(value) == 2
        if not ok or not all(isinstance(t, Tensor) and t.ndim == 2 for t in value):
            raise AssertionError(f"{where}, layer {name!r}: not a pair (A, B) of 2-D tensors")
        out[name] = (value[0], value[1])
    return out


def updates(target: Target, result: object) -> list[dict[str, tuple[Tensor, Tensor]]]:
    """The adapter(s) whose ``B @ A`` the clients apply: one global update, or one per client.

    ``target.update`` maps the result to them; by default a global update is the result itself
    and per-client adapters are ``result.adapters`` (as :class:`lorafair.types.FedSAResult`).
    """
    if target.claims.personalised:
        per_client: object = (
            target.update(result)
            if target.update is not None
            else getattr(result, "adapters", result)
        )
        if not isinstance(per_client, Sequence):
            raise AssertionError(
                f"a personalised result must give one adapter per client, got "
                f"{type(per_client).__name__}; pass update="
            )
        return [_adapter(a, f"client {k}'s adapter") for k, a in enumerate(per_client)]
    update = result if target.update is None else target.update(result)
    return [_adapter(update, "the result")]


def fits(
    clients: Sequence[Adapter], adapters: list[dict[str, tuple[Tensor, Tensor]]]
) -> list[dict[str, tuple[Tensor, Tensor]]]:
    """Assert that every adapter has the clients' layers with shapes that fit; return them."""
    first = clients[0]
    for adapter in adapters:
        if set(adapter) != set(first):
            raise AssertionError(
                f"result layers {sorted(adapter)} differ from the clients' {sorted(first)}"
            )
        for name, (A, B) in adapter.items():
            d_in, d_out = first[name][0].shape[1], first[name][1].shape[0]
            if A.shape[1] != d_in or B.shape[0] != d_out or A.shape[0] != B.shape[1]:
                raise AssertionError(
                    f"layer {name!r}: result A {tuple(A.shape)} and B {tuple(B.shape)} do not "
                    f"fit the layer (d_out, d_in) = ({d_out}, {d_in})"
                )
    return adapters


def may_overflow(clients: Sequence[Adapter], weights: Sequence[float] | None) -> bool:
    """Whether a LoRAFairError may stand in for a finite result (see ``OVERFLOW_FRACTION``)."""
    dtype = next(iter(clients[0].values()))[0].dtype
    limit = OVERFLOW_FRACTION * torch.finfo(dtype).max
    return any(input_scale(clients, weights, name) > limit for name in clients[0])


def run(target: Target, clients: Sequence[Adapter], weights: Sequence[float] | None) -> Any:
    """``fn(clients, weights)``."""
    return target.fn(clients, weights)


def describe(clients: Sequence[Adapter], weights: Sequence[float] | None) -> str:
    """Shapes and ranks of an input, layer by layer: ``'fc' (d_out, d_in) ranks [r_0, …]``."""
    if not clients:
        return "no clients"
    layers = []
    for name in clients[0]:
        A, B = clients[0][name]
        rs = [int(c[name][0].shape[0]) for c in clients]
        layers.append(f"{name!r} (d_out, d_in) = ({B.shape[0]}, {A.shape[1]}) ranks {rs}")
    w = "None (equal)" if weights is None else "[" + ", ".join(f"{x:g}" for x in weights) + "]"
    dtype = str(clients[0][next(iter(clients[0]))][0].dtype).replace("torch.", "")
    return f"{len(clients)} clients, {dtype}, weights {w}; " + "; ".join(layers)


def close(actual: Tensor, expected: Tensor, scale: float, dtype: torch.dtype) -> float | None:
    """``‖actual − expected‖_F`` if it exceeds ``RTOL[dtype]·(scale + ‖expected‖_F)``, else None."""
    err = float((actual.to(torch.float64) - expected.to(torch.float64)).norm())
    bound = RTOL.get(dtype, 1e-5) * (scale + float(expected.norm()))
    return None if err <= bound else err  # NaN fails

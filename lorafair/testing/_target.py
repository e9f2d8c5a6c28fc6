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
    watch_inputs: bool = True
    """Whether :func:`run` raises :class:`InputMutated` when a call changes its inputs."""


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


class InputMutated(AssertionError):
    """A call of the function changed its inputs (raised by :func:`run`, even when the call
    itself raised, which is then the ``__context__``); the message says what changed."""


def _where(path: tuple[object, ...]) -> str:
    root, *rest = path
    if root == "weights":
        return "the weights" if not rest else f"weight {rest[0]!r}"
    if not rest:
        return "the clients"
    if len(rest) == 1:
        return f"client {rest[0]!r}"
    if len(rest) == 2:
        return f"client {rest[0]!r}'s layer {rest[1]!r}"
    if len(rest) == 3 and rest[2] in (0, 1):
        return f"layer {rest[1]!r}: client {rest[0]!r}'s {'A' if rest[2] == 0 else 'B'}"
    return "the clients" + "".join(f"[{p!r}]" for p in rest)


class _Node(NamedTuple):
    """What one input object was before the call: a tensor's metadata and a copy of its
    values (``None`` on the meta device), or a container's children (key, object, node)."""

    meta: tuple[object, ...] | None
    values: Tensor | None
    children: tuple[tuple[object, object, _Node], ...] | None


def _snapshot(x: object) -> _Node:
    if isinstance(x, Tensor):
        meta = (tuple(x.shape), x.dtype, x.device)
        return _Node(meta, None if x.is_meta else x.detach().clone(), None)
    if isinstance(x, Mapping):
        return _Node(None, None, tuple((k, v, _snapshot(v)) for k, v in x.items()))
    if isinstance(x, list | tuple):
        return _Node(None, None, tuple((i, v, _snapshot(v)) for i, v in enumerate(x)))
    return _Node(None, None, None)  # a leaf (a number): its identity is checked by its parent


def _equal(a: Tensor, b: Tensor) -> bool:
    """Elementwise equal, NaN equal to NaN."""
    same = a == b
    if a.is_floating_point() or a.is_complex():
        same |= a.isnan() & b.isnan()
    return bool(same.all())


def _changed(node: _Node, x: object, path: tuple[object, ...]) -> str | None:
    """What changed in ``x`` since ``node`` was taken of it, or ``None``."""
    where = _where(path)
    if isinstance(x, Tensor):
        if node.meta != (tuple(x.shape), x.dtype, x.device):
            return (
                f"{where} was changed in place: {node.meta} → {(tuple(x.shape), x.dtype, x.device)}"
            )
        if node.values is not None and not _equal(node.values, x.detach()):
            return f"{where} was modified (its values changed in place)"
        return None
    if node.children is None:
        return None
    items: list[tuple[object, object]]
    if isinstance(x, Mapping):
        items = list(x.items())
    elif isinstance(x, list | tuple):
        items = list(enumerate(x))
    else:  # unreachable: the parent checks that the same object sits here
        return f"{where} is no longer a container"
    before = [k for k, _, _ in node.children]
    if isinstance(x, Mapping) and before != [k for k, _ in items]:
        return f"{where} changed keys: {before} → {[k for k, _ in items]}"
    if len(items) != len(before):
        return f"{where} changed length: {len(before)} → {len(items)}"
    for (key, obj, child), (_, now) in zip(node.children, items, strict=True):
        if now is not obj:
            return f"{_where((*path, key))} was replaced by another object"
        change = _changed(child, now, (*path, key))
        if change is not None:
            return change
    return None


def run(target: Target, clients: Sequence[Adapter], weights: Sequence[float] | None) -> Any:
    """``fn(clients, weights)``, the one way the checks and properties call the function.

    Unless ``target.watch_inputs`` is false, the inputs' structure (list lengths, dict keys,
    which object sits where) and tensors (shape, dtype, device and values; metadata only on
    the meta device) are copied before the call and compared after it, also when it raises:
    any change raises :class:`InputMutated` saying what changed. This costs a copy of the
    input tensors per call.
    """
    if not target.watch_inputs:
        return target.fn(clients, weights)
    before = _snapshot(clients), _snapshot(weights)
    try:
        return target.fn(clients, weights)
    finally:
        change = _changed(before[0], clients, ("clients",)) or _changed(
            before[1], weights, ("weights",)
        )
        if change is not None:
            raise InputMutated(change)


def run_valid(target: Target, clients: Sequence[Adapter], weights: Sequence[float] | None) -> Any:
    """:func:`run` on a valid input: raising is a failure (an ``AssertionError`` naming the
    exception), except :class:`InputMutated`, which passes through to be reported as such."""
    try:
        return run(target, clients, weights)
    except InputMutated:
        raise
    except Exception as exc:
        raise AssertionError(f"raised {type(exc).__name__} on a valid input: {exc}") from exc


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

"""The conformance checks of :func:`lorafair.testing.check_aggregator`: fixed inputs, no Hypothesis.

Each check is a function ``(target) -> None`` that raises ``AssertionError`` with what it saw;
``CHECKS`` names them in the order they run. The inputs: three clients, two layers
``'blocks.0.attn.qkv'`` (12 × 4) and ``'blocks.0.mlp.fc1'`` (6 × 10), rank 3, float32, one
shared ``A`` per layer when the function claims ``shared_A`` (distinct ones otherwise).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lorafair.errors import LoRAFairError
from lorafair.testing._reference import product, singular_tail
from lorafair.testing._target import (
    InputMutated,
    Target,
    close,
    fits,
    may_overflow,
    run,
    run_valid,
    tensors,
    updates,
)
from lorafair.types import LoRAFactors

QKV, FC1 = "blocks.0.attn.qkv", "blocks.0.mlp.fc1"
_SHAPES = {QKV: (12, 4), FC1: (6, 10)}
_RANK = 3

Clients = list[dict[str, Any]]


def make_clients(
    *,
    k: int = 3,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    shared_A: bool = False,
    zero_B: bool = False,
) -> list[dict[str, LoRAFactors]]:
    """``k`` clients on :data:`_SHAPES` at rank 3 with Gaussian entries from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    shared = {n: torch.randn(_RANK, d_in, generator=g) for n, (_, d_in) in _SHAPES.items()}
    out: list[dict[str, LoRAFactors]] = []
    for _ in range(k):
        client = {}
        for n, (d_out, d_in) in _SHAPES.items():
            A = shared[n] if shared_A else torch.randn(_RANK, d_in, generator=g)
            B = torch.randn(d_out, _RANK, generator=g) * (0.0 if zero_B else 1.0)
            client[n] = LoRAFactors(
                A.to(dtype=dtype, device=device).clone(), B.to(dtype=dtype, device=device)
            )
        out.append(client)
    return out


def _base(target: Target, **kwargs: Any) -> list[dict[str, LoRAFactors]]:
    return make_clients(shared_A=target.claims.shared_A, **kwargs)


def _with_layer(
    clients: Sequence[Mapping[str, Any]],
    k: int,
    name: str,
    A: Tensor | None = None,
    B: Tensor | None = None,
) -> Clients:
    out = [dict(c) for c in clients]
    A0, B0 = out[k][name]
    out[k][name] = (A0 if A is None else A, B0 if B is None else B)
    return out


def _finite(result: object) -> None:
    for t in tensors(result):
        if not bool(torch.isfinite(t).all()):
            raise AssertionError(f"the result holds NaN or Inf (a {tuple(t.shape)} tensor)")


def _same_products(
    got: list[dict[str, tuple[Tensor, Tensor]]],
    expected: list[dict[str, tuple[Tensor, Tensor]]],
    what: str,
) -> None:
    if len(got) != len(expected):
        raise AssertionError(f"{what}: {len(got)} adapters, expected {len(expected)}")
    for a, b in zip(got, expected, strict=True):
        for name in b:
            P, Q = product(*a[name]), product(*b[name])
            err = close(P, Q, 1.0, torch.float32)
            if err is not None:
                raise AssertionError(
                    f"{what}: layer {name!r}: B @ A differs by ‖·‖_F = {err:.3g} (its norm "
                    f"{float(Q.norm()):.3g})"
                )


# ---- the checks that apply to any aggregator ----


def dtype_device(target: Target) -> None:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            clients = _base(target, dtype=dtype, device=device)
            try:
                result = run(target, clients, [1.0, 2.0, 3.0])
            except InputMutated:
                raise
            except Exception as exc:
                if isinstance(exc, LoRAFairError) and may_overflow(clients, [1.0, 2.0, 3.0]):
                    continue  # the honest alternative to a result that overflows the dtype
                raise AssertionError(
                    f"{dtype} on {device}: raised {type(exc).__name__} on a valid input: {exc}"
                ) from exc
            for t in tensors(result):
                if t.dtype != dtype or t.device.type != torch.device(device).type:
                    raise AssertionError(
                        f"{dtype} input on {device} gave a {t.dtype} result tensor "
                        f"{tuple(t.shape)} on {t.device}"
                    )
            _finite(result)
            fits(clients, updates(target, result))


def no_mutation(target: Target) -> None:
    """One call on three clients; :func:`run` compares the inputs before and after it (as it
    does for every call of the suite, which reports a change under this check's name)."""
    run_valid(target, _base(target), [1.0, 0.0, 2.0])


def _storage(t: Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.data_ptr() + storage.nbytes()


def no_aliasing(target: Target) -> None:
    """No result tensor's storage overlaps an input tensor's, on three clients with weights
    ``[1, 0, 2]`` and ``[0, 1, 0]`` (one positive weight) and on one client."""
    for k, weights in ((3, [1.0, 0.0, 2.0]), (3, [0.0, 1.0, 0.0]), (1, None)):
        clients = _base(target, k=k)
        result = run_valid(target, clients, weights)
        inputs = [
            (_storage(t), (i, name, label))
            for i, c in enumerate(clients)
            for name, f in c.items()
            for label, t in zip("AB", f, strict=True)
        ]
        for t in tensors(result):
            start, end = _storage(t)
            for (s0, e0), (i, name, label) in inputs:
                if start < e0 and s0 < end:
                    raise AssertionError(
                        f"{k} clients, weights {weights}: a result tensor {tuple(t.shape)} "
                        f"shares memory with client {i}'s {label} of layer {name!r} (return a "
                        "copy, or a later in-place update corrupts the input)"
                    )


def deterministic(target: Target) -> None:
    clients = _base(target, seed=3)
    first = list(tensors(run_valid(target, clients, [3.0, 1.0, 1.0])))
    second = list(tensors(run_valid(target, clients, [3.0, 1.0, 1.0])))
    if len(first) != len(second):
        raise AssertionError(f"two calls gave {len(first)} and {len(second)} tensors")
    for a, b in zip(first, second, strict=True):
        if a.shape != b.shape or not torch.equal(a, b):
            raise AssertionError(
                f"two calls on the same input differ (a {tuple(a.shape)} result tensor)"
            )


def plain_tuples(target: Target) -> None:
    clients = tuple({n: (f.A, f.B) for n, f in c.items()} for c in _base(target))
    fits(list(clients), updates(target, run_valid(target, clients, None)))


def zero_update(target: Target) -> None:
    clients = _base(target, zero_B=True)
    result = run_valid(target, clients, None)
    _finite(result)
    for adapter in fits(clients, updates(target, result)):
        for name, (A, B) in adapter.items():
            if bool((product(A, B) != 0).any()):
                raise AssertionError(f"layer {name!r}: ΔW = 0 but B @ A is not zero")


def one_client(target: Target) -> None:
    clients = _base(target, k=1)
    for adapter in fits(clients, updates(target, run_valid(target, clients, None))):
        for name, (A, B) in adapter.items():
            P, Q = product(A, B), product(*clients[0][name])
            err = float((P - Q).norm())
            # An optimal method may keep a lower rank (e.g. chosen by energy): the best of it.
            allowed = singular_tail(Q, A.shape[0]) if target.claims.optimal else 0.0
            if err > allowed + 1e-5 * (1.0 + float(Q.norm())):
                raise AssertionError(
                    f"layer {name!r}: one client's update B_0 @ A_0 came back off by "
                    f"‖·‖_F = {err:.3g} (allowed {allowed:.3g})"
                )


def zero_weight(target: Target) -> None:
    clients = _base(target, seed=5)
    with_zero = fits(clients, updates(target, run_valid(target, clients, [1.0, 0.0, 1.0])))
    without = updates(target, run_valid(target, [clients[0], clients[2]], [1.0, 1.0]))
    if target.claims.personalised:  # the zero-weight client still gets an adapter; drop it
        with_zero = [with_zero[0], with_zero[2]]
    _same_products(with_zero, without, "weights [1, 0, 1] against the client dropped")


def shared_A(target: Target) -> None:
    clients = _with_layer(_base(target), 2, FC1, A=torch.randn(_RANK, 10))
    if target.claims.shared_A:
        _raises(target, clients, None, FC1, 2)
    else:
        fits(clients, updates(target, run_valid(target, clients, None)))


def equal_ranks(target: Target) -> None:
    clients = _with_layer(_base(target), 1, QKV, A=torch.randn(2, 4), B=torch.randn(12, 2))
    if target.claims.shared_A:  # the frozen A is shared: client 1 uses its first two rows
        clients = _with_layer(clients, 1, QKV, A=clients[0][QKV][0][:2].clone())
    if target.claims.equal_ranks:
        _raises(target, clients, None, QKV, 1)
    else:
        fits(clients, updates(target, run_valid(target, clients, None)))


# ---- bad input: a ValueError that names the layer, and the client where there is one ----


def _raises(
    target: Target,
    clients: object,
    weights: Any,
    layer: str | None,
    client: int | None,
) -> None:
    try:
        run(target, clients, weights)  # type: ignore[arg-type]
    except ValueError as exc:
        message = str(exc)
        if layer is not None and layer not in message:
            raise AssertionError(
                f"the ValueError does not name layer {layer!r}: {message!r}"
            ) from exc
        if client is not None and not re.search(rf"\bclient {client}\b", message):
            raise AssertionError(
                f"the ValueError does not name 'client {client}': {message!r}"
            ) from exc
        return
    except Exception as exc:
        if isinstance(exc, InputMutated):
            raise
        raise AssertionError(f"raised {type(exc).__name__} instead of a ValueError: {exc}") from exc
    raise AssertionError("returned instead of raising a ValueError")


class _Bad(NamedTuple):
    """One bad input: how to build it from valid clients, and what its error must name."""

    build: Callable[[list[dict[str, LoRAFactors]]], tuple[object, Any]]
    layer: str | None
    client: int | None


def _non_finite(value: float, which: int) -> Callable[[Clients], tuple[object, Any]]:
    def build(clients: Clients) -> tuple[object, Any]:
        pair = [t.clone() for t in clients[2][FC1]]
        pair[which][0, 1] = value
        return _with_layer(clients, 2, FC1, A=pair[0], B=pair[1]), None

    return build


def _missing(clients: Clients) -> tuple[object, Any]:
    out = [dict(c) for c in clients]
    del out[2][FC1]
    return out, None


def _extra(clients: Clients) -> tuple[object, Any]:
    out = [dict(c) for c in clients]
    out[1]["head"] = out[1][FC1]
    return out, None


def _not_a_pair(clients: Clients) -> tuple[object, Any]:
    out = [dict(c) for c in clients]
    out[0][QKV] = torch.randn(3, 4)
    return out, None


def _dtype(clients: Clients) -> tuple[object, Any]:
    A, B = clients[1][QKV]
    return _with_layer(clients, 1, QKV, A=A.double(), B=B.double()), None


def _integer(clients: Clients) -> tuple[object, Any]:
    A, B = clients[0][QKV]
    return _with_layer(clients, 0, QKV, A=A.long(), B=B.long()), None


def _meta(clients: Clients) -> tuple[object, Any]:
    A, B = clients[1][QKV]
    return _with_layer(clients, 1, QKV, A=A.to("meta"), B=B.to("meta")), None


def _weights(weights: list[Any]) -> Callable[[Clients], tuple[object, Any]]:
    return lambda clients: (clients, weights)


BAD_INPUTS: Mapping[str, _Bad] = {
    "empty_clients": _Bad(lambda c: ([], None), None, None),
    "client_without_layers": _Bad(lambda c: ([{}], None), None, None),
    "mapping_not_list": _Bad(lambda c: (c[0], None), None, None),
    "missing_layer": _Bad(_missing, FC1, 2),
    "extra_layer": _Bad(_extra, "head", 1),
    "rank_mismatch_in_client": _Bad(
        lambda c: (_with_layer(c, 1, QKV, B=torch.randn(12, 2)), None), QKV, 1
    ),
    "d_in_mismatch": _Bad(lambda c: (_with_layer(c, 2, QKV, A=torch.randn(3, 5)), None), QKV, 2),
    "d_out_mismatch": _Bad(lambda c: (_with_layer(c, 1, FC1, B=torch.randn(7, 3)), None), FC1, 1),
    "one_dimensional": _Bad(lambda c: (_with_layer(c, 1, QKV, A=torch.randn(12)), None), QKV, 1),
    "three_dimensional": _Bad(
        lambda c: (_with_layer(c, 1, QKV, A=torch.randn(1, 3, 4)), None), QKV, 1
    ),
    "not_a_pair": _Bad(_not_a_pair, QKV, 0),
    "nan_in_A": _Bad(_non_finite(float("nan"), 0), FC1, 2),
    "nan_in_B": _Bad(_non_finite(float("nan"), 1), FC1, 2),
    "inf_in_A": _Bad(_non_finite(float("inf"), 0), FC1, 2),
    "inf_in_B": _Bad(_non_finite(float("inf"), 1), FC1, 2),
    "neg_inf_in_A": _Bad(_non_finite(-float("inf"), 0), FC1, 2),
    "neg_inf_in_B": _Bad(_non_finite(-float("inf"), 1), FC1, 2),
    "negative_weight": _Bad(_weights([1.0, -1.0, 1.0]), None, 1),
    "nan_weight": _Bad(_weights([1.0, float("nan"), 1.0]), None, 1),
    "inf_weight": _Bad(_weights([1.0, 1.0, float("inf")]), None, 2),
    "all_zero_weights": _Bad(_weights([0.0, 0.0, 0.0]), None, None),
    "wrong_number_of_weights": _Bad(_weights([1.0, 1.0]), None, None),
    "non_numeric_weight": _Bad(_weights(["a", 1.0, 1.0]), None, None),
    "dtype_mismatch": _Bad(_dtype, QKV, 1),
    "integer_dtype": _Bad(_integer, QKV, 0),
    "device_mismatch": _Bad(_meta, QKV, 1),
}


def _bad_input(bad: _Bad) -> Callable[[Target], None]:
    def check(target: Target) -> None:
        clients, weights = bad.build(_base(target))
        _raises(target, clients, weights, bad.layer, bad.client)

    return check


class Check(NamedTuple):
    """A conformance check: what it asserts (for the report and the error) and how."""

    doc: str
    run: Callable[[Target], None]


CHECKS: Mapping[str, Check] = {
    "dtype_device": Check("each dtype and device in, the same out, finite", dtype_device),
    "no_mutation": Check("the inputs are not modified", no_mutation),
    "no_aliasing": Check("no result tensor shares memory with an input", no_aliasing),
    "deterministic": Check("two calls on one input give identical results", deterministic),
    "plain_tuples": Check("a tuple of dicts of plain (A, B) tuples is accepted", plain_tuples),
    "zero_update": Check("ΔW = 0 gives a finite, zero update", zero_update),
    "one_client": Check("one client gets its own update back", one_client),
    "zero_weight": Check("a zero-weight client is ignored", zero_weight),
    "shared_A": Check(
        "clients whose A differ: a ValueError naming layer and client if shared_A is "
        "claimed, accepted otherwise",
        shared_A,
    ),
    "equal_ranks": Check(
        "clients of different ranks: a ValueError naming layer and client if equal_ranks "
        "is claimed, accepted otherwise",
        equal_ranks,
    ),
    **{
        f"bad_input.{case}": Check(
            f"{case.replace('_', ' ')}: a ValueError naming"
            + (f" layer {bad.layer!r}" if bad.layer else "")
            + (" and" if bad.layer and bad.client is not None else "")
            + (f" client {bad.client}" if bad.client is not None else "")
            + ("" if bad.layer or bad.client is not None else " the problem"),
            _bad_input(bad),
        )
        for case, bad in BAD_INPUTS.items()
    },
}

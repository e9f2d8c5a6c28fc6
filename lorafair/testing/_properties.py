"""The Hypothesis properties of :func:`lorafair.testing.check_aggregator` (needs ``hypothesis``).

Each property is a function ``(target, example) -> None`` raising ``AssertionError``; the
examples come from :func:`lorafair.testing.strategies.seeded_clients` and
:func:`~lorafair.testing.strategies.weights`, drawn to fit the function's claims (a shared
``A`` when it claims ``shared_A``, equal ranks when it claims ``equal_ranks``).
:func:`run_property` runs one property under ``@given`` and, on failure, reports the smallest
example Hypothesis shrank to: its seed, shapes, ranks and weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

from lorafair.errors import LoRAFairError
from lorafair.testing import _reference as ref
from lorafair.testing import strategies as lst
from lorafair.testing._target import (
    OBJECTIVE_RTOL,
    OBJECTIVE_SLACK,
    RTOL,
    Claims,
    InputMutated,
    Target,
    describe,
    fits,
    may_overflow,
    run,
    run_valid,
    tensors,
    updates,
)
from lorafair.types import LoRAFactors

_F64 = torch.float64
_Adapters = list[dict[str, tuple[Tensor, Tensor]]]


class Example(NamedTuple):
    """One drawn input: clients (with the seed of their entries), weights, and the client
    permutation and weight factor that the invariance properties apply."""

    seed: int
    clients: list[dict[str, LoRAFactors]]
    weights: list[float] | None
    permutation: list[int]
    factor: float

    def describe(self) -> str:
        return (
            f"seed {self.seed}: {describe(self.clients, self.weights)}; "
            f"permutation {self.permutation}, weight factor {self.factor:g}"
        )


@st.composite
def examples(draw: st.DrawFn, /, claims: Claims, dtypes: Sequence[torch.dtype]) -> Example:
    """Clients, weights, a permutation and a factor that fit the claims."""
    dtype = draw(st.sampled_from(list(dtypes)))
    drawn = draw(
        lst.seeded_clients(equal_ranks=claims.equal_ranks, shared_A=claims.shared_A, dtype=dtype)
    )
    k = len(drawn.clients)
    weights = None if draw(st.booleans()) else draw(lst.weights(k))
    permutation = draw(st.permutations(range(k)))
    factor = draw(st.sampled_from([1e-3, 0.5, 7.0, 1e4]))
    return Example(drawn.seed, drawn.clients, weights, permutation, factor)


def _call(target: Target, clients: Sequence[Any], weights: Sequence[float] | None) -> _Adapters:
    return fits(clients, updates(target, run_valid(target, clients, weights)))


def _tolerance(ex: Example, name: str, dW: Tensor) -> float:
    dtype = ex.clients[0][name].A.dtype
    return RTOL.get(dtype, 1e-5) * (
        ref.input_scale(ex.clients, ex.weights, name) + float(dW.norm())
    )


def _same(target: Target, ex: Example, got: _Adapters, expected: _Adapters, what: str) -> None:
    """Two results of one problem agree: their updates ``B @ A``; for an ``optimal`` method
    their Eckart–Young errors, and for a ``never_worse_than_fedit`` one their objectives (the
    minimiser of either need not be unique, e.g. under ties of σ_r)."""
    if len(got) != len(expected):
        raise AssertionError(f"{what}: {len(got)} adapters, expected {len(expected)}")
    for a, b in zip(got, expected, strict=True):
        for name in b:
            dW = ref.delta_w(ex.clients, ex.weights, name)
            tol = _tolerance(ex, name, dW)
            if target.claims.optimal:
                e1 = float((ref.product(*a[name]) - dW).norm())
                e2 = float((ref.product(*b[name]) - dW).norm())
                if not abs(e1 - e2) <= tol:
                    raise AssertionError(
                        f"{what}: layer {name!r}: ‖B @ A − ΔW‖_F is {e1:.6g}, not {e2:.6g}"
                    )
            elif target.claims.never_worse_than_fedit:
                f1 = ref.fair_objective(ex.clients, ex.weights, name, a[name], target.objective)
                f2 = ref.fair_objective(ex.clients, ex.weights, name, b[name], target.objective)
                if not abs(f1 - f2) <= OBJECTIVE_RTOL * (1.0 + abs(f2)):
                    raise AssertionError(
                        f"{what}: layer {name!r}: the LoRA-FAIR objective is {f1:.9g}, not {f2:.9g}"
                    )
            else:
                P, Q = ref.product(*a[name]), ref.product(*b[name])
                err = float((P - Q).norm())
                if not err <= tol:
                    raise AssertionError(
                        f"{what}: layer {name!r}: B @ A differs by ‖·‖_F = {err:.3g} "
                        f"(tolerance {tol:.3g}, ‖B @ A‖_F = {float(Q.norm()):.3g})"
                    )


def permutation_invariance(target: Target, ex: Example) -> None:
    perm = ex.permutation
    out = _call(target, ex.clients, ex.weights)
    weights = None if ex.weights is None else [ex.weights[i] for i in perm]
    shuffled = _call(target, [ex.clients[i] for i in perm], weights)
    if target.claims.personalised:  # client i of the shuffled call is client perm[i]
        out = [out[i] for i in perm]
    _same(target, ex, shuffled, out, f"clients reordered by {perm}")


def weight_scale_invariance(target: Target, ex: Example) -> None:
    weights = ex.weights if ex.weights is not None else [1.0] * len(ex.clients)
    out = _call(target, ex.clients, weights)
    scaled = _call(target, ex.clients, [w * ex.factor for w in weights])
    _same(target, ex, scaled, out, f"every weight times {ex.factor:g}")


def none_means_equal_weights(target: Target, ex: Example) -> None:
    equal = _call(target, ex.clients, [1.0] * len(ex.clients))
    default = _call(target, ex.clients, None)
    _same(target, ex, default, equal, "weights=None against equal weights")


def exact(target: Target, ex: Example) -> None:
    (out,) = _call(target, ex.clients, ex.weights)
    for name, (A, B) in out.items():
        dW = ref.delta_w(ex.clients, ex.weights, name)
        err = float((ref.product(A, B) - dW).norm())
        tol = _tolerance(ex, name, dW)
        if not err <= tol:
            raise AssertionError(
                f"layer {name!r}: ‖B @ A − ΔW‖_F = {err:.3g} > {tol:.3g} "
                f"(‖ΔW‖_F = {float(dW.norm()):.3g})"
            )


def optimal(target: Target, ex: Example) -> None:
    (out,) = _call(target, ex.clients, ex.weights)
    for name, (A, B) in out.items():
        dW = ref.delta_w(ex.clients, ex.weights, name)
        err = float((ref.product(A, B) - dW).norm())
        best = ref.singular_tail(dW, A.shape[0])
        tol = _tolerance(ex, name, dW)
        if not err <= best + tol:
            raise AssertionError(
                f"layer {name!r}: ‖B @ A − ΔW‖_F = {err:.6g} at rank {A.shape[0]}, but the "
                f"truncated SVD of ΔW reaches {best:.6g} (tolerance {tol:.3g})"
            )


def never_worse_than_fedit(target: Target, ex: Example) -> None:
    (out,) = _call(target, ex.clients, ex.weights)
    for name, pair in out.items():
        mine = ref.fair_objective(ex.clients, ex.weights, name, pair, target.objective)
        fedit = ref.fair_objective(ex.clients, ex.weights, name, None, target.objective)
        if not mine <= fedit + OBJECTIVE_SLACK * (1.0 + abs(fedit)):
            raise AssertionError(
                f"layer {name!r}: LoRA-FAIR objective {mine:.12g} above FedIT's {fedit:.12g} "
                f"({target.objective})"
            )


def finite_output(target: Target, ex: Example) -> None:
    try:
        result = run(target, ex.clients, ex.weights)
    except InputMutated:
        raise
    except LoRAFairError as exc:
        if may_overflow(ex.clients, ex.weights):
            return  # the honest alternative to a result that overflows the dtype
        raise AssertionError(
            f"raised {type(exc).__name__} on a valid input that fits the dtype: {exc}"
        ) from exc
    except Exception as exc:
        raise AssertionError(f"raised {type(exc).__name__} on a valid input: {exc}") from exc
    dtype = ex.clients[0]["layer0"].A.dtype
    for t in tensors(result):
        if t.dtype != dtype:
            raise AssertionError(f"{dtype} input gave a {t.dtype} result tensor")
        if not bool(torch.isfinite(t).all()):
            raise AssertionError(
                f"finite {dtype} input gave NaN or Inf (raise a LoRAFairError if the result "
                "overflows the dtype)"
            )


class Property(NamedTuple):
    """A Hypothesis property: what it asserts, when it applies, its dtypes, and how."""

    doc: str
    applies: Callable[[Claims], bool]
    dtypes: tuple[torch.dtype, ...]
    run: Callable[[Target, Example], None]


def _always(claims: Claims) -> bool:
    return True


_ALL = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

PROPERTIES: Mapping[str, Property] = {
    "permutation_invariance": Property(
        "reordering the clients (and their weights) gives the same update",
        _always,
        (_F64,),
        permutation_invariance,
    ),
    "weight_scale_invariance": Property(
        "scaling every weight by one factor gives the same update",
        _always,
        (_F64,),
        weight_scale_invariance,
    ),
    "none_means_equal_weights": Property(
        "weights=None gives the update of equal weights", _always, (_F64,), none_means_equal_weights
    ),
    "finite_output": Property(
        "finite input gives a finite result in the input dtype, or a LoRAFairError where "
        "that may overflow",
        _always,
        _ALL,
        finite_output,
    ),
    "exact": Property(
        "B @ A == ΔW = Σ p_k B_k A_k to the dtype's tolerance",
        lambda c: c.exact,
        (_F64, torch.float32),
        exact,
    ),
    "optimal": Property(
        "‖B @ A − ΔW‖_F is the Eckart–Young optimum at the result's rank (dense SVD)",
        lambda c: c.optimal,
        (_F64,),
        optimal,
    ),
    "never_worse_than_fedit": Property(
        "the LoRA-FAIR objective of the result is not above FedIT's",
        lambda c: c.never_worse_than_fedit,
        (_F64,),
        never_worse_than_fedit,
    ),
}


class PropertyFailure(AssertionError):
    """A property failed; ``example`` describes the smallest counterexample Hypothesis found."""

    def __init__(self, detail: str, example: str) -> None:
        super().__init__(detail)
        self.detail = detail
        self.example = example


def profile_max_examples() -> int:
    """``max_examples`` of the loaded Hypothesis profile."""
    return int(settings().max_examples)


def run_property(prop: Property, target: Target, max_examples: int) -> None:
    """Run ``prop`` on ``max_examples`` examples (the loaded Hypothesis profile's other
    settings, e.g. ``derandomize``; no example database, no deadline)."""
    last = [""]

    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        report_multiple_bugs=False,
        print_blob=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(examples(target.claims, prop.dtypes))
    def body(ex: Example) -> None:
        last[0] = ex.describe()  # the last example run is the shrunk one Hypothesis reports
        prop.run(target, ex)

    try:
        body()
    except InputMutated as exc:
        raise InputMutated(f"{exc} (on {last[0]})") from exc
    except Exception as exc:
        raise PropertyFailure(f"{type(exc).__name__}: {exc}".strip(), last[0]) from exc

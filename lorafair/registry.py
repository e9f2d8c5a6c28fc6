"""One registry of aggregators: name → function, default options, and what each guarantees.

The benchmarks, the conformance suite and the example loop all read this table, so a new
method is added in one place: write the function in :mod:`lorafair.aggregate`, then add one
:class:`AggregatorSpec` to ``_SPECS`` below. Its optional ``reference`` and ``form`` link the
method to an independent float64 definition of its result (in :mod:`lorafair.testing`), which
the benchmarks check every layer against; without them a method is checked on its claims.

>>> from lorafair.registry import get, names
>>> "lora_fair" in names()
True
>>> get("flora").exact
True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from lorafair import aggregate
from lorafair.aggregate import EnergyThreshold, rolora_trained
from lorafair.types import FedExResult, LoRAFactors

__all__ = ["AggregatorSpec", "Floor", "Form", "Output", "Reference", "get", "names", "specs"]

Floor = Literal["memory", "gram"]
"""What bounds a method's cost from below: one read of its inputs, or the float64 Grams."""

Output = Literal["adapters", "adapters+residual", "per_client"]
"""What a method returns: ``dict[str, LoRAFactors]``; FedEx-LoRA's
:class:`~lorafair.types.FedExResult` (adapters plus a residual for the frozen weights); or
one adapter per client (:class:`~lorafair.types.FedSAResult`, personalised)."""


Reference = Callable[
    [Sequence[Mapping[str, LoRAFactors]], Sequence[float] | None, str],
    tuple[Tensor | None, Tensor | None],
]
"""``reference(clients, weights, name)``: an independent float64 definition of the factors a
method reports for layer ``name`` (:attr:`AggregatorSpec.update_factors`'s, or a personalised
method's client 0's adapter), ``None`` for a factor it does not define element-wise."""

Form = Callable[[Tensor, Tensor, float], str | None]
"""``form(A, B, tol)``: what is wrong with a result's stated form beyond its product (FedSVD:
``A`` with orthonormal rows), or ``None``."""


def _testing(attr: str) -> Any:
    """``lorafair.testing._reference.<attr>``, imported at its first use: the testing package
    imports this registry, and a run that checks nothing never loads it."""
    from lorafair.testing import _reference

    return getattr(_reference, attr)


def _reference(attr: str) -> Reference:
    """The float64 definition :mod:`lorafair.testing._reference` gives under ``attr``."""

    def reference(
        clients: Sequence[Mapping[str, LoRAFactors]], weights: Sequence[float] | None, name: str
    ) -> tuple[Tensor | None, Tensor | None]:
        fn: Reference = _testing(attr)
        return fn(clients, weights, name)

    reference.__name__ = reference.__qualname__ = attr
    return reference


def _form(attr: str) -> Form:
    """The stated-form check :mod:`lorafair.testing._reference` gives under ``attr``."""

    def form(A: Tensor, B: Tensor, tol: float) -> str | None:
        fn: Form = _testing(attr)
        return fn(A, B, tol)

    form.__name__ = form.__qualname__ = attr
    return form


def _as_is(out: Any) -> dict[str, LoRAFactors]:
    return dict(out)


def _adapters_plus_residual(out: Any) -> dict[str, LoRAFactors]:
    """FedEx-LoRA's update ``B̄Ā + B_res A_res`` as one factored pair (ranks concatenated)."""
    result: FedExResult = out
    return {
        name: LoRAFactors(
            torch.cat([A, result.residual[name].A], dim=0),
            torch.cat([B, result.residual[name].B], dim=1),
        )
        for name, (A, B) in result.adapters.items()
    }


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
    output: Output = "adapters"
    """The kind of result ``fn`` returns (see :data:`Output`)."""
    update_factors: Callable[[Any], dict[str, LoRAFactors]] | None = _as_is
    """Maps ``fn``'s result to factors whose ``B @ A`` is the global update the clients apply
    (FedEx-LoRA: adapters and residual concatenated); ``None`` for personalised methods."""
    personalised: bool = False
    """Each client ends the round with its own adapter; there is no single global update."""
    round_options: Callable[[int], Mapping[str, object]] | None = None
    """Options that follow the round (0-based index), merged over ``defaults``; e.g. RoLoRA's
    ``{"trained": rolora_trained(i)}``. ``None``: the options are the same every round."""
    secure_aggregation: bool = False
    """The server needs only sums over clients of client-computed quantities (e.g. ``Σ p_k B_k``
    and ``Σ p_k A_k``), so a secure-aggregation protocol that reveals only sums suffices.
    ``False``: it needs each client's factors (stacks, SVDs of ``ΔW``, per-client Grams)."""
    dp_clipping: bool = False
    """Flower's fixed-clipping DP wrappers (``DifferentialPrivacyServerSideFixedClipping`` /
    ``...ClientSideFixedClipping``) apply: with equal client ranks the result has the clients'
    shapes (the wrapper clips ``reply − global`` array by array) and is the whole download
    (nothing travels outside the noised ``ArrayRecord``)."""
    reference: Reference | None = None
    """An independent float64 definition of the reported factors (see :data:`Reference`), which
    the benchmarks compare every layer with; ``None``: the result is checked on its claims
    (``exact``, ``optimal``, ``never_worse_than_fedit``) alone."""
    form: Form | None = None
    """A stated form of the result beyond its product (see :data:`Form`); ``None``: none."""


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
    output: Output = "adapters",
    round_options: Callable[[int], Mapping[str, object]] | None = None,
    secure_aggregation: bool = False,
    reference: Reference | None = None,
    form: Form | None = None,
    dp_clipping: bool = False,
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
        output=output,
        update_factors={
            "adapters": _as_is,
            "adapters+residual": _adapters_plus_residual,
            "per_client": None,
        }[output],
        personalised=output == "per_client",
        round_options=round_options,
        secure_aggregation=secure_aggregation,
        reference=reference,
        form=form,
        dp_clipping=dp_clipping,
    )


def _rolora_round(round_index: int) -> Mapping[str, object]:
    return {"trained": rolora_trained(round_index)}


_SPECS: tuple[AggregatorSpec, ...] = (
    _spec(
        "fedit",
        aggregate.fedit,
        "average A and B separately (biased)",
        secure_aggregation=True,
        dp_clipping=True,
        reference=_reference("fedit_factors"),
    ),
    _spec(
        "ffa_lora",
        aggregate.ffa_lora,
        "A frozen and shared; average B (exact)",
        exact=True,
        shared_A=True,
        secure_aggregation=True,
        dp_clipping=True,
        reference=_reference("ffa_lora_factors"),
    ),
    _spec(
        "flora",
        aggregate.flora,
        "stack every client's factors along the rank axis (exact, rank Σ r_k)",
        exact=True,
        equal_ranks=False,
        reference=_reference("flora_factors"),
    ),
    _spec(
        "flexlora",
        aggregate.flexlora,
        "truncated SVD of ΔW, factored (optimal at its rank)",
        optimal=True,
        equal_ranks=False,
        floor="gram",
        dp_clipping=True,
    ),
    _spec(
        "lora_fair",
        aggregate.lora_fair,
        "keep Ā, correct B̄ by the residual that best aligns (B̄+ΔB)Ā with ΔW",
        defaults={"lam": 0.01},
        never_worse_than_fedit=True,
        equal_ranks=False,
        floor="gram",
        dp_clipping=True,
        reference=_reference("lora_fair_factors"),
    ),
    _spec(
        "fedex_lora",
        aggregate.fedex_lora,
        "FedIT's (Ā, B̄) plus the factored residual ΔW − B̄Ā for the frozen weights (exact)",
        exact=True,
        output="adapters+residual",
    ),
    _spec(
        "fedsa_lora",
        aggregate.fedsa_lora,
        "average and share A; each client keeps its own B (personalised)",
        output="per_client",
        secure_aggregation=True,
        reference=_reference("fedsa_lora_factors"),
    ),
    _spec(
        "rolora",
        aggregate.rolora,
        "alternate rounds: average the trained factor, the other is shared (exact)",
        defaults={"trained": "B"},
        exact=True,
        shared_A=True,
        round_options=_rolora_round,
        secure_aggregation=True,
        dp_clipping=True,
    ),
    _spec(
        "hetlora",
        aggregate.hetlora,
        "zero-pad ranks to the largest; average weighted by p_k ‖B_k A_k‖_F (biased)",
        equal_ranks=False,
        secure_aggregation=True,
        dp_clipping=True,
        reference=_reference("hetlora_factors"),
    ),
    _spec(
        "fedsvd",
        aggregate.fedsvd,
        "B trained on a shared A; re-factor B̄A as (Vᵀ, UΣ), A orthonormal (exact)",
        exact=True,
        shared_A=True,
        secure_aggregation=True,
        dp_clipping=True,
        form=_form("orthonormal_rows"),
    ),
    _spec(
        "flexlora_energy",
        aggregate.flexlora,
        "FlexLoRA with per-layer ranks keeping 99% of ‖ΔW‖_F² (FLoRIST's rule)",
        defaults={"rank": EnergyThreshold(0.99)},
        optimal=True,
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

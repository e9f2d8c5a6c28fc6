"""``check_aggregator``: lorafair's conformance suite and properties, for anyone's aggregator."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

from lorafair.registry import AggregatorSpec
from lorafair.testing._conformance import CHECKS
from lorafair.testing._reference import Objective
from lorafair.testing._target import Claims, InputMutated, Target, Update

__all__ = ["CheckReport", "check_aggregator", "check_names"]

_GROUPS = ("bad_input",)
_PROPERTY_NAMES = (
    "permutation_invariance",
    "weight_scale_invariance",
    "none_means_equal_weights",
    "finite_output",
    "exact",
    "optimal",
    "never_worse_than_fedit",
)
_DEFAULT_MAX_EXAMPLES = 20


class CheckReport(NamedTuple):
    """What :func:`check_aggregator` checked, and what it did not.

    ``checked``: the checks and properties that ran and passed, in order; ``skipped``: those
    switched off by ``skip``; ``not_claimed``: the properties of claims the function does not
    make (``exact``, ``optimal``, ``never_worse_than_fedit``); ``max_examples``: Hypothesis
    examples per property.
    """

    name: str
    checked: tuple[str, ...]
    skipped: tuple[str, ...]
    not_claimed: tuple[str, ...]
    max_examples: int


def check_names() -> tuple[str, ...]:
    """Every check and property :func:`check_aggregator` knows, in the order it runs them."""
    return (*CHECKS, *_PROPERTY_NAMES)


def _claim(given: bool | None, spec: AggregatorSpec | None, field: str) -> bool:
    if given is not None:
        return given
    return bool(getattr(spec, field, False)) if spec is not None else False


def _objective(spec: AggregatorSpec | None) -> Objective:
    defaults: Mapping[str, Any] = spec.defaults if spec is not None else {}
    return Objective(**{f: defaults[f] for f in Objective._fields if f in defaults})


def _selected(skip: Iterable[str]) -> frozenset[str]:
    skip = frozenset(skip)
    known = set(check_names()) | set(_GROUPS)
    unknown = sorted(skip - known)
    if unknown:
        raise ValueError(
            f"skip: unknown check {unknown[0]!r}; choose from {', '.join(check_names())} "
            f"(or the group {', '.join(_GROUPS)})"
        )
    return skip


def _skipped(name: str, skip: frozenset[str]) -> bool:
    return name in skip or name.split(".")[0] in skip


def check_aggregator(
    fn: Callable[..., Any] | AggregatorSpec,
    *,
    exact: bool | None = None,
    optimal: bool | None = None,
    never_worse_than_fedit: bool | None = None,
    shared_A: bool | None = None,
    equal_ranks: bool | None = None,
    personalised: bool | None = None,
    update: Update | None = None,
    objective: Objective | None = None,
    skip: Iterable[str] = (),
    max_examples: int | None = None,
) -> CheckReport:
    """Run lorafair's conformance suite and Hypothesis properties on an aggregator.

    ``fn(clients, weights)`` takes a sequence of K clients' adapters (``{layer: (A, B)}``, A of
    shape (r, d_in), B (d_out, r)) and optional non-negative weights (``None``: equal), and
    returns ``{layer: (A, B)}`` whose ``B @ A`` is the global update. The claims, named like
    :class:`lorafair.registry.AggregatorSpec`'s fields, say what else it promises (each
    defaults to ``False``): ``exact`` (``B @ A == ΔW = Σ p_k B_k A_k``), ``optimal`` (the
    Eckart–Young optimum at the result's rank), ``never_worse_than_fedit`` (the LoRA-FAIR
    ``objective``, see :class:`Objective`, not above FedIT's), ``shared_A`` (it requires one
    shared ``A`` and rejects clients whose ``A`` differ), ``equal_ranks`` (it requires equal
    ranks and rejects others), ``personalised`` (one adapter per client, no global update).
    Pass an :class:`~lorafair.registry.AggregatorSpec` instead of ``fn`` to run
    ``spec.fn(clients, weights, **spec.defaults)`` with the spec's claims (a claim given here
    overrides the spec's), its ``update_factors`` and its LoRA-FAIR options.

    ``update`` maps ``fn``'s result to the adapter(s) to check: the global update (FedEx-LoRA:
    adapters and residual concatenated, as ``AggregatorSpec.update_factors`` does), or, when
    ``personalised``, the sequence of per-client adapters (default: ``result.adapters``).
    Every tensor in the result is checked for dtype, device, purity and determinism.

    Conformance checks, on fixed inputs: ``dtype_device`` (float16/bfloat16/float32/float64
    on the CPU, and CUDA if present, give finite results of the same dtype and device),
    ``no_mutation`` (no call changes its inputs: list lengths, dict keys, which object sits
    where, tensor shapes, dtypes, devices and values are compared before and after every call
    of every check and property, and a change fails as ``no_mutation``, naming the check or
    property during which it happened; skipping ``no_mutation`` switches this off),
    ``no_aliasing`` (no result tensor's storage overlaps an input tensor's, for three clients
    with weights ``[1, 0, 2]`` and ``[0, 1, 0]``, and for one client), ``deterministic``,
    ``plain_tuples``,
    ``zero_update`` (ΔW = 0 gives a finite zero update), ``one_client`` (gets its update back;
    for an ``optimal`` method, its best approximation at the result's rank), ``zero_weight``
    (a zero-weight client is ignored), ``shared_A`` and ``equal_ranks`` (rejected with a
    ``ValueError`` naming layer and client when claimed, accepted otherwise), and
    ``bad_input.<case>`` for 26 bad inputs (empty, missing and extra layers, wrong shapes, NaN
    and Inf, bad weights, mixed dtypes and devices): each must raise a ``ValueError`` whose
    message names the layer, and the client where there is one.

    Hypothesis properties, on inputs from :mod:`lorafair.testing.strategies` that fit the
    claims (float64 unless said), compared with dense float64 references of ``ΔW``, its SVD
    and the objective written in this package (never by calling another aggregator):
    ``permutation_invariance``, ``weight_scale_invariance``, ``none_means_equal_weights``
    (the same update ``B @ A``; for ``optimal``/``never_worse_than_fedit`` methods the same
    error/objective, as their minimiser need not be unique), ``finite_output`` (all four
    dtypes), and, if claimed, ``exact`` (float64 and float32), ``optimal`` and
    ``never_worse_than_fedit``. Tolerances are relative to ``Σ p_k ‖B_k‖_F ‖A_k‖_F`` by dtype
    (``lorafair.testing._target.RTOL``: 1e-9 in float64, 1e-5 in float32).

    Finite input must give a finite result, or, where the result may honestly overflow the
    dtype (``Σ p_k ‖B_k‖_F ‖A_k‖_F`` of a layer, a bound on ``‖ΔW‖_2``, above 2⁻⁸ of the
    dtype's largest value), a ``LoRAFairError``; raising on any other valid input fails.

    ``skip`` switches checks off by name (:func:`check_names`; ``"bad_input"`` for all of its
    cases). ``max_examples`` per property defaults to the loaded Hypothesis profile's, capped
    at 20; other settings (``derandomize``) come from the profile. Hypothesis (the ``test``
    extra) is imported only when a property runs. Cost: about 45 calls of ``fn`` on tiny
    inputs, plus 1–2 calls per example per property, each with a copy of its input tensors.

    Raises ``AssertionError`` naming the first check or property that fails, what it saw, and
    for a property the smallest counterexample Hypothesis found (the seed of
    :func:`~lorafair.testing.strategies.seeded_clients`, the clients' shapes, ranks and
    weights). Returns a :class:`CheckReport` when everything passes.

    >>> from lorafair.aggregate import flora
    >>> from lorafair.testing import check_aggregator
    >>> report = check_aggregator(flora, exact=True, max_examples=3)
    >>> "exact" in report.checked
    True
    """
    spec = fn if isinstance(fn, AggregatorSpec) else None
    claims = Claims(
        exact=_claim(exact, spec, "exact"),
        optimal=_claim(optimal, spec, "optimal"),
        never_worse_than_fedit=_claim(never_worse_than_fedit, spec, "never_worse_than_fedit"),
        shared_A=_claim(shared_A, spec, "shared_A"),
        equal_ranks=_claim(equal_ranks, spec, "equal_ranks"),
        personalised=_claim(personalised, spec, "personalised"),
    )
    if claims.personalised and (claims.exact or claims.optimal or claims.never_worse_than_fedit):
        raise ValueError(
            "exact, optimal and never_worse_than_fedit describe a global update; a personalised "
            "aggregator has none"
        )
    if update is None and spec is not None:
        update = getattr(spec, "update_factors", None)
    if spec is not None:
        name = spec.name
        call: Callable[..., Any] = functools.partial(spec.fn, **spec.defaults)
    else:
        assert callable(fn)
        name = str(
            getattr(fn, "__name__", None) or getattr(getattr(fn, "func", fn), "__name__", "fn")
        )
        call = fn
    skip_set = _selected(skip)
    target = Target(
        name, call, claims, update, objective or _objective(spec), "no_mutation" not in skip_set
    )
    checked: list[str] = []
    skipped: list[str] = []
    for check_name, check in CHECKS.items():
        if _skipped(check_name, skip_set):
            skipped.append(check_name)
            continue
        try:
            check.run(target)
        except InputMutated as exc:
            raise _mutated(name, "check", check_name, exc) from exc
        except AssertionError as exc:
            raise AssertionError(
                f"check_aggregator({name}): check {check_name!r} failed ({check.doc}): {exc}"
            ) from exc
        checked.append(check_name)
    not_claimed: list[str] = []
    examples = _DEFAULT_MAX_EXAMPLES if max_examples is None else max_examples
    wanted = [p for p in _PROPERTY_NAMES if not _skipped(p, skip_set)]
    skipped += [p for p in _PROPERTY_NAMES if _skipped(p, skip_set)]
    if wanted:
        properties = _import_properties()
        assert tuple(properties.PROPERTIES) == _PROPERTY_NAMES, "keep the two lists in step"
        if max_examples is None:
            examples = min(examples, properties.profile_max_examples())
        for prop_name in wanted:
            prop = properties.PROPERTIES[prop_name]
            if not prop.applies(claims):
                not_claimed.append(prop_name)
                continue
            try:
                properties.run_property(prop, target, examples)
            except InputMutated as exc:
                raise _mutated(name, "property", prop_name, exc) from exc
            except properties.PropertyFailure as exc:
                raise AssertionError(
                    f"check_aggregator({name}): property {prop_name!r} failed ({prop.doc}): "
                    f"{exc.detail}\nsmallest counterexample: {exc.example}"
                ) from exc
            checked.append(prop_name)
    return CheckReport(name, tuple(checked), tuple(skipped), tuple(not_claimed), examples)


def _mutated(name: str, kind: str, during: str, exc: InputMutated) -> AssertionError:
    where = "" if during == "no_mutation" else f"during {kind} {during!r}: "
    return AssertionError(
        f"check_aggregator({name}): check 'no_mutation' failed ({CHECKS['no_mutation'].doc}): "
        f"{where}{exc}"
    )


def _import_properties() -> Any:
    try:
        from lorafair.testing import _properties
    except ImportError as exc:
        if exc.name != "hypothesis" and not str(exc.name).startswith("hypothesis."):
            raise
        raise ImportError(
            "check_aggregator's properties need hypothesis: pip install 'lorafair[test]' "
            "(or skip them: skip=('permutation_invariance', ...))"
        ) from exc
    return _properties

"""CI's budget of the fuzz (``benchmarks/fuzz.py``): 550 calls, 50 per registered method.

Every call must return finite factors in the input dtype and of the right shapes, or raise a
``LoRAFairError`` (a ``DtypeOverflowError`` only for a value that really exceeds the dtype),
and leave its inputs bit for bit unchanged. A failure lists the command that replays each call.
"""

from __future__ import annotations

import pytest

from benchmarks.fuzz import make_case, run_case
from lorafair.registry import specs

CALLS = 50 * len(specs())


@pytest.mark.parametrize("seed", [0])
def test_fuzz_budget_has_no_defects(seed: int) -> None:
    defects = []
    kinds = set()
    for i in range(CALLS):
        outcome = run_case(make_case(seed, i))
        kinds.add(outcome.kind)
        if outcome.kind == "defect":
            replay = f"python -m benchmarks.fuzz --seed {seed} --case {i}"
            defects.append(f"{replay}: {outcome.detail}")
    assert not defects, "\n".join(defects)
    assert "ok" in kinds  # the budget does exercise successful calls


def test_every_method_and_dtype_is_drawn() -> None:
    cases = [make_case(0, i) for i in range(CALLS)]
    assert {c.spec.name for c in cases} == {s.name for s in specs()}
    assert len({c.dtype for c in cases}) == 4


def test_a_case_replays_from_its_seed_and_index() -> None:
    a, b = make_case(7, 123), make_case(7, 123)
    assert a.spec.name == b.spec.name
    assert a.weights == b.weights
    for ca, cb in zip(a.clients, b.clients, strict=True):
        for (A1, B1), (A2, B2) in zip(ca.values(), cb.values(), strict=True):
            assert A1.equal(A2)
            assert B1.equal(B2)


def _inf(clients: object, weights: object = None, **_: object) -> dict[str, object]:
    import torch

    from lorafair.types import LoRAFactors

    A, B = clients[0]["l0"]  # type: ignore[index]
    return {"l0": LoRAFactors(A.clone(), torch.full_like(B, float("inf")))}


def _mutates(clients: object, weights: object = None, **_: object) -> dict[str, object]:
    out = _finite(clients)
    clients[0]["l0"].B.add_(1.0)  # type: ignore[index]
    return out


def _finite(clients: object, weights: object = None, **_: object) -> dict[str, object]:
    from lorafair.types import LoRAFactors

    return {n: LoRAFactors(A.clone(), B.clone()) for n, (A, B) in clients[0].items()}  # type: ignore[index]


def _crashes(clients: object, weights: object = None, **_: object) -> dict[str, object]:
    raise RuntimeError("boom")


@pytest.mark.parametrize("fn", [_inf, _mutates, _crashes])
def test_the_checks_catch_a_broken_aggregator(fn: object) -> None:
    for i in range(40):  # a case with a layer "l0" of a nonzero B (most are)
        case = make_case(0, i * len(specs()))
        if case.dtype.is_floating_point and bool(case.clients[0]["l0"].B.ne(0).any()):
            break
    broken = case._replace(spec=case.spec._replace(fn=fn, defaults={}))
    assert run_case(broken).kind == "defect"
    assert run_case(case._replace(spec=case.spec._replace(fn=_finite, defaults={}))).kind == "ok"


# Calls that were defects before the library was fixed (float64 near its limits; the fuzz's
# own report names them): lora_fair's eigh failure and NaN, flexlora's SVD failure and NaN,
# fedsvd's NaN, hetlora's NaN weights, lora_fair's clients 10^300 apart.
FOUND = [(1, 37), (1, 153), (1, 230), (1, 339), (1, 382), (1, 411), (0, 1863)]


@pytest.mark.parametrize(("seed", "index"), FOUND)
def test_calls_the_fuzz_found_are_no_longer_defects(seed: int, index: int) -> None:
    outcome = run_case(make_case(seed, index))
    assert outcome.kind != "defect", outcome.detail

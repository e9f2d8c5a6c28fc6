"""``lorafair.testing.check_aggregator``: it passes every registered method with the registry's
claims, and catches each deliberately broken aggregator by the property that it breaks."""

from __future__ import annotations

import functools
import itertools
import re

import pytest
import torch
from hypothesis import settings

from lorafair import LoRAFactors, errors, registry
from lorafair.aggregate import fedit, lora_fair
from lorafair.testing import CheckReport, Objective, check_aggregator, check_names

# Examples per property: a third of the loaded profile's (tests/conftest.py: 60, or 40 under CI)
# for the registered methods, 20 × 7 properties each, which replace tests/properties' three
# invariances (60 examples, 4 methods); a few for the LoRA-FAIR forms and the broken aggregators.
EXAMPLES = max(5, settings().max_examples // 3)
FEW = max(3, settings().max_examples // 10)
# LoRA-FAIR's solver costs ~30 ms a call (the others ~1 ms); its own properties run in
# tests/properties/test_lora_fair_properties.py.
SLOW = {"lora_fair": FEW}


@pytest.mark.parametrize("name", registry.names())
def test_every_registered_method_passes_with_its_claims(name):
    spec = registry.get(name)
    report = check_aggregator(spec, max_examples=SLOW.get(name, EXAMPLES))
    assert isinstance(report, CheckReport)
    assert report.name == name
    assert report.skipped == ()
    claimed = {c for c in ("exact", "optimal", "never_worse_than_fedit") if getattr(spec, c)}
    assert claimed <= set(report.checked)
    assert set(report.checked) | set(report.not_claimed) == set(check_names())
    assert not claimed & set(report.not_claimed)


# LoRA-FAIR in each of its forms (flat/columns cosine, both norms, both residual sides), each
# checked never worse than FedIT on the objective of its own options. The columns form costs
# ~0.5 s a call on these sizes, so it runs the conformance checks only: its properties (client
# order, never worse than FedIT against a dense objective) run on smaller problems in
# tests/properties/test_lora_fair_properties.py.
PROPERTIES = (
    "permutation_invariance",
    "weight_scale_invariance",
    "none_means_equal_weights",
    "finite_output",
    "exact",
    "optimal",
    "never_worse_than_fedit",
)


@pytest.mark.parametrize(
    ("sim", "norm", "side"),
    list(itertools.product(("flat", "columns"), ("fro", "fro_squared"), ("B", "A"))),
)
def test_every_lora_fair_form_passes(sim, norm, side):
    fn = functools.partial(lora_fair, lam=0.1, similarity=sim, norm=norm, residual_on=side)
    report = check_aggregator(
        fn,
        never_worse_than_fedit=True,
        objective=Objective(lam=0.1, norm=norm, similarity=sim),
        skip=PROPERTIES if sim == "columns" else (),
        max_examples=FEW,
    )
    assert ("never_worse_than_fedit" in report.checked) == (sim == "flat")
    assert "bad_input.nan_in_A" in report.checked


# ---- deliberately broken aggregators: each is caught, by the property it breaks ----


def mutates_its_input(clients, weights=None):
    out = fedit(clients, weights)
    for c in clients:
        for A, _ in c.values():
            A.mul_(2.0)
    return out


def depends_on_client_order(clients, weights=None):
    """FedIT's B̄ with the first client's A: passes every fixed-input check, not reordering."""
    out = fedit(clients, weights)
    return {n: LoRAFactors(clients[0][n][0].clone(), B) for n, (_, B) in out.items()}


def float32_for_float64(clients, weights=None):
    out = fedit(clients, weights)
    if next(iter(out.values())).A.dtype != torch.float64:
        return out
    return {n: LoRAFactors(A.float(), B.float()) for n, (A, B) in out.items()}


def nan_for_nan(clients, weights=None):
    """FedIT, except that a NaN or Inf factor gives a NaN result instead of an error."""
    try:
        return fedit(clients, weights)
    except errors.NonFiniteError:
        nan = float("nan")
        return {
            n: LoRAFactors(torch.full_like(A, nan), torch.full_like(B, nan))
            for n, (A, B) in clients[0].items()
        }


def ignores_the_weights(clients, weights=None):
    fedit(clients, weights)  # validates them, then drops them
    return fedit(clients)


REFUSED: list[int] = []


def raises_where_half_may_overflow(clients, weights=None):
    """FedIT, refusing float16 input where Σ p_k ‖B_k‖_F ‖A_k‖_F (a bound on ‖ΔW‖_2) of a layer
    exceeds 2⁻⁸ of float16's range, as D's overflow rule may."""
    out = fedit(clients, weights)
    p = [1.0] * len(clients) if weights is None else weights
    for name, (A, _) in clients[0].items():
        size = sum(
            w * float(c[name][1].double().norm() * c[name][0].double().norm())
            for w, c in zip(p, clients, strict=True)
        )
        if A.dtype == torch.float16 and size / sum(p) > 65504 / 256:
            REFUSED.append(1)
            raise errors.LoRAFairError(f"layer {name!r}: the update may overflow float16")
    return out


def raises_on_every_half(clients, weights=None):
    if next(iter(clients[0].values()))[0].dtype == torch.float16:
        raise errors.LoRAFairError("float16 is not supported")
    return fedit(clients, weights)


def test_a_lorafair_error_stands_in_for_a_result_that_may_overflow():
    REFUSED.clear()
    report = check_aggregator(raises_where_half_may_overflow, equal_ranks=True, max_examples=20)
    assert "finite_output" in report.checked
    assert REFUSED  # the check saw the error, and accepted it
    with pytest.raises(AssertionError) as excinfo:
        check_aggregator(raises_on_every_half, equal_ranks=True, max_examples=FEW)
    assert "float16 is not supported" in failed("dtype_device", excinfo)


def failed(check: str, excinfo: pytest.ExceptionInfo[AssertionError]) -> str:
    message = str(excinfo.value)
    head = rf"check_aggregator\(\w+\): (check|property) '{re.escape(check)}' failed"
    assert re.match(head, message), message
    return message


def test_catches_an_aggregator_that_mutates_its_input():
    with pytest.raises(AssertionError) as excinfo:
        check_aggregator(mutates_its_input, equal_ranks=True, max_examples=FEW)
    assert "client 0's A was modified" in failed("no_mutation", excinfo)


def aliases_one_client(clients, weights=None):
    """FedIT, except that one client gets its own tensors back."""
    out = fedit(clients, weights)  # validates the input
    if len(clients) == 1:
        return {n: tuple(f) for n, f in clients[0].items()}
    return out


def aliases_the_only_weighted_client(clients, weights=None):
    """FedIT, except that a single positive weight gets that client's tensors back."""
    out = fedit(clients, weights)  # validates the input
    positive = [k for k, w in enumerate(weights or [1.0] * len(clients)) if w > 0]
    if len(positive) == 1:
        return {n: tuple(f) for n, f in clients[positive[0]].items()}
    return out


def appends_a_client(clients, weights=None):
    out = fedit(clients, weights)
    clients.append(clients[0])
    return out


def adds_a_layer(clients, weights=None):
    out = fedit(clients, weights)
    clients[0]["head"] = next(iter(clients[0].values()))
    return out


def mutates_without_weights(clients, weights=None):
    out = fedit(clients, weights)
    if weights is None:
        next(iter(clients[0].values()))[1].zero_()
    return out


def mutates_the_property_inputs(clients, weights=None):
    """Only the properties' inputs have a layer named 'layer0'."""
    out = fedit(clients, weights)
    if "layer0" in clients[0]:
        clients[0]["layer0"][0].add_(1.0)
    return out


@pytest.mark.parametrize("fn", [aliases_one_client, aliases_the_only_weighted_client])
def test_catches_an_aggregator_that_returns_its_input(fn):
    with pytest.raises(AssertionError) as excinfo:
        check_aggregator(fn, equal_ranks=True, max_examples=FEW)
    message = failed("no_aliasing", excinfo)
    assert "shares memory with client" in message
    assert ("1 clients, weights None" if fn is aliases_one_client else "[0.0, 1.0, 0.0]") in message


@pytest.mark.parametrize(
    ("fn", "change"),
    [
        (appends_a_client, "the clients changed length: 3 → 4"),
        (adds_a_layer, "client 0 changed keys: ['blocks.0.attn.qkv', 'blocks.0.mlp.fc1'] → "),
        (
            mutates_without_weights,
            "during check 'no_aliasing': layer 'blocks.0.attn.qkv': client 0's B was modified",
        ),
        (mutates_the_property_inputs, "during property 'permutation_invariance': "),
    ],
)
def test_catches_a_mutation_during_any_call(fn, change):
    with pytest.raises(AssertionError) as excinfo:
        check_aggregator(fn, equal_ranks=True, max_examples=FEW)
    assert change in failed("no_mutation", excinfo)


def rewrites_the_weights(clients, weights=None):
    """FedIT, then each weight replaced by an equal float: a change, but a harmless one."""
    out = fedit(clients, weights)
    if isinstance(weights, list):
        weights[:] = [float(w) + 0.0 for w in weights]
    return out


def test_skipping_no_mutation_stops_watching_the_inputs():
    with pytest.raises(AssertionError) as excinfo:
        check_aggregator(rewrites_the_weights, equal_ranks=True, max_examples=2)
    assert "weight 0 was replaced by another object" in failed("no_mutation", excinfo)
    report = check_aggregator(
        rewrites_the_weights, equal_ranks=True, skip=("no_mutation",), max_examples=2
    )
    assert "no_mutation" in report.skipped
    assert "permutation_invariance" in report.checked


def test_catches_an_aggregator_that_depends_on_client_order():
    with pytest.raises(AssertionError) as excinfo:
        check_aggregator(depends_on_client_order, equal_ranks=True, max_examples=FEW)
    message = failed("permutation_invariance", excinfo)
    assert re.search(r"smallest counterexample: seed \d+: [2-5] clients, float64", message)
    assert re.search(r"'layer0' \(d_out, d_in\) = \(\d+, \d+\) ranks \[", message)


def test_catches_fedit_claimed_exact():
    with pytest.raises(AssertionError) as excinfo:
        check_aggregator(fedit, exact=True, equal_ranks=True, max_examples=FEW)
    message = failed("exact", excinfo)
    assert "‖B @ A − ΔW‖_F" in message
    # Shrunk to the smallest input that shows the bias: two clients of one 1 × 1 layer, rank 1.
    assert "smallest counterexample: seed" in message
    assert "2 clients" in message
    assert "'layer0' (d_out, d_in) = (1, 1) ranks [1, 1]" in message


def test_catches_float32_for_float64():
    with pytest.raises(AssertionError) as excinfo:
        check_aggregator(float32_for_float64, equal_ranks=True, max_examples=FEW)
    assert "torch.float64 input on cpu gave a torch.float32" in failed("dtype_device", excinfo)


def test_catches_nan_out_for_nan_in():
    with pytest.raises(AssertionError) as excinfo:
        check_aggregator(nan_for_nan, equal_ranks=True, max_examples=FEW)
    assert "returned instead of raising a ValueError" in failed("bad_input.nan_in_A", excinfo)


def test_catches_an_aggregator_that_ignores_the_weights():
    with pytest.raises(AssertionError) as excinfo:
        check_aggregator(ignores_the_weights, equal_ranks=True, max_examples=FEW)
    assert "weights [1, 0, 1] against the client dropped" in failed("zero_weight", excinfo)


def test_skip_switches_checks_off_by_name():
    report = check_aggregator(
        depends_on_client_order,
        equal_ranks=True,
        skip=("permutation_invariance", "bad_input"),
        max_examples=2,
    )
    assert report.skipped[0] == "bad_input.empty_clients"
    assert report.skipped[-1] == "permutation_invariance"
    assert "permutation_invariance" not in report.checked
    assert not any(n.startswith("bad_input") for n in report.checked)
    assert "weight_scale_invariance" in report.checked
    with pytest.raises(ValueError, match="unknown check 'determinism'"):
        check_aggregator(fedit, skip=("determinism",))


def test_a_wrong_shared_A_claim_is_caught():
    # FedIT accepts clients whose A differ, so claiming it needs a shared A is false.
    with pytest.raises(AssertionError) as excinfo:
        check_aggregator(fedit, shared_A=True, equal_ranks=True, skip=("bad_input",))
    assert "returned instead of raising" in failed("shared_A", excinfo)


def test_personalised_claims_are_consistent():
    with pytest.raises(ValueError, match="personalised"):
        check_aggregator(registry.get("fedsa_lora"), exact=True)


def test_report_lists_what_ran():
    report = check_aggregator(registry.get("flora"), max_examples=2)
    assert report.max_examples == 2
    assert report.checked[:2] == ("dtype_device", "no_mutation")
    assert "bad_input.nan_in_B" in report.checked
    assert "exact" in report.checked
    assert report.not_claimed == ("optimal", "never_worse_than_fedit")
    assert set(check_names()) == {*report.checked, *report.not_claimed}
    assert check_names()[-len(PROPERTIES) :] == PROPERTIES


def test_properties_need_hypothesis_only_when_they_run():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['hypothesis'] = None\n"
        "from lorafair.aggregate import flora\n"
        "from lorafair.testing import check_aggregator\n"
        f"print(len(check_aggregator(flora, skip={PROPERTIES!r}).checked))\n"
        "try:\n"
        "    check_aggregator(flora)\n"
        "except ImportError as e:\n"
        "    print('lorafair[test]' in str(e))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.stdout.split() == [str(len(check_names()) - len(PROPERTIES)), "True"], (
        result.stderr
    )


def test_the_readme_usage_runs(monkeypatch):
    from pathlib import Path

    import lorafair.testing
    from lorafair.aggregate import flora, hetlora

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Test your own aggregator", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert len([line for line in code.splitlines() if line.strip()]) == 2
    few = functools.partial(check_aggregator, max_examples=2)
    monkeypatch.setattr(lorafair.testing, "check_aggregator", few)
    exec(code, {"my_aggregate": flora})
    with pytest.raises(AssertionError, match="property 'exact' failed"):
        exec(code, {"my_aggregate": hetlora})  # biased: weights by p_k ‖B_k A_k‖_F

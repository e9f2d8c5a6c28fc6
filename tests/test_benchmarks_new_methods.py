"""The benchmarks' checks of every registered method: right results pass, wrong ones fail.

The checks are chosen by the registry's fields (its references included), never by a method's
name in the benchmark code; these tests name methods only to build wrong results."""

from __future__ import annotations

import ast
import pathlib

import pytest

from benchmarks import entries
from benchmarks.checks import check
from lorafair import registry
from lorafair.aggregate import fedit, flexlora
from lorafair.bench import Inputs, from_spec, make_inputs, preset
from lorafair.types import LoRAFactors

_OPTIONS = {"lam": 0.01, "similarity": "flat"}


def _inputs() -> Inputs:
    return make_inputs(preset("tiny"), 3, 3, "float64", "cpu", seed=0)


def _problems(name: str, result: dict[str, LoRAFactors], inputs: Inputs) -> list[str]:
    return check(entries.get(name), result, inputs, _OPTIONS, dense={}).problems


@pytest.mark.parametrize("name", registry.names())
def test_registered_result_passes_its_check(name: str) -> None:
    inputs = _inputs()
    result, _ = entries.get(name).run(inputs, _OPTIONS, None)
    assert _problems(name, result, inputs) == []


def test_every_registered_method_has_an_entry_with_its_flags() -> None:
    for spec in registry.specs():
        e = entries.get(spec.name)
        assert (e.exact, e.optimal, e.shared_A, e.floor, e.personalised) == (
            spec.exact,
            spec.optimal,
            spec.shared_A,
            spec.floor,
            spec.personalised,
        )


@pytest.mark.parametrize("name", ["fedex_lora", "fedsa_lora", "hetlora", "fedsvd"])
def test_fedit_passed_off_as_the_method_is_caught(name: str) -> None:
    inputs = _inputs()
    clients = inputs.shared if entries.get(name).shared_A else inputs.free
    if name == "hetlora":  # plain mean instead of the norm-weighted one
        clients = [
            {n: LoRAFactors(f.A, f.B * w) for n, f in c.items()}
            for c, w in zip(clients, [1.0, 5.0, 25.0], strict=True)
        ]
        inputs.free = clients
    wrong = fedit(clients)
    if name == "fedsvd":  # the right product, but A not orthonormal
        problems = _problems(name, wrong, inputs)
        assert any("differs from I" in p for p in problems)
        return
    problems = _problems(name, wrong, inputs)
    if name == "fedsa_lora":  # Ā kept, but B averaged instead of client 0's own
        assert any("B differs from its definition" in p for p in problems)
        assert not any("A differs" in p for p in problems)
        return
    assert problems


def test_energy_rank_that_is_too_small_or_too_large_is_caught() -> None:
    inputs = _inputs()
    for rank in (1, 9):
        problems = _problems("flexlora_energy", flexlora(inputs.free, rank=rank), inputs)
        assert any("smallest" in p or "under the" in p for p in problems)


def _rescaled(result: dict[str, LoRAFactors]) -> dict[str, LoRAFactors]:
    """``(2A, B/2)``: the same product ``BA``, the same cosine, exactness and optimality."""
    return {n: LoRAFactors(f.A * 2, f.B / 2) for n, f in result.items()}


@pytest.mark.parametrize(
    "name", [s.name for s in registry.specs() if s.reference is not None or s.form is not None]
)
def test_a_product_preserving_break_is_caught_by_the_linked_reference(name: str) -> None:
    # Every claim on the product still holds for (2A, B/2): only the registry's reference (or
    # form) can catch it, so this fails if an entry's link is lost on its way to the check.
    inputs = _inputs()
    right, _ = entries.get(name).run(inputs, _OPTIONS, None)
    problems = _problems(name, _rescaled(right), inputs)
    spec = registry.get(name)
    wanted = "differs from its definition" if spec.reference is not None else "differs from I"
    assert any(wanted in p for p in problems), problems


def test_the_references_are_linked_as_before() -> None:
    # The methods the benchmarks compared with an element-wise definition or a stated form
    # before the link moved into the registry: none may lose it.
    linked = {s.name for s in registry.specs() if s.reference is not None}
    assert {"fedit", "ffa_lora", "flora", "lora_fair", "fedsa_lora", "hetlora"} <= linked
    assert registry.get("fedsvd").form is not None
    for name in ("lora_fair_sq", "dense_sgd", "dense_sgd_sq"):
        assert entries.get(name).reference is registry.get("lora_fair").reference


def test_a_method_without_a_reference_is_checked_on_its_claims() -> None:
    # A user's method with no reference: a right result passes, a biased one claimed exact fails.
    inputs = _inputs()
    spec = registry.get("flora")._replace(name="mine", reference=None, form=None)
    entry = from_spec(spec)
    right, _ = entry.run(inputs, _OPTIONS, None)
    assert check(entry, right, inputs, _OPTIONS, dense={}).problems == []
    assert check(entry, _rescaled(right), inputs, _OPTIONS, dense={}).problems == []
    problems = check(entry, fedit(inputs.free), inputs, _OPTIONS, dense={}).problems
    assert any("must be exact" in p for p in problems)


_SOLVER_GATE = "solver_gate.py"
"""The LoRA-FAIR solver's bit-for-bit refactoring gate: it runs that one solver's functions
(``lora_fair``, ``solve_residual``) by design, so it is the one file allowed to name them."""


def _code_names(path: pathlib.Path) -> set[str]:
    """Registered names a module imports from :mod:`lorafair.aggregate` or writes as a string
    constant outside docstrings."""
    registered = set(registry.names()) | {s.fn.__name__ for s in registry.specs()}
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "lorafair.aggregate":
            found |= {a.name for a in node.names} & registered
        elif (
            isinstance(node, ast.Constant)
            and id(node) not in docstrings
            and isinstance(node.value, str)
            and node.value in registered
        ):
            found.add(node.value)
    return found


def test_no_benchmark_code_names_a_method() -> None:
    # Adding a method to the benchmarks takes its registry entry alone: no module of
    # benchmarks/ or lorafair.bench imports a method or special-cases one by its name.
    root = pathlib.Path(__file__).resolve().parent.parent
    files = sorted((root / "benchmarks").glob("*.py")) + sorted(
        (root / "lorafair" / "bench").glob("*.py")
    )
    named = {
        str(f.relative_to(root)): n
        for f in files
        if f.name != _SOLVER_GATE and (n := _code_names(f))
    }
    assert named == {}


def test_the_name_scan_sees_an_import_and_a_table(tmp_path: pathlib.Path) -> None:
    # The scan above must be able to fail: an import and a name-keyed table are both seen.
    probe = tmp_path / "probe.py"
    probe.write_text(
        '"""fedit in a docstring is fine."""\n'
        "from lorafair.aggregate import lora_fair\n"
        'TABLE = {"fedsvd": 1}\n'
    )
    assert _code_names(probe) == {"lora_fair", "fedsvd"}


def test_the_registry_loads_its_references_only_when_one_is_called() -> None:
    # The registry stays import-light: lorafair.testing (which imports the registry) is loaded
    # at the first reference call, not when the registry or lorafair.bench is imported.
    import subprocess
    import sys

    code = (
        "import sys, lorafair.registry as r, lorafair.bench\n"
        "print('lorafair.testing' in sys.modules)\n"
        "ref = r.get('fedit').reference\n"
        "print('lorafair.testing' in sys.modules)\n"
        "import torch\n"
        "ref([{'l': (torch.ones(1, 2), torch.ones(3, 1))}], None, 'l')\n"
        "print('lorafair.testing' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.split() == ["False", "False", "True"]

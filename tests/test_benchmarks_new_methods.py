"""The benchmark rows of issue 16's methods: right results pass their checks, wrong ones fail."""

from __future__ import annotations

import pytest
import torch

from benchmarks import new_methods
from benchmarks.shapes import SHAPE_SETS, make_clients
from lorafair.aggregate import fedit, flexlora
from lorafair.types import LoRAFactors


def _clients(shared_A: bool) -> list[dict[str, LoRAFactors]]:
    return make_clients(SHAPE_SETS["tiny"], 3, 3, dtype=torch.float64, seed=0, shared_A=shared_A)


@pytest.mark.parametrize("name", new_methods.NAMES)
def test_registered_result_passes_its_check(name: str) -> None:
    clients = _clients(new_methods.needs_shared_A(name))
    out = new_methods.call(name, clients)
    assert new_methods.check(name, out, clients, 1e-9) == []


@pytest.mark.parametrize("name", ["fedex_lora", "fedsa_lora", "hetlora", "fedsvd"])
def test_fedit_passed_off_as_the_method_is_caught(name: str) -> None:
    clients = _clients(new_methods.needs_shared_A(name))
    wrong = fedit(clients)
    if name == "hetlora":  # plain mean instead of the norm-weighted one
        weights = [1.0, 5.0, 25.0]
        clients = [
            {n: LoRAFactors(f.A, f.B * w) for n, f in c.items()}
            for c, w in zip(clients, weights, strict=True)
        ]
        wrong = fedit(clients)
    if name == "fedsa_lora":  # Ā kept, but B averaged instead of client 0's own
        assert any("B was not kept" in p for p in new_methods.check(name, wrong, clients, 1e-9))
        return
    assert new_methods.check(name, wrong, clients, 1e-9)


def test_energy_rank_that_is_too_small_or_too_large_is_caught() -> None:
    clients = _clients(False)
    assert new_methods.check("flexlora_energy", flexlora(clients, rank=1), clients, 1e-9)
    assert new_methods.check("flexlora_energy", flexlora(clients, rank=9), clients, 1e-9)

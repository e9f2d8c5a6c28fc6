"""The public testing helpers: they must catch real differences and accept equal results."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given

from lorafair._validate import prepare
from lorafair.testing import assert_factors_close
from lorafair.testing import strategies as lst


def test_assert_factors_close_names_the_differing_layer():
    A, B = torch.randn(2, 3), torch.randn(4, 2)
    good = {"a": (A, B), "b": (A, B)}
    assert_factors_close(good, {"a": (A.clone(), B.clone()), "b": (A, B)})
    bad = {"a": (A, B), "b": (A, B + 1e-2)}
    with pytest.raises(AssertionError, match="layer 'b', B @ A"):
        assert_factors_close(bad, good)
    with pytest.raises(AssertionError, match="layer 'b', B"):
        assert_factors_close(bad, good, compare="factors")
    with pytest.raises(AssertionError, match="layer names differ"):
        assert_factors_close({"a": (A, B)}, good)


def test_product_comparison_ignores_the_factorisation():
    A, B = torch.randn(2, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    M = torch.tensor([[2.0, 1.0], [0.0, 3.0]], dtype=torch.float64)
    assert_factors_close({"x": (M @ A, B @ torch.linalg.inv(M))}, {"x": (A, B)})
    with pytest.raises(AssertionError):
        assert_factors_close(
            {"x": (M @ A, B @ torch.linalg.inv(M))}, {"x": (A, B)}, compare="factors"
        )


@given(lst.clients_and_weights(equal_ranks=False))
def test_strategies_generate_valid_input(cw):
    clients, weights = cw
    prep = prepare(clients, weights, equal_ranks=False)
    assert prep.n_clients == len(clients)
    assert abs(sum(prep.weights) - 1.0) < 1e-12


@given(lst.clients(shared_A=True, zero_B=True, n_clients=3))
def test_strategy_options(clients):
    assert len(clients) == 3
    for name in clients[0]:
        assert all(torch.equal(c[name].A, clients[0][name].A) for c in clients)
        assert all(torch.count_nonzero(c[name].B) == 0 for c in clients)


def test_core_import_does_not_need_hypothesis():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['hypothesis'] = None; "
        "import lorafair, lorafair.aggregate, lorafair.metrics, lorafair.testing; print('ok')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.stdout.strip() == "ok", result.stderr

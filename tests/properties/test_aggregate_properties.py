"""Hypothesis properties every aggregator must satisfy (products compared, in float64)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lorafair.aggregate import fedit, ffa_lora, flexlora, flora
from lorafair.testing import assert_factors_close
from lorafair.testing import strategies as lst

AGGREGATORS = {"fedit": fedit, "ffa_lora": ffa_lora, "flora": flora, "flexlora": flexlora}
# FFA-LoRA needs a shared A; FedIT needs equal ranks; the others take any ranks.
OPTIONS = {
    "fedit": {"equal_ranks": True},
    "ffa_lora": {"equal_ranks": True, "shared_A": True},
    "flora": {"equal_ranks": False},
    "flexlora": {"equal_ranks": False},
}


def _tolerance(clients):
    scale = max(float(f.B.abs().max() * f.A.abs().max()) for c in clients for f in c.values())
    return {"rtol": 1e-9, "atol": 1e-9 * (1.0 + scale)}


@pytest.mark.parametrize("name", list(AGGREGATORS))
@given(data=st.data())
def test_permutation_invariance(name, data):
    clients, weights = data.draw(lst.clients_and_weights(**OPTIONS[name]))
    perm = data.draw(st.permutations(range(len(clients))))
    aggregate = AGGREGATORS[name]
    out = aggregate(clients, weights)
    shuffled = aggregate(
        [clients[i] for i in perm], None if weights is None else [weights[i] for i in perm]
    )
    if name == "flexlora":
        # Eckart–Young: the truncation is unique only up to ties in σ_r; compare errors too.
        _assert_same_error(clients, weights, out, shuffled)
    else:
        assert_factors_close(shuffled, out, **_tolerance(clients))


@pytest.mark.parametrize("name", list(AGGREGATORS))
@given(data=st.data())
def test_weight_scale_invariance(name, data):
    clients, weights = data.draw(lst.clients_and_weights(allow_none=False, **OPTIONS[name]))
    factor = data.draw(st.sampled_from([1e-3, 0.5, 7.0, 1e4]))
    aggregate = AGGREGATORS[name]
    out = aggregate(clients, weights)
    scaled = aggregate(clients, [w * factor for w in weights])
    if name == "flexlora":
        _assert_same_error(clients, weights, out, scaled)
    else:
        assert_factors_close(scaled, out, **_tolerance(clients))


@pytest.mark.parametrize("name", list(AGGREGATORS))
@given(data=st.data())
def test_none_weights_mean_equal_weights(name, data):
    clients, _ = data.draw(lst.clients_and_weights(**OPTIONS[name]))
    aggregate = AGGREGATORS[name]
    equal = aggregate(clients, [1.0] * len(clients))
    default = aggregate(clients, None)
    if name == "flexlora":
        _assert_same_error(clients, None, equal, default)
    else:
        assert_factors_close(default, equal, **_tolerance(clients))


def _assert_same_error(clients, weights, out1, out2):
    p = [1.0 / len(clients)] * len(clients) if weights is None else weights
    total = sum(p)
    for name in out1:
        dw = sum((w / total) * (c[name].B @ c[name].A) for w, c in zip(p, clients, strict=True))
        e1 = float((out1[name].B @ out1[name].A - dw).norm())
        e2 = float((out2[name].B @ out2[name].A - dw).norm())
        assert abs(e1 - e2) <= 1e-9 * (1.0 + float(dw.norm())), (name, e1, e2)


@given(lst.clients_and_weights(dtype=torch.float32, equal_ranks=False))
def test_flora_float32_product_equals_dense_delta_w(cw):
    clients, weights = cw
    out = flora(clients, weights)
    p = [1.0 / len(clients)] * len(clients) if weights is None else weights
    total = sum(p)
    for name, (A, B) in out.items():
        dw = sum(
            (w / total) * (c[name].B.double() @ c[name].A.double())
            for w, c in zip(p, clients, strict=True)
        )
        scale = 1e-5 * (1.0 + float(dw.abs().max()))
        torch.testing.assert_close(B.double() @ A.double(), dw, rtol=1e-5, atol=scale)

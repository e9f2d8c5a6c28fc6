"""Diagnostics against dense float64 computations written in the test."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given

from lorafair import LoRAFactors, errors
from lorafair.aggregate import fedit, flora
from lorafair.metrics import aggregation_bias, ideal_update, lora_fair_report
from lorafair.testing import strategies as lst
from tests import reference as ref


@given(lst.clients_and_weights(equal_ranks=False))
def test_ideal_update_is_the_dense_weighted_sum(cw):
    clients, weights = cw
    out = ideal_update(clients, weights)
    for name, dw in out.items():
        torch.testing.assert_close(dw, ref.delta_w(clients, name, weights))


def test_ideal_update_dtype():
    clients = [{"x": (torch.randn(2, 3), torch.randn(4, 2))}]
    assert ideal_update(clients)["x"].dtype == torch.float32
    assert ideal_update(clients, dtype=torch.float64)["x"].dtype == torch.float64


@given(lst.clients_and_weights())
def test_aggregation_bias_of_fedit_matches_dense(cw):
    clients, weights = cw
    agg = fedit(clients, weights)
    report = aggregation_bias(clients, agg, weights)
    for name, rep in report.items():
        dw = ref.delta_w(clients, name, weights)
        prod = agg[name].B @ agg[name].A
        n_dw, n_prod = float(dw.norm()), float(prod.norm())
        assert rep.ideal_norm == pytest.approx(n_dw, rel=1e-9, abs=1e-12)
        assert rep.aggregated_norm == pytest.approx(n_prod, rel=1e-9, abs=1e-12)
        assert rep.error_norm == pytest.approx(float((prod - dw).norm()), rel=1e-7, abs=1e-9)
        if n_dw > 0 and n_prod > 0:
            assert rep.cosine == pytest.approx(ref.cosine(prod, dw), abs=1e-9)
            assert rep.relative_error == pytest.approx(float((prod - dw).norm()) / n_dw, rel=1e-7)


@given(lst.clients_and_weights(equal_ranks=False))
def test_flora_has_no_bias_and_tiny_errors_are_resolved(cw):
    clients, weights = cw
    for rep in aggregation_bias(clients, flora(clients, weights), weights).values():
        if rep.ideal_norm > 0:
            assert rep.cosine == pytest.approx(1.0, abs=1e-12)
            # No cancellation floor: the factored error resolves ~1e-15 relative.
            assert rep.relative_error < 1e-12


def test_zero_norm_conventions():
    A = torch.randn(2, 3, dtype=torch.float64)
    zero_B = torch.zeros(4, 2, dtype=torch.float64)
    clients = [{"x": (A, zero_B)}]
    both_zero = aggregation_bias(clients, {"x": (A, zero_B)})["x"]
    assert (both_zero.cosine, both_zero.relative_error) == (1.0, 0.0)
    only_ideal_zero = aggregation_bias(clients, {"x": (A, torch.ones(4, 2, dtype=A.dtype))})["x"]
    assert only_ideal_zero.cosine == 0.0
    assert math.isinf(only_ideal_zero.relative_error)
    nonzero = [{"x": (A, torch.ones(4, 2, dtype=A.dtype))}]
    only_agg_zero = aggregation_bias(nonzero, {"x": (A, zero_B)})["x"]
    assert only_agg_zero.cosine == 0.0
    assert only_agg_zero.relative_error == pytest.approx(1.0, rel=1e-12)


def test_aggregation_bias_validates_the_aggregated_result():
    clients = [{"x": LoRAFactors(torch.randn(2, 3), torch.randn(4, 2))}]
    with pytest.raises(errors.LayerKeyError, match="missing layer 'x'"):
        aggregation_bias(clients, {})
    with pytest.raises(errors.LayerKeyError, match="layer 'y'"):
        aggregation_bias(clients, {"x": clients[0]["x"], "y": clients[0]["x"]})
    with pytest.raises(errors.LoRAShapeError, match="layer 'x'"):
        aggregation_bias(clients, {"x": (torch.randn(2, 5), torch.randn(4, 2))})
    with pytest.raises(errors.NonFiniteError, match="layer 'x'"):
        aggregation_bias(clients, {"x": (torch.full((2, 3), math.nan), torch.randn(4, 2))})


def test_lora_fair_report_validates_like_aggregation_bias():
    # One validation of the aggregated adapter for both diagnostics: keys, shapes, device, NaN.
    clients = [{"x": LoRAFactors(torch.randn(2, 3), torch.randn(4, 2))} for _ in range(2)]
    good = fedit(clients)
    assert set(lora_fair_report(clients, good)) == {"x"}
    with pytest.raises(errors.LayerKeyError, match="missing layer 'x'"):
        lora_fair_report(clients, {})
    with pytest.raises(errors.LayerKeyError, match="layer 'y'"):
        lora_fair_report(clients, {"x": good["x"], "y": good["x"]})
    with pytest.raises(errors.LoRAShapeError, match="layer 'x'"):
        lora_fair_report(clients, {"x": (torch.randn(1, 3), torch.randn(4, 1))})
    with pytest.raises(errors.NonFiniteError, match="layer 'x'"):
        lora_fair_report(clients, {"x": (good["x"].A, torch.full((4, 2), math.nan))})
    with pytest.raises(errors.DeviceMismatchError, match="layer 'x'"):
        lora_fair_report(clients, {"x": (good["x"].A.to("meta"), good["x"].B)})

"""The solver's one cosine (``lorafair._fair._cosine.cosine``): its edge cases and its forms,
against plain float64 arithmetic written out here (the forms differ only in the last bit)."""

from __future__ import annotations

import math

import pytest
import torch

from lorafair._fair import _cosine
from lorafair._fair import _tolerances as _tol

F64 = torch.float64
TINY = _tol.TINY


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inner products, reference norms, squared product norms and ``defined``, covering a zero
    reference, ``n² = 0``, ``0 < n² < TINY``, ``n² = TINY`` and ordinary values."""
    inner = torch.tensor([0.3, -1.5, 2e-160, 1e-200, 0.0, 4.0, 1.0], dtype=F64)
    ref = torch.tensor([2.0, 3.0, 1.0, 1.0, 1.0, 0.0, 1.5], dtype=F64)
    n_sq = torch.tensor([0.25, 4.0, 1e-310, 0.0, TINY, 1.0, 2.0], dtype=F64)
    return inner, ref, n_sq, ref > 0


@pytest.mark.parametrize("small", ["zero", "clamp", "floor", "zero_tiny"])
@pytest.mark.parametrize("form", ["quotient", "inverse", "split"])
def test_cosine_edge_cases_and_forms(small: _cosine.Small, form: _cosine.Form) -> None:
    inner, ref, n_sq, defined = _inputs()
    got = _cosine.cosine(inner, ref, n_sq, defined=defined, small=small, form=form)
    for i in range(inner.shape[0]):
        a, w, q, d = float(inner[i]), float(ref[i]), float(n_sq[i]), bool(defined[i])
        zero_by_norm = {"zero": q <= 0.0, "clamp": q <= 0.0, "floor": False, "zero_tiny": q <= TINY}
        n = math.sqrt(max(q, TINY)) if small in ("clamp", "floor") else math.sqrt(q)
        ok = d and not zero_by_norm[small]
        assert bool(got.ok[i]) == ok
        if not ok:
            assert float(got.cos[i]) == 0.0
            assert float(got.inverse()[i]) == 0.0
            continue
        assert math.isclose(float(got.cos[i]), a / (w * n), rel_tol=1e-15)
        assert math.isclose(float(got.inverse()[i]), 1.0 / (w * n), rel_tol=1e-15)
        assert math.isclose(float(got.norm[i]), n, rel_tol=1e-15)
        assert math.isclose(float(got.unit(inner)[i]), a / w, rel_tol=1e-15)


def test_cosine_from_a_norm_is_zero_only_at_a_zero_norm() -> None:
    inner = torch.tensor([0.5, 0.0, 1e-300], dtype=F64)
    ref = torch.tensor([1.0, 2.0, 1.0], dtype=F64)
    norm = torch.tensor([2.0, 0.0, 1e-155], dtype=F64)
    got = _cosine.cosine(inner, ref, norm=norm, defined=ref > 0, small="zero")
    assert got.ok.tolist() == [True, False, True]
    assert got.cos.tolist() == [0.25, 0.0, 1e-300 / (1.0 * 1e-155)]
    with pytest.raises(ValueError, match="small='zero'"):
        _cosine.cosine(inner, ref, norm=norm, defined=ref > 0, small="clamp")


def test_cosine_broadcasts_a_reference_per_row() -> None:
    # the line search's shapes: (L, 1, n) references against (L, S, n) products
    gen = torch.Generator().manual_seed(5)
    inner = torch.randn(2, 3, 4, generator=gen, dtype=F64)
    n_sq = torch.rand(2, 3, 4, generator=gen, dtype=F64) + 0.1
    ref = torch.rand(2, 1, 4, generator=gen, dtype=F64) + 0.1
    got = _cosine.cosine(inner, ref, n_sq, defined=ref > 0, small="floor").cos
    torch.testing.assert_close(got, inner / (ref * n_sq.sqrt()), rtol=1e-15, atol=0.0)

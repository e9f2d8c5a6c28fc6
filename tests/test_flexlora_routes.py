"""FlexLoRA's three routes (Gram, QR, dense) and the rule that picks them, against dense float64."""

from __future__ import annotations

import pytest
import torch

from lorafair import LoRAFactors, _linalg
from lorafair import aggregate as agg
from lorafair.aggregate import flexlora
from tests import reference as ref


def _clients(seed, *, k=4, d_out=40, d_in=30, r=3, dtype=torch.float32, cancel=None):
    """Random clients; ``cancel=δ`` makes client 1 undo client 0 (exactly, in ``dtype``) up to δ."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        A = torch.randn(r, d_in, generator=g).to(dtype)
        B = torch.randn(d_out, r, generator=g).to(dtype)
        out.append({"fc": LoRAFactors(A, B)})
    if cancel is not None:
        A0, B0 = out[0]["fc"]
        noise = (cancel * torch.randn(d_out, r, generator=g)).to(dtype)
        out[1]["fc"] = LoRAFactors(A0.clone(), -B0 + noise)
        for c in out[2:]:
            c["fc"] = LoRAFactors(c["fc"].A, (cancel * c["fc"].B.float()).to(dtype))
    return out


def _rel_error(out, clients, rank):
    dw = ref.delta_w(clients, "fc")
    best = ref.best_rank_approx(dw, rank)
    A, B = out["fc"]
    return float((B.double() @ A.double() - best).norm() / best.norm())


def _kappa(clients):
    A_s = torch.cat([c["fc"].A.double() / len(clients) for c in clients])
    B_s = torch.cat([c["fc"].B.double() for c in clients], dim=1)
    return float(A_s.norm() * B_s.norm() / (B_s @ A_s).norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("seed", range(3))
def test_gram_route_is_as_accurate_as_the_output_dtype(dtype, seed):
    clients = _clients(seed, dtype=dtype)
    assert agg._route(40, 30, 12, dtype) == "gram"
    u = float(torch.finfo(dtype).eps)
    for rank in (1, 3, 7):
        assert _rel_error(flexlora(clients, rank=rank), clients, rank) < 4 * u


def test_near_cancelling_clients_leave_the_gram_route():
    clients = _clients(0, cancel=1e-9)
    kappa = _kappa(clients)
    assert kappa > agg._gram_kappa_limit(torch.float32, 40, 30, 12)
    # the Gram route itself loses the answer here: that is why the rule exists
    A_s = torch.cat([c["fc"].A.double() / 4 for c in clients])
    B_s = torch.cat([c["fc"].B.double() for c in clients], dim=1)
    G_a, G_b = _linalg.grams(B_s, A_s)
    B_g, A_g = _linalg.split(_linalg.gram_svd(B_s, A_s, G_a, G_b), 3, 0.5)
    best = ref.best_rank_approx(ref.delta_w(clients, "fc"), 3)
    assert float((B_g @ A_g - best).norm() / best.norm()) > 1e-3
    # flexlora notices (κ above the limit) and redoes the layer by the QR route
    assert _rel_error(flexlora(clients, rank=3), clients, 3) < 4 * float(torch.finfo().eps)


def test_float64_inputs_take_the_qr_route_and_keep_float64_accuracy():
    assert agg._gram_kappa_limit(torch.float64, 40, 30, 12) < 1
    assert agg._route(40, 30, 12, torch.float64) == "qr"
    clients = _clients(1, dtype=torch.float64, cancel=1e-6)
    assert _rel_error(flexlora(clients, rank=3), clients, 3) < 1e-8


def test_dense_route_for_many_clients_matches_the_reference():
    # R = 20·4 = 80 ≫ d_out d_in / (d_out + d_in) = 12: forming ΔW is cheaper
    assert agg._route(24, 24, 80, torch.float32) == "dense"
    clients = _clients(2, k=20, d_out=24, d_in=24, r=4)
    out = flexlora(clients, rank=4)
    assert out["fc"].A.shape == (4, 24)
    assert out["fc"].B.shape == (24, 4)
    assert _rel_error(out, clients, 4) < 4 * float(torch.finfo().eps)


def test_cost_model_follows_its_stated_rule():
    # qkv of ViT-B/16 (2304 × 768): Gram for K·r ≤ 512, QR up to twice the crossover 576, dense
    assert agg._route(2304, 768, 96, torch.float32) == "gram"
    assert agg._route(2304, 768, 480, torch.float32) == "gram"
    assert agg._route(2304, 768, 960, torch.float32) == "qr"
    assert agg._route(2304, 768, 1600, torch.float32) == "dense"
    assert agg._route(768, 768, 960, torch.float32) == "dense"


@pytest.mark.parametrize("route", ["gram", "qr", "dense"])
def test_factored_svd_gives_every_triplet_descending(route):
    g = torch.Generator().manual_seed(5)
    B = torch.randn(2, 17, 6, generator=g, dtype=torch.float64)
    A = torch.randn(2, 6, 11, generator=g, dtype=torch.float64)
    if route == "gram":
        svd = _linalg.gram_svd(B, A, *_linalg.grams(B, A))
    else:
        svd = _linalg.qr_svd(B, A) if route == "qr" else _linalg.dense_svd(B, A)
    for i in range(2):
        dw = B[i] @ A[i]
        S_ref = torch.linalg.svdvals(dw)
        m = min(svd.S.shape[-1], S_ref.numel())
        torch.testing.assert_close(
            svd.S[i, :m], S_ref[:m], rtol=1e-10, atol=1e-10 * float(S_ref[0])
        )
        assert bool((svd.S[i, :-1] >= svd.S[i, 1:]).all())
        U, S, Vh = _linalg.top(svd, 6)
        torch.testing.assert_close(U[i] @ torch.diag(S[i]) @ Vh[i], dw, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(
            U[i].mT @ U[i], torch.eye(6, dtype=torch.float64), atol=1e-9, rtol=0
        )


def test_zero_update_gives_zero_factors_on_every_route():
    for k, d in ((3, 30), (20, 24)):
        clients = _clients(3, k=k, d_out=d, d_in=d)
        zero = [{"fc": LoRAFactors(c["fc"].A, torch.zeros_like(c["fc"].B))} for c in clients]
        A, B = flexlora(zero, rank=3)["fc"]
        assert torch.isfinite(A).all()
        assert torch.isfinite(B).all()
        assert torch.count_nonzero(B @ A) == 0

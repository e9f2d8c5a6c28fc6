"""FlexLoRA's four routes (Gram, QR, dense, dense_top) and the rule that picks them, against dense
float64."""

from __future__ import annotations

import platform

import pytest
import torch

from lorafair import LoRAFactors, _heap, _linalg, errors
from lorafair import aggregate as agg
from lorafair._threads import torch_single_threaded
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
    assert all(agg._route(40, 30, 12, dtype, rank) == "gram" for rank in (1, 3, 7, None))
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
    B_g, A_g = _linalg.split(_linalg.gram_svd(B_s, A_s, G_a, G_b)[0], 3, 0.5)
    best = ref.best_rank_approx(ref.delta_w(clients, "fc"), 3)
    assert float((B_g @ A_g - best).norm() / best.norm()) > 1e-3
    # flexlora notices (κ above the limit) and redoes the layer by the QR route
    assert _rel_error(flexlora(clients, rank=3), clients, 3) < 4 * float(torch.finfo().eps)


def test_float64_inputs_take_the_qr_route_and_keep_float64_accuracy():
    assert agg._gram_kappa_limit(torch.float64, 40, 30, 12) < 1
    assert agg._route(40, 30, 12, torch.float64, 3) == "qr"
    clients = _clients(1, dtype=torch.float64, cancel=1e-6)
    assert _rel_error(flexlora(clients, rank=3), clients, 3) < 1e-8


def test_dense_route_for_many_clients_matches_the_reference():
    # R = 20·4 = 80 ≫ d_out d_in / (d_out + d_in) = 12: forming ΔW is cheaper
    assert agg._route(24, 24, 80, torch.float32, 4) == "dense"
    clients = _clients(2, k=20, d_out=24, d_in=24, r=4)
    out = flexlora(clients, rank=4)
    assert out["fc"].A.shape == (4, 24)
    assert out["fc"].B.shape == (24, 4)
    assert _rel_error(out, clients, 4) < 4 * float(torch.finfo().eps)


def test_cost_model_follows_its_stated_rule():
    f32, f64 = torch.float32, torch.float64
    # every σ needed (rank None) or float64: qkv of ViT-B/16 (2304 × 768) takes Gram for
    # K·r ≤ 512, QR up to twice the crossover 576, dense beyond
    assert agg._route(2304, 768, 96, f32, None) == "gram"
    assert agg._route(2304, 768, 480, f32, None) == "gram"
    assert agg._route(2304, 768, 960, f32, None) == "qr"
    assert agg._route(2304, 768, 1600, f32, None) == "dense"
    assert agg._route(768, 768, 960, f32, None) == "dense"
    assert agg._route(2304, 768, 960, f64, 16) == "qr"
    assert agg._route(2304, 768, 1600, f64, 16) == "dense"
    # a fixed rank in a narrow dtype: dense_top beyond R = 512 (and where its flops are lower)
    assert agg._route(2304, 768, 480, f32, 16) == "gram"
    for shape in ((2304, 768), (768, 768), (3072, 768), (768, 3072)):
        assert agg._route(*shape, 960, f32, 16) == "dense_top"
        assert agg._route(*shape, 1600, torch.bfloat16, 16) == "dense_top"
    # ... unless its block 2·rank + 8 exceeds half the shorter side
    assert agg._route(2304, 768, 960, f32, 188) == "dense_top"
    assert agg._route(2304, 768, 960, f32, 189) == "qr"
    assert agg._route(40, 30, 600, f32, 3) == "dense_top"
    assert agg._route(40, 30, 600, f32, 4) == "dense"
    # long layers beyond R = 512: forming d_out × d_in costs more than the Grams (Llama-3-8B's
    # MLP at K = 50 and 100, r = 16), until R is large enough for its flops to win again
    for R in (800, 1600):
        assert agg._route(14336, 4096, R, torch.bfloat16, 16) == "gram"
        assert agg._route(4096, 4096, R, torch.bfloat16, 16) == "gram"
    assert agg._route(14336, 4096, 6400, torch.bfloat16, 16) == "dense_top"
    # beyond R = 512 the core weighs c = 8 R³ (docs/scripts/flexlora_routes.py crossover): the
    # faster route at each measured point, where 18 and 13/3 each missed some
    assert agg._route(1024, 4096, 800, torch.bfloat16, 16) == "gram"  # 92 against 171 ms
    assert agg._route(1024, 4096, 1280, torch.bfloat16, 64) == "dense_top"  # 241 against 349
    assert agg._route(1024, 4096, 1600, torch.bfloat16, 16) == "dense_top"  # 214 against 403
    for d_out in (2304, 3072):
        assert agg._route(d_out, 768, 640, torch.bfloat16, 16) == "gram"  # 60 against 86, 91
        assert agg._route(d_out, 768, 800, torch.bfloat16, 16) == "dense_top"  # 84, 111: 154, 160
    assert agg._route(768, 768, 640, torch.bfloat16, 16) == "dense_top"  # 39 against 42


def test_long_layers_beyond_r_512_take_the_gram_route_and_stay_optimal():
    # R = 20 · 26 = 520 > 512 on a 1500 × 1500 layer: dense_top would form ΔW and its 1500²
    # Gram (5.7 Gflop), the Grams and the R × R core cost 3.3 (with the core weighted)
    assert agg._route(1500, 1500, 520, torch.float32, 26) == "gram"
    clients = _clients(5, k=20, d_out=1500, d_in=1500, r=26)
    out = flexlora(clients, rank=26)
    assert out["fc"].A.shape == (26, 1500)
    assert out["fc"].B.shape == (1500, 26)
    assert _rel_error(out, clients, 26) < 1e-5


@pytest.mark.parametrize("route", ["gram", "qr", "dense"])
def test_factored_svd_gives_every_triplet_descending(route):
    g = torch.Generator().manual_seed(5)
    B = torch.randn(2, 17, 6, generator=g, dtype=torch.float64)
    A = torch.randn(2, 6, 11, generator=g, dtype=torch.float64)
    if route == "gram":
        svd = _linalg.gram_svd(B, A, *_linalg.grams(B, A))[0]
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
    assert agg._route(64, 64, 120, torch.float32, 3) == "dense_top"
    for k, d in ((3, 30), (20, 24), (40, 64)):
        clients = _clients(3, k=k, d_out=d, d_in=d)
        zero = [{"fc": LoRAFactors(c["fc"].A, torch.zeros_like(c["fc"].B))} for c in clients]
        A, B = flexlora(zero, rank=3)["fc"]
        assert torch.isfinite(A).all()
        assert torch.isfinite(B).all()
        assert torch.count_nonzero(B @ A) == 0


# --- dense_top: ΔW formed densely, its top triplets from the smaller Gram, certified -----------


def _spectrum_clients(sigma, *, d_out=96, d_in=64, r=4, extra=16, seed=0, cancel=0.0, scale=1.0):
    """float32 clients whose ΔW is ``U diag(sigma) Vᵀ`` (up to the inputs' rounding).

    The first ``len(sigma) / r`` clients carry r components each; ``extra`` more come in pairs
    ``(A, B)``, ``(A, −B + cancel·N)`` with ``B = scale·N'`` that cancel (exactly for
    ``cancel = 0``), so that R is large enough for the dense_top route while ΔW keeps (nearly)
    the spectrum given.
    """
    g = torch.Generator().manual_seed(seed)
    n = len(sigma)
    U = torch.linalg.qr(torch.randn(d_out, n, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(d_in, n, generator=g, dtype=torch.float64)).Q
    s = torch.as_tensor(sigma, dtype=torch.float64)
    k = n // r + extra
    out = []
    for j in range(n // r):
        cols = slice(j * r, (j + 1) * r)
        A = V[:, cols].mT.float()
        B = (k * U[:, cols] * s[cols]).float()
        out.append({"fc": LoRAFactors(A, B)})
    for _ in range(extra // 2):
        A = torch.randn(r, d_in, generator=g)
        B = scale * torch.randn(d_out, r, generator=g)
        out.append({"fc": LoRAFactors(A, B)})
        out.append({"fc": LoRAFactors(A.clone(), -B + cancel * torch.randn(d_out, r, generator=g))})
    return out


def _optimality_gap(out, clients, rank):
    """``(‖ΔW − BA‖_F − √Σ_{i>rank} σ_i²) / ‖ΔW‖_F`` against a dense float64 SVD."""
    dw = ref.delta_w(clients, "fc")
    tail = float(torch.linalg.svdvals(dw)[rank:].norm())
    A, B = out["fc"]
    return (float((dw - B.double() @ A.double()).norm()) - tail) / float(dw.norm())


@torch_single_threaded  # as flexlora runs it (multi-threaded small kernels crawl on a busy CPU)
def _raw_top(clients, rank, u=2.0**-24, route="dense_top"):
    """One step's top ``rank`` answer on the float64 stacks, before any fallback: (B A, certified).

    ``route``: ``dense_top`` (``dense_top_svd`` whole, its CPU second stage included);
    ``iteration`` / ``full``: ``top_eigh`` / ``full_top_eigh`` alone on ``G = ΔWᵀΔW``; ``gram``:
    ``top_eigh`` alone on the Gram route's core ``C = PᵀG_bP``, with that route's product
    ``B_s P W Θ⁻¹ Wᵀ Pᵀ G_b A_s``.
    """
    A_s = torch.cat([c["fc"].A.double() / len(clients) for c in clients])[None]
    B_s = torch.cat([c["fc"].B.double() for c in clients], dim=1)[None]
    if route == "dense_top":
        top = _linalg.dense_top_svd(B_s, A_s, rank, u)
        B, A = _linalg.split(top.svd, rank, 0.5)
        return B[0] @ A[0], bool(top.certified[0])
    if route == "gram":
        G_a, G_b = _linalg.grams(B_s, A_s)
        R = G_a.shape[-1]
        P = _linalg._gram_root(G_a, R * 2.0**-52)
        C = P.mT @ G_b @ P
        C = (C + C.mT) / 2
        tr = C.diagonal(dim1=-2, dim2=-1).sum(-1)
        top = _linalg.top_eigh(C, rank, 2 * R * 2.0**-53 * tr, u * tr.sqrt(), oblique=True)
        W, theta = top.vectors, top.values
        out = B_s @ P @ W @ torch.diag_embed(1 / theta) @ W.mT @ P.mT @ G_b @ A_s
        return out[0], bool(top.certified[0])
    dw = B_s @ A_s
    G = dw.mT @ dw
    fro2 = G.diagonal(dim1=-2, dim2=-1).sum(-1)
    delta, tol = 2 * dw.shape[-2] * 2.0**-53 * fro2, u * fro2.sqrt()
    if route == "iteration":
        top = _linalg.top_eigh(G, rank, delta, tol, oblique=False)
    else:
        top = _linalg.full_top_eigh(G, rank, delta, tol)
    W = top.vectors
    return (dw @ W @ W.mT)[0], bool(top.certified[0])


# d_out = 200, d_in = 160, R = 96 ≥ 4·(2·4 + 8): the Gram route with its certified core
_GRAM_TOP = {"d_out": 200, "d_in": 160, "extra": 8}


def _decaying(n=64, *, k=4, ratio=0.05):
    """σ: k values in [1, 0.7], then a tail of ``ratio``·(1 … 0.5)."""
    head = [1.0 - 0.3 * i / max(1, k - 1) for i in range(k)]
    return head + [ratio * (1.0 - 0.5 * i / (n - k)) for i in range(n - k)]


def test_dense_top_route_is_taken_for_these_clients():
    clients = _spectrum_clients(_decaying())
    R = sum(c["fc"].A.shape[0] for c in clients)
    assert R == 128
    assert agg._route(96, 64, R, torch.float32, 4) == "dense_top"
    assert agg._route(96, 64, R, torch.float32, None) != "dense_top"  # every σ: not this route


@pytest.mark.parametrize("split", ["balanced", "left"])
@pytest.mark.parametrize("seed", range(3))
def test_dense_top_matches_the_dense_svd_reference(seed, split):
    clients = _spectrum_clients(_decaying(), seed=seed)
    assert _raw_top(clients, 4)[1]  # certified: the route's own answer is the one returned
    out = flexlora(clients, rank=4, split=split)
    A, B = out["fc"]
    assert A.shape == (4, 64)
    assert B.shape == (96, 4)
    assert abs(_optimality_gap(out, clients, 4)) < 1e-6
    best = ref.best_rank_approx(ref.delta_w(clients, "fc"), 4)
    assert float((B.double() @ A.double() - best).norm() / best.norm()) < 1e-6
    if split == "left":  # A = V_rᵀ: orthonormal rows
        torch.testing.assert_close(
            A.double() @ A.double().mT, torch.eye(4, dtype=torch.float64), atol=1e-6, rtol=0
        )
    else:  # B = U S^½, A = S^½ Vᵀ: equal column / row norms
        torch.testing.assert_close(
            B.double().norm(dim=0), A.double().norm(dim=1), rtol=1e-5, atol=0
        )


def test_dense_top_on_random_clients_matches_the_reference():
    clients = _clients(4, k=40, d_out=64, d_in=96, r=3)  # d_out < d_in: the Gram of ΔWᵀ
    assert agg._route(64, 96, 120, torch.float32, 3) == "dense_top"
    for rank in (1, 3):
        out = flexlora(clients, rank=rank)
        assert abs(_optimality_gap(out, clients, rank)) < 1e-6


def test_dense_top_with_near_cancelling_clients_matches_the_reference():
    # pairs 10³ times the signal cancel up to a residue of 10⁻⁴ (and float32 rounding)
    clients = _spectrum_clients(_decaying(), cancel=1e-4, scale=1e3, seed=3)
    assert _kappa(clients) > 1e4
    out = flexlora(clients, rank=4)
    assert abs(_optimality_gap(out, clients, 4)) < 1e-6


def test_dense_top_certificate_refuses_an_unconverged_subspace():
    # a flat spectrum (σ from 1 to 0.5 over 64 values): six block iterations cannot resolve the
    # top 4, and their raw answer is measurably worse than the optimum
    sigma = [1.0 - 0.5 * i / 63 for i in range(64)]
    clients = _spectrum_clients(sigma, seed=1)
    dw = ref.delta_w(clients, "fc")
    raw, certified = _raw_top(clients, 4, route="iteration")
    tail = float(torch.linalg.svdvals(dw)[4:].norm())
    assert (float((dw - raw).norm()) - tail) / float(dw.norm()) > 1e-4
    assert not certified
    # the full eigh of the same G needs no gap: certified, and optimal
    raw, certified = _raw_top(clients, 4, route="full")
    assert certified
    assert (float((dw - raw).norm()) - tail) / float(dw.norm()) <= 2.0**-24
    assert _raw_top(clients, 4)[1]  # dense_top_svd takes that second stage on the CPU
    assert abs(_optimality_gap(flexlora(clients, rank=4), clients, 4)) < 1e-6


def test_full_top_eigh_refuses_a_nearly_rank_k_update():
    # ΔW of rank 4 plus 1e-7 noise: the optimal error is tiny, and squaring cannot certify it
    sigma = [1.0, 0.9, 0.8, 0.7] + [1e-7] * 60
    clients = _spectrum_clients(sigma, seed=4)
    assert not _raw_top(clients, 4, route="full")[1]
    assert abs(_optimality_gap(flexlora(clients, rank=4), clients, 4)) < 1e-6


def _assert_certified_answers_are_optimal(clients, k):  # type: ignore[no-untyped-def]
    """Every route's certified top-``k`` answer is optimal to the inputs' rounding (float32
    unit roundoff of ‖ΔW‖), and flexlora's own answer is optimal to 1e-6."""
    dw = ref.delta_w(clients, "fc")
    tail = float(torch.linalg.svdvals(dw)[k:].norm())
    for route in ("iteration", "full", "dense_top"):
        raw, certified = _raw_top(clients, k, route=route)
        if certified:
            assert (float((dw - raw).norm()) - tail) / float(dw.norm()) <= 2.0**-24
    assert abs(_optimality_gap(flexlora(clients, rank=k), clients, k)) < 1e-6


@pytest.mark.parametrize("gap", [0.0, 1e-9, 1e-6, 1e-4])
def test_dense_top_near_degenerate_sigma_r_is_still_optimal(gap):
    # σ_4 = σ_5 (1 − gap): the top-4 subspace is (nearly) not unique. The float32 inputs split
    # even gap = 0 by their rounding; the block (16 > 4 columns) then holds both vectors and
    # Rayleigh–Ritz separates them, so a certificate may be given: then it must be right.
    sigma = _decaying()
    sigma[3], sigma[4] = 0.7, 0.7 * (1 - gap)
    clients = _spectrum_clients(sigma, seed=2)
    _assert_certified_answers_are_optimal(clients, 4)


def test_dense_top_exactly_degenerate_sigma_r_is_not_certified_by_the_iteration():
    # float64 factors with σ_4 = σ_5 = 0.7 (to float64 rounding): no gap at k, so Cholesky of
    # μI − (I − WWᵀ) G (I − WWᵀ) − cI must fail whatever W the iteration found
    g = torch.Generator().manual_seed(9)
    U = torch.linalg.qr(torch.randn(96, 64, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64)).Q
    sigma = torch.tensor(_decaying(), dtype=torch.float64)
    sigma[3] = sigma[4] = 0.7

    def top(sigma):
        dw = U * sigma @ V.mT
        G = (dw.mT @ dw)[None]
        fro2 = G.diagonal(dim1=-2, dim2=-1).sum(-1)
        d, tol = 2 * 96 * 2.0**-53 * fro2, 2.0**-24 * fro2.sqrt()
        return _linalg.top_eigh(G, 4, d, tol, oblique=False), _linalg.full_top_eigh(G, 4, d, tol)

    it, full = top(sigma)
    assert not bool(it.certified[0])
    assert bool(full.certified[0])  # any basis of the tie is optimal: the gap-free bound holds
    # with the gap restored the iteration certifies: the refusal is the degeneracy's doing
    sigma[4] = 0.6
    assert bool(top(sigma)[0].certified[0])


@pytest.mark.parametrize("seed", range(6))
def test_dense_top_certificate_holds_whenever_it_is_given(seed):
    # spectra from a clear gap to none; a certified answer is optimal to the inputs' rounding
    g = torch.Generator().manual_seed(100 + seed)
    ratio = float(torch.rand((), generator=g)) * 1.2
    clients = _spectrum_clients(_decaying(ratio=ratio), seed=seed)
    _assert_certified_answers_are_optimal(clients, 4)


def test_dense_top_never_certifies_at_float64_precision():
    clients = _spectrum_clients(_decaying())
    for route in ("iteration", "full", "dense_top"):
        assert not _raw_top(clients, 4, u=2.0**-53, route=route)[1]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("which", ["A", "B"])
def test_dense_top_names_a_non_finite_client(bad, which):
    clients = _spectrum_clients(_decaying())
    A, B = clients[2]["fc"]
    A, B = A.clone(), B.clone()
    (A if which == "A" else B)[0, 0] = bad
    if which == "A":  # the entry meets a zero column of B: IEEE still propagates (0·Inf = NaN)
        B[:, 0] = 0.0
    clients[2] = {"fc": LoRAFactors(A, B)}
    with pytest.raises(errors.NonFiniteError, match=rf"'fc': client 2 .* in {which}"):
        flexlora(clients, rank=4)


def test_gram_route_top_core_is_taken_for_these_clients():
    clients = _spectrum_clients(_decaying(), **_GRAM_TOP)
    assert sum(c["fc"].A.shape[0] for c in clients) == 96
    assert agg._route(200, 160, 96, torch.float32, 4) == "gram"
    assert _linalg._TOP_GRAM_MIN * _linalg.top_block(4) <= 96
    _, certified = _raw_top(clients, 4, route="gram")
    assert certified


@pytest.mark.parametrize("seed", range(3))
def test_gram_route_top_core_matches_the_dense_svd_reference(seed):
    clients = _spectrum_clients(_decaying(), seed=seed, **_GRAM_TOP)
    out = flexlora(clients, rank=4)
    assert abs(_optimality_gap(out, clients, 4)) < 1e-6
    best = ref.best_rank_approx(ref.delta_w(clients, "fc"), 4)
    A, B = out["fc"]
    assert float((B.double() @ A.double() - best).norm() / best.norm()) < 1e-6


def test_gram_route_top_core_refuses_an_unconverged_subspace():
    sigma = [1.0 - 0.5 * i / 63 for i in range(64)]
    clients = _spectrum_clients(sigma, seed=1, **_GRAM_TOP)
    dw = ref.delta_w(clients, "fc")
    raw, certified = _raw_top(clients, 4, route="gram")
    tail = float(torch.linalg.svdvals(dw)[4:].norm())
    assert (float((dw - raw).norm()) - tail) / float(dw.norm()) > 1e-4
    assert not certified
    # flexlora redoes the layer with the full R × R eigendecomposition
    assert abs(_optimality_gap(flexlora(clients, rank=4), clients, 4)) < 1e-6


@pytest.mark.parametrize("seed", range(6))
def test_gram_route_top_core_certificate_holds_whenever_it_is_given(seed):
    g = torch.Generator().manual_seed(200 + seed)
    ratio = float(torch.rand((), generator=g)) * 1.2
    sigma = _decaying(ratio=ratio)
    if seed == 0:
        sigma[3], sigma[4] = 0.7, 0.7  # σ_4 = σ_5 up to the inputs' rounding
    clients = _spectrum_clients(sigma, seed=seed, **_GRAM_TOP)
    dw = ref.delta_w(clients, "fc")
    raw, certified = _raw_top(clients, 4, route="gram")
    tail = float(torch.linalg.svdvals(dw)[4:].norm())
    if certified:
        assert (float((dw - raw).norm()) - tail) / float(dw.norm()) <= 2.0**-24
    assert abs(_optimality_gap(flexlora(clients, rank=4), clients, 4)) < 1e-6


def test_dense_top_does_not_certify_clients_that_cancel_beyond_float64_forming():
    # ΔW = B₁A₁ − (1 − 1e-8) B₁A₁: forming it in float64 errs by ~R·u₆₄·‖B‖‖A‖, far above
    # u_in·‖ΔW‖ for float32 (κ ≈ 1e8); its computed spectrum is clean, so only the forming
    # term of the certificate can refuse it
    g = torch.Generator().manual_seed(3)
    B1 = torch.randn(1, 80, 8, generator=g, dtype=torch.float64)
    A1 = torch.randn(1, 8, 60, generator=g, dtype=torch.float64)
    B = torch.cat([B1, -(1 - 1e-8) * B1], dim=-1)
    A = torch.cat([A1, A1], dim=-2)
    assert not bool(_linalg.dense_top_svd(B, A, 4, 2.0**-24).certified[0])
    # the same clients without the cancellation are certified
    assert bool(_linalg.dense_top_svd(B.abs(), A, 4, 2.0**-24).certified[0])


def test_flexlora_returns_the_gram_route_s_freed_memory_before_the_stacked_routes(monkeypatch):
    """A call with CPU layers on the Gram route and on a stacked route (here dense) hands the
    memory its Gram phase freed back to the system between the two (``_heap.release``), once,
    and its result is the same to the bit as without it."""
    g = torch.Generator().manual_seed(5)
    clients = [
        {
            "long": LoRAFactors(torch.randn(3, 30, generator=g), torch.randn(40, 3, generator=g)),
            "tiny": LoRAFactors(torch.randn(3, 8, generator=g), torch.randn(8, 3, generator=g)),
        }
        for _ in range(4)
    ]
    clients = [
        {n: LoRAFactors(f.A.bfloat16(), f.B.bfloat16()) for n, f in c.items()} for c in clients
    ]
    assert agg._route(40, 30, 12, torch.bfloat16, 3) == "gram"
    assert agg._route(8, 8, 12, torch.bfloat16, 3) in ("dense", "dense_top")
    events = []
    for name in ("_gram_route_host", "_flexlora_svd"):
        inner = getattr(agg, name)

        def logged(*a, _inner=inner, _name=name, **k):
            events.append(_name)
            return _inner(*a, **k)

        monkeypatch.setattr(agg, name, logged)
    monkeypatch.setattr(_heap, "release", lambda: events.append("release"))
    out = flexlora(clients, rank=3)
    assert events == ["_gram_route_host", "release", "_flexlora_svd"]
    monkeypatch.undo()
    _assert_same(out, flexlora(clients, rank=3))


def _assert_same(one, two):
    for name in one:
        assert torch.equal(one[name].A, two[name].A)
        assert torch.equal(one[name].B, two[name].B)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_heap_release_finds_glibc_s_malloc_trim():
    assert _heap._malloc_trim() is not None
    _heap.release()


def test_gram_route_hands_memory_back_only_where_the_cores_change_thread(monkeypatch):
    """Five same-shaped layers in chunks of two (a chunk of two: two core jobs, on the workers;
    the last chunk of one: one job, on the caller's thread): ``release_beyond`` runs once,
    before the last chunk, with the call's start plus ``_RETAINED`` times its input; the result
    is the same to the bit as without it."""
    g = torch.Generator().manual_seed(6)
    names = [f"l{i}" for i in range(5)]
    clients = [
        {
            n: LoRAFactors(torch.randn(4, 48, generator=g), torch.randn(64, 4, generator=g))
            for n in names
        }
        for _ in range(4)
    ]
    R = 16
    assert agg._route(64, 48, R, torch.float32, 4) == "gram"
    monkeypatch.setattr(agg._stacks, "GRAM_BYTES", 2 * 2 * 8 * R * R)  # two layers a chunk
    monkeypatch.setattr(agg, "_CORE_BYTES", 16 * R * R)  # one layer a job
    monkeypatch.setattr(_heap, "resident", lambda: 1 << 30)
    events = []
    inner = agg._gram_route_host

    def logged(groups, *a, **k):
        events.append(sum(len(layers) for layers in groups))
        return inner(groups, *a, **k)

    monkeypatch.setattr(agg, "_gram_route_host", logged)
    monkeypatch.setattr(_heap, "release_beyond", lambda limit: events.append(("release", limit)))
    out = flexlora(clients, rank=4)
    input_bytes = 5 * 4 * (4 * 48 + 64 * 4) * 4
    assert events == [2, 2, ("release", (1 << 30) + int(agg._RETAINED * input_bytes)), 1]
    monkeypatch.setattr(_heap, "release_beyond", lambda limit: False)
    _assert_same(out, flexlora(clients, rank=4))


def test_release_beyond_trims_only_above_its_limit(monkeypatch):
    trims = []
    monkeypatch.setattr(_heap, "release", lambda: trims.append(1))
    monkeypatch.setattr(_heap, "resident", lambda: 1000)
    assert not _heap.release_beyond(1000)
    assert trims == []
    assert _heap.release_beyond(999)
    assert trims == [1]
    monkeypatch.setattr(_heap, "resident", lambda: 0)  # unknown: never
    assert not _heap.release_beyond(-1)
    assert trims == [1]


@pytest.mark.skipif(platform.system() != "Linux", reason="/proc/self/statm is Linux's")
def test_resident_reads_this_process_s_memory():
    before = _heap.resident()
    block = torch.ones(64 << 18)  # 64 MiB, written
    assert _heap.resident() - before >= 48 << 20
    del block

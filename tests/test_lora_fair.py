"""LoRA-FAIR (issue 4): the factored, batched residual solver against a plain dense reference.

The reference below forms ΔW and (B̄ + ΔB)Ā densely in float64 and runs torch's L-BFGS with a
strong-Wolfe line search from several starts; it shares no code with ``lorafair._fair``.
"""

from __future__ import annotations

import itertools
import math
import random
from typing import Any, NamedTuple

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lorafair.aggregate import ResidualSolution, fedit, lora_fair, solve_residual
from lorafair.errors import LayerKeyError, LoRAFairError, LoRAShapeError
from lorafair.metrics import FairReport, lora_fair_report
from lorafair.testing import strategies as lst
from lorafair.types import LoRAFactors

F64 = torch.float64


# --------------------------------------------------------------------------- dense reference
def dense_parts(clients: list[dict[str, Any]], weights: list[float] | None, name: str) -> tuple:
    """Ā, B̄ (zero-padded to the largest rank) and ΔW, all dense float64."""
    k = len(clients)
    p = [1.0 / k] * k if weights is None else [w / sum(weights) for w in weights]
    As = [c[name][0].to(F64) for c in clients]
    Bs = [c[name][1].to(F64) for c in clients]
    r = max(a.shape[0] for a in As)
    Abar = sum(
        w * torch.cat([a, a.new_zeros(r - a.shape[0], a.shape[1])])
        for w, a in zip(p, As, strict=True)
    )
    Bbar = sum(
        w * torch.cat([b, b.new_zeros(b.shape[0], r - b.shape[1])], 1)
        for w, b in zip(p, Bs, strict=True)
    )
    dW = sum(w * b @ a for w, a, b in zip(p, As, Bs, strict=True))
    return Abar, Bbar, dW


def dense_objective(D, Abar, Bbar, dW, lam, norm, similarity, residual_on):  # type: ignore[no-untyped-def]
    """1 − S(ΔW, product) + λ reg(D); a cosine with a zero side counts 0."""
    Y = (Bbar + D) @ Abar if residual_on == "B" else Bbar @ (Abar + D)
    if similarity == "flat":
        nx, ny = dW.norm(), Y.norm()
        cos = (dW * Y).sum() / (nx * ny) if (nx > 0 and ny > 0) else (Y * 0).sum()
    else:
        nx, ny = dW.norm(dim=0), Y.norm(dim=0)
        ok = (nx > 0) & (ny > 0)
        den = torch.where(ok, nx * ny, torch.ones_like(nx))
        cos = torch.where(ok, (dW * Y).sum(0) / den, torch.zeros_like(nx)).mean()
    reg = D.norm() if norm == "fro" else (D * D).sum()
    return 1 - cos + lam * reg


def dense_reference(Abar, Bbar, dW, lam, norm, similarity, residual_on, seed=0):  # type: ignore[no-untyped-def]
    """Best objective of torch L-BFGS (strong Wolfe) from ΔB≈0, the LS fit, its half, a random."""
    gen = torch.Generator().manual_seed(seed)
    shape = Bbar.shape if residual_on == "B" else Abar.shape
    if residual_on == "B":
        ls = dW @ torch.linalg.pinv(Abar) - Bbar
    else:
        ls = torch.linalg.pinv(Bbar) @ dW - Abar
    size = float(ls.norm()) + float((Bbar if residual_on == "B" else Abar).norm()) + 1e-3
    starts = [1e-9 * torch.randn(shape, generator=gen, dtype=F64), ls, 0.5 * ls]
    starts += [size * torch.randn(shape, generator=gen, dtype=F64) / shape.numel() ** 0.5]
    zero = torch.zeros(shape, dtype=F64)
    best = float(dense_objective(zero, Abar, Bbar, dW, lam, norm, similarity, residual_on))
    best_D = zero
    for s in starts:
        D = s.clone().requires_grad_(True)
        opt = torch.optim.LBFGS(
            [D],
            max_iter=400,
            tolerance_grad=1e-13,
            tolerance_change=1e-15,
            history_size=20,
            line_search_fn="strong_wolfe",
        )

        def closure(opt=opt, D=D) -> torch.Tensor:  # type: ignore[no-untyped-def]
            opt.zero_grad()
            f = dense_objective(D, Abar, Bbar, dW, lam, norm, similarity, residual_on)
            f.backward()
            return f

        opt.step(closure)
        with torch.no_grad():
            f = float(dense_objective(D, Abar, Bbar, dW, lam, norm, similarity, residual_on))
        if math.isfinite(f) and f < best:
            best, best_D = f, D.detach().clone()
    return best, best_D


def projection_bound(Abar, Bbar, dW, residual_on):  # type: ignore[no-untyped-def]
    """‖ΔW Ā⁺Ā‖/‖ΔW‖ (B side) or ‖B̄B̄⁺ΔW‖/‖ΔW‖ (A side): the best cosine with one factor fixed."""
    if residual_on == "B":
        proj = dW @ torch.linalg.pinv(Abar) @ Abar
    else:
        proj = Bbar @ torch.linalg.pinv(Bbar) @ dW
    return float(proj.norm() / dW.norm())


def make_clients(seed: int, k: int, d_out: int, d_in: int, r: int | list[int]) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    rs = r if isinstance(r, list) else [r] * k
    return [
        {
            "fc": LoRAFactors(
                torch.randn(rs[c], d_in, generator=gen, dtype=F64),
                torch.randn(d_out, rs[c], generator=gen, dtype=F64),
            )
        }
        for c in range(k)
    ]


def ours(sol: ResidualSolution, parts: tuple, lam, norm, similarity, residual_on) -> float:  # type: ignore[no-untyped-def]
    Abar, Bbar, dW = parts
    return float(
        dense_objective(sol.delta.to(F64), Abar, Bbar, dW, lam, norm, similarity, residual_on)
    )


small_clients = lst.clients_and_weights(
    n_clients=st.integers(2, 4),
    n_layers=1,
    shapes=lst.layer_shapes(min_dim=1, max_dim=8),
    rank=lst.ranks(max_rank=3),
)


# --------------------------------------------------------------------------- the reference tests
@pytest.mark.parametrize("residual_on", ["B", "A"])
@pytest.mark.parametrize("similarity", ["flat", "columns"])
@settings(max_examples=4, deadline=None)
@given(
    cw=small_clients,
    norm=st.sampled_from(["fro", "fro_squared"]),
    lam=st.sampled_from([0.0, 0.01, 0.1]),
)
def test_objective_at_most_dense_reference(cw, norm, lam, similarity, residual_on) -> None:  # type: ignore[no-untyped-def]
    clients, weights = cw
    parts = dense_parts(clients, weights, "layer0")
    sol = solve_residual(
        clients, weights, lam=lam, norm=norm, similarity=similarity, residual_on=residual_on
    )["layer0"]
    mine = ours(sol, parts, lam, norm, similarity, residual_on)
    assert math.isclose(mine, sol.objective, rel_tol=0, abs_tol=1e-9)
    ref, _ = dense_reference(*parts, lam, norm, similarity, residual_on)
    assert mine <= ref + 1e-7


def test_objective_matches_reference_on_a_fixed_case_all_options() -> None:
    clients = make_clients(3, k=3, d_out=6, d_in=3, r=2)
    parts = dense_parts(clients, [1.0, 2.0, 3.0], "fc")
    for norm in ("fro", "fro_squared"):
        for similarity in ("flat", "columns"):
            for residual_on in ("B", "A"):
                sol = solve_residual(
                    clients,
                    [1.0, 2.0, 3.0],
                    lam=0.05,
                    norm=norm,
                    similarity=similarity,
                    residual_on=residual_on,
                )["fc"]
                ref, _ = dense_reference(*parts, 0.05, norm, similarity, residual_on)
                assert ours(sol, parts, 0.05, norm, similarity, residual_on) <= ref + 1e-7
                assert sol.converged


def _searched_case(seed: int) -> tuple[list[dict], list[float] | None]:
    """Case ``seed`` of a random search: K 2–4, d 1–8, r 1–3, B scales 10^-2…10^2."""
    rnd = random.Random(seed)
    k, d_out, d_in, r = (rnd.randint(*span) for span in ((2, 4), (1, 8), (1, 8), (1, 3)))
    gen = torch.Generator().manual_seed(seed)
    scales = [10.0 ** rnd.randint(-2, 2) for _ in range(k)]
    clients = []
    for c in range(k):
        A = torch.randn(r, d_in, generator=gen, dtype=F64)
        B = torch.randn(d_out, r, generator=gen, dtype=F64) * scales[c]
        clients.append({"layer0": LoRAFactors(A, B)})
    weights = None if rnd.random() < 0.5 else [rnd.uniform(0, 1000) for _ in range(k)]
    return clients, weights


@pytest.mark.parametrize(
    ("seed", "lam", "norm"),
    [
        (5259, 0.0, "fro_squared"),  # the three starts all end in a worse local minimum
        (6210, 0.01, "fro"),  # the infimum: the whole product vanishes (B' → 0)
    ],
)
def test_columns_cases_from_random_search(seed, lam, norm) -> None:  # type: ignore[no-untyped-def]
    clients, weights = _searched_case(seed)
    parts = dense_parts(clients, weights, "layer0")
    sol = solve_residual(clients, weights, lam=lam, norm=norm, similarity="columns")["layer0"]
    mine = ours(sol, parts, lam, norm, "columns", "B")
    assert math.isclose(mine, sol.objective, rel_tol=0, abs_tol=1e-9)
    ref, _ = dense_reference(*parts, lam, norm, "columns", "B")
    assert mine <= ref + 1e-7


@pytest.mark.parametrize(
    ("lam", "norm", "residual_on"),
    [(1.0, "fro_squared", "B"), (0.01, "fro", "B"), (0.05, "fro", "A")],
)
def test_columns_large_problems_at_most_dense_reference(lam, norm, residual_on) -> None:  # type: ignore[no-untyped-def]
    # Above NEWTON_MAX_UNKNOWNS unknowns the columns form runs L-BFGS, with the line search's
    # polynomial values and the starts scouted (one best start per layer goes on).
    from lorafair._fair import _tolerances as _tol

    clients = make_clients(41, k=4, d_out=40, d_in=34, r=6)
    # unknowns: (K + 2) r basis rows × r (residual on B), r × d_in (on A)
    assert min((4 + 2) * 6 * 6, 6 * 34) > _tol.NEWTON_MAX_UNKNOWNS
    parts = dense_parts(clients, None, "fc")
    opts = {"lam": lam, "norm": norm, "similarity": "columns", "residual_on": residual_on}
    sol = solve_residual(clients, **opts)["fc"]  # type: ignore[arg-type]
    mine = ours(sol, parts, lam, norm, "columns", residual_on)
    assert math.isclose(mine, sol.objective, rel_tol=0, abs_tol=1e-9)
    ref, _ = dense_reference(*parts, lam, norm, "columns", residual_on)
    assert mine <= ref + 1e-7


# --------------------------------------------------------------------------- λ = 0
@pytest.mark.parametrize("residual_on", ["B", "A"])
@settings(max_examples=10, deadline=None)
@given(cw=small_clients)
def test_lam0_reaches_projection_bound(cw, residual_on) -> None:  # type: ignore[no-untyped-def]
    clients, weights = cw
    Abar, Bbar, dW = dense_parts(clients, weights, "layer0")
    assume(float(dW.norm()) > 1e-9)
    sol = solve_residual(clients, weights, lam=0.0, residual_on=residual_on)["layer0"]
    bound = projection_bound(Abar, Bbar, dW, residual_on)
    D = sol.delta.to(F64)
    Y = (Bbar + D) @ Abar if residual_on == "B" else Bbar @ (Abar + D)
    cos = float((Y * dW).sum() / (Y.norm() * dW.norm())) if Y.norm() > 0 else 0.0
    assert cos == pytest.approx(bound, abs=1e-6)
    assert sol.cosine == pytest.approx(bound, abs=1e-6)


def test_lam0_returns_the_maximiser_closest_to_fedit() -> None:
    clients = make_clients(5, k=3, d_out=7, d_in=5, r=3)
    Abar, Bbar, dW = dense_parts(clients, None, "fc")
    (dB,) = (s.delta for s in solve_residual(clients, lam=0.0).values())
    Bp = Bbar + dB
    # Every cosine maximiser is t·ΔW Ā⁺ (+ a part that Ā annihilates); with Ā of full row rank
    # the closest to B̄ has t = <ΔWĀ⁺, B̄>/‖ΔWĀ⁺‖².
    M = dW @ torch.linalg.pinv(Abar)
    t = float((M * Bbar).sum() / (M * M).sum())
    assert t > 0
    torch.testing.assert_close(Bp, t * M, rtol=1e-9, atol=1e-10)


# --------------------------------------------------------------------------- monotonicity in λ
@pytest.mark.parametrize("norm", ["fro", "fro_squared"])
@pytest.mark.parametrize("residual_on", ["B", "A"])
def test_tradeoff_is_monotone_in_lam(norm, residual_on) -> None:  # type: ignore[no-untyped-def]
    clients = make_clients(11, k=4, d_out=9, d_in=7, r=3)
    lams = [0.0, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 1e3]
    sols = [
        solve_residual(clients, lam=lam, norm=norm, residual_on=residual_on)["fc"] for lam in lams
    ]
    norms = [float(s.delta.norm()) for s in sols]
    coss = [s.cosine for s in sols]
    for a, b in itertools.pairwise(norms):
        assert b <= a + 1e-7 * (1 + a)
    for a, b in itertools.pairwise(coss):
        assert b <= a + 1e-9
    assert norms[-1] <= 1e-3 * norms[0]
    assert norms[0] > 0
    if norm == "fro":  # the subgradient condition holds for large λ: exactly FedIT
        assert norms[-1] == 0.0


@settings(max_examples=12, deadline=None)
@given(
    cw=small_clients,
    norm=st.sampled_from(["fro", "fro_squared"]),
    similarity=st.sampled_from(["flat", "columns"]),
    residual_on=st.sampled_from(["B", "A"]),
    lam=st.sampled_from([0.0, 0.01, 1.0]),
)
def test_never_worse_than_fedit(cw, norm, similarity, residual_on, lam) -> None:  # type: ignore[no-untyped-def]
    clients, weights = cw
    parts = dense_parts(clients, weights, "layer0")
    sol = solve_residual(
        clients, weights, lam=lam, norm=norm, similarity=similarity, residual_on=residual_on
    )["layer0"]
    zero = torch.zeros_like(sol.delta, dtype=F64)
    fedit_obj = float(dense_objective(zero, *parts, lam, norm, similarity, residual_on))
    assert ours(sol, parts, lam, norm, similarity, residual_on) <= fedit_obj + 1e-12


# --------------------------------------------------------------------------- edge cases
def test_zero_update_returns_fedit() -> None:
    clients = make_clients(1, k=3, d_out=5, d_in=4, r=2)
    clients = [{"fc": LoRAFactors(c["fc"].A, torch.zeros_like(c["fc"].B))} for c in clients]
    for similarity in ("flat", "columns"):
        for residual_on in ("B", "A"):
            out = lora_fair(clients, similarity=similarity, residual_on=residual_on)
            ref = fedit(clients)
            assert torch.equal(out["fc"].A, ref["fc"].A)
            assert torch.equal(out["fc"].B, ref["fc"].B)
            sol = solve_residual(clients, similarity=similarity, residual_on=residual_on)["fc"]
            assert torch.count_nonzero(sol.delta) == 0
            assert sol.cosine == 0.0
            assert sol.objective == 1.0


def test_fedit_product_zero_but_update_nonzero() -> None:
    gen = torch.Generator().manual_seed(4)
    A1, A2 = (
        torch.randn(2, 5, generator=gen, dtype=F64),
        torch.randn(2, 5, generator=gen, dtype=F64),
    )
    b = torch.randn(6, 2, generator=gen, dtype=F64)
    clients = [{"fc": (A1, b)}, {"fc": (A2, -b)}]  # B̄ = 0, so B̄Ā = 0, but ΔW = b(A1 − A2)/2
    parts = dense_parts(clients, None, "fc")
    assert float(parts[1].norm()) == 0.0
    assert float(parts[2].norm()) > 0
    for lam in (0.0, 0.01):
        for norm in ("fro", "fro_squared"):
            sol = solve_residual(clients, lam=lam, norm=norm)["fc"]
            assert torch.isfinite(sol.delta).all()
            ref, _ = dense_reference(*parts, lam, norm, "flat", "B")
            assert ours(sol, parts, lam, norm, "flat", "B") <= ref + 1e-7
            assert sol.cosine > 0.5
    sol0 = solve_residual(clients, lam=0.0)["fc"]
    assert sol0.cosine == pytest.approx(projection_bound(*parts, "B"), abs=1e-9)


@pytest.mark.parametrize("residual_on", ["B", "A"])
def test_rank_deficient_A_and_rank_above_d_in(residual_on) -> None:  # type: ignore[no-untyped-def]
    clients = make_clients(8, k=3, d_out=6, d_in=2, r=4)  # r > d_in: Ā Āᵀ is singular
    parts = dense_parts(clients, None, "fc")
    for lam in (0.0, 0.01):
        sol = solve_residual(clients, lam=lam, residual_on=residual_on)["fc"]
        assert torch.isfinite(sol.delta).all()
        ref, _ = dense_reference(*parts, lam, "fro", "flat", residual_on)
        assert ours(sol, parts, lam, "fro", "flat", residual_on) <= ref + 1e-7
    sol0 = solve_residual(clients, lam=0.0, residual_on=residual_on)["fc"]
    assert sol0.cosine == pytest.approx(projection_bound(*parts, residual_on), abs=1e-6)


@pytest.mark.parametrize("similarity", ["flat", "columns"])
@pytest.mark.parametrize("residual_on", ["B", "A"])
def test_single_client_is_exact(similarity, residual_on) -> None:  # type: ignore[no-untyped-def]
    (client,) = make_clients(2, k=1, d_out=5, d_in=4, r=2)
    for lam in (0.0, 0.01):
        sol = solve_residual([client], lam=lam, similarity=similarity, residual_on=residual_on)
        assert torch.count_nonzero(sol["fc"].delta) == 0
        out = lora_fair([client], lam=lam, similarity=similarity, residual_on=residual_on)
        assert torch.equal(out["fc"].A, client["fc"].A)
        assert torch.equal(out["fc"].B, client["fc"].B)
        assert sol["fc"].cosine == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("similarity", ["flat", "columns"])
def test_different_ranks_are_zero_padded(similarity) -> None:  # type: ignore[no-untyped-def]
    clients = make_clients(6, k=3, d_out=7, d_in=5, r=[1, 3, 2])
    parts = dense_parts(clients, [1.0, 1.0, 2.0], "fc")
    out = lora_fair(clients, [1.0, 1.0, 2.0], similarity=similarity)["fc"]
    assert out.A.shape == (3, 5)
    assert out.B.shape == (7, 3)
    torch.testing.assert_close(out.A, parts[0], rtol=0, atol=1e-14)
    sol = solve_residual(clients, [1.0, 1.0, 2.0], similarity=similarity)["fc"]
    ref, _ = dense_reference(*parts, 0.01, "fro", similarity, "B")
    assert ours(sol, parts, 0.01, "fro", similarity, "B") <= ref + 1e-7


# --------------------------------------------------------------------------- API behaviour
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_round_trip(dtype) -> None:  # type: ignore[no-untyped-def]
    clients64 = make_clients(9, k=3, d_out=8, d_in=6, r=2)
    clients = [{"fc": LoRAFactors(c["fc"].A.to(dtype), c["fc"].B.to(dtype))} for c in clients64]
    out = lora_fair(clients)["fc"]
    assert out.A.dtype == dtype
    assert out.B.dtype == dtype
    sol = solve_residual(clients)["fc"]
    assert sol.delta.dtype == dtype
    # The solve itself runs in float64 on the (rounded) inputs.
    rounded = [{"fc": LoRAFactors(c["fc"].A.to(F64), c["fc"].B.to(F64))} for c in clients]
    ref = solve_residual(rounded)["fc"]
    torch.testing.assert_close(sol.delta, ref.delta.to(dtype))
    assert sol.objective == pytest.approx(ref.objective, abs=1e-12)


@pytest.mark.parametrize(
    ("seed", "lam", "norm", "residual_on", "similarity", "b_scale"),
    [
        (216, 0.01, "fro_squared", "A", "columns", 1.0),
        (232, 0.1, "fro_squared", "B", "columns", 1.0),
        (269, 0.01, "fro", "B", "columns", 1.0),
        (127, 0.01, "fro", "B", "columns", 1e-5),  # float16: B's entries mostly subnormal
        (202, 0.01, "fro_squared", "A", "flat", 1.0),
        (250, 0.01, "fro_squared", "A", "flat", 1.0),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_narrow_outputs_hold_the_reported_objective(
    seed, lam, norm, residual_on, similarity, b_scale, dtype
) -> None:  # type: ignore[no-untyped-def]
    # Cases from a random search where the float64 solution drove the product (or some of its
    # columns) to zero further than the narrow output can represent (float16: also below its
    # normal range): the returned factors, rounded, lost them.
    clients64, weights = _searched_case(seed)
    clients = [
        {"layer0": LoRAFactors(c["layer0"].A.to(dtype), (b_scale * c["layer0"].B).to(dtype))}
        for c in clients64
    ]
    rounded = [
        {"layer0": LoRAFactors(c["layer0"].A.to(F64), c["layer0"].B.to(F64))} for c in clients
    ]
    parts = dense_parts(rounded, weights, "layer0")
    opts = {"lam": lam, "norm": norm, "similarity": similarity, "residual_on": residual_on}
    # The search draws r up to 3 on layers down to 1 × 1: ranks above both sides on purpose.
    sol = solve_residual(clients, weights, **opts, allow_excess_rank=True)["layer0"]
    out = lora_fair(clients, weights, **opts, allow_excess_rank=True)["layer0"]
    base = fedit(clients, weights, allow_excess_rank=True)["layer0"]

    def objective(f: LoRAFactors) -> float:
        side = f.B.to(F64) - parts[1] if residual_on == "B" else f.A.to(F64) - parts[0]
        return float(dense_objective(side, *parts, lam, norm, similarity, residual_on))

    tol = 10 * torch.finfo(dtype).eps
    assert abs(objective(out) - sol.objective) <= tol
    assert objective(out) <= objective(base) + tol


def test_inputs_untouched_and_deterministic() -> None:
    clients = make_clients(10, k=3, d_out=6, d_in=5, r=2)
    before = [{k: (v.A.clone(), v.B.clone()) for k, v in c.items()} for c in clients]
    a = lora_fair(clients, similarity="columns")
    b = lora_fair(clients, similarity="columns")
    for c, o in zip(clients, before, strict=True):
        assert torch.equal(c["fc"].A, o["fc"][0])
        assert torch.equal(c["fc"].B, o["fc"][1])
    assert torch.equal(a["fc"].B, b["fc"].B)


def test_batched_layers_match_solo_solves() -> None:
    gen = torch.Generator().manual_seed(12)
    shapes = {"q": (6, 5), "k": (6, 5), "v": (4, 7), "o": (6, 5)}
    clients = [
        {
            n: (
                torch.randn(3, i, generator=gen, dtype=F64),
                torch.randn(o, 3, generator=gen, dtype=F64),
            )
            for n, (o, i) in shapes.items()
        }
        for _ in range(3)
    ]
    for similarity in ("flat", "columns"):
        together = solve_residual(clients, similarity=similarity)
        assert list(together) == list(shapes)
        for name in shapes:
            solo = solve_residual([{name: c[name]} for c in clients], similarity=similarity)[name]
            assert together[name].objective == pytest.approx(solo.objective, abs=1e-12)
            torch.testing.assert_close(together[name].delta, solo.delta, rtol=1e-7, atol=1e-9)


def test_lora_fair_applies_the_residual() -> None:
    clients = make_clients(13, k=3, d_out=6, d_in=5, r=2)
    Abar, Bbar, _ = dense_parts(clients, None, "fc")
    for residual_on in ("B", "A"):
        out = lora_fair(clients, residual_on=residual_on)["fc"]
        sol = solve_residual(clients, residual_on=residual_on)["fc"]
        if residual_on == "B":
            torch.testing.assert_close(out.A, Abar, rtol=0, atol=1e-15)
            torch.testing.assert_close(out.B, Bbar + sol.delta, rtol=0, atol=1e-14)
        else:
            torch.testing.assert_close(out.A, Abar + sol.delta, rtol=0, atol=1e-14)
            torch.testing.assert_close(out.B, Bbar, rtol=0, atol=1e-15)
        assert sol.converged
        assert sol.iterations > 0
        assert float(sol.delta.norm()) > 0


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"lam": -0.1}, "lam"),
        ({"lam": float("nan")}, "lam"),
        ({"lam": float("inf")}, "lam"),
        ({"tol": 0.0}, "tol"),
        ({"tol": float("nan")}, "tol"),
        ({"max_iter": 0}, "max_iter"),
        ({"max_iter": 2.5}, "max_iter"),
        ({"norm": "l1"}, "norm"),
        ({"similarity": "rows"}, "similarity"),
        ({"residual_on": "C"}, "residual_on"),
    ],
)
def test_bad_options_are_named(options, needle) -> None:  # type: ignore[no-untyped-def]
    clients = make_clients(0, k=2, d_out=3, d_in=3, r=1)
    with pytest.raises(LoRAFairError, match=needle):
        lora_fair(clients, **options)
    with pytest.raises(ValueError, match=needle):
        solve_residual(clients, **options)


# --------------------------------------------------------------------------- the report
def test_report_matches_dense_table4_columns() -> None:
    clients = make_clients(14, k=4, d_out=7, d_in=6, r=3)
    Abar, Bbar, dW = dense_parts(clients, None, "fc")
    agg = lora_fair(clients, lam=0.0)
    rep = lora_fair_report(clients, agg)["fc"]
    assert isinstance(rep, FairReport)
    A1, B1 = agg["fc"]

    def cos(x: torch.Tensor, y: torch.Tensor) -> float:
        return float((x * y).sum() / (x.norm() * y.norm()))

    assert rep.b_cosine == pytest.approx(cos(B1, Bbar), abs=1e-12)
    assert rep.update_cosine == pytest.approx(cos(B1 @ A1, dW), abs=1e-12)
    assert rep.fedit_cosine == pytest.approx(cos(Bbar @ Abar, dW), abs=1e-12)
    assert rep.delta_b_norm == pytest.approx(float((B1 - Bbar).norm()), abs=1e-12)
    assert rep.delta_a_norm == pytest.approx(0.0, abs=1e-14)
    assert rep.update_cosine >= rep.fedit_cosine
    assert rep.update_cosine == pytest.approx(projection_bound(Abar, Bbar, dW, "B"), abs=1e-9)


def test_report_errors_name_the_layer() -> None:
    clients = make_clients(15, k=2, d_out=4, d_in=3, r=2)
    agg = lora_fair(clients)
    with pytest.raises(LayerKeyError, match="fc"):
        lora_fair_report(clients, {})
    with pytest.raises(LoRAShapeError, match="'fc'"):
        lora_fair_report(clients, {"fc": (agg["fc"].A[:1], agg["fc"].B[:, :1])})


# ---------------------------------------------------------------- closed-form derivatives
def _flat_reference(lam: float, norm: str, eta, beta, mask, g, w):  # type: ignore[no-untyped-def]
    """The reduced flat objective of one layer, written plainly for autograd."""

    def f(x: torch.Tensor) -> torch.Tensor:
        xm = x.reshape(eta.shape) * mask
        cos = (xm * eta).sum() / (w * ((xm * xm).sum(-1) * g).sum().sqrt())
        d = (x.reshape(eta.shape) - beta) * mask
        reg = (d * d).sum().sqrt() if norm == "fro" else (d * d).sum()
        return 1 - cos + lam * reg

    return f


def _columns_reference(lam: float, norm: str, shape, X, xn, active, Z0, left, right, c0=0.0):  # type: ignore[no-untyped-def]
    def f(z: torch.Tensor) -> torch.Tensor:
        Z = z.reshape(shape)
        Y = Z if left is None else left @ Z
        Y = Y if right is None else Y @ right
        cos = torch.where(active, (Y * X).sum(0) / (xn * Y.norm(dim=0)), 0.0).mean()
        d = Z - Z0
        dsq = (d * d).sum() + c0
        reg = dsq.sqrt() if norm == "fro" else dsq
        return 1 - cos + lam * reg

    return f


@pytest.mark.parametrize("norm", ["fro", "fro_squared"])
def test_flat_closed_form_derivatives_match_autograd(norm) -> None:  # type: ignore[no-untyped-def]
    from lorafair._fair import _flat as _solve

    gen = torch.Generator().manual_seed(21)
    n_layers, r, lam = 3, 4, 0.3
    eta = torch.randn(n_layers, r, 3, generator=gen, dtype=F64)
    beta = torch.randn(n_layers, r, 3, generator=gen, dtype=F64)
    mask = torch.ones(n_layers, r, 3, dtype=F64)
    mask[1, :, 2] = 0.0  # a layer with d_out = 2: the third frame direction is missing
    eta, beta = eta * mask, beta * mask
    g = torch.rand(n_layers, r, generator=gen, dtype=F64) + 0.1
    g[2, 0] = 0.0  # a null direction of Ā
    w = torch.rand(n_layers, generator=gen, dtype=F64) + 0.5
    x = torch.randn(n_layers, 3 * r, generator=gen, dtype=F64)
    obj = _solve.flat_objective(lam, norm)  # type: ignore[arg-type]
    f, grad = obj.value_and_grad(x, eta, beta, mask, g, w)
    hess = obj.hessian(x, eta, beta, mask, g, w)
    vals = obj.values(x.unsqueeze(1), eta, beta, mask, g, w).squeeze(1)
    for i in range(n_layers):
        ref = _flat_reference(lam, norm, eta[i], beta[i], mask[i], g[i], w[i])
        _assert_matches_autograd(ref, x[i], f[i], vals[i], grad[i], hess[i])


def _assert_matches_autograd(ref, x, f, val, grad, hess) -> None:  # type: ignore[no-untyped-def]
    """Closed-form value, gradient and Hessian at ``x`` against autograd on ``ref``."""
    xi = x.clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(ref(xi), xi)
    h_ref = torch.autograd.functional.hessian(ref, x)
    torch.testing.assert_close(f, ref(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(val, ref(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, g_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(hess, h_ref, rtol=1e-9, atol=1e-11)


class _ColumnsProblem(NamedTuple):
    shape: tuple[int, int]
    X: torch.Tensor
    xn: torch.Tensor
    active: torch.Tensor
    Z0: torch.Tensor
    mat: torch.Tensor


def _columns_problem(gen: torch.Generator, side: str, n_layers: int) -> _ColumnsProblem:
    """A small column problem with one inactive column, for either side ("tall": the right side
    with ``Z`` at least ``FACTORED_ROWS`` times as tall as wide, which is evaluated without
    forming ``Y``)."""
    from lorafair._fair import _tolerances as _tol

    m, p, q, n = (5, 3, 4, 6) if side != "tall" else (_tol.FACTORED_ROWS * 3, 3, 3, 7)
    shape = (p, q) if side == "left" else (m, q)
    n = q if side == "left" else n
    X = torch.randn(n_layers, m, n, generator=gen, dtype=F64)
    xn = X.norm(dim=-2) * 1.3  # full column norms exceed the projected ones
    active = torch.ones(n_layers, n, dtype=torch.bool)
    active[0, 1] = False
    Z0 = torch.randn(n_layers, *shape, generator=gen, dtype=F64)
    mat = (
        torch.randn(n_layers, m, p, generator=gen, dtype=F64)
        if side == "left"
        else torch.randn(n_layers, q, n, generator=gen, dtype=F64)
    )
    return _ColumnsProblem(shape, X, xn, active, Z0, mat)


@pytest.mark.parametrize("offset", [False, True])
@pytest.mark.parametrize("norm", ["fro", "fro_squared"])
@pytest.mark.parametrize("side", ["left", "right", "tall"])
def test_columns_closed_form_derivatives_match_autograd(norm, side, offset) -> None:  # type: ignore[no-untyped-def]
    from lorafair._fair import _column_objective as _solve

    gen = torch.Generator().manual_seed(22)
    n_layers, lam = 2, 0.2
    shape, X, xn, active, Z0, mat = _columns_problem(gen, side, n_layers)
    x = torch.randn(n_layers, shape[0] * shape[1], generator=gen, dtype=F64)
    obj = _solve.columns_objective(lam, norm, shape, side == "left")  # type: ignore[arg-type]
    c0 = torch.rand(n_layers, generator=gen, dtype=F64) + 0.5  # the restricted problems' offset
    c0 = c0 if offset else torch.zeros_like(c0)
    data = _solve.ColumnData(X, xn, active, Z0, mat, c0)
    f, grad = obj.value_and_grad(x, *data)
    hess = obj.hessian(x, *data)
    vals = obj.values(x.unsqueeze(1), *data).squeeze(1)
    for i in range(n_layers):
        left = mat[i] if side == "left" else None
        right = mat[i] if side != "left" else None
        ref = _columns_reference(
            lam, norm, shape, X[i], xn[i], active[i], Z0[i], left, right, c0[i] if offset else 0.0
        )
        _assert_matches_autograd(ref, x[i], f[i], vals[i], grad[i], hess[i])


@pytest.mark.parametrize("through", ["nothing", "zero", "fedit"])
@pytest.mark.parametrize("offset", [False, True])
@pytest.mark.parametrize("norm", ["fro", "fro_squared"])
@pytest.mark.parametrize("side", ["left", "right", "tall"])
def test_columns_line_values_match_the_reference(norm, side, offset, through) -> None:  # type: ignore[no-untyped-def]
    # The line search's values along x + t d (polynomials in t, with an exact fallback where
    # they cancel): lines through a generic point, near Z = 0 (every product column shrinks
    # by 1e9 at ts[3]: the polynomials lose every digit there) and through Z0 (the
    # regulariser's root, at ts[3]).
    from lorafair._fair import _column_objective as _solve
    from lorafair._fair import _tolerances as _tol

    gen = torch.Generator().manual_seed(23)
    n_layers, lam = 2, 0.2
    shape, X, xn, active, Z0, mat = _columns_problem(gen, side, n_layers)
    ts = _tol.SHRINK ** torch.arange(_tol.STEPS, dtype=F64)
    x = torch.randn(n_layers, shape[0] * shape[1], generator=gen, dtype=F64)
    d = torch.randn(n_layers, shape[0] * shape[1], generator=gen, dtype=F64)
    if through == "zero":
        d = -x / (ts[3] * (1.0 + 1e-9))  # at ts[3]: 1e-9 x, columns of norm ~1e-9
    elif through == "fedit":
        d = (Z0.flatten(-2) - x) / ts[3]
    obj = _solve.columns_objective(lam, norm, shape, side == "left")  # type: ignore[arg-type]
    c0 = torch.rand(n_layers, generator=gen, dtype=F64) + 0.5
    c0 = c0 if offset else torch.zeros_like(c0)
    data = _solve.ColumnData(X, xn, active, Z0, mat, c0)
    assert obj.line is not None
    got = obj.line(x, d, ts, *data)
    for i in range(n_layers):
        left = mat[i] if side == "left" else None
        right = mat[i] if side != "left" else None
        ref = _columns_reference(
            lam, norm, shape, X[i], xn[i], active[i], Z0[i], left, right, c0[i] if offset else 0.0
        )
        for k in range(ts.shape[0]):
            want = ref(x[i] + ts[k] * d[i])
            torch.testing.assert_close(got[i, k], want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("offset", [False, True])
@pytest.mark.parametrize("norm", ["fro", "fro_squared"])
def test_columns_carried_features_match_fresh_products(norm, offset) -> None:  # type: ignore[no-untyped-def]
    # Tall bases: L-BFGS carries ZᵀX along its steps (features). The values and gradients read
    # from carried products must be the fresh ones, and a run that carries them must end where
    # one that recomputes them does (above NEWTON_MAX_UNKNOWNS, so L-BFGS runs).
    from lorafair._fair import _column_objective as _solve
    from lorafair._fair import _newton
    from lorafair._fair import _tolerances as _tol

    gen = torch.Generator().manual_seed(24)
    n_layers, lam, q, n = 3, 0.05, 8, 40
    p = _tol.FACTORED_ROWS * q
    assert p * q > _tol.NEWTON_MAX_UNKNOWNS
    X = torch.randn(n_layers, p, n, generator=gen, dtype=F64)
    xn = X.norm(dim=-2) * 1.2
    active = torch.ones(n_layers, n, dtype=torch.bool)
    Z0 = torch.randn(n_layers, p, q, generator=gen, dtype=F64)
    right = torch.randn(n_layers, q, n, generator=gen, dtype=F64)
    c0 = torch.rand(n_layers, generator=gen, dtype=F64) + 0.5
    c0 = c0 if offset else torch.zeros_like(c0)
    data = _solve.ColumnData(X, xn, active, Z0, right, c0)
    obj = _solve.columns_objective(lam, norm, (p, q), on_left=False)
    assert obj.features is not None
    assert obj.line is not None
    x = torch.randn(n_layers, p * q, generator=gen, dtype=F64)
    d = torch.randn(n_layers, p * q, generator=gen, dtype=F64)
    fx, fd = obj.features(x, *data), obj.features(d, *data)
    torch.testing.assert_close(fx, x.reshape(n_layers, p, q).mT @ X, rtol=1e-13, atol=0.0)
    for got, want in zip(
        obj.value_and_grad(x, *data, fx=fx), obj.value_and_grad(x, *data), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    ts = _tol.SHRINK ** torch.arange(_tol.STEPS, dtype=F64)
    torch.testing.assert_close(
        obj.line(x, d, ts, *data, fx=fx, fd=fd), obj.line(x, d, ts, *data), rtol=1e-12, atol=1e-14
    )
    carried = _newton.minimise(obj, data, Z0.flatten(-2), tol=1e-10, max_iter=300)
    fresh = _newton.minimise(
        obj._replace(features=None), data, Z0.flatten(-2), tol=1e-10, max_iter=300
    )
    assert bool(carried.converged.all())
    assert bool(fresh.converged.all())
    torch.testing.assert_close(carried.f, fresh.f, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(
        obj.values(carried.x.unsqueeze(1), *data).squeeze(1), carried.f, rtol=1e-12, atol=1e-14
    )


@pytest.mark.parametrize("residual_on", ["B", "A"])
def test_columns_chunked_rows_match_one_batch(monkeypatch, residual_on) -> None:  # type: ignore[no-untyped-def]
    # On CPU the columns objective runs over cache-sized chunks of rows; one row per chunk must
    # give the one-batch answer up to rounding.
    from lorafair._fair import _tolerances as _tol

    gen = torch.Generator().manual_seed(31)
    clients = [
        {
            f"l{i}": (
                torch.randn(2, 7, generator=gen, dtype=F64),
                torch.randn(9, 2, generator=gen, dtype=F64),
            )
            for i in range(3)
        }
        for _ in range(3)
    ]
    opts = {"lam": 0.05, "similarity": "columns", "residual_on": residual_on}
    whole = solve_residual(clients, **opts)  # type: ignore[arg-type]
    monkeypatch.setattr(_tol, "CHUNK_BYTES", 1)
    rows = solve_residual(clients, **opts)  # type: ignore[arg-type]
    for name, sol in whole.items():
        assert rows[name].objective == pytest.approx(sol.objective, rel=0, abs=1e-12)
        torch.testing.assert_close(rows[name].delta, sol.delta, rtol=1e-6, atol=1e-9)


def test_lora_fair_restores_the_thread_pools() -> None:
    # The solver pins torch's and NumPy's pools to one thread for the call (lorafair._threads)
    # and must hand both back as it found them.
    from threadpoolctl import threadpool_info

    from lorafair import _threads

    g = torch.Generator().manual_seed(0)
    clients = [
        {"fc": (torch.randn(2, 5, generator=g), torch.randn(4, 2, generator=g))} for _ in range(3)
    ]
    before = torch.get_num_threads()
    blas_before = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
    torch.set_num_threads(2)
    try:
        with _threads.single_threaded():
            assert torch.get_num_threads() == 1
        lora_fair(clients)
        solve_residual(clients, similarity="columns")
        assert torch.get_num_threads() == 2
        blas_after = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
        assert blas_after == blas_before
    finally:
        torch.set_num_threads(before)


def test_columns_result_does_not_depend_on_client_order() -> None:
    # The column form puts each layer's clients in a canonical order before its multi-start, so
    # the same clients in another order give the same bits (without it, about 6 in 10 of these
    # cases differ in the last digits, and rarely land in another local minimum).
    for seed in range(4):
        rnd = random.Random(seed)
        gen = torch.Generator().manual_seed(seed)
        k, d_out, d_in, r = (
            rnd.randint(2, 4),
            rnd.randint(2, 8),
            rnd.randint(2, 8),
            rnd.randint(1, 2),
        )
        clients = [
            {
                "l": LoRAFactors(
                    torch.randn(r, d_in, generator=gen, dtype=F64),
                    torch.randn(d_out, r, generator=gen, dtype=F64) * 10.0 ** rnd.randint(-1, 1),
                )
            }
            for _ in range(k)
        ]
        weights = [rnd.uniform(0.5, 2.0) for _ in range(k)]
        perm = list(range(k))
        rnd.shuffle(perm)
        for residual_on in ("B", "A"):
            opts: dict[str, Any] = {
                "lam": 0.05,
                "similarity": "columns",
                "residual_on": residual_on,
            }
            a = solve_residual(clients, weights, **opts)["l"]
            b = solve_residual([clients[i] for i in perm], [weights[i] for i in perm], **opts)["l"]
            assert a.objective == b.objective
            assert torch.equal(a.delta, b.delta)


@pytest.mark.parametrize("residual_on", ["B", "A"])
@pytest.mark.parametrize("lam", [0.01, 1.0])
def test_columns_end_of_some_layers_of_a_batch(lam: float, residual_on: str) -> None:
    # Two layers of one shape solved as one batch: "same" has identical clients (FedIT exact,
    # already at its λ = 0 end's floor), "diff" has not, so the λ = 0 end runs for "diff"
    # alone. Each layer must get what it gets solved on its own: FedIT's factors bit for bit
    # for "same", the single-layer answer for "diff". (The end once projected the layer
    # subset's points with every layer's projector: an IndexError here.)
    gen = torch.Generator().manual_seed(0)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=F64)

    A, B = draw(3, 7), draw(6, 3)
    clients = [
        {"same": LoRAFactors(A, B), "diff": LoRAFactors(draw(3, 7), draw(6, 3))},
        {"same": LoRAFactors(A.clone(), B.clone()), "diff": LoRAFactors(draw(3, 7), draw(6, 3))},
    ]
    opts: dict[str, Any] = {"lam": lam, "similarity": "columns", "residual_on": residual_on}
    both = lora_fair(clients, **opts)
    alone = lora_fair([{"diff": c["diff"]} for c in clients], **opts)["diff"]
    fed = fedit(clients)["same"]
    assert torch.equal(both["same"].A, fed.A)
    assert torch.equal(both["same"].B, fed.B)
    torch.testing.assert_close(both["diff"].A, alone.A, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(both["diff"].B, alone.B, rtol=1e-9, atol=1e-12)


def test_pool_never_gives_a_layer_another_layers_point_for_a_nan_score() -> None:
    # A NaN score counts as +inf: layer 0 (only NaN candidates) keeps ΔB = 0, layer 1 its own
    # best candidate. Without that, amin carries the NaN to layer 0's best and its pick falls
    # on the pool's last row, layer 1's.
    from lorafair._fair._pool import _Pool

    zero_x = torch.zeros(2, 3, dtype=F64)
    pool = _Pool(zero_x, torch.tensor([1.0, 1.0], dtype=F64))
    x = torch.tensor([[9.0, 9.0, 9.0], [5.0, 5.0, 5.0]], dtype=F64)
    f = torch.tensor([float("nan"), 0.5], dtype=F64)
    none = torch.zeros(2, dtype=torch.int64)
    pool.add(x, f, torch.tensor([0, 1]), none, none.bool())
    got = pool.pick((1, 3))
    torch.testing.assert_close(got.x[0, 0], zero_x[0])
    torch.testing.assert_close(got.x[1, 0], x[1])
    torch.testing.assert_close(got.f, torch.tensor([1.0, 0.5], dtype=F64))

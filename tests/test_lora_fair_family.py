"""The two-unknown flat solver (``lorafair._fair._family``) against the general r × 3 solver.

``_family`` reduces the flat problem to the stationary family ``c_i = (a h_i + b_i)/(1 + k g_i)``;
these tests check its derivatives numerically, its answers against the independent general
solver (``_fair._flat._solve_flat_general``, itself tested against a dense L-BFGS reference in
``test_lora_fair.py``), the fallback for layers it cannot certify, the NaN/Inf check it takes
from its Grams, and that a zero residual hands back FedIT's factors bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorafair._fair import _batch, _family, _options
from lorafair._fair import _flat as _flat_form
from lorafair._validate import prepare
from lorafair.aggregate import fedit, lora_fair, solve_residual
from lorafair.errors import NonFiniteError
from lorafair.testing import strategies as lst
from lorafair.types import LoRAFactors

F64 = torch.float64


def _data(seed: int, n_layers: int = 5, r: int = 4) -> tuple[torch.Tensor, ...]:
    """The family objective's data ``(D, gh, sigma, kscale, gmax, w)`` of random layers."""
    rng = np.random.default_rng(seed)
    g = rng.random((n_layers, r)) * 3
    g[0, 0] = 0.0
    Hm, Pm = rng.standard_normal((2, n_layers, 7, r))
    hh, hb, bb = (Hm * Hm).sum(-2), (Hm * Pm).sum(-2), (Pm * Pm).sum(-2)
    gmax = g.max(-1)
    gh = g / gmax[:, None]
    D = (gh[..., None] ** np.arange(5.0))[..., None] * np.stack([hh, hb, bb], -1)[..., None, :]
    arrays = (
        D.reshape(n_layers, r, 15),
        gh,
        rng.random(n_layers) + 0.5,
        rng.random(n_layers) + 0.5,
        gmax,
        rng.random(n_layers) + 0.5,
    )
    return tuple(torch.from_numpy(a) for a in arrays)


@pytest.mark.parametrize("norm", ["fro", "fro_squared"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_family_derivatives_match_finite_differences(norm, seed) -> None:  # type: ignore[no-untyped-def]
    d = _data(seed)
    obj = _family.family_objective(0.1, norm)
    assert obj.with_hessian is not None
    rng = np.random.default_rng(seed + 10)
    theta = rng.standard_normal((5, 2)) * 0.5
    theta[:, 1] = np.abs(theta[:, 1])  # k ≥ 0: inside the family

    def value(t: np.ndarray) -> np.ndarray:
        return obj.values(torch.from_numpy(t)[:, None], *d)[:, 0].numpy()

    def derivatives(t: np.ndarray) -> tuple[np.ndarray, ...]:
        assert obj.with_hessian is not None
        return tuple(v.numpy() for v in obj.with_hessian(torch.from_numpy(t), *d))

    f, grad, hess = derivatives(theta)
    np.testing.assert_allclose(f, value(theta))
    h = 1e-6
    eye = np.eye(2)
    fd_grad = np.stack(
        [(value(theta + h * eye[j]) - value(theta - h * eye[j])) / (2 * h) for j in range(2)], -1
    )
    fd_hess = np.stack(
        [
            (derivatives(theta + h * eye[j])[1] - derivatives(theta - h * eye[j])[1]) / (2 * h)
            for j in range(2)
        ],
        1,
    )
    scale = 1.0 + np.abs(hess).max()
    assert np.abs(grad - fd_grad).max() <= 1e-6 * scale
    assert np.abs(hess - fd_hess).max() <= 1e-6 * scale
    np.testing.assert_allclose(hess, hess.transpose(0, 2, 1), rtol=1e-12, atol=1e-12)


def test_family_is_infinite_outside_its_domain() -> None:
    d = _data(3)
    theta = torch.tensor([[[0.0, -1e6]]], dtype=F64).repeat(5, 1, 1)  # 1 + k ĝ < 0 for every layer
    assert torch.isinf(_family.family_objective(0.01, "fro").values(theta, *d)).all()


def _general(clients, weights, lam, norm, residual_on):  # type: ignore[no-untyped-def]
    opts = _options._check_options(lam, norm, "flat", residual_on, 1e-8, 500)
    prep = prepare(clients, weights, equal_ranks=False)
    grp = _batch._build_group(list(prep.layers.values()), prep.weights)
    rows = torch.ones(grp.n, dtype=torch.bool)
    return _flat_form._solve_flat_general(grp, opts, False, rows)


wide_clients = lst.clients_and_weights(
    n_clients=st.integers(2, 6),
    n_layers=1,
    shapes=lst.layer_shapes(min_dim=3, max_dim=24),
    rank=lst.ranks(max_rank=6),
)


@settings(max_examples=40, deadline=None)
@given(
    cw=wide_clients,
    lam=st.sampled_from([1e-4, 1e-3, 0.01, 0.1, 1.0, 10.0]),
    norm=st.sampled_from(["fro", "fro_squared"]),
    residual_on=st.sampled_from(["B", "A"]),
)
def test_family_never_worse_than_the_general_solver(cw, lam, norm, residual_on) -> None:  # type: ignore[no-untyped-def]
    clients, weights = cw
    clients64 = [
        {n: LoRAFactors(f[0].to(F64), f[1].to(F64)) for n, f in c.items()} for c in clients
    ]
    ours = solve_residual(clients64, weights, lam=lam, norm=norm, residual_on=residual_on)
    general = _general(clients64, weights, lam, norm, residual_on)
    (sol,) = ours.values()
    assert sol.objective <= float(general.objective[0]) + 1e-9


def test_layers_with_d_below_3_fall_back_to_the_general_solver(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(5)
    clients = [
        {
            "fc": (
                torch.randn(2, 6, generator=gen, dtype=F64),
                torch.randn(2, 2, generator=gen, dtype=F64),
            )
        }
        for _ in range(3)
    ]
    calls: list[int] = []
    real = _flat_form._solve_flat_general

    def spy(grp, opts, single, rows, w=None):  # type: ignore[no-untyped-def]
        calls.append(int(rows.sum()))
        return real(grp, opts, single, rows, w)

    monkeypatch.setattr(_flat_form, "_solve_flat_general", spy)
    sol = solve_residual(clients, lam=0.05)["fc"]  # d_out = 2: the family is not certified
    assert calls == [1]
    expected = _general(clients, None, 0.05, "fro", "B")
    assert sol.objective == pytest.approx(float(expected.objective[0]), abs=1e-12)
    torch.testing.assert_close(sol.delta, expected.extra[0], rtol=0, atol=1e-12)


# Rank 3 on a 1 × 1 layer, on purpose (the scalar case of the unattained infimum).
EXCESS = {"allow_excess_rank": True}


@pytest.mark.parametrize("norm", ["fro", "fro_squared"])
@pytest.mark.parametrize("residual_on", ["B", "A"])
def test_unattained_infimum_is_approached_the_same_way_at_any_weight_scale(
    norm, residual_on
) -> None:  # type: ignore[no-untyped-def]
    # d_out = d_in = 1: the cosine is the sign of the product, and B̄Ā has the wrong sign. The
    # infimum λ R(dist²) (dist: from the moved factor's vector to the hyperplane orthogonal to
    # the fixed one's) is only approached from the right side of that hyperplane.
    col = [
        torch.tensor([[1.0], [0.0], [0.0]], dtype=F64),
        torch.tensor([[0.0], [1.0], [0.0]], dtype=F64),
    ]
    row = [torch.tensor([[1.0, -3.0, 0.0]], dtype=F64), torch.tensor([[-3.0, 0.2, 0.0]], dtype=F64)]
    a, b = (col, row) if residual_on == "B" else ([x.mT for x in row], [x.mT for x in col])
    clients = [{"fc": (a[k].to(F64), b[k].to(F64))} for k in range(2)]
    bars = [(0.3 * f[0] + 0.7 * f[1]).to(F64).flatten() for f in (a, b)]
    fixed, moved = bars if residual_on == "B" else bars[::-1]
    dist = float((fixed @ moved).abs() / fixed.norm())
    infimum = 0.1 * (dist if norm == "fro" else dist * dist)
    runs = [
        solve_residual(
            clients, [3 * s, 7 * s], lam=0.1, norm=norm, residual_on=residual_on, **EXCESS
        )["fc"]
        for s in (1.0, 1e-3, 0.73, 1.1e3)
    ]
    for sol in runs:
        assert sol.cosine == pytest.approx(1.0, abs=1e-12)
        assert infimum < sol.objective <= infimum + 1e-9
        assert abs(sol.objective - runs[0].objective) <= 1e-12
    # Narrow outputs stop where their own rounding keeps the product on the right side.
    for dtype in (torch.float32, torch.bfloat16):
        narrow = [{"fc": (a[k].to(dtype), b[k].to(dtype))} for k in range(2)]
        out = lora_fair(narrow, [3, 7], lam=0.1, norm=norm, residual_on=residual_on, **EXCESS)["fc"]
        f64 = [(f["fc"][0].to(F64), f["fc"][1].to(F64)) for f in narrow]
        dW = 0.3 * f64[0][1] @ f64[0][0] + 0.7 * f64[1][1] @ f64[1][0]
        assert float((out.B.to(F64) @ out.A.to(F64)) * dW) > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_check_from_the_grams_names_the_same_culprit_as_fedit(dtype, value) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(6)
    clients = [
        {
            name: LoRAFactors(
                torch.randn(3, 8, generator=gen).to(dtype),
                torch.randn(5, 3, generator=gen).to(dtype),
            )
            for name in ("q", "v")
        }
        for _ in range(3)
    ]
    bad_v = clients[2]["v"].B.clone()
    bad_v[4, 0] = value
    bad_q = clients[1]["q"].A.clone()
    bad_q[2, 7] = value
    clients[2]["v"] = LoRAFactors(clients[2]["v"].A, bad_v)
    clients[1]["q"] = LoRAFactors(bad_q, clients[1]["q"].B)
    with pytest.raises(NonFiniteError) as want:
        fedit(clients)
    with pytest.raises(NonFiniteError) as got:
        lora_fair(clients)
    assert str(got.value) == str(want.value)
    assert "'q': client 1" in str(got.value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("residual_on", ["B", "A"])
def test_zero_residual_returns_fedit_bit_for_bit(dtype, residual_on) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(7)
    clients = [
        {
            "fc": LoRAFactors(
                torch.randn(3, 9, generator=gen).to(dtype),
                torch.randn(6, 3, generator=gen).to(dtype),
            )
        }
        for _ in range(4)
    ]
    # λ far above ‖∇cos‖ at ΔP = 0: the residual is exactly zero ("fro" is not smooth there).
    sol = solve_residual(clients, lam=1e6, residual_on=residual_on)["fc"]
    assert torch.count_nonzero(sol.delta) == 0
    out = lora_fair(clients, lam=1e6, residual_on=residual_on)["fc"]
    ref = fedit(clients)["fc"]
    assert torch.equal(out.A, ref.A)
    assert torch.equal(out.B, ref.B)


def test_narrow_dtypes_match_float64_on_the_rounded_inputs_across_layers() -> None:
    gen = torch.Generator().manual_seed(8)
    shapes = {"qkv": (24, 8), "proj": (8, 8), "fc1": (32, 8), "fc2": (8, 32)}
    clients32 = [
        {
            n: LoRAFactors(torch.randn(4, i, generator=gen), torch.randn(o, 4, generator=gen))
            for n, (o, i) in shapes.items()
        }
        for _ in range(5)
    ]
    clients64 = [
        {n: LoRAFactors(f.A.to(F64), f.B.to(F64)) for n, f in c.items()} for c in clients32
    ]
    for residual_on in ("B", "A"):
        a = solve_residual(clients32, residual_on=residual_on)
        b = solve_residual(clients64, residual_on=residual_on)
        for name in shapes:
            assert a[name].objective == pytest.approx(b[name].objective, abs=1e-12)
            torch.testing.assert_close(a[name].delta, b[name].delta.float(), rtol=1e-5, atol=1e-6)

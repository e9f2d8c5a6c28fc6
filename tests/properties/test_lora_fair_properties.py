"""Properties of LoRA-FAIR over Hypothesis-generated clients (``lorafair.testing.strategies``)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorafair.aggregate import fedit, lora_fair, solve_residual
from lorafair.testing import strategies as lst

F64 = torch.float64

few = lst.clients_and_weights(
    n_clients=st.integers(2, 4),
    n_layers=st.integers(1, 3),
    shapes=lst.layer_shapes(min_dim=1, max_dim=10),
    rank=lst.ranks(max_rank=4),
)
options = st.fixed_dictionaries(
    {
        "lam": st.sampled_from([0.0, 0.01, 0.1]),
        "norm": st.sampled_from(["fro", "fro_squared"]),
        "residual_on": st.sampled_from(["B", "A"]),
    }
)


def flat_objective(clients, weights, name, sol, lam, norm, residual_on):  # type: ignore[no-untyped-def]
    """Dense float64 objective 1 − cos(ΔW, product) + λ reg, written plainly."""
    k = len(clients)
    p = [1.0 / k] * k if weights is None else [w / sum(weights) for w in weights]
    Abar = sum(w * c[name][0].to(F64) for w, c in zip(p, clients, strict=True))
    Bbar = sum(w * c[name][1].to(F64) for w, c in zip(p, clients, strict=True))
    dW = sum(w * c[name][1].to(F64) @ c[name][0].to(F64) for w, c in zip(p, clients, strict=True))
    D = sol.to(F64)
    Y = (Bbar + D) @ Abar if residual_on == "B" else Bbar @ (Abar + D)
    den = float(Y.norm() * dW.norm())
    cos = float((Y * dW).sum()) / den if den > 0 else 0.0
    reg = float(D.norm()) if norm == "fro" else float((D * D).sum())
    return 1.0 - cos + lam * reg


@settings(max_examples=8, deadline=None)
@given(cw=few, opts=options, data=st.data())
def test_client_order_does_not_matter(cw, opts, data) -> None:  # type: ignore[no-untyped-def]
    clients, weights = cw
    perm = data.draw(st.permutations(range(len(clients))))
    a = solve_residual(clients, weights, **opts)
    b = solve_residual(
        [clients[i] for i in perm], None if weights is None else [weights[i] for i in perm], **opts
    )
    for name in a:
        assert abs(a[name].objective - b[name].objective) <= 1e-9


@settings(max_examples=8, deadline=None)
@given(cw=few, opts=options, scale=st.floats(1e-3, 1e3))
def test_weights_are_scale_invariant(cw, opts, scale) -> None:  # type: ignore[no-untyped-def]
    clients, weights = cw
    w = weights if weights is not None else [1.0] * len(clients)
    a = solve_residual(clients, w, **opts)
    b = solve_residual(clients, [scale * x for x in w], **opts)
    for name in a:
        assert abs(a[name].objective - b[name].objective) <= 1e-9


@settings(max_examples=12, deadline=None)
@given(cw=few, opts=options)
def test_never_worse_than_fedit_on_its_objective(cw, opts) -> None:  # type: ignore[no-untyped-def]
    clients, weights = cw
    sols = solve_residual(clients, weights, **opts)
    for name, sol in sols.items():
        mine = flat_objective(clients, weights, name, sol.delta, **opts)
        zero = flat_objective(clients, weights, name, torch.zeros_like(sol.delta), **opts)
        assert mine <= zero + 1e-12
        assert abs(mine - sol.objective) <= 1e-9
        assert torch.isfinite(sol.delta).all()


@settings(max_examples=6, deadline=None)
@given(cw=lst.clients_and_weights(n_clients=st.integers(1, 4), zero_B=True), opts=options)
def test_zero_update_gives_fedit(cw, opts) -> None:  # type: ignore[no-untyped-def]
    clients, weights = cw
    out = lora_fair(clients, weights, **opts)
    ref = fedit(clients, weights)
    for name in ref:
        assert torch.equal(out[name].A, ref[name].A)
        assert torch.equal(out[name].B, ref[name].B)


@settings(max_examples=6, deadline=None)
@given(cw=lst.clients_and_weights(n_clients=1), opts=options)
def test_one_client_is_returned_unchanged(cw, opts) -> None:  # type: ignore[no-untyped-def]
    clients, weights = cw
    out = lora_fair(clients, weights, **opts)
    for name, (A, B) in clients[0].items():
        assert torch.equal(out[name].A, A)
        assert torch.equal(out[name].B, B)


def columns_objective(clients, weights, name, sol, lam, norm, residual_on):  # type: ignore[no-untyped-def]
    """Dense float64 ``1 − mean_j cos(ΔW_j, Y_j) + λ reg`` (a column with a zero side counts 0)."""
    k = len(clients)
    p = [1.0 / k] * k if weights is None else [w / sum(weights) for w in weights]
    Abar = sum(w * c[name][0].to(F64) for w, c in zip(p, clients, strict=True))
    Bbar = sum(w * c[name][1].to(F64) for w, c in zip(p, clients, strict=True))
    dW = sum(w * c[name][1].to(F64) @ c[name][0].to(F64) for w, c in zip(p, clients, strict=True))
    D = sol.to(F64)
    Y = (Bbar + D) @ Abar if residual_on == "B" else Bbar @ (Abar + D)
    den = Y.norm(dim=0) * dW.norm(dim=0)
    cos = torch.where(den > 0, (Y * dW).sum(dim=0) / torch.where(den > 0, den, 1.0), 0.0)
    reg = float(D.norm()) if norm == "fro" else float((D * D).sum())
    return 1.0 - float(cos.mean()) + lam * reg


small = lst.clients_and_weights(
    n_clients=st.integers(2, 3),
    n_layers=st.integers(1, 2),
    shapes=lst.layer_shapes(min_dim=1, max_dim=6),
    rank=lst.ranks(max_rank=3),
)


@settings(max_examples=10, deadline=None)
@given(cw=small, opts=options)
def test_columns_never_worse_than_fedit_on_its_objective(cw, opts) -> None:  # type: ignore[no-untyped-def]
    clients, weights = cw
    sols = solve_residual(clients, weights, similarity="columns", **opts)
    for name, sol in sols.items():
        mine = columns_objective(clients, weights, name, sol.delta, **opts)
        zero = columns_objective(clients, weights, name, torch.zeros_like(sol.delta), **opts)
        assert mine <= zero + 1e-9
        assert abs(mine - sol.objective) <= 1e-7
        assert torch.isfinite(sol.delta).all()


@settings(max_examples=6, deadline=None)
@given(cw=small, opts=options, data=st.data())
def test_columns_client_order_does_not_matter(cw, opts, data) -> None:  # type: ignore[no-untyped-def]
    clients, weights = cw
    perm = data.draw(st.permutations(range(len(clients))))
    a = solve_residual(clients, weights, similarity="columns", **opts)
    b = solve_residual(
        [clients[i] for i in perm],
        None if weights is None else [weights[i] for i in perm],
        similarity="columns",
        **opts,
    )
    for name in a:
        assert abs(a[name].objective - b[name].objective) <= 1e-7

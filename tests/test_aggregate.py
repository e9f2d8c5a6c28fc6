"""Each aggregator against an independent dense float64 reference (tests/reference.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lorafair import LoRAFactors
from lorafair.aggregate import fedit, ffa_lora, flexlora, flora
from lorafair.errors import FrozenAMismatchError, LoRAFairError
from lorafair.testing import strategies as lst
from tests import reference as ref

close = torch.testing.assert_close


def _random_clients(seed, *, k=4, d_out=9, d_in=7, ranks=(3, 3, 3, 3), layers=("q", "v")):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            name: LoRAFactors(
                torch.randn(r, d_in, generator=g, dtype=torch.float64),
                torch.randn(d_out, r, generator=g, dtype=torch.float64),
            )
            for name in layers
        }
        for r in ranks[:k]
    ]


@given(lst.clients_and_weights())
def test_fedit_matches_dense_reference(cw):
    clients, weights = cw
    out = fedit(clients, weights)
    assert list(out) == list(clients[0])
    for name in clients[0]:
        A_ref, B_ref = ref.fedit(clients, name, weights)
        close(out[name].A, A_ref)
        close(out[name].B, B_ref)


@given(lst.clients_and_weights(shared_A=True))
def test_fedit_is_exact_when_all_A_are_equal(cw):
    clients, weights = cw
    out = fedit(clients, weights)
    for name, (A, B) in out.items():
        dw = ref.delta_w(clients, name, weights)
        close(B @ A, dw, rtol=1e-9, atol=1e-9 * (1 + float(dw.abs().max())))


def test_fedit_is_biased_in_general():
    clients = _random_clients(0)
    out = fedit(clients)
    dw = ref.delta_w(clients, "q")
    assert float((out["q"].B @ out["q"].A - dw).norm()) > 0.1 * float(dw.norm())


@given(lst.clients_and_weights(shared_A=True))
def test_ffa_lora_is_exact(cw):
    clients, weights = cw
    out = ffa_lora(clients, weights)
    for name, (A, B) in out.items():
        assert torch.equal(A, clients[0][name].A)
        close(B, ref.fedit(clients, name, weights)[1])
        close(B @ A, ref.delta_w(clients, name, weights))


def test_ffa_lora_rejects_differing_A_naming_layer_and_client():
    clients = _random_clients(1, k=3, ranks=(2, 2, 2))
    for c in clients[1:]:
        c["q"] = LoRAFactors(clients[0]["q"].A.clone(), c["q"].B)
        c["v"] = LoRAFactors(clients[0]["v"].A.clone(), c["v"].B)
    ffa_lora(clients)  # shared A: fine
    A2 = clients[0]["v"].A.clone()
    A2[0, 0] += 1e-3
    clients[2]["v"] = LoRAFactors(A2, clients[2]["v"].B)
    with pytest.raises(FrozenAMismatchError, match=r"layer 'v': client 2"):
        ffa_lora(clients)
    ffa_lora(clients, atol=1e-2)  # within the stated tolerance


@given(lst.clients_and_weights(equal_ranks=False))
def test_flora_is_exact_with_heterogeneous_ranks(cw):
    clients, weights = cw
    out = flora(clients, weights)
    for name, (A, B) in out.items():
        total_rank = sum(c[name].A.shape[0] for c in clients)
        assert A.shape == (total_rank, clients[0][name].A.shape[1])
        assert B.shape == (clients[0][name].B.shape[0], total_rank)
        close(B @ A, ref.delta_w(clients, name, weights))


def test_flexlora_matches_dense_svd():
    clients = _random_clients(2, k=3, d_out=20, d_in=16, ranks=(4, 4, 4))
    for rank in (1, 4, 7):
        out = flexlora(clients, rank=rank)
        for name in ("q", "v"):
            A, B = out[name]
            assert A.shape == (rank, 16)
            assert B.shape == (20, rank)
            close(B @ A, ref.best_rank_approx(ref.delta_w(clients, name), rank))


@given(lst.clients_and_weights(equal_ranks=False), st.integers(1, 8))
def test_flexlora_reaches_the_eckart_young_bound(cw, rank):
    clients, weights = cw
    out = flexlora(clients, weights, rank=rank)
    for name, (A, B) in out.items():
        dw = ref.delta_w(clients, name, weights)
        err = float((B @ A - dw).norm())
        tail = ref.singular_tail(dw, rank)
        scale = 1e-9 * (1.0 + float(dw.norm()))
        assert abs(err - tail) <= scale, (name, err, tail)
        total_rank = sum(c[name].A.shape[0] for c in clients)
        if rank >= total_rank:
            close(B @ A, dw, rtol=1e-9, atol=scale)


def test_flexlora_default_rank_is_the_clients_max_rank():
    clients = _random_clients(3, k=3, ranks=(2, 5, 3))
    out = flexlora(clients)
    assert out["q"].A.shape[0] == 5
    assert out["q"].B.shape[1] == 5


def test_flexlora_splits_give_the_same_product_and_their_stated_structure():
    clients = _random_clients(4, k=3, d_out=12, d_in=10, ranks=(3, 3, 3))
    bal = flexlora(clients, rank=4, split="balanced")["q"]
    left = flexlora(clients, rank=4, split="left")["q"]
    close(bal.B @ bal.A, left.B @ left.A)
    # balanced: BᵀB = A Aᵀ = diag(S); left: A has orthonormal rows.
    close(bal.B.T @ bal.B, bal.A @ bal.A.T)
    close(left.A @ left.A.T, torch.eye(4, dtype=torch.float64))
    sigma = torch.linalg.svdvals(ref.delta_w(clients, "q"))[:4]
    close(torch.diagonal(bal.A @ bal.A.T), sigma)


def test_flexlora_rank_beyond_the_layer_pads_with_zeros():
    clients = _random_clients(5, k=2, d_out=3, d_in=2, ranks=(2, 2))
    A, B = flexlora(clients, rank=6)["q"]
    assert A.shape == (6, 2)
    assert B.shape == (3, 6)
    close(B @ A, ref.delta_w(clients, "q"))
    assert torch.count_nonzero(A[2:]) == 0
    assert torch.count_nonzero(B[:, 2:]) == 0


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_flexlora_rejects_bad_rank(bad):
    with pytest.raises(LoRAFairError, match="rank"):
        flexlora(_random_clients(6), rank=bad)


def test_flexlora_rejects_bad_split():
    with pytest.raises(LoRAFairError, match="split"):
        flexlora(_random_clients(6), split="right")  # type: ignore[arg-type]


def test_flexlora_float32_at_a_1024_layer_matches_dense_svd_to_1e5():
    g = torch.Generator().manual_seed(7)
    d, r, k = 1024, 16, 6
    clients = [
        {"q": (torch.randn(r, d, generator=g) / d**0.5, torch.randn(d, r, generator=g))}
        for _ in range(k)
    ]
    A, B = flexlora(clients)["q"]
    best = ref.best_rank_approx(ref.delta_w(clients, "q"), r)
    rel = float((B.double() @ A.double() - best).norm() / best.norm())
    assert rel < 1e-5

"""FedEx-LoRA, FedSA-LoRA, RoLoRA / generalised FFA-LoRA, HetLoRA, FedSVD and FlexLoRA's rank
policies against the dense float64 references in tests/reference_methods.py, plus Hypothesis
properties (exactness where a method claims it)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lorafair import LoRAFactors, errors, registry
from lorafair.aggregate import (
    EnergyThreshold,
    fedex_lora,
    fedit,
    fedsa_lora,
    fedsvd,
    ffa_lora,
    flexlora,
    flexlora_report,
    hetlora,
    hetlora_truncate,
    rolora,
    rolora_trained,
)
from lorafair.testing import strategies as lst
from tests import reference as ref
from tests import reference_methods as refm

close = torch.testing.assert_close


def _scale(clients) -> float:
    return max(float(f.B.abs().max() * f.A.abs().max()) for c in clients for f in c.values())


def _tol(clients) -> dict[str, float]:
    return {"rtol": 1e-9, "atol": 1e-9 * (1.0 + _scale(clients))}


def _gen_clients(ranks, d_out=7, d_in=9, *, seed=0, shared_A=False, names=("q", "v")):
    g = torch.Generator().manual_seed(seed)
    shared = {n: torch.randn(ranks[0], d_in, generator=g, dtype=torch.float64) for n in names}
    return [
        {
            n: (
                shared[n] if shared_A else torch.randn(r, d_in, generator=g, dtype=torch.float64),
                torch.randn(d_out, r, generator=g, dtype=torch.float64),
            )
            for n in names
        }
        for r in ranks
    ]


# ---- FedEx-LoRA ----


@given(lst.clients_and_weights())
def test_fedex_adapters_are_fedit_and_residual_is_dense_reference(cw):
    clients, weights = cw
    out = fedex_lora(clients, weights)
    for name in clients[0]:
        A_ref, B_ref, R_ref = refm.fedex(clients, name, weights)
        A, B = out.adapters[name]
        close(A, A_ref, **_tol(clients))
        close(B, B_ref, **_tol(clients))
        A_res, B_res = out.residual[name]
        close(B_res @ A_res, R_ref, **_tol(clients))
        R = sum(f[name].A.shape[0] for f in clients) + A.shape[0]
        assert A_res.shape == (R, A.shape[1])
        assert B_res.shape == (B.shape[0], R)
        rep = out.report[name]
        assert rep.rank == R
        assert rep.lost == 0.0
        assert rep.norm == pytest.approx(float(R_ref.norm()), rel=1e-9, abs=_tol(clients)["atol"])


@given(lst.clients_and_weights())
def test_fedex_adapters_plus_residual_is_exactly_delta_w(cw):
    clients, weights = cw
    out = fedex_lora(clients, weights)
    for name in clients[0]:
        A, B = out.adapters[name]
        A_res, B_res = out.residual[name]
        close(B @ A + B_res @ A_res, ref.delta_w(clients, name, weights), **_tol(clients))


def test_fedex_float32_exactness_is_to_float32_rounding():
    clients = [
        {n: (A.float(), B.float()) for n, (A, B) in c.items()} for c in _gen_clients([3] * 4)
    ]
    out = fedex_lora(clients, [1.0, 2.0, 3.0, 4.0])
    for name in clients[0]:
        A, B = (t.double() for t in out.adapters[name])
        A_res, B_res = (t.double() for t in out.residual[name])
        dw = ref.delta_w(clients, name, [1.0, 2.0, 3.0, 4.0])
        err = float((B @ A + B_res @ A_res - dw).norm() / dw.norm())
        fedit_err = float((B @ A - dw).norm() / dw.norm())
        assert err < 1e-6 < fedit_err


@given(lst.clients_and_weights(), st.integers(1, 6))
def test_fedex_truncated_residual_is_eckart_young_and_reports_the_loss(cw, q):
    clients, weights = cw
    out = fedex_lora(clients, weights, residual_rank=q)
    tol = _tol(clients)
    for name in clients[0]:
        _, _, R_ref = refm.fedex(clients, name, weights)
        A_q, B_q = out.residual[name]
        assert A_q.shape[0] == B_q.shape[1] == q
        tail = ref.singular_tail(R_ref, q)
        err = float((R_ref - B_q @ A_q).norm())
        assert err == pytest.approx(tail, rel=1e-7, abs=1e3 * tol["atol"])
        rep = out.report[name]
        assert rep.rank == q
        assert rep.lost == pytest.approx(tail, rel=1e-7, abs=1e3 * tol["atol"])
        assert rep.norm == pytest.approx(float(R_ref.norm()), rel=1e-7, abs=1e3 * tol["atol"])


def test_fedex_truncation_to_full_rank_loses_nothing():
    clients = _gen_clients([2, 2, 2])
    full = fedex_lora(clients, residual_rank=8)  # Σ r_k + r = 8
    for name in clients[0]:
        A_q, B_q = full.residual[name]
        _, _, R_ref = refm.fedex(clients, name)
        close(B_q @ A_q, R_ref, rtol=1e-9, atol=1e-9)
        assert full.report[name].lost < 1e-9


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_fedex_rejects_bad_residual_rank(bad):
    with pytest.raises(errors.LoRAFairError, match="residual_rank"):
        fedex_lora(_gen_clients([2, 2]), residual_rank=bad)


# ---- FedSA-LoRA ----


@given(lst.clients_and_weights())
def test_fedsa_shares_the_average_A_and_keeps_each_B(cw):
    clients, weights = cw
    out = fedsa_lora(clients, weights)
    assert len(out.adapters) == len(clients)
    for name in clients[0]:
        A_ref, Bs = refm.fedsa(clients, name, weights)
        close(out.shared_A[name], A_ref, **_tol(clients))
        for k, B_k in enumerate(Bs):
            A, B = out.adapters[k][name]
            close(A, A_ref, **_tol(clients))
            assert torch.equal(B, B_k)


def test_fedsa_adapters_are_independent_copies():
    clients = _gen_clients([2, 2, 2])
    out = fedsa_lora(clients)
    ptrs = [t.data_ptr() for a in out.adapters for f in a.values() for t in f]
    ptrs += [t.data_ptr() for t in out.shared_A.values()]
    assert len(ptrs) == len(set(ptrs))


# ---- generalised FFA-LoRA and RoLoRA ----


@pytest.mark.parametrize("frozen", ["A", "B"])
@given(data=st.data())
def test_ffa_lora_either_factor_frozen_is_exact(frozen, data):
    clients, weights = data.draw(lst.clients_and_weights(shared_A=True))
    if frozen == "B":  # swap roles: a shared B, distinct As
        g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
        clients = [
            {
                n: LoRAFactors(
                    torch.randn(f.A.shape, generator=g, dtype=torch.float64), clients[0][n].B
                )
                for n, f in c.items()
            }
            for c in clients
        ]
    out = ffa_lora(clients, weights, frozen=frozen)
    for name in clients[0]:
        A, B = out[name]
        A_ref, B_ref = refm.frozen_average(clients, name, weights, frozen=frozen)
        close(A, A_ref, **_tol(clients))
        close(B, B_ref, **_tol(clients))
        close(B @ A, ref.delta_w(clients, name, weights), **_tol(clients))


def test_ffa_lora_default_still_freezes_A():
    clients = _gen_clients([3, 3], shared_A=True)
    close(ffa_lora(clients)["q"].A, clients[0]["q"][0], rtol=0, atol=0)
    with pytest.raises(errors.FrozenAMismatchError):
        ffa_lora(_gen_clients([3, 3]))


def test_frozen_B_mismatch_names_layer_and_client():
    clients = _gen_clients([2, 2, 2], shared_A=True)
    B = clients[0]["v"][1]
    clients = [{n: (A, B if n == "v" else b) for n, (A, b) in c.items()} for c in clients]
    ffa_lora([{"v": c["v"]} for c in clients], frozen="B")  # shared B on layer v: fine
    with pytest.raises(errors.FrozenBMismatchError, match=r"layer 'q': client 1 has B"):
        ffa_lora(clients, frozen="B")
    with pytest.raises(errors.FrozenFactorMismatchError, match=r"layer 'q': client 1 has B"):
        rolora(clients, trained="A")


@pytest.mark.parametrize("bad", ["a", None, "AB"])
def test_bad_factor_choice(bad):
    clients = _gen_clients([2, 2], shared_A=True)
    with pytest.raises(errors.LoRAFairError, match="'A' or 'B'"):
        ffa_lora(clients, frozen=bad)
    with pytest.raises(errors.LoRAFairError, match="'A' or 'B'"):
        rolora(clients, trained=bad)


@pytest.mark.parametrize("trained", ["A", "B"])
def test_rolora_is_ffa_lora_with_the_other_factor_frozen(trained):
    clients = _gen_clients([3, 3, 3], shared_A=True)
    if trained == "A":
        clients = [{n: (A, clients[0][n][1]) for n, (A, _) in c.items()} for c in clients]
        clients = [
            {n: (A + k, B) for n, (A, B) in c.items()} for k, c in enumerate(clients)
        ]  # distinct As, shared B
    out = rolora(clients, [1.0, 2.0, 3.0], trained=trained)
    frozen = "A" if trained == "B" else "B"
    for name in clients[0]:
        A_ref, B_ref = refm.frozen_average(clients, name, [1.0, 2.0, 3.0], frozen=frozen)
        close(out[name].A, A_ref, rtol=1e-12, atol=1e-12)
        close(out[name].B, B_ref, rtol=1e-12, atol=1e-12)
        close(out[name].B @ out[name].A, ref.delta_w(clients, name, [1.0, 2.0, 3.0]))


@given(lst.clients_and_weights(shared_A=True))
def test_rolora_b_round_is_exact(cw):
    clients, weights = cw
    out = rolora(clients, weights, trained="B")
    for name in clients[0]:
        close(out[name].B @ out[name].A, ref.delta_w(clients, name, weights), **_tol(clients))


def test_rolora_schedule_alternates_starting_with_B():
    assert [rolora_trained(t) for t in range(5)] == ["B", "A", "B", "A", "B"]
    for bad in (-1, 1.0, True):
        with pytest.raises(errors.LoRAFairError, match="round_index"):
            rolora_trained(bad)


# ---- HetLoRA ----


@given(lst.clients_and_weights(equal_ranks=False))
def test_hetlora_matches_dense_reference(cw):
    clients, weights = cw
    out = hetlora(clients, weights)
    for name in clients[0]:
        A_ref, B_ref = refm.hetlora(clients, name, weights)
        close(out[name].A, A_ref, **_tol(clients))
        close(out[name].B, B_ref, **_tol(clients))


@given(lst.clients_and_weights(equal_ranks=False))
def test_hetlora_with_equal_norms_is_zero_padded_fedit(cw):
    clients, weights = cw
    # rescale every B_k so that ‖B_k A_k‖_F = 1 on every layer (all norms equal)
    unit = [
        {n: (A, B / torch.linalg.matrix_norm(B @ A).clamp_min(1e-300)) for n, (A, B) in c.items()}
        for c in clients
    ]
    if any(float(torch.linalg.matrix_norm(B @ A)) == 0 for c in unit for A, B in c.values()):
        return
    out = hetlora(unit, weights)
    p = ref.normalised(weights, len(unit))
    for name in unit[0]:
        r = max(c[name][0].shape[0] for c in unit)
        A_pad = sum(
            w * torch.nn.functional.pad(c[name][0], (0, 0, 0, r - c[name][0].shape[0]))
            for w, c in zip(p, unit, strict=True)
        )
        B_pad = sum(
            w * torch.nn.functional.pad(c[name][1], (0, r - c[name][1].shape[1]))
            for w, c in zip(p, unit, strict=True)
        )
        close(out[name].A, A_pad, rtol=1e-9, atol=1e-9)
        close(out[name].B, B_pad, rtol=1e-9, atol=1e-9)


def test_hetlora_equal_ranks_and_zero_B_is_fedit():
    clients = [
        {n: (A, torch.zeros_like(B)) for n, (A, B) in c.items()} for c in _gen_clients([3] * 3)
    ]
    out = hetlora(clients, [1.0, 2.0, 3.0])
    expected = fedit(clients, [1.0, 2.0, 3.0])
    for name in clients[0]:
        close(out[name].A, expected[name].A)
        close(out[name].B, expected[name].B)


def test_hetlora_model_norm_weights_whole_adapters():
    clients = _gen_clients([4, 8, 16], d_out=20, d_in=18)
    out = hetlora(clients, [1.0, 1.0, 2.0], norm="model")
    p = ref.normalised([1.0, 1.0, 2.0], 3)
    norms = [
        math.sqrt(sum(float(torch.linalg.matrix_norm(B @ A)) ** 2 for A, B in c.values()))
        for c in clients
    ]
    raw = [w * n for w, n in zip(p, norms, strict=True)]
    q = [x / sum(raw) for x in raw]
    for name in clients[0]:
        A_ref = sum(
            w * torch.nn.functional.pad(c[name][0], (0, 0, 0, 16 - c[name][0].shape[0]))
            for w, c in zip(q, clients, strict=True)
        )
        close(out[name].A, A_ref)
    with pytest.raises(errors.LoRAFairError, match="norm"):
        hetlora(clients, norm="global")


def test_hetlora_truncate_gives_each_client_its_leading_block():
    clients = _gen_clients([4, 8, 16], d_out=20, d_in=18)
    glob = hetlora(clients)
    assert glob["q"].A.shape == (16, 18)
    mine = hetlora_truncate(glob, [4, 8, {"q": 16, "v": 2}])
    for k, r in enumerate([4, 8]):
        for name in glob:
            assert torch.equal(mine[k][name].A, glob[name].A[:r])
            assert torch.equal(mine[k][name].B, glob[name].B[:, :r])
    assert mine[2]["v"].A.shape == (2, 18)
    assert mine[2]["q"].B.shape == (20, 16)
    assert mine[0]["q"].A.data_ptr() != glob["q"].A.data_ptr()
    with pytest.raises(errors.LoRAShapeError, match=r"layer 'q': client 1 asks for rank 17"):
        hetlora_truncate(glob, [4, 17])
    with pytest.raises(errors.LoRAShapeError, match="client 0 asks for rank 0"):
        hetlora_truncate(glob, [0])
    with pytest.raises(errors.LoRAFairError, match=r"client 0 gives no rank for layer 'v'"):
        hetlora_truncate(glob, [{"q": 3}])


# ---- FedSVD ----


@given(lst.clients_and_weights(shared_A=True))
def test_fedsvd_reproduces_B_bar_A_with_orthonormal_A(cw):
    clients, weights = cw
    out = fedsvd(clients, weights)
    for name in clients[0]:
        A, B = out[name]
        r, d_in = clients[0][name].A.shape
        assert A.shape == (r, d_in)
        assert B.shape == (clients[0][name].B.shape[0], r)
        close(B @ A, refm.fedsvd_product(clients, name, weights), **_tol(clients))
        s = min(r, d_in)
        close(A[:s] @ A[:s].T, torch.eye(s, dtype=torch.float64), rtol=1e-10, atol=1e-10)
        assert torch.count_nonzero(A[s:]) == 0
        # B' = UΣ: its columns are orthogonal, with norms the singular values of B̄A
        S_ref = torch.linalg.svdvals(refm.fedsvd_product(clients, name, weights))
        m = min(r, S_ref.numel())
        col = torch.linalg.vector_norm(B, dim=0)
        close(col[:m], S_ref[:m], **_tol(clients))
        close(col[m:], torch.zeros(r - m, dtype=torch.float64), **_tol(clients))


def test_fedsvd_zero_B_gives_orthonormal_A_spanning_the_old_A():
    clients = [
        {n: (A, torch.zeros_like(B)) for n, (A, B) in c.items()}
        for c in _gen_clients([3, 3], d_out=2, d_in=9, shared_A=True)
    ]
    out = fedsvd(clients)
    for name, (A, B) in out.items():
        assert torch.count_nonzero(B) == 0
        close(A @ A.T, torch.eye(3, dtype=torch.float64), rtol=1e-12, atol=1e-12)
        A0 = clients[0][name][0]
        proj = A0 @ A.T @ A  # A0 lies in the row space of A'
        close(proj, A0, rtol=1e-10, atol=1e-10)


def test_fedsvd_rejects_differing_A():
    with pytest.raises(errors.FrozenAMismatchError, match=r"layer 'q': client 1 .*FedSVD"):
        fedsvd(_gen_clients([2, 2]))


# ---- FlexLoRA rank policies ----


@given(lst.clients_and_weights(equal_ranks=False), st.sampled_from([0.5, 0.9, 0.99, 1.0]))
def test_energy_threshold_matches_dense_svd(cw, tau):
    clients, weights = cw
    rep = flexlora_report(clients, weights, rank=EnergyThreshold(tau))
    plain = flexlora(clients, weights, rank=EnergyThreshold(tau))
    for name in clients[0]:
        dw = ref.delta_w(clients, name, weights)
        k, energy = rep.ranks[name]
        k_ref = refm.energy_rank(dw, tau)
        S2 = torch.linalg.svdvals(dw) ** 2
        # ties in σ² at the threshold can move k by one; the energy it keeps must still pass
        assert energy >= tau * (1 - 1e-9)
        assert k <= k_ref or abs(float(S2[:k_ref].sum() / S2.sum()) - tau) < 1e-9
        A, B = rep.adapters[name]
        assert A.shape[0] == B.shape[1] == k
        assert torch.equal(A, plain[name].A)
        assert torch.equal(B, plain[name].B)
        err = float((dw - B @ A).norm())
        assert err == pytest.approx(
            ref.singular_tail(dw, k), rel=1e-7, abs=1e3 * _tol(clients)["atol"]
        )
        total = float(S2.sum())
        if total > 0:
            assert energy == pytest.approx(float(S2[:k].sum()) / total, rel=1e-7, abs=1e-9)


def test_energy_threshold_gives_per_layer_ranks():
    g = torch.Generator().manual_seed(1)
    low = torch.randn(5, 1, generator=g, dtype=torch.float64)
    clients = [
        {
            "flat": (
                torch.randn(1, 6, generator=g, dtype=torch.float64).repeat(2, 1),
                low.repeat(1, 2),
            ),
            "full": (
                torch.randn(2, 6, generator=g, dtype=torch.float64),
                torch.randn(5, 2, generator=g, dtype=torch.float64),
            ),
        }
        for _ in range(3)
    ]
    rep = flexlora_report(clients, rank=EnergyThreshold(0.999999))
    assert rep.ranks["flat"].rank == 1  # every client's update is along one left vector
    assert rep.ranks["full"].rank > 1
    capped = flexlora_report(clients, rank=EnergyThreshold(0.999999, max_rank=2))
    assert capped.ranks["full"].rank == 2


def test_fixed_rank_report_equals_flexlora():
    clients = _gen_clients([2, 3, 4])
    rep = flexlora_report(clients, [1.0, 2.0, 3.0], rank=3)
    plain = flexlora(clients, [1.0, 2.0, 3.0], rank=3)
    for name in clients[0]:
        close(rep.adapters[name].B @ rep.adapters[name].A, plain[name].B @ plain[name].A)
        dw = ref.delta_w(clients, name, [1.0, 2.0, 3.0])
        S2 = torch.linalg.svdvals(dw) ** 2
        assert rep.ranks[name].rank == 3
        assert rep.ranks[name].energy == pytest.approx(float(S2[:3].sum() / S2.sum()), rel=1e-10)


@pytest.mark.parametrize(
    "bad", [EnergyThreshold(0.0), EnergyThreshold(1.5), EnergyThreshold(0.9, 0), 0, "svd", 2.0]
)
def test_bad_rank_policy(bad):
    with pytest.raises(errors.LoRAFairError, match=r"rank|threshold|max_rank"):
        flexlora(_gen_clients([2, 2]), rank=bad)


# ---- properties every new method states: client order and weight scale do not matter ----

_OPTIONS = {
    "fedex_lora": {"equal_ranks": True},
    "fedsa_lora": {"equal_ranks": True},
    "rolora": {"equal_ranks": True, "shared_A": True},
    "hetlora": {"equal_ranks": False},
    "fedsvd": {"equal_ranks": True, "shared_A": True},
}


def _products(name, out):
    """Every product B @ A a method's result hands out (float64), in a fixed order."""
    spec = registry.get(name)
    if spec.personalised:
        return [{n: f.B @ f.A for n, f in a.items()} for a in out.adapters]
    return [{n: f.B @ f.A for n, f in spec.update_factors(out).items()}]


@pytest.mark.parametrize("name", list(_OPTIONS))
@given(data=st.data())
def test_permutation_and_weight_scale_invariance(name, data):
    clients, weights = data.draw(lst.clients_and_weights(allow_none=False, **_OPTIONS[name]))
    perm = data.draw(st.permutations(range(len(clients))))
    factor = data.draw(st.sampled_from([1e-3, 0.5, 7.0, 1e4]))
    fn = registry.get(name).fn
    base = _products(name, fn(clients, weights))
    shuffled = _products(name, fn([clients[i] for i in perm], [weights[i] for i in perm]))
    scaled = _products(name, fn(clients, [w * factor for w in weights]))
    if registry.get(name).personalised:  # client i of the shuffled list is client perm[i]
        shuffled = [shuffled[perm.index(k)] for k in range(len(clients))]
    tol = {"rtol": 1e-7, "atol": 1e-7 * (1.0 + _scale(clients))}
    for got_s, got_w, want in zip(shuffled, scaled, base, strict=True):
        for n in want:
            close(got_s[n], want[n], **tol)
            close(got_w[n], want[n], **tol)

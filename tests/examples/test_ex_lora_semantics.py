"""Client-side semantics of the example's methods, asserted directly (no timm needed).

A toy model with timm-style layer names (``blocks.i.mlp.fc1/fc2`` and a ``head``) goes through
real local SGD; every expectation is recomputed here plainly in float64.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from examples.data import ArrayDataset, ClientData
from examples.loop import FedConfig, local_train, run_method
from examples.lora import (
    VIT_TARGETS,
    LoRALinear,
    get_factors,
    inject_lora,
    lora_layers,
    merge_updates,
    set_factors,
)
from examples.methods import (
    METHODS,
    SIDES,
    ClientUpload,
    GlobalState,
    RoundResult,
    ServerOptions,
    client_start,
    client_upload,
    initial_state,
    server_step,
    trainable_parameters,
)
from lorafair import registry
from lorafair.types import LoRAFactors

D_IN, HIDDEN, CLASSES, RANK = 6, 10, 3, 2
F64 = torch.float64


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D_IN, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, D_IN)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(torch.tanh(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = _Mlp()

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(_Block(), _Block())
        self.head = nn.Linear(D_IN, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(x))


def _make(alpha: float = 4.0, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(123)
    model = _Toy()
    inject_lora(model, VIT_TARGETS, rank=RANK, alpha=alpha, seed=seed)
    for p in model.head.parameters():
        p.requires_grad_(True)
    return model, model.head


def _clients(n: tuple[int, ...] = (12, 20, 8)) -> list[ClientData]:
    g = torch.Generator().manual_seed(7)
    out = []
    for k, size in enumerate(n):
        x = torch.randn(size, D_IN, generator=g) + k  # a feature shift per client
        y = torch.randint(0, CLASSES, (size,), generator=g)
        out.append(ClientData(f"d{k}", ArrayDataset(x, y)))
    return out


def _cfg(**kw: object) -> FedConfig:
    base = {
        "rounds": 2,
        "local_iters": 3,
        "local_unit": "steps",
        "batch_size": 4,
        "lr": 0.2,
        "rank": RANK,
    }
    base.update(kw)
    return FedConfig(**base)  # type: ignore[arg-type]


def _local_round(method: str, model: nn.Module, head: nn.Module, state, clients, cfg, t=0):  # type: ignore[no-untyped-def]
    """One round of client work, exactly as run_method does it; returns the uploads."""
    uploads = []
    for k, c in enumerate(clients):
        client_start(method, model, head, state, seed=100 + k, client=k)
        params = trainable_parameters(method, model, head, round_index=t)
        local_train(model, params, c.data, cfg, generator=torch.Generator().manual_seed(k))
        uploads.append(client_upload(method, model, head, client=k, n=len(c)))
    return uploads


def _server(
    method: str,
    model: nn.Module,
    state: GlobalState,
    uploads: list[ClientUpload],
    *,
    t: int = 0,
    **options: object,
) -> RoundResult:
    """The server step of round ``t`` with every client of ``uploads`` taking part."""
    opts = ServerOptions(RANK, **options)._replace(round_index=t)  # type: ignore[arg-type]
    return server_step(method, model, state, uploads, list(range(len(uploads))), opts)


def _p(uploads: list[ClientUpload]) -> list[float]:
    total = sum(u.n for u in uploads)
    return [u.n / total for u in uploads]


def _wmean(ts: list[Tensor], p: list[float]) -> Tensor:
    return sum(w * t.to(F64) for w, t in zip(p, ts, strict=True))  # type: ignore[return-value]


def _dense_dw(uploads: list[ClientUpload], name: str) -> Tensor:
    p = _p(uploads)
    return sum(  # type: ignore[return-value]
        w * (u.factors[name].B.to(F64) @ u.factors[name].A.to(F64))
        for w, u in zip(p, uploads, strict=True)
    )


def _flat_cos(x: Tensor, y: Tensor) -> float:
    return float((x * y).sum() / (x.norm() * y.norm()))


# ------------------------------------------------------------------------------- LoRA module


def test_lora_linear_forward_matches_dense_reference() -> None:
    torch.manual_seed(0)
    base = nn.Linear(5, 4)
    layer = LoRALinear(base, rank=3, alpha=6.0)
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    x = torch.randn(7, 5)
    W = base.weight.detach().to(F64) + 2.0 * (
        layer.lora_B.detach().to(F64) @ layer.lora_A.detach().to(F64)
    )
    want = x.to(F64) @ W.T + base.bias.detach().to(F64)
    torch.testing.assert_close(layer(x).to(F64), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("merge_when_training", [False, True])
def test_both_lora_forms_give_the_dense_output_and_gradients(merge_when_training: bool) -> None:
    """Merged (one GEMM) and unmerged (two rank-r products): same output, same ∂A and ∂B."""
    torch.manual_seed(1)
    base = nn.Linear(6, 5)
    layer = LoRALinear(base, rank=2, alpha=3.0, merge_when_training=merge_when_training)
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    x, g = torch.randn(4, 3, 6), torch.randn(4, 3, 5)
    A = layer.lora_A.detach().to(F64).requires_grad_(True)
    B = layer.lora_B.detach().to(F64).requires_grad_(True)
    want = x.to(F64) @ (base.weight.detach().to(F64) + 1.5 * B @ A).T + base.bias.detach()
    (want * g.to(F64)).sum().backward()  # type: ignore[no-untyped-call]
    (layer(x) * g).sum().backward()  # type: ignore[no-untyped-call]
    assert layer.lora_A.grad is not None
    assert layer.lora_B.grad is not None
    torch.testing.assert_close(layer.lora_A.grad.to(F64), A.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B.grad.to(F64), B.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # evaluation always takes the merged form
        torch.testing.assert_close(layer(x).to(F64), want.detach(), rtol=1e-5, atol=1e-5)


def test_inject_wraps_targets_only_and_freezes_base() -> None:
    model, _ = _make()
    names = sorted(lora_layers(model))
    assert names == [f"blocks.{i}.mlp.{f}" for i in (0, 1) for f in ("fc1", "fc2")]
    assert isinstance(model.head, nn.Linear)
    for layer in lora_layers(model).values():
        assert not layer.base.weight.requires_grad
        assert torch.count_nonzero(layer.lora_B) == 0
        assert torch.count_nonzero(layer.lora_A) > 0


def test_factors_on_the_wire_fold_the_scaling() -> None:
    model, _ = _make(alpha=4.0)  # s = alpha / rank = 2
    layer = lora_layers(model)["blocks.0.mlp.fc1"]
    with torch.no_grad():
        layer.lora_B.fill_(0.5)
    A, B = get_factors(model)["blocks.0.mlp.fc1"]
    torch.testing.assert_close(B, torch.full_like(B, 1.0))
    set_factors(model, {n: LoRAFactors(a, 3 * b) for n, (a, b) in get_factors(model).items()})
    torch.testing.assert_close(layer.lora_B.detach(), torch.full_like(B, 1.5))
    torch.testing.assert_close(layer.lora_A.detach(), A)


def test_merge_updates_adds_product_of_any_rank() -> None:
    model, _ = _make()
    layer = lora_layers(model)["blocks.1.mlp.fc2"]
    w0 = layer.base.weight.detach().clone().to(F64)
    A, B = torch.randn(5, HIDDEN), torch.randn(D_IN, 5)  # rank 5 > RANK, like FLoRA's stack
    factors = {
        n: LoRAFactors(torch.zeros(5, m.lora_A.shape[1]), torch.zeros(m.lora_B.shape[0], 5))
        for n, m in lora_layers(model).items()
    }
    factors["blocks.1.mlp.fc2"] = LoRAFactors(A, B)
    merge_updates(model, factors)
    torch.testing.assert_close(
        layer.base.weight.detach().to(F64), w0 + B.to(F64) @ A.to(F64), rtol=1e-6, atol=1e-6
    )


# ------------------------------------------------------------------------- client semantics


def test_fedit_clients_restart_from_plain_averages_and_head_is_fedavg() -> None:
    model, head = _make()
    cfg, clients = _cfg(), _clients()
    state = initial_state(model, head)
    uploads = _local_round("fedit", model, head, state, clients, cfg)
    p = _p(uploads)
    rr = _server("fedit", model, state, uploads)
    client_start("fedit", model, head, rr.state, seed=0)
    got = get_factors(model)
    for name in got:
        want_A = _wmean([u.factors[name].A for u in uploads], p)
        want_B = _wmean([u.factors[name].B for u in uploads], p)
        torch.testing.assert_close(got[name].A.to(F64), want_A, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[name].B.to(F64), want_B, rtol=1e-5, atol=1e-6)
    want_w = _wmean([u.head["weight"] for u in uploads], p)
    torch.testing.assert_close(head.weight.detach().to(F64), want_w, rtol=1e-5, atol=1e-6)
    # Clients really trained A and B (otherwise the checks above would be vacuous).
    assert not torch.equal(
        uploads[0].factors["blocks.0.mlp.fc1"].A, state.factors["blocks.0.mlp.fc1"].A
    )
    assert torch.count_nonzero(uploads[0].factors["blocks.0.mlp.fc1"].B) > 0


def test_ffa_lora_freezes_the_shared_a_and_sends_only_b() -> None:
    model, head = _make()
    cfg, clients = _cfg(), _clients()
    state = initial_state(model, head)
    init_A = {n: f.A.clone() for n, f in state.factors.items()}
    for _ in range(2):
        uploads = _local_round("ffa_lora", model, head, state, clients, cfg)
        for u in uploads:
            for n, (A, B) in u.factors.items():
                assert torch.equal(A, init_A[n]), "FFA-LoRA client changed the frozen A"
                assert torch.count_nonzero(B) > 0
        rr = _server("ffa_lora", model, state, uploads)
        state = rr.state
        for n, (A, _) in state.factors.items():
            assert torch.equal(A, init_A[n])
    for layer in lora_layers(model).values():
        assert not layer.lora_A.requires_grad
    p = _p(uploads)
    name = "blocks.1.mlp.fc1"
    want_B = _wmean([u.factors[name].B for u in uploads], p)
    torch.testing.assert_close(state.factors[name].B.to(F64), want_B, rtol=1e-5, atol=1e-6)
    # Upload and download carry B only: K · Σ numel(B) float32 values.
    b_bytes = sum(m.lora_B.numel() * 4 for m in lora_layers(model).values())
    assert rr.bytes_up == rr.bytes_down == len(clients) * b_bytes


def test_flora_merges_the_stacked_update_then_reinitialises() -> None:
    model, head = _make()
    cfg, clients = _cfg(), _clients()
    state = initial_state(model, head)
    base0 = {n: m.base.weight.detach().clone().to(F64) for n, m in lora_layers(model).items()}
    uploads = _local_round("flora", model, head, state, clients, cfg)
    # Each client starts from a fresh LoRA: different random A per client, B = 0 (so the
    # uploaded A differ across clients, unlike FedIT's shared start).
    n0 = "blocks.0.mlp.fc1"
    assert not torch.equal(uploads[0].factors[n0].A, uploads[1].factors[n0].A)
    rr = _server("flora", model, state, uploads)
    for n, m in lora_layers(model).items():
        want = base0[n] + _dense_dw(uploads, n)
        torch.testing.assert_close(m.base.weight.detach().to(F64), want, rtol=1e-5, atol=1e-5)
    for _, B in rr.state.factors.values():
        assert torch.count_nonzero(B) == 0  # the global model is the merged base alone
    client_start("flora", model, head, rr.state, seed=999)
    for layer in lora_layers(model).values():
        assert torch.count_nonzero(layer.lora_B) == 0
        assert torch.count_nonzero(layer.lora_A) > 0
    # Download: every client gets all K clients' factors.
    k = len(clients)
    ab = sum((m.lora_A.numel() + m.lora_B.numel()) * 4 for m in lora_layers(model).values())
    assert rr.bytes_up == k * ab
    assert rr.bytes_down == k * k * ab


def test_flexlora_clients_take_the_best_rank_r_approximation() -> None:
    model, head = _make()
    cfg, clients = _cfg(), _clients()
    state = initial_state(model, head)
    uploads = _local_round("flexlora", model, head, state, clients, cfg)
    rr = _server("flexlora", model, state, uploads)
    client_start("flexlora", model, head, rr.state, seed=0)
    for n, (A, B) in get_factors(model).items():
        U, S, Vh = torch.linalg.svd(_dense_dw(uploads, n))
        want = U[:, :RANK] @ torch.diag(S[:RANK]) @ Vh[:RANK]
        torch.testing.assert_close(B.to(F64) @ A.to(F64), want, rtol=1e-4, atol=1e-5)


def test_lora_fair_clients_start_from_corrected_average() -> None:
    model, head = _make()
    cfg, clients = _cfg(), _clients()
    state = initial_state(model, head)
    uploads = _local_round("lora_fair", model, head, state, clients, cfg)
    p = _p(uploads)
    rr = _server("lora_fair", model, state, uploads, lam=0.01)
    client_start("lora_fair", model, head, rr.state, seed=0)
    got = get_factors(model)
    moved = 0.0
    for n, (A, B) in got.items():
        A_bar = _wmean([u.factors[n].A for u in uploads], p)
        B_bar = _wmean([u.factors[n].B for u in uploads], p)
        dW = _dense_dw(uploads, n)
        torch.testing.assert_close(A.to(F64), A_bar, rtol=1e-5, atol=1e-6)  # A' = Ā
        # B' = B̄ + ΔB*: at least as aligned with ΔW as FedIT's B̄ (Eq. 8 with ΔB = 0 feasible)
        assert _flat_cos(B.to(F64) @ A_bar, dW) >= _flat_cos(B_bar @ A_bar, dW) - 1e-6
        moved = max(moved, float((B.to(F64) - B_bar).norm()))
    assert moved > 0, "LoRA-FAIR returned FedIT's B̄ unchanged on every layer"
    d = rr.diagnostics
    assert d["cos_B_prime_A_bar_dW"] >= d["fedit_cos_B_bar_A_bar_dW"] - 1e-9
    assert 0.0 < d["cos_B_prime_B_bar"] <= 1.0 + 1e-12


@pytest.mark.parametrize("method", METHODS)
def test_run_method_two_rounds_is_finite_and_deterministic(method: str) -> None:
    clients = _clients()
    tests = {c.domain: c.data for c in clients}
    cfg = _cfg()
    r1 = run_method(method, _make, clients, tests, cfg)  # type: ignore[arg-type]
    r2 = run_method(method, _make, clients, tests, cfg)  # type: ignore[arg-type]
    assert len(r1.accuracy) == 2
    assert r1.accuracy == r2.accuracy
    assert r1.diagnostics == r2.diagnostics
    assert all(0.0 <= v <= 100.0 for a in r1.accuracy for v in a.values())
    assert all(b > 0 for b in r1.bytes_up + r1.bytes_down)
    # Every method records the same bias diagnostics of the update its clients apply.
    for d in r1.diagnostics:
        assert -1.0 <= d["min_cos_agg_dW"] <= d["cos_agg_dW"] <= 1.0
        if registry.get(SIDES[method].aggregator).exact:
            assert d["min_cos_agg_dW"] == pytest.approx(1.0, abs=1e-6), method


def test_partial_participation_samples_clients_per_round() -> None:
    clients = _clients((6, 6, 6, 6, 6))
    tests = {"all": clients[0].data}
    r = run_method("fedit", _make, clients, tests, _cfg(clients_per_round=2))
    model, _ = _make()
    ab = sum((m.lora_A.numel() + m.lora_B.numel()) * 4 for m in lora_layers(model).values())
    assert r.bytes_up == [2 * ab, 2 * ab]


def test_every_method_dispatches_to_a_registered_aggregator() -> None:
    assert set(METHODS) == set(SIDES)
    assert {"fedit", "ffa_lora", "flora", "flexlora", "lora_fair"} <= set(METHODS)
    for name, side in SIDES.items():
        assert side.aggregator in registry.names(), name
    model, head = _make()
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        server_step("nope", model, initial_state(model, head), [], [], ServerOptions(RANK))


def test_fedit_reports_its_own_bias_and_exact_methods_report_none() -> None:
    model, head = _make()
    cfg, clients = _cfg(), _clients()
    state = initial_state(model, head)
    for method, exact in (("fedit", False), ("ffa_lora", True)):
        uploads = _local_round(method, model, head, state, clients, cfg)
        rr = _server(method, model, state, uploads)
        cos = []
        for n in uploads[0].factors:
            A, B = rr.state.factors[n]
            cos.append(_flat_cos(B.to(F64) @ A.to(F64), _dense_dw(uploads, n)))
        assert rr.diagnostics["cos_agg_dW"] == pytest.approx(sum(cos) / len(cos), abs=1e-9)
        assert rr.diagnostics["min_cos_agg_dW"] == pytest.approx(min(cos), abs=1e-9)
        if exact:
            assert min(cos) == pytest.approx(1.0, abs=1e-6)
        else:
            assert min(cos) < 1.0 - 1e-9  # trained A_k differ, so B̄Ā ≠ ΔW

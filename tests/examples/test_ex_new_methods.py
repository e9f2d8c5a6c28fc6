"""Client sides of FedEx-LoRA, FedSA-LoRA, RoLoRA, HetLoRA and FedSVD in the example loop (toy
model, no timm needed); every expectation recomputed here in float64."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from examples.data import ArrayDataset, ClientData
from examples.loop import FedConfig, evaluate_state, local_train, run_method
from examples.lora import VIT_TARGETS, inject_lora, lora_layers
from examples.methods import (
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
from tests.examples.test_ex_lora_semantics import CLASSES, D_IN, _Toy

RANK = 4  # the HetLoRA client ranks are RANK // 4, RANK // 2 and RANK
F64 = torch.float64


def _make() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(123)
    model = _Toy()
    inject_lora(model, VIT_TARGETS, rank=RANK, alpha=8.0, seed=0)
    for p in model.head.parameters():
        p.requires_grad_(True)
    return model, model.head


def _clients(n: tuple[int, ...] = (12, 20, 8)) -> list[ClientData]:
    g = torch.Generator().manual_seed(7)
    return [
        ClientData(
            f"d{k}",
            ArrayDataset(
                torch.randn(size, D_IN, generator=g) + k,
                torch.randint(0, CLASSES, (size,), generator=g),
            ),
        )
        for k, size in enumerate(n)
    ]


def _cfg(**kw: object) -> FedConfig:
    base = {"rounds": 2, "local_iters": 3, "local_unit": "steps", "batch_size": 4, "lr": 0.2}
    base.update({"rank": RANK, **kw})
    return FedConfig(**base)  # type: ignore[arg-type]


def _round(
    method: str,
    t: int,
    model: nn.Module,
    head: nn.Module,
    state: GlobalState,
    clients: list[ClientData],
    cfg: FedConfig,
) -> list[ClientUpload]:
    """One round of client work exactly as run_method does it; returns the uploads."""
    uploads = []
    for k, c in enumerate(clients):
        client_start(method, model, head, state, seed=100 + k, client=k)
        params = trainable_parameters(method, model, head, round_index=t)
        local_train(model, params, c.data, cfg, generator=torch.Generator().manual_seed(k))
        uploads.append(client_upload(method, model, head, client=k, n=len(c)))
    return uploads


def _server(
    method: str, t: int, model: nn.Module, state: GlobalState, uploads: list[ClientUpload]
) -> RoundResult:
    opts = ServerOptions(RANK, round_index=t)
    return server_step(method, model, state, uploads, list(range(len(uploads))), opts)


def _p(clients: list[ClientData]) -> list[float]:
    n = [len(c) for c in clients]
    return [x / sum(n) for x in n]


def _effective(model: nn.Module) -> dict[str, Tensor]:
    """W0 + s B A of every LoRA layer, float64."""
    return {
        n: m.base.weight.to(F64) + m.scaling * m.lora_B.to(F64) @ m.lora_A.to(F64)
        for n, m in lora_layers(model).items()
    }


def _dense_dw(uploads: list[ClientUpload], p: list[float], name: str) -> Tensor:
    return sum(  # type: ignore[return-value]
        w * u.factors[name].B.to(F64) @ u.factors[name].A.to(F64)
        for w, u in zip(p, uploads, strict=True)
    )


def _flat_cos(x: Tensor, y: Tensor) -> float:
    return float((x * y).sum() / (x.norm() * y.norm()))


def _fac_bytes(uploads: list[ClientUpload], part: str) -> int:
    return sum(getattr(f, part).numel() * 4 for u in uploads for f in u.factors.values())


def test_fedex_folds_the_residual_so_the_global_model_moves_by_exactly_delta_w() -> None:
    model, head = _make()
    clients, cfg = _clients(), _cfg()
    state = initial_state(model, head)
    up0 = _round("fedex_lora", 0, model, head, state, clients, cfg)
    state = _server("fedex_lora", 0, model, state, up0).state  # B ≠ 0 after round 0
    before = {n: m.base.weight.to(F64).clone() for n, m in lora_layers(model).items()}
    uploads = _round("fedex_lora", 1, model, head, state, clients, cfg)
    rr = _server("fedex_lora", 1, model, state, uploads)
    client_start("fedex_lora", model, head, rr.state, seed=0)
    after = _effective(model)
    for n in before:
        dW = _dense_dw(uploads, _p(clients), n)
        torch.testing.assert_close(after[n], before[n] + dW, rtol=1e-5, atol=1e-5)
    assert rr.diagnostics["min_cos_agg_dW"] == pytest.approx(1.0, abs=1e-6)
    # Down: adapters and the residual, both of rank r (the residual of a rank-r FedIT).
    assert rr.bytes_up == _fac_bytes(uploads, "A") + _fac_bytes(uploads, "B")
    assert rr.bytes_down > rr.bytes_up


def test_fedsa_keeps_each_clients_B_and_shares_the_averaged_A() -> None:
    model, head = _make()
    clients, cfg = _clients(), _cfg()
    state = initial_state(model, head)
    uploads = _round("fedsa_lora", 0, model, head, state, clients, cfg)
    p = _p(clients)
    rr = _server("fedsa_lora", 0, model, state, uploads)
    for k in range(3):
        client_start("fedsa_lora", model, head, rr.state, seed=0, client=k)
        for n, m in lora_layers(model).items():
            A_bar = sum(w * u.factors[n].A.to(F64) for w, u in zip(p, uploads, strict=True))
            torch.testing.assert_close(m.lora_A.to(F64), A_bar, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(m.lora_B * m.scaling, uploads[k].factors[n].B)
    # Its diagnostic: the data-weighted mean of the clients' next updates, (Σ p_k B_k) Ā.
    cos = []
    for n in uploads[0].factors:
        A_bar = sum(w * u.factors[n].A.to(F64) for w, u in zip(p, uploads, strict=True))
        B_bar = sum(w * u.factors[n].B.to(F64) for w, u in zip(p, uploads, strict=True))
        cos.append(_flat_cos(B_bar @ A_bar, _dense_dw(uploads, p, n)))
    assert rr.diagnostics["cos_agg_dW"] == pytest.approx(sum(cos) / len(cos), abs=1e-6)
    # Only A travels, up and down.
    assert rr.bytes_up == rr.bytes_down == _fac_bytes(uploads, "A")
    tests = {c.domain: c.data for c in clients}
    acc = evaluate_state("fedsa_lora", model, head, rr.state, tests, clients, cfg)
    assert set(acc) == {"d0", "d1", "d2", "avg"}


def test_rolora_alternates_the_trained_factor() -> None:
    model, head = _make()
    clients, cfg = _clients(), _cfg()
    state = initial_state(model, head)
    init = state.factors
    up0 = _round("rolora", 0, model, head, state, clients, cfg)
    for u in up0:  # round 0 trains B on the shared initial A
        for n in u.factors:
            assert torch.equal(u.factors[n].A, init[n].A)
    rr = _server("rolora", 0, model, state, up0)
    assert rr.bytes_up == _fac_bytes(up0, "B")
    B_shared = {n: f.B.clone() for n, f in rr.state.factors.items()}
    up1 = _round("rolora", 1, model, head, rr.state, clients, cfg)
    for u in up1:  # round 1 trains A on the shared averaged B
        for n in u.factors:
            torch.testing.assert_close(u.factors[n].B, B_shared[n])
        assert any(not torch.equal(u.factors[n].A, init[n].A) for n in u.factors)
    rr = _server("rolora", 1, model, rr.state, up1)  # B shared, so RoLoRA accepts it
    assert rr.bytes_up == rr.bytes_down == _fac_bytes(up1, "A")


def test_hetlora_clients_train_ranks_quarter_half_full() -> None:
    model, head = _make()
    clients, cfg = _clients(), _cfg()
    state = initial_state(model, head)
    uploads = _round("hetlora", 0, model, head, state, clients, cfg)
    assert [u.factors["blocks.0.mlp.fc1"].A.shape[0] for u in uploads] == [1, 2, 4]
    rr = _server("hetlora", 0, model, state, uploads)
    assert rr.state.factors["blocks.0.mlp.fc1"].A.shape[0] == RANK
    # Each client downloads its own rank's block: (1 + 2 + 4) / 4 of the full adapter.
    full = sum((f.A.numel() + f.B.numel()) * 4 for f in rr.state.factors.values())
    assert rr.bytes_down * RANK == full * (1 + 2 + 4)
    client_start("hetlora", model, head, rr.state, seed=0, client=0)  # rank 1: zero tail
    for m in lora_layers(model).values():
        assert torch.count_nonzero(m.lora_A[1:]) == 0
        assert torch.count_nonzero(m.lora_B[:, 1:]) == 0


def test_fedsvd_trains_B_only_and_returns_an_orthonormal_A() -> None:
    model, head = _make()
    clients, cfg = _clients(), _cfg()
    state = initial_state(model, head)
    init = state.factors
    uploads = _round("fedsvd", 0, model, head, state, clients, cfg)
    for u in uploads:
        for n in u.factors:
            assert torch.equal(u.factors[n].A, init[n].A)
    rr = _server("fedsvd", 0, model, state, uploads)
    for n, (A, B) in rr.state.factors.items():
        torch.testing.assert_close(
            A.to(F64) @ A.to(F64).T, torch.eye(RANK, dtype=F64), rtol=1e-5, atol=1e-5
        )
        B_bar = sum(w * u.factors[n].B.to(F64) for w, u in zip(_p(clients), uploads, strict=True))
        torch.testing.assert_close(
            B.to(F64) @ A.to(F64), B_bar @ init[n].A.to(F64), rtol=1e-5, atol=1e-5
        )
    # Up: B only; down: A' and B'.
    assert rr.bytes_up == _fac_bytes(uploads, "B")
    assert rr.bytes_down == 3 * sum(
        (f.A.numel() + f.B.numel()) * 4 for f in rr.state.factors.values()
    )


def test_hetlora_under_partial_participation_keeps_the_full_rank() -> None:
    # With one client a round, a round may have no client of the full rank: the global adapter
    # is zero-padded back to it, so the next round's clients can still load it.
    clients = _clients()
    tests = {c.domain: c.data for c in clients}
    result = run_method("hetlora", _make, clients, tests, _cfg(rounds=3, clients_per_round=1))
    assert len(result.accuracy) == 3
    full = sum((m.lora_A.numel() + m.lora_B.numel()) * 4 for m in lora_layers(_make()[0]).values())
    assert all(0 < down <= full for down in result.bytes_down)
    assert any(down < full for down in result.bytes_down)  # a round without a full-rank client

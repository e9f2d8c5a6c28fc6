"""Client sides of issue 16's methods in the example loop (toy model, no timm needed); every
expectation recomputed here in float64."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from examples.data import ArrayDataset, ClientData
from examples.loop import FedConfig, local_train
from examples.lora import VIT_TARGETS, get_factors, inject_lora, lora_layers
from examples.new_methods import CLIENT_SIDES, NEW_METHODS, _trainable, run_new_method
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


def _round(method, t, model, head, side, clients, cfg):  # type: ignore[no-untyped-def]
    """One round of client work exactly as run_new_method does it; returns the uploads."""
    uploads = []
    for k, c in enumerate(clients):
        side.start(model, k, t)
        params = _trainable(model, head, *side.trains(t))
        local_train(model, params, c.data, cfg, generator=torch.Generator().manual_seed(k))
        uploads.append(side.upload(get_factors(model), k))
    return uploads


def _p(clients: list[ClientData]) -> list[float]:
    n = [len(c) for c in clients]
    return [x / sum(n) for x in n]


def _effective(model: nn.Module) -> dict[str, Tensor]:
    """W0 + s B A of every LoRA layer, float64."""
    return {
        n: m.base.weight.to(F64) + m.scaling * m.lora_B.to(F64) @ m.lora_A.to(F64)
        for n, m in lora_layers(model).items()
    }


def test_fedex_folds_the_residual_so_the_global_model_moves_by_exactly_delta_w() -> None:
    model, head = _make()
    clients, cfg = _clients(), _cfg()
    side = CLIENT_SIDES["fedex_lora"](get_factors(model), 3, cfg)
    _round("fedex_lora", 0, model, head, side, clients, cfg)  # B ≠ 0 after round 0
    side.server(
        model, _round("fedex_lora", 0, model, head, side, clients, cfg), [0, 1, 2], _p(clients)
    )
    before = {n: m.base.weight.to(F64).clone() for n, m in lora_layers(model).items()}
    uploads = _round("fedex_lora", 1, model, head, side, clients, cfg)
    side.server(model, uploads, [0, 1, 2], _p(clients))
    side.start(model, 0, 2)
    after = _effective(model)
    for n in before:
        dW = sum(
            w * u[n].B.to(F64) @ u[n].A.to(F64) for w, u in zip(_p(clients), uploads, strict=True)
        )
        torch.testing.assert_close(after[n], before[n] + dW, rtol=1e-5, atol=1e-5)


def test_fedsa_keeps_each_clients_B_and_shares_the_averaged_A() -> None:
    model, head = _make()
    clients, cfg = _clients(), _cfg()
    side = CLIENT_SIDES["fedsa_lora"](get_factors(model), 3, cfg)
    uploads = _round("fedsa_lora", 0, model, head, side, clients, cfg)
    side.server(model, uploads, [0, 1, 2], _p(clients))
    for k in range(3):
        side.start(model, k, 1)
        for n, m in lora_layers(model).items():
            A_bar = sum(w * u[n].A.to(F64) for w, u in zip(_p(clients), uploads, strict=True))
            torch.testing.assert_close(m.lora_A.to(F64), A_bar, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(m.lora_B * m.scaling, uploads[k][n].B)
    acc = side.evaluate(model, {c.domain: c.data for c in clients}, clients, cfg)
    assert set(acc) == {"d0", "d1", "d2", "avg"}


def test_rolora_alternates_the_trained_factor() -> None:
    model, head = _make()
    clients, cfg = _clients(), _cfg()
    init = get_factors(model)
    side = CLIENT_SIDES["rolora"](init, 3, cfg)
    up0 = _round("rolora", 0, model, head, side, clients, cfg)
    for u in up0:  # round 0 trains B on the shared initial A
        for n in u:
            assert torch.equal(u[n].A, init[n].A)
    side.server(model, up0, [0, 1, 2], _p(clients))
    B_shared = {n: f.B.clone() for n, f in side.factors.items()}
    up1 = _round("rolora", 1, model, head, side, clients, cfg)
    for u in up1:  # round 1 trains A on the shared averaged B
        for n in u:
            torch.testing.assert_close(u[n].B, B_shared[n])
        assert any(not torch.equal(u[n].A, init[n].A) for n in u)
    side.server(model, up1, [0, 1, 2], _p(clients))  # B shared, so RoLoRA accepts it


def test_hetlora_clients_train_ranks_quarter_half_full() -> None:
    model, head = _make()
    clients, cfg = _clients(), _cfg()
    side = CLIENT_SIDES["hetlora"](get_factors(model), 3, cfg)
    uploads = _round("hetlora", 0, model, head, side, clients, cfg)
    assert [u["blocks.0.mlp.fc1"].A.shape[0] for u in uploads] == [1, 2, 4]
    side.server(model, uploads, [0, 1, 2], _p(clients))
    assert side.factors["blocks.0.mlp.fc1"].A.shape[0] == RANK
    side.start(model, 0, 1)  # client 0 of rank 1: the tail beyond rank 1 is zero
    for m in lora_layers(model).values():
        assert torch.count_nonzero(m.lora_A[1:]) == 0
        assert torch.count_nonzero(m.lora_B[:, 1:]) == 0


def test_fedsvd_trains_B_only_and_returns_an_orthonormal_A() -> None:
    model, head = _make()
    clients, cfg = _clients(), _cfg()
    init = get_factors(model)
    side = CLIENT_SIDES["fedsvd"](init, 3, cfg)
    uploads = _round("fedsvd", 0, model, head, side, clients, cfg)
    for u in uploads:
        for n in u:
            assert torch.equal(u[n].A, init[n].A)
    side.server(model, uploads, [0, 1, 2], _p(clients))
    for n, (A, B) in side.factors.items():
        torch.testing.assert_close(
            A.to(F64) @ A.to(F64).T, torch.eye(RANK, dtype=F64), rtol=1e-5, atol=1e-5
        )
        B_bar = sum(w * u[n].B.to(F64) for w, u in zip(_p(clients), uploads, strict=True))
        torch.testing.assert_close(
            B.to(F64) @ A.to(F64), B_bar @ init[n].A.to(F64), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("method", NEW_METHODS)
def test_run_new_method_two_rounds_is_finite_and_deterministic(method: str) -> None:
    clients = _clients()
    tests = {c.domain: c.data for c in clients}
    r1 = run_new_method(method, _make, clients, tests, _cfg())  # type: ignore[arg-type]
    r2 = run_new_method(method, _make, clients, tests, _cfg())  # type: ignore[arg-type]
    assert len(r1.accuracy) == 2
    assert r1.accuracy == r2.accuracy
    assert all(0.0 <= v <= 100.0 for a in r1.accuracy for v in a.values())
    assert all(b > 0 for b in r1.bytes_up + r1.bytes_down)

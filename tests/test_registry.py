"""The registry lists every public aggregator once, with callable functions and honest flags."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import lorafair.aggregate as agg
from lorafair import registry
from lorafair.metrics import ideal_update


def test_every_public_aggregator_is_registered_once() -> None:
    helpers = {
        "solve_residual",
        "rolora_trained",
        "hetlora_truncate",
        "flexlora_report",
        "lora_fair_solved",
    }
    public = {n for n in agg.__all__ if n[0].islower() and n not in helpers}
    assert set(registry.names()) >= public
    assert len(registry.names()) == len(set(registry.names()))


def test_unknown_name_lists_the_choices() -> None:
    with pytest.raises(KeyError, match="fedit"):
        registry.get("fedavg")


@pytest.mark.parametrize("name", registry.names())
def test_exact_flag_holds(name: str) -> None:
    spec = registry.get(name)
    g = torch.Generator().manual_seed(0)
    A0 = torch.randn(2, 5, generator=g, dtype=torch.float64)
    clients = [
        {
            "fc": (
                A0 if spec.shared_A else torch.randn(2, 5, generator=g, dtype=torch.float64),
                torch.randn(4, 2, generator=g, dtype=torch.float64),
            )
        }
        for _ in range(3)
    ]
    if spec.update_factors is None:  # personalised: no single global update to compare
        pytest.skip(f"{name} returns one adapter per client")
    out = spec.update_factors(spec.fn(clients, [1.0, 2.0, 3.0], **spec.defaults))
    A, B = out["fc"]
    err = float((B @ A - ideal_update(clients, [1.0, 2.0, 3.0])["fc"]).norm())
    if spec.exact:
        assert err < 1e-12
    elif not spec.optimal:  # a biased method on generic clients is not exact
        assert err > 1e-6


def _clients(
    spec: registry.AggregatorSpec, seed: int = 1
) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    A0 = torch.randn(3, 7, generator=g, dtype=torch.float64)
    return [
        {
            name: (
                A0 if spec.shared_A else torch.randn(3, 7, generator=g, dtype=torch.float64),
                torch.randn(5, 3, generator=g, dtype=torch.float64),
            )
            for name in ("q", "v")
        }
        for _ in range(3)
    ]


@pytest.mark.parametrize("name", [s.name for s in registry.specs() if s.dp_clipping])
def test_dp_clipping_methods_return_the_clients_shapes(name: str) -> None:
    # Flower's fixed-clipping wrappers clip `reply − global` array by array and noise the one
    # aggregated ArrayRecord: the result must be an adapter of the clients' shapes.
    spec = registry.get(name)
    assert spec.output == "adapters"
    clients = _clients(spec)
    out = spec.fn(clients, [1.0, 2.0, 3.0], **spec.defaults)
    for layer, (A, B) in out.items():
        assert A.shape == clients[0][layer][0].shape
        assert B.shape == clients[0][layer][1].shape


def _hetlora_mixing(clients: list[Any], p: list[float], layer: str) -> list[float]:
    """HetLoRA's q_k = p_k n_k / Σ p_j n_j, n_k = ‖B_k A_k‖_F (dense, float64, written here)."""
    norms = [float((c[layer][1] @ c[layer][0]).norm()) for c in clients]
    total = sum(pk * nk for pk, nk in zip(p, norms, strict=True))
    return [pk * nk / total for pk, nk in zip(p, norms, strict=True)]


@pytest.mark.parametrize("name", [s.name for s in registry.specs() if s.secure_aggregation])
def test_secure_aggregation_methods_need_only_sums(name: str) -> None:
    # The result from K clients equals the result from one client holding the sums
    # (Σ q_k A_k, Σ q_k B_k): what a secure-aggregation protocol reveals. q = p, except
    # HetLoRA's norm weights, which each client computes from its own adapter.
    spec = registry.get(name)
    clients = _clients(spec)
    w = [1.0, 2.0, 3.0]
    p = [x / sum(w) for x in w]
    summed = {}
    for layer in clients[0]:
        q = _hetlora_mixing(clients, p, layer) if spec.fn is agg.hetlora else p
        summed[layer] = (
            sum(qk * c[layer][0] for qk, c in zip(q, clients, strict=True)),
            sum(qk * c[layer][1] for qk, c in zip(q, clients, strict=True)),
        )
    full = spec.fn(clients, w, **spec.defaults)
    alone = spec.fn([summed], None, **spec.defaults)
    if spec.personalised:  # FedSA-LoRA: the shared Ā is the download
        full, alone = full.shared_A, alone.shared_A
        for layer in full:
            torch.testing.assert_close(full[layer], alone[layer], rtol=1e-12, atol=1e-12)
        return
    for layer, (A, B) in full.items():
        torch.testing.assert_close(A, alone[layer][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(B, alone[layer][1], rtol=1e-12, atol=1e-12)

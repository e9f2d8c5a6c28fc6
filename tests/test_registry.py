"""The registry lists every public aggregator once, with callable functions and honest flags."""

from __future__ import annotations

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

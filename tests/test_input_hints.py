"""The first mistakes a new user makes get an error that says what to do, from every aggregator."""

from __future__ import annotations

import pytest
import torch

from lorafair import errors, registry
from lorafair.metrics import aggregation_bias, ideal_update
from lorafair.types import LoRAFactors

SPECS = [pytest.param(s, id=s.name) for s in registry.specs()]


def _clients(spec: registry.AggregatorSpec, d_out: int, d_in: int, r: int) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    shared = torch.randn(r, d_in, generator=g)
    return [
        {
            "q": LoRAFactors(
                shared if spec.shared_A else torch.randn(r, d_in, generator=g),
                torch.randn(d_out, r, generator=g),
            )
        }
        for _ in range(3)
    ]


@pytest.mark.parametrize("spec", SPECS)
def test_a_peft_state_dict_is_named_and_the_converter_suggested(spec) -> None:
    peft_sd = {
        "base_model.model.q.lora_A.weight": torch.randn(2, 6),
        "base_model.model.q.lora_B.weight": torch.randn(4, 2),
    }
    with pytest.raises(errors.AdapterFormatError, match=r"client 1 looks like a peft state dict"):
        spec.fn([_clients(spec, 4, 6, 2)[0], peft_sd], **spec.defaults)
    with pytest.raises(errors.AdapterFormatError, match="from_peft_state_dict"):
        spec.fn([peft_sd, peft_sd], **spec.defaults)


@pytest.mark.parametrize("spec", SPECS)
def test_swapped_factors_on_a_square_layer_are_caught(spec) -> None:
    # Every client sends A as (768, 16) and B as (16, 768): a "rank-768" update to a 16 × 16 layer.
    good = _clients(spec, 16, 16, 4)
    swapped = [
        {"q": LoRAFactors(c["q"].B.T.repeat(192, 1), c["q"].A.T.repeat(1, 192))} for c in good
    ]
    assert swapped[0]["q"].A.shape == (768, 16)
    with pytest.raises(errors.LoRAShapeError, match=r"layer 'q': client 0 .*look swapped") as info:
        spec.fn(swapped, **spec.defaults)
    assert "allow_excess_rank=True" in str(info.value)


@pytest.mark.parametrize("spec", SPECS)
def test_an_excess_rank_on_purpose_is_accepted_with_the_keyword(spec) -> None:
    clients = _clients(spec, 2, 3, 4)  # rank 4 on a 2 × 3 layer
    with pytest.raises(errors.LoRAShapeError, match="rank 4 exceeds both d_in = 3 and d_out = 2"):
        spec.fn(clients, **spec.defaults)
    result = spec.fn(clients, **spec.defaults, allow_excess_rank=True)
    # FedEx-LoRA's adapters + residual / FedSA-LoRA's per-client adapters, viewed as factors
    out = result.adapters[0] if spec.update_factors is None else spec.update_factors(result)
    assert set(out) == {"q"}
    assert all(torch.isfinite(t).all() for t in out["q"])


def test_a_rank_above_one_side_only_is_not_an_error() -> None:
    clients = [{"q": LoRAFactors(torch.randn(8, 4), torch.randn(16, 8))} for _ in range(2)]
    assert ideal_update(clients)["q"].shape == (16, 4)


def test_metrics_take_the_same_keyword() -> None:
    clients = [{"q": LoRAFactors(torch.randn(4, 3), torch.randn(2, 4))} for _ in range(2)]
    with pytest.raises(errors.LoRAShapeError, match="look swapped"):
        ideal_update(clients)
    dw = ideal_update(clients, allow_excess_rank=True)["q"]
    report = aggregation_bias(clients, clients[0], allow_excess_rank=True)["q"]
    assert dw.shape == (2, 3)
    assert -1.0 <= report.cosine <= 1.0


@pytest.mark.parametrize("spec", SPECS)
def test_layer_keys_that_differ_name_both_sides(spec) -> None:
    clients = _clients(spec, 4, 6, 2)
    clients = [c | {"k": c["q"]} for c in clients]
    odd = dict(clients[2])
    del odd["k"]
    odd["blocks.0.v"] = odd["q"]
    odd["blocks.0.o"] = odd["q"]
    with pytest.raises(errors.LayerKeyError) as info:
        spec.fn([clients[0], clients[1], odd], **spec.defaults)
    msg = str(info.value)
    assert "client 2 is missing layer 'k' (client 0 has it)" in msg
    assert "client 2 has layers 'blocks.0.v', 'blocks.0.o' that client 0 does not have" in msg

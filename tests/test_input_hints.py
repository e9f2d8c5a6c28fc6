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


def _leaves(x: object) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _leaves(v)]
    if hasattr(x, "_asdict"):
        return [t for v in x._asdict().values() for t in _leaves(v)]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _leaves(v)]
    return []


@pytest.mark.parametrize("spec", SPECS)
def test_parameters_that_require_grad_give_results_without_a_graph(spec) -> None:
    """A model's parameters passed as they are: the result is the plain one, with no graph."""
    plain = _clients(spec, 10, 12, 4)
    params = [
        {n: LoRAFactors(*(torch.nn.Parameter(t.clone()) for t in f)) for n, f in c.items()}
        for c in plain
    ]
    got, want = _leaves(spec.fn(params, **spec.defaults)), _leaves(spec.fn(plain, **spec.defaults))
    assert got
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert not g.requires_grad
        assert g.grad_fn is None
        assert torch.equal(g, w)


@pytest.mark.parametrize("spec", SPECS)
def test_transposed_inputs_give_the_same_bits_contiguous(spec) -> None:
    """Factors laid out transposed (``x.mT.contiguous().mT``): the same bits as contiguous
    input, and every result contiguous (``safetensors`` saves only contiguous tensors)."""
    plain = _clients(spec, 10, 12, 4)
    strided = [
        {n: LoRAFactors(*(t.mT.contiguous().mT for t in f)) for n, f in c.items()} for c in plain
    ]
    assert not strided[0]["q"].A.is_contiguous()
    got, want = _leaves(spec.fn(strided, **spec.defaults)), _leaves(spec.fn(plain, **spec.defaults))
    assert got
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.is_contiguous()
        assert torch.equal(g, w)


@pytest.mark.parametrize("spec", SPECS)
def test_meta_tensors_are_named_not_a_raw_error(spec) -> None:
    meta = [
        {n: LoRAFactors(*(t.to("meta") for t in f)) for n, f in c.items()}
        for c in _clients(spec, 10, 12, 4)
    ]
    with pytest.raises(errors.DeviceMismatchError, match=r"layer 'q': client 0 has A on the meta"):
        spec.fn(meta, **spec.defaults)


def test_weights_whose_sum_overflows_are_their_ratios() -> None:
    spec = registry.get("fedit")
    clients = _clients(spec, 10, 12, 4)
    for got, want in zip(
        _leaves(spec.fn(clients, [1e308, 1e308, 5e307])),
        _leaves(spec.fn(clients, [2.0, 2.0, 1.0])),
        strict=True,
    ):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("weights", [["1", "2", "3"], [True, True, False], [1.0, None, 1.0]])
def test_weights_that_are_not_numbers_are_refused(weights: list[object]) -> None:
    spec = registry.get("fedit")
    with pytest.raises(errors.InvalidWeightsError, match="sequence of numbers"):
        spec.fn(_clients(spec, 10, 12, 4), weights)

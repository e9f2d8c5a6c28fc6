"""The bad-input checks, with lorafair's exact error classes and messages, for the methods whose
result is not a plain ``dict[str, LoRAFactors]`` — FedEx-LoRA, FedSA-LoRA — and the other
methods of issue 16 (RoLoRA, HetLoRA, FedSVD, FlexLoRA with an energy threshold), driven by the
registry; the rest of the conformance suite runs through ``check_aggregator``."""

from __future__ import annotations

import pytest
import torch

from lorafair import LoRAFactors, errors, registry
from tests.test_conformance import make_clients, with_layer

NAMES = ["fedex_lora", "fedsa_lora", "rolora", "hetlora", "fedsvd", "flexlora_energy"]


def updates(spec, out) -> list[dict[str, LoRAFactors]]:
    """The adapter(s) whose B @ A clients apply: one global, or one per client (personalised)."""
    if spec.update_factors is None:
        return list(out.adapters)
    return [spec.update_factors(out)]


@pytest.fixture(params=NAMES)
def spec(request):
    return registry.get(request.param)


def run(spec, clients, weights=None):
    return spec.fn(clients, weights, **spec.defaults)


def test_registry_describes_the_output_kinds():
    assert registry.get("fedex_lora").output == "adapters+residual"
    assert registry.get("fedsa_lora").personalised
    assert registry.get("fedsa_lora").update_factors is None
    for name in ("rolora", "hetlora", "fedsvd", "flexlora_energy"):
        assert registry.get(name).output == "adapters"


# dtypes, devices, purity, determinism, tuples, ΔW = 0, one client and zero weights run through
# check_aggregator for every registered method (tests/test_check_aggregator.py), which reads
# these results through the registry's update_factors / personalised, as updates() does here.


def test_energy_rank_keeps_its_share_of_one_clients_update():
    spec = registry.get("flexlora_energy")
    clients = make_clients(k=1)
    for adapter in updates(spec, run(spec, clients)):
        for name, (A, B) in adapter.items():
            A0, B0 = clients[0][name]
            lost = float((B0 @ A0 - B @ A).double().norm() ** 2)
            assert lost <= (1 - 0.99) * float((B0 @ A0).double().norm() ** 2) * (1 + 1e-4)


# ---- bad input: every case raises the documented error and names what is wrong ----


def test_empty_client_list(spec):
    with pytest.raises(errors.EmptyClientsError):
        run(spec, [])


def test_client_without_layers(spec):
    with pytest.raises(errors.EmptyClientsError):
        run(spec, [{}])


def test_single_mapping_instead_of_a_list(spec):
    with pytest.raises(errors.EmptyClientsError, match="sequence"):
        run(spec, make_clients()[0])


def test_missing_layer_is_named(spec):
    clients = make_clients()
    del clients[2]["blocks.0.mlp.fc1"]
    with pytest.raises(errors.LayerKeyError, match=r"client 2 is missing layer 'blocks.0.mlp.fc1'"):
        run(spec, clients)


def test_extra_layer_is_named(spec):
    clients = make_clients()
    clients[1]["head"] = clients[1]["blocks.0.mlp.fc1"]
    with pytest.raises(errors.LayerKeyError, match=r"client 1 has layer 'head'"):
        run(spec, clients)


def test_rank_mismatch_inside_a_client(spec):
    clients = with_layer(make_clients(), 1, "blocks.0.attn.qkv", B=torch.randn(12, 2))
    with pytest.raises(errors.LoRAShapeError, match=r"layer 'blocks.0.attn.qkv': client 1"):
        run(spec, clients)


def test_rank_mismatch_across_clients(spec):
    clients = with_layer(
        make_clients(), 1, "blocks.0.attn.qkv", A=torch.randn(2, 4), B=torch.randn(12, 2)
    )
    if spec.equal_ranks:
        with pytest.raises(errors.LoRAShapeError, match=r"client 1 .*equal ranks"):
            run(spec, clients)
    else:
        for adapter in updates(spec, run(spec, clients)):
            assert adapter["blocks.0.attn.qkv"].A.shape[1] == 4


def test_d_in_mismatch_across_clients(spec):
    clients = with_layer(make_clients(), 2, "blocks.0.attn.qkv", A=torch.randn(3, 5))
    with pytest.raises(errors.LoRAShapeError, match=r"client 2 has A of shape \(3, 5\)"):
        run(spec, clients)


def test_d_out_mismatch_across_clients(spec):
    clients = with_layer(make_clients(), 1, "blocks.0.mlp.fc1", B=torch.randn(7, 3))
    with pytest.raises(errors.LoRAShapeError, match=r"client 1 has B of shape \(7, 3\)"):
        run(spec, clients)


@pytest.mark.parametrize("shape", [(12,), (1, 3, 4)])
def test_wrong_number_of_dimensions(spec, shape):
    clients = with_layer(make_clients(), 1, "blocks.0.attn.qkv", A=torch.randn(*shape))
    with pytest.raises(errors.LoRAShapeError, match="must be 2-D"):
        run(spec, clients)


def test_not_a_pair(spec):
    clients = make_clients()
    clients[0]["blocks.0.attn.qkv"] = torch.randn(3, 4)
    with pytest.raises(errors.LoRAShapeError, match=r"client 0 must give a pair"):
        run(spec, clients)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("which", ["A", "B"])
def test_non_finite_factor_is_named(spec, value, which):
    clients = make_clients()
    A, B = clients[2]["blocks.0.mlp.fc1"]
    A, B = A.clone(), B.clone()
    (A if which == "A" else B)[0, 1] = value
    clients = with_layer(clients, 2, "blocks.0.mlp.fc1", A=A, B=B)
    with pytest.raises(errors.NonFiniteError, match=rf"'blocks.0.mlp.fc1': client 2 .* in {which}"):
        run(spec, clients)


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ([1.0, -1.0, 1.0], "client 1 is -1.0"),
        ([1.0, float("nan"), 1.0], "client 1 is nan"),
        ([1.0, 1.0, float("inf")], "client 2 is inf"),
        ([0.0, 0.0, 0.0], "all weights are zero"),
        ([1.0, 1.0], "got 2 weights for 3 clients"),
        (["a", 1.0, 1.0], "sequence of numbers"),
    ],
)
def test_bad_weights(spec, weights, match):
    with pytest.raises(errors.InvalidWeightsError, match=match):
        run(spec, make_clients(), weights)


def test_dtype_mismatch_across_clients(spec):
    clients = make_clients()
    A, B = clients[1]["blocks.0.attn.qkv"]
    clients = with_layer(clients, 1, "blocks.0.attn.qkv", A=A.double(), B=B.double())
    with pytest.raises(errors.DtypeMismatchError, match=r"client 1 has A of dtype torch\.float64"):
        run(spec, clients)


def test_integer_dtype(spec):
    clients = make_clients()
    A, B = clients[0]["blocks.0.attn.qkv"]
    clients = with_layer(clients, 0, "blocks.0.attn.qkv", A=A.long(), B=B.long())
    with pytest.raises(errors.DtypeMismatchError, match="expected float16"):
        run(spec, clients)


def test_device_mismatch(spec):
    clients = make_clients()
    A, B = clients[1]["blocks.0.attn.qkv"]
    clients = with_layer(clients, 1, "blocks.0.attn.qkv", A=A.to("meta"), B=B.to("meta"))
    with pytest.raises(errors.DeviceMismatchError, match="client 1 has A on meta"):
        run(spec, clients)


def test_frozen_factor_must_be_shared(spec):
    clients = with_layer(make_clients(), 2, "blocks.0.mlp.fc1", A=torch.randn(3, 10))
    if spec.shared_A:
        with pytest.raises(errors.FrozenAMismatchError, match=r"'blocks.0.mlp.fc1': client 2"):
            run(spec, clients)
    else:
        run(spec, clients)

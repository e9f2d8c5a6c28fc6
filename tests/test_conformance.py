"""The bad-input half of the conformance suite, with lorafair's exact error classes and messages,
over every aggregator; the rest runs through ``check_aggregator``
(tests/test_check_aggregator.py)."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable

import pytest
import torch

from lorafair import LoRAFactors, errors, registry
from lorafair.aggregate import lora_fair

Aggregator = Callable[..., dict[str, LoRAFactors]]

# Every registered aggregator that returns plain adapters, with its registry defaults: a new
# method is covered by its entry. (FedEx-LoRA's and FedSA-LoRA's results are other types; they
# have their own suite in test_conformance_methods.py.)
AGGREGATORS: dict[str, Aggregator] = {
    **{
        s.name: functools.partial(s.fn, **s.defaults)
        for s in registry.specs()
        if s.output == "adapters"
    },
    # LoRA-FAIR in each of its forms: flat/columns cosine, both norms, both residual sides.
    **{
        f"lora_fair[{sim},{norm},{side}]": functools.partial(
            lora_fair, lam=0.1, similarity=sim, norm=norm, residual_on=side
        )
        for sim, norm, side in itertools.product(
            ("flat", "columns"), ("fro", "fro_squared"), ("B", "A")
        )
    },
}


def make_clients(*, k=3, dtype=torch.float32, device="cpu", seed=0, zero_B=False):
    """Clients with a shared A (so that FFA-LoRA accepts them too) and distinct Bs."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"blocks.0.attn.qkv": (12, 4), "blocks.0.mlp.fc1": (6, 10)}
    shared = {n: torch.randn(3, d_in, generator=g) for n, (_, d_in) in shapes.items()}
    out = []
    for _ in range(k):
        client = {}
        for n, (d_out, _) in shapes.items():
            B = torch.zeros(d_out, 3) if zero_B else torch.randn(d_out, 3, generator=g)
            client[n] = LoRAFactors(
                shared[n].to(dtype=dtype, device=device), B.to(dtype=dtype, device=device)
            )
        out.append(client)
    return out


def with_layer(clients, k, name, A=None, B=None):
    out = [dict(c) for c in clients]
    A0, B0 = out[k][name]
    out[k][name] = (A0 if A is None else A, B0 if B is None else B)
    return out


@pytest.fixture(params=list(AGGREGATORS), ids=list(AGGREGATORS))
def aggregate(request) -> Aggregator:
    return AGGREGATORS[request.param]


def test_result_is_a_dict_of_lora_factors_in_the_clients_layer_order(aggregate):
    # dtypes, devices, purity, determinism, tuples, ΔW = 0, one client and zero weights:
    # check_aggregator (tests/test_check_aggregator.py) runs them on every registered method and
    # every LoRA-FAIR form above. What stays here is lorafair's own contract beyond them: the
    # result type and layer order, and (below) the exact error classes and messages.
    clients = make_clients()
    out = aggregate(clients, [1.0, 2.0, 3.0])
    assert type(out) is dict
    assert list(out) == list(clients[0])
    assert all(isinstance(factors, LoRAFactors) for factors in out.values())


# ---- bad input: every case raises the documented error and names what is wrong ----


def test_empty_client_list(aggregate):
    with pytest.raises(errors.EmptyClientsError):
        aggregate([])


def test_client_without_layers(aggregate):
    with pytest.raises(errors.EmptyClientsError):
        aggregate([{}])


def test_single_mapping_instead_of_a_list(aggregate):
    with pytest.raises(errors.EmptyClientsError, match="sequence"):
        aggregate(make_clients()[0])


def test_missing_layer_is_named(aggregate):
    clients = make_clients()
    del clients[2]["blocks.0.mlp.fc1"]
    with pytest.raises(errors.LayerKeyError, match=r"client 2 is missing layer 'blocks.0.mlp.fc1'"):
        aggregate(clients)


def test_extra_layer_is_named(aggregate):
    clients = make_clients()
    clients[1]["head"] = clients[1]["blocks.0.mlp.fc1"]
    with pytest.raises(errors.LayerKeyError, match=r"client 1 has layer 'head'"):
        aggregate(clients)


def test_rank_mismatch_inside_a_client(aggregate):
    clients = with_layer(make_clients(), 1, "blocks.0.attn.qkv", B=torch.randn(12, 2))
    with pytest.raises(errors.LoRAShapeError, match=r"layer 'blocks.0.attn.qkv': client 1"):
        aggregate(clients)


def test_d_in_mismatch_across_clients(aggregate):
    clients = with_layer(make_clients(), 2, "blocks.0.attn.qkv", A=torch.randn(3, 5))
    with pytest.raises(errors.LoRAShapeError, match=r"client 2 has A of shape \(3, 5\)"):
        aggregate(clients)


def test_d_out_mismatch_across_clients(aggregate):
    clients = with_layer(make_clients(), 1, "blocks.0.mlp.fc1", B=torch.randn(7, 3))
    with pytest.raises(errors.LoRAShapeError, match=r"client 1 has B of shape \(7, 3\)"):
        aggregate(clients)


@pytest.mark.parametrize("shape", [(12,), (1, 3, 4)])
def test_wrong_number_of_dimensions(aggregate, shape):
    A = torch.randn(*shape)
    clients = with_layer(make_clients(), 1, "blocks.0.attn.qkv", A=A)
    with pytest.raises(errors.LoRAShapeError, match="must be 2-D"):
        aggregate(clients)


def test_not_a_pair(aggregate):
    clients = make_clients()
    clients[0]["blocks.0.attn.qkv"] = torch.randn(3, 4)
    with pytest.raises(errors.LoRAShapeError, match=r"client 0 must give a pair"):
        aggregate(clients)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("which", ["A", "B"])
def test_non_finite_factor_is_named(aggregate, value, which):
    clients = make_clients()
    A, B = clients[2]["blocks.0.mlp.fc1"]
    A, B = A.clone(), B.clone()
    (A if which == "A" else B)[0, 1] = value
    clients = with_layer(clients, 2, "blocks.0.mlp.fc1", A=A, B=B)
    with pytest.raises(errors.NonFiniteError, match=rf"'blocks.0.mlp.fc1': client 2 .* in {which}"):
        aggregate(clients)


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
def test_bad_weights(aggregate, weights, match):
    with pytest.raises(errors.InvalidWeightsError, match=match):
        aggregate(make_clients(), weights)


def test_dtype_mismatch_across_clients(aggregate):
    clients = make_clients()
    A, B = clients[1]["blocks.0.attn.qkv"]
    clients = with_layer(clients, 1, "blocks.0.attn.qkv", A=A.double(), B=B.double())
    with pytest.raises(errors.DtypeMismatchError, match=r"client 1 has A of dtype torch\.float64"):
        aggregate(clients)


def test_integer_dtype(aggregate):
    clients = make_clients()
    A, B = clients[0]["blocks.0.attn.qkv"]
    clients = with_layer(clients, 0, "blocks.0.attn.qkv", A=A.long(), B=B.long())
    with pytest.raises(errors.DtypeMismatchError, match="expected float16"):
        aggregate(clients)


def test_device_mismatch(aggregate):
    clients = make_clients()
    A, B = clients[1]["blocks.0.attn.qkv"]
    clients = with_layer(clients, 1, "blocks.0.attn.qkv", A=A.to("meta"), B=B.to("meta"))
    with pytest.raises(errors.DeviceMismatchError, match="client 1 has A on meta"):
        aggregate(clients)


def test_errors_are_value_errors():
    for cls in (
        errors.EmptyClientsError,
        errors.LayerKeyError,
        errors.LoRAShapeError,
        errors.NonFiniteError,
        errors.InvalidWeightsError,
        errors.DeviceMismatchError,
        errors.DtypeMismatchError,
        errors.FrozenAMismatchError,
    ):
        assert issubclass(cls, errors.LoRAFairError)
        assert issubclass(cls, ValueError)

"""One conformance suite over every aggregator (optax-style): dtypes, devices, purity, errors."""

from __future__ import annotations

import copy
import functools
import itertools
from collections.abc import Callable

import pytest
import torch

from lorafair import LoRAFactors, errors
from lorafair.aggregate import fedit, ffa_lora, flexlora, flora, lora_fair

Aggregator = Callable[..., dict[str, LoRAFactors]]

AGGREGATORS: dict[str, Aggregator] = {
    "fedit": fedit,
    "ffa_lora": ffa_lora,
    "flora": flora,
    "flexlora": flexlora,
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
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtype_device_and_names_preserved(aggregate, dtype, device):
    clients = make_clients(dtype=dtype, device=device)
    out = aggregate(clients, [1.0, 2.0, 3.0])
    assert list(out) == list(clients[0])
    for name, factors in out.items():
        assert isinstance(factors, LoRAFactors)
        A, B = factors
        assert A.dtype == B.dtype == dtype
        assert A.device.type == B.device.type == torch.device(device).type
        assert A.shape[1] == clients[0][name].A.shape[1]
        assert B.shape[0] == clients[0][name].B.shape[0]
        assert torch.isfinite(A).all()
        assert torch.isfinite(B).all()


def test_inputs_are_not_mutated_and_outputs_do_not_alias_them(aggregate):
    clients = make_clients()
    snapshot = copy.deepcopy(clients)
    out = aggregate(clients, [1.0, 0.0, 2.0])
    for before, after in zip(snapshot, clients, strict=True):
        for name in before:
            assert torch.equal(before[name].A, after[name].A)
            assert torch.equal(before[name].B, after[name].B)
    inputs = {t.data_ptr() for c in clients for f in c.values() for t in f}
    for A, B in out.values():
        assert A.data_ptr() not in inputs
        assert B.data_ptr() not in inputs


def test_deterministic(aggregate):
    clients = make_clients(seed=3)
    first = aggregate(clients, [3.0, 1.0, 1.0])
    second = aggregate(clients, [3.0, 1.0, 1.0])
    for name in first:
        assert torch.equal(first[name].A, second[name].A)
        assert torch.equal(first[name].B, second[name].B)


def test_plain_tuples_and_mappings_are_accepted(aggregate):
    clients = [{n: (f.A, f.B) for n, f in c.items()} for c in make_clients()]
    out = aggregate(tuple(clients))
    assert set(out) == set(clients[0])


def test_zero_delta_w_gives_finite_output(aggregate):
    out = aggregate(make_clients(zero_B=True))
    for A, B in out.values():
        assert torch.isfinite(A).all()
        assert torch.isfinite(B).all()
        assert torch.count_nonzero(B @ A) == 0


def test_single_client(aggregate):
    clients = make_clients(k=1)
    out = aggregate(clients)
    for name, (A, B) in out.items():
        A0, B0 = clients[0][name]
        torch.testing.assert_close(B @ A, B0 @ A0, rtol=1e-5, atol=1e-5)


def test_zero_weight_client_is_ignored(aggregate):
    clients = make_clients(k=3, seed=5)
    with_zero = aggregate(clients, [1.0, 0.0, 1.0])
    without = aggregate([clients[0], clients[2]], [1.0, 1.0])
    for name in with_zero:
        A1, B1 = with_zero[name]
        A2, B2 = without[name]
        torch.testing.assert_close(B1 @ A1, B2 @ A2, rtol=1e-5, atol=1e-5)


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

"""The conformance checks (dtypes, devices, purity, every bad input) for the methods whose result
is not a plain ``dict[str, LoRAFactors]`` — FedEx-LoRA, FedSA-LoRA — and the other methods of
issue 16 (RoLoRA, HetLoRA, FedSVD, FlexLoRA with an energy threshold), driven by the registry."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping

import pytest
import torch
from torch import Tensor

from lorafair import LoRAFactors, errors, registry
from tests.test_conformance import make_clients, with_layer

NAMES = ["fedex_lora", "fedsa_lora", "rolora", "hetlora", "fedsvd", "flexlora_energy"]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tensors(x: object) -> Iterator[Tensor]:
    """Every tensor in a result (NamedTuples, dicts, tuples; report numbers skipped)."""
    if isinstance(x, Tensor):
        yield x
    elif isinstance(x, Mapping):
        for v in x.values():
            yield from tensors(v)
    elif isinstance(x, tuple | list):
        for v in x:
            yield from tensors(v)


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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtype_device_and_names_preserved(spec, dtype, device):
    clients = make_clients(dtype=dtype, device=device)
    out = run(spec, clients, [1.0, 2.0, 3.0])
    for t in tensors(out):
        assert t.dtype == dtype
        assert t.device.type == torch.device(device).type
        assert torch.isfinite(t).all()
    for adapter in updates(spec, out):
        assert list(adapter) == list(clients[0])
        for name, (A, B) in adapter.items():
            assert A.shape[1] == clients[0][name].A.shape[1]
            assert B.shape[0] == clients[0][name].B.shape[0]
            assert A.shape[0] == B.shape[1]


def test_inputs_are_not_mutated_and_outputs_do_not_alias_them(spec):
    clients = make_clients()
    snapshot = copy.deepcopy(clients)
    out = run(spec, clients, [1.0, 0.0, 2.0])
    for before, after in zip(snapshot, clients, strict=True):
        for name in before:
            assert torch.equal(before[name].A, after[name].A)
            assert torch.equal(before[name].B, after[name].B)
    inputs = {t.data_ptr() for c in clients for f in c.values() for t in f}
    assert not inputs & {t.data_ptr() for t in tensors(out)}


def test_deterministic(spec):
    clients = make_clients(seed=3)
    first = list(tensors(run(spec, clients, [3.0, 1.0, 1.0])))
    second = list(tensors(run(spec, clients, [3.0, 1.0, 1.0])))
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_plain_tuples_are_accepted(spec):
    clients = [{n: (f.A, f.B) for n, f in c.items()} for c in make_clients()]
    for adapter in updates(spec, run(spec, tuple(clients))):
        assert set(adapter) == set(clients[0])


def test_zero_delta_w_gives_a_finite_zero_update(spec):
    out = run(spec, make_clients(zero_B=True))
    for t in tensors(out):
        assert torch.isfinite(t).all()
    for adapter in updates(spec, out):
        for A, B in adapter.values():
            assert torch.count_nonzero(B @ A) == 0


def test_single_client_gets_its_own_update(spec):
    clients = make_clients(k=1)
    for adapter in updates(spec, run(spec, clients)):
        for name, (A, B) in adapter.items():
            A0, B0 = clients[0][name]
            if spec.name == "flexlora_energy":  # lossy by design: keeps >= 99% of the energy
                lost = float((B0 @ A0 - B @ A).double().norm() ** 2)
                assert lost <= (1 - 0.99) * float((B0 @ A0).double().norm() ** 2) * (1 + 1e-4)
                continue
            torch.testing.assert_close(B @ A, B0 @ A0, rtol=1e-5, atol=1e-5)


def test_zero_weight_client_is_ignored(spec):
    clients = make_clients(k=3, seed=5)
    with_zero = updates(spec, run(spec, clients, [1.0, 0.0, 1.0]))
    without = updates(spec, run(spec, [clients[0], clients[2]], [1.0, 1.0]))
    if spec.personalised:  # the zero-weight client still gets an adapter; drop it
        with_zero = [with_zero[0], with_zero[2]]
    for got, expected in zip(with_zero, without, strict=True):
        for name in got:
            A1, B1 = got[name]
            A2, B2 = expected[name]
            torch.testing.assert_close(B1 @ A1, B2 @ A2, rtol=1e-5, atol=1e-5)


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

"""bfloat16 adapters through Flower's ArrayRecord: to_array_record and from_array_record.

Flower 1.42's ``ArrayRecord(state_dict)`` converts through NumPy, which has no bfloat16; the
helpers carry bfloat16 as its raw bytes and everything else as Flower does. Checked here: bit
exactness (including -0, subnormals, inf and NaN payloads), the size on the wire, Flower's
own deflate/inflate (what the SuperLink stores and forwards), and records without bfloat16.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r".*click.*deprecated", category=DeprecationWarning)
    pytest.importorskip("flwr")
    from flwr.app import ArrayRecord
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    from lorafair.flower import BF16_STYPE, from_array_record, to_array_record


def bits(t: Tensor) -> Tensor:
    """The raw 16/32/64-bit patterns, so NaN payloads and -0.0 compare exactly."""
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(width)


def state_dict() -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    special = torch.tensor(
        [0.0, -0.0, 1e-40, -1e-39, float("inf"), -float("inf"), 3.0e38, 1.0 + 2**-7],
        dtype=torch.float32,
    ).to(torch.bfloat16)
    nan = torch.tensor([0x7FC1, -0x0001], dtype=torch.int16).view(torch.bfloat16)  # 2 NaNs
    return {
        "m.q_proj.lora_A.weight": torch.randn(4, 24, generator=g).to(torch.bfloat16),
        "m.q_proj.lora_B.weight": torch.randn(24, 4, generator=g).to(torch.bfloat16).T.T,
        "m.v_proj.lora_B.weight": torch.randn(4, 24, generator=g).to(torch.bfloat16).T,
        "special": torch.cat([special, nan]),
        "scalar": torch.tensor(2.5, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 3, dtype=torch.bfloat16),
        "fp32": torch.randn(3, 2, generator=g),
        "fp16": torch.randn(5, generator=g).half(),
        "steps": torch.tensor([7, -1], dtype=torch.int64),
    }


def assert_same(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    assert list(got) == list(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype, key
        assert got[key].shape == tensor.shape, key
        assert torch.equal(bits(got[key]), bits(tensor)), key


def test_flower_own_arrayrecord_cannot_carry_bfloat16() -> None:
    # Why the helpers exist; if Flower learns bfloat16, this fails and they can go.
    with pytest.raises(TypeError, match="BFloat16"):
        ArrayRecord({"w": torch.ones(2, dtype=torch.bfloat16)})


def test_round_trip_is_bit_exact_and_two_bytes_per_entry() -> None:
    sd = state_dict()
    record = to_array_record(sd)
    assert_same(from_array_record(record), sd)
    for key, tensor in sd.items():
        array = record[key]
        if tensor.dtype == torch.bfloat16:
            assert array.stype == BF16_STYPE
            assert array.dtype == "bfloat16"
            assert len(array.data) == 2 * tensor.numel()  # not upcast on the wire
        else:
            assert array.stype == "numpy.ndarray"  # Flower's own encoding, readable anywhere


def test_round_trip_through_flower_serialisation() -> None:
    """Deflate every object as a Message's content is deflated, inflate them back."""
    sd = state_dict()
    record = to_array_record(sd)
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(record).items()}
    inflated = inflate_object_from_contents(record.object_id, contents)
    assert isinstance(inflated, ArrayRecord)
    assert_same(from_array_record(inflated), sd)


def test_without_bfloat16_it_is_flower_own_format() -> None:
    sd = {k: v for k, v in state_dict().items() if v.dtype != torch.bfloat16}
    ours, theirs = to_array_record(sd), ArrayRecord(sd)
    assert list(ours) == list(theirs)
    for key in sd:
        assert ours[key].data == theirs[key].data
        assert ours[key].dtype == theirs[key].dtype
    assert_same(from_array_record(theirs), theirs.to_torch_state_dict())
    assert_same(from_array_record(ours), sd)


def test_decoded_tensors_are_writable_and_independent() -> None:
    sd = {"w": torch.ones(3, dtype=torch.bfloat16)}
    record = to_array_record(sd)
    out = from_array_record(record)["w"]
    out.add_(1)  # no read-only buffer underneath, and the record is not changed
    assert_same(from_array_record(record), sd)
    sd["w"].add_(1)  # nor does the record alias the input
    assert torch.equal(from_array_record(record)["w"], torch.ones(3, dtype=torch.bfloat16))

"""from_array_record's in-place read of Flower's NumPy encoding equals np.load's, entry by entry."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

with warnings.catch_warnings():
    # flwr 1.42 imports typer, which touches an API that click 8.5 deprecates.
    warnings.filterwarnings("ignore", message=r".*click.*deprecated", category=DeprecationWarning)
    pytest.importorskip("flwr")
    from flwr.app import Array, ArrayRecord

    from lorafair.flower import from_array_record

_RNG = np.random.default_rng(0)

CASES = {
    "float32 matrix": _RNG.standard_normal((16, 40)).astype(np.float32),
    "float64 vector": _RNG.standard_normal(7),
    "float16 Fortran order": np.asfortranarray(_RNG.standard_normal((5, 3)).astype(np.float16)),
    "int64": np.arange(-3, 9, dtype=np.int64).reshape(3, 4),
    "bool": np.array([True, False, True]),
    "scalar": np.array(2.5),
    "empty": np.zeros((0, 4), dtype=np.float32),
    "uint8 3-d": _RNG.integers(0, 255, (2, 3, 4), dtype=np.uint8),
}


@pytest.mark.parametrize("name", list(CASES))
def test_decoded_like_np_load(name: str) -> None:
    x = CASES[name]
    record = ArrayRecord({"x": Array.from_numpy_ndarray(x)})
    got = from_array_record(record)["x"]
    expected = torch.from_numpy(record["x"].numpy())  # Flower's own np.load
    assert got.dtype == expected.dtype
    assert got.shape == expected.shape
    assert torch.equal(got, expected)
    assert np.array_equal(got.numpy(), x)


def test_decoded_tensor_owns_its_memory() -> None:
    """Writing to the result must not touch the message's bytes (they are immutable)."""
    x = np.ones((4, 4), dtype=np.float32)
    record = ArrayRecord({"x": Array.from_numpy_ndarray(x)})
    got = from_array_record(record)["x"]
    got.add_(1.0)
    assert torch.equal(from_array_record(record)["x"], torch.ones(4, 4))


def test_a_header_that_is_not_np_save_s_own_falls_back_to_np_load() -> None:
    """A valid .npy header that np.save would not write (an extra space in the shape) is left to
    np.load, and read correctly."""
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (2,  3), }"
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    data = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + x.tobytes()
    arr = Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=data)
    assert np.array_equal(arr.numpy(), x)  # a valid .npy
    assert torch.equal(from_array_record(ArrayRecord({"x": arr}))["x"], torch.from_numpy(x))

"""A bad reply is rejected, logged and counted; the round aggregates the rest as if it had not
been sent (bit for bit), and keeps the global adapter when too few valid replies remain."""

from __future__ import annotations

import logging
import warnings
from typing import Any
from unittest.mock import Mock

import pytest
import torch
from torch import Tensor

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r".*click.*deprecated", category=DeprecationWarning)
    pytest.importorskip("flwr")
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp.exception import InconsistentMessageReplies

    from lorafair.flower import LoRAStrategy, from_array_record

from lorafair.errors import LoRAFairError, NonFiniteError

P = "base_model.model."
LAYERS = ("enc.q", "enc.v")
D_OUT, D_IN, RANK = 6, 5, 3


def client_sd(
    seed: int, *, d_in: int = D_IN, layers: tuple[str, ...] = LAYERS
) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, Tensor] = {}
    for layer in layers:
        sd[f"{P}{layer}.lora_A.weight"] = torch.randn(RANK, d_in, generator=g)
        sd[f"{P}{layer}.lora_B.weight"] = torch.randn(D_OUT, RANK, generator=g)
    sd[f"{P}head.weight"] = torch.randn(3, D_OUT, generator=g)
    return sd


def reply(node: int, arrays: ArrayRecord, weight: Any = 10.0, **extra: Any) -> Message:
    message = Mock(spec=Message)
    records: dict[str, Any] = {"arrays": arrays, "metrics": MetricRecord({"num-examples": weight})}
    records.update(extra)
    message.content = RecordDict(records)
    message.has_error.side_effect = lambda: False
    message.has_content.side_effect = lambda: True
    message.metadata.src_node_id = node
    return message


def good(n: int = 3) -> list[Message]:
    return [reply(100 + k, ArrayRecord(client_sd(k)), 10.0 * (k + 1)) for k in range(n)]


def nan_sd() -> dict[str, Tensor]:
    sd = client_sd(9)
    sd[f"{P}enc.v.lora_B.weight"][1, 2] = float("nan")
    return sd


def inf_sd() -> dict[str, Tensor]:
    sd = client_sd(9)
    sd[f"{P}head.weight"][0, 0] = float("inf")
    return sd


def unreadable() -> ArrayRecord:
    record = ArrayRecord(client_sd(9))
    key = f"{P}enc.q.lora_A.weight"
    array = record[key]
    record[key] = Array(array.dtype, array.shape, array.stype, b"\x00\x01\x02")
    return record


BAD = {
    "nan": lambda: reply(7, ArrayRecord(nan_sd())),
    "inf": lambda: reply(7, ArrayRecord(inf_sd())),
    "mis-shaped": lambda: reply(7, ArrayRecord(client_sd(9, d_in=D_IN + 1))),
    "another-model": lambda: reply(7, ArrayRecord(client_sd(9, layers=("dec.q", "dec.v")))),
    "unreadable": lambda: reply(7, unreadable()),
    "no-lora": lambda: reply(7, ArrayRecord({f"{P}head.weight": torch.zeros(3, D_OUT)})),
    "nan-weight": lambda: reply(7, ArrayRecord(client_sd(9)), float("nan")),
    "two-array-records": lambda: reply(
        7, ArrayRecord(client_sd(9)), extra=ArrayRecord(client_sd(8))
    ),
}


@pytest.mark.parametrize("method", ["fedit", "lora_fair", "flora", "fedex_lora"])
@pytest.mark.parametrize("bad", sorted(BAD))
def test_bad_reply_is_rejected_and_the_rest_aggregate_as_if_it_was_not_sent(
    bad: str, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    replies = good()
    clean_arrays, clean_metrics = LoRAStrategy(method).aggregate_train(1, replies)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = LoRAStrategy(method).aggregate_train(
            1, [replies[0], BAD[bad](), *replies[1:]]
        )
    assert arrays is not None
    assert clean_arrays is not None
    assert metrics is not None
    assert clean_metrics is not None
    got, want = from_array_record(arrays), from_array_record(clean_arrays)
    assert list(got) == list(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert metrics["replies-rejected"] == 1
    assert clean_metrics["replies-rejected"] == 0
    assert {k: v for k, v in metrics.items() if k != "replies-rejected"} == {
        k: v for k, v in clean_metrics.items() if k != "replies-rejected"
    }
    assert "node 7" in caplog.text


def test_the_log_names_the_node_and_the_library_error(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="flwr"):
        LoRAStrategy("fedit").aggregate_train(1, [*good(), BAD["nan"]()])
    assert "node 7: NonFiniteError: layer 'base_model.model.enc.v': lora_B holds NaN or Inf" in (
        caplog.text
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flwr"):
        LoRAStrategy("fedit").aggregate_train(1, [*good(), BAD["mis-shaped"]()])
    assert "node 7: InconsistentMessageReplies: layer 'base_model.model.enc.q'" in caplog.text


def test_too_few_valid_replies_keep_the_global_adapter() -> None:
    replies = [good(1)[0], BAD["nan"](), BAD["inf"]()]
    arrays, metrics = LoRAStrategy("fedit", min_train_nodes=2).aggregate_train(1, replies)
    assert arrays is None
    assert metrics is not None
    assert dict(metrics) == {"replies-rejected": 2}
    arrays, _ = LoRAStrategy("fedit", min_train_nodes=1).aggregate_train(1, replies)
    assert arrays is not None


def test_method_rejecting_the_valid_replies_keeps_the_global_adapter() -> None:
    # FFA-LoRA needs one shared A; these clients' A differ, so the method itself refuses.
    arrays, metrics = LoRAStrategy("ffa_lora").aggregate_train(1, good())
    assert arrays is None
    assert metrics is not None
    assert metrics["replies-rejected"] == 0
    with pytest.raises(LoRAFairError, match="client"):
        LoRAStrategy("ffa_lora", on_invalid_reply="raise").aggregate_train(1, good())


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ("nan", NonFiniteError),
        ("mis-shaped", InconsistentMessageReplies),
        ("another-model", InconsistentMessageReplies),
        ("nan-weight", InconsistentMessageReplies),
        ("no-lora", LoRAFairError),
    ],
)
def test_on_invalid_reply_raise(bad: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        LoRAStrategy("fedit", on_invalid_reply="raise").aggregate_train(1, [*good(), BAD[bad]()])
    with pytest.raises(ValueError, match="on_invalid_reply"):
        LoRAStrategy("fedit", on_invalid_reply="skip")  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["fedit", "lora_fair", "flexlora"])
def test_result_depends_on_the_set_of_replies_not_their_order_or_nodes(method: str) -> None:
    sds = [client_sd(k) for k in range(4)]
    x, y = _in_two_orders(method, sds, [10.0 + k for k in range(4)])
    assert all(torch.equal(x[k], y[k]) for k in x)


def _in_two_orders(
    method: str, sds: list[dict[str, Tensor]], weights: list[float]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """One round's result on the replies in order from nodes 100.., and shuffled from 900.."""
    first = [reply(100 + k, ArrayRecord(sd), weights[k]) for k, sd in enumerate(sds)]
    shuffled = [reply(900 - k, ArrayRecord(sds[k]), weights[k]) for k in (2, 0, 3, 1)]
    a, _ = LoRAStrategy(method).aggregate_train(1, first)
    b, _ = LoRAStrategy(method).aggregate_train(1, shuffled)
    assert a is not None
    assert b is not None
    return from_array_record(a), from_array_record(b)


@pytest.mark.parametrize("method", ["fedit", "lora_fair"])
def test_order_is_by_content_where_replies_agree_in_the_sampled_bytes(method: str) -> None:
    # d_in = 400: each lora_A is 4.8 KB, so its sort key hashes 64 slices of 64 bytes only. The
    # replies share client 0's factors and differ in one entry between two slices; the sampled
    # keys tie, and the whole bytes must order them, whatever the arrival order.
    base = client_sd(0, d_in=400)
    key = f"{P}enc.q.lora_A.weight"
    n = base[key].numel()
    data = ArrayRecord(base)[key].data  # the array's bytes as sent: a .npy header, then values
    header = len(data) - 4 * n
    step = len(data) // 64  # the slices' spacing; each slice reads 64 bytes
    sampled = torch.zeros(len(data), dtype=torch.bool)
    for i in range(64):
        sampled[i * step : i * step + 64] = True
    free = sampled[header:].view(n, 4).any(dim=1).logical_not()  # entries no slice touches
    assert int(free.sum()) > 100
    g = torch.Generator().manual_seed(5)
    sds = []
    for _ in range(4):
        sd = {k: t.clone() for k, t in base.items()}
        sd[key].view(-1)[free] = torch.randn(int(free.sum()), generator=g)
        sds.append(sd)
    # equal weights: the metrics, which every key hashes, agree too
    x, y = _in_two_orders(method, sds, [10.0] * 4)
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_a_reply_whose_sum_overflows_is_finite_and_kept() -> None:
    sd = client_sd(9)
    sd[f"{P}enc.q.lora_A.weight"][0, :2] = 3e38  # finite entries; their float32 sum is Inf
    replies = [*good(), reply(7, ArrayRecord(sd))]
    arrays, metrics = LoRAStrategy("fedit").aggregate_train(1, replies)
    assert arrays is not None
    assert metrics is not None
    assert metrics["replies-rejected"] == 0

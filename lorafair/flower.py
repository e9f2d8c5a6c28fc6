"""A Flower strategy that aggregates peft LoRA adapters with any lorafair aggregator.

Needs the ``flower`` extra (``pip install "lorafair[flower]"``); ``import lorafair`` never
imports this module or flwr.

Protocol (Flower's Message API, as for ``flwr.serverapp.strategy.FedAvg``): each client replies
with one ``ArrayRecord`` holding its peft adapter state dict (``get_peft_model_state_dict`` or the
module state dict; see :mod:`lorafair.interop.peft`) and one ``MetricRecord`` holding its weight
under ``weighted_by_key`` (``"num-examples"`` by default). The server splits each state dict into
LoRA factors and other tensors, aggregates the factors with the chosen lorafair function, averages
the other tensors (FedAvg), and returns one ``ArrayRecord`` in the first reply's key format.

bfloat16 adapters: Flower's ``ArrayRecord(state_dict)`` cannot hold them (it goes through
NumPy). Encode with :func:`to_array_record` and decode with :func:`from_array_record`, which
carry bfloat16 bit for bit as raw bytes; the strategy reads both encodings and aggregates in
the adapters' own dtype.

If clients' LoRA ranks or alphas differ, clients should upload factors with peft's scaling folded
into B (:func:`lorafair.interop.peft.fold_scaling`) and unfold their own scaling from what they
receive (:func:`~lorafair.interop.peft.unfold_scaling`); the strategy itself is scaling-agnostic.
Ranks may differ between clients (and the result may have another rank, e.g. FLoRA's Σ r_k):
replies are validated for identical keys only, never identical shapes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from logging import INFO
from typing import Any, Literal

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import validate_message_reply_consistency
from flwr.supercore import log
from torch import Tensor

from lorafair._fair import lora_fair_solved
from lorafair.aggregate import ResidualSolution, lora_fair
from lorafair.interop.peft import fedavg_others, from_peft_state_dict, to_peft_state_dict
from lorafair.metrics import aggregation_bias
from lorafair.types import LoRAFactors

__all__ = ["BF16_STYPE", "LoRAStrategy", "from_array_record", "to_array_record"]

Aggregator = Callable[..., Mapping[str, LoRAFactors]]

BF16_STYPE = "lorafair.bfloat16.le-bytes"
"""The ``Array.stype`` of a bfloat16 tensor carried as its raw little-endian bytes."""


def to_array_record(state_dict: Mapping[str, Tensor]) -> ArrayRecord:
    """An ``ArrayRecord`` of ``state_dict`` that also carries bfloat16 tensors, bit for bit.

    Flower 1.42's ``ArrayRecord(state_dict)`` goes through NumPy, which has no bfloat16, and
    raises ``TypeError: Got unsupported ScalarType BFloat16``. Here a bfloat16 tensor becomes an
    ``Array(dtype="bfloat16", shape, stype=BF16_STYPE, data)`` with its 2 bytes per entry
    (little-endian), so it travels at its own size and is not rounded; every other dtype uses
    Flower's own NumPy encoding, so receivers that do not know ``BF16_STYPE`` read those as
    usual. Read back with :func:`from_array_record`. Cost: one copy of the tensors.
    """
    arrays: dict[str, Array] = {}
    for key, tensor in state_dict.items():
        t = tensor.detach().cpu()
        if t.dtype == torch.bfloat16:
            raw = t.contiguous().view(torch.int16).numpy().astype("<i2", copy=False)
            arrays[key] = Array("bfloat16", tuple(t.shape), BF16_STYPE, raw.tobytes())
        else:
            arrays[key] = Array.from_torch_tensor(t)
    return ArrayRecord(arrays)


def from_array_record(record: ArrayRecord) -> dict[str, Tensor]:
    """The torch state dict of ``record``, decoding :data:`BF16_STYPE` arrays to bfloat16.

    The inverse of :func:`to_array_record`; for records without bfloat16 arrays it equals
    ``record.to_torch_state_dict()``. Keys keep the record's order.
    """
    return _decode(record, copy=True)


def _decode(record: ArrayRecord, *, copy: bool) -> dict[str, Tensor]:
    """:func:`from_array_record`; ``copy=False`` leaves the entries in the message's immutable
    bytes where the encoding allows (read-only tensors: for callers that never write to them,
    such as the aggregators, which never mutate their inputs; saves one copy of every input)."""
    out: dict[str, Tensor] = {}
    for key, array in record.items():
        if array.stype == BF16_STYPE:
            raw = np.frombuffer(array.data, dtype="<i2")
            raw = raw.astype(np.int16) if copy else raw
        else:
            payload = _npy_payload(array)
            raw = array.numpy() if payload is None else payload.copy() if copy else payload
        if raw.flags.writeable:
            t = torch.from_numpy(raw)
        else:
            with warnings.catch_warnings():  # read-only on purpose, see above
                warnings.filterwarnings("ignore", "The given NumPy array is not writable")
                t = torch.from_numpy(raw)
        out[key] = t.view(torch.bfloat16).reshape(array.shape) if array.stype == BF16_STYPE else t
    return out


_NPY_MAGIC = b"\x93NUMPY\x01\x00"


def _npy_payload(array: Array) -> np.ndarray[Any, Any] | None:
    """The entries of a Flower NumPy ``Array`` as a read-only view of its bytes, or ``None``.

    Flower encodes with ``np.save`` (format 1.0): 10 bytes, a header of ``descr``,
    ``fortran_order`` and ``shape``, then the entries in C order. Where the header is exactly the
    one ``np.save`` writes for the ``Array``'s own dtype (this machine's byte order) and shape,
    the entries are read in place (the caller copies them once); otherwise ``None``, and the
    caller takes ``Array.numpy()`` (``np.load``: a second copy and a ``literal_eval`` of the
    header, about 60% of a FedAvg round's time at the Llama-3-8B cell).
    """
    data = array.data
    if array.stype != "numpy.ndarray" or data[:8] != _NPY_MAGIC:
        return None
    try:
        dtype = np.dtype(array.dtype)
    except TypeError:
        return None
    shape = tuple(int(n) for n in array.shape)
    end = 10 + int.from_bytes(data[8:10], "little")
    expected = f"{{'descr': '{dtype.str}', 'fortran_order': False, 'shape': {shape!r}, }}"
    if dtype.hasobject or data[10:end].rstrip(b" \n") != expected.encode("latin1"):
        return None
    count = math.prod(shape)
    if len(data) != end + count * dtype.itemsize:
        return None
    return np.frombuffer(data, dtype=dtype, count=count, offset=end).reshape(shape)


class LoRAStrategy(FedAvg):
    """FedAvg's sampling and metrics, with LoRA factors aggregated by a lorafair function.

    ``aggregator`` is any function of :mod:`lorafair.aggregate` (``fedit``, ``ffa_lora``,
    ``flora``, ``flexlora``, ``lora_fair``, or your own with the same signature), called as
    ``aggregator(clients, weights, **options)`` with ``weights`` the replies' ``weighted_by_key``
    values (normalised to ``p_k = n_k / Σ n_j`` by the aggregator). Non-LoRA tensors are
    averaged with :func:`~lorafair.interop.peft.fedavg_others` (``nonfloat`` as there).

    :meth:`aggregate_train` returns the aggregated ``ArrayRecord`` and a ``MetricRecord`` with
    the clients' metrics averaged as FedAvg does, plus, with ``report_bias``, the per-layer
    cosine ``cos(B A, ΔW)`` of the result to the ideal ``ΔW = Σ p_k B_k A_k`` as
    ``"bias-cosine/<layer>"``, its minimum ``"bias-cosine-min"`` and mean ``"bias-cosine-mean"``
    and the largest relative error ``"bias-relative-error-max"`` (factored, float64, via
    :func:`lorafair.metrics.aggregation_bias`); and, when ``aggregator`` is ``lora_fair``, the
    solver's ``"solver-iterations-max"`` and ``"solver-converged"`` (fraction of layers). For
    ``lora_fair`` the residual problem is solved once per round: one solve gives both
    ``lora_fair``'s output (bit for bit) and the solutions behind the metrics.

    Every other argument is :class:`flwr.serverapp.strategy.FedAvg`'s, keyword-only.
    """

    def __init__(
        self,
        aggregator: Aggregator,
        *,
        options: Mapping[str, Any] | None = None,
        adapter_name: str = "default",
        nonfloat: Literal["equal", "first"] = "equal",
        report_bias: bool = True,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        evaluate_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
    ) -> None:
        if not callable(aggregator):
            raise TypeError(f"aggregator must be callable, got {type(aggregator).__name__}")
        if nonfloat not in ("equal", "first"):
            raise ValueError(f"nonfloat must be 'equal' or 'first', got {nonfloat!r}")
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        )
        self.aggregator = aggregator
        self.options: dict[str, Any] = dict(options or {})
        self.adapter_name = adapter_name
        self.nonfloat: Literal["equal", "first"] = nonfloat
        self.report_bias = report_bias

    def summary(self) -> None:
        """Log the configuration (FedAvg's, plus the aggregator and its options)."""
        name = getattr(self.aggregator, "__name__", repr(self.aggregator))
        log(INFO, "\t├──> LoRA aggregation: %s %s", name, self.options)
        super().summary()

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the replies' adapters with ``self.aggregator``; see the class docstring.

        Replies carrying an error are skipped (and logged), as in FedAvg. Returns
        ``(None, None)`` when no valid reply is left. Raises ``InconsistentMessageReplies``
        (Flower's) for replies without exactly one ArrayRecord and one MetricRecord, or with
        differing keys, and lorafair's errors (naming layer and client) for bad adapters.
        """
        replies = list(replies)
        valid = [msg for msg in replies if not msg.has_error()]
        log(
            INFO,
            "aggregate_train: Received %s results and %s failures",
            len(valid),
            len(replies) - len(valid),
        )
        for msg in replies:
            if msg.has_error():
                log(
                    INFO,
                    "\t> Received error in reply from node %d: %s",
                    msg.metadata.src_node_id,
                    msg.error.reason,
                )
        if not valid:
            return None, None
        contents = [msg.content for msg in valid]
        # Keys and the weight entry only: shapes may differ (heterogeneous ranks).
        validate_message_reply_consistency(
            replies=contents, weighted_by_key=self.weighted_by_key, check_arrayrecord=True
        )
        # read in place (one copy less of every input): the aggregators never write to it
        state_dicts = [_decode(next(iter(c.array_records.values())), copy=False) for c in contents]
        weights = [_weight(c, self.weighted_by_key) for c in contents]
        splits = [from_peft_state_dict(sd, adapter_name=self.adapter_name) for sd in state_dicts]
        clients = [s.factors for s in splits]
        solved: dict[str, ResidualSolution] | None = None
        if self.aggregator is lora_fair:
            aggregated, solved = lora_fair_solved(clients, weights, **self.options)
        else:
            aggregated = dict(self.aggregator(clients, weights, **self.options))
        others = (
            fedavg_others([s.others for s in splits], weights, nonfloat=self.nonfloat)
            if splits[0].others
            else {}
        )
        arrays = to_array_record(to_peft_state_dict(aggregated, like=splits[0], others=others))

        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        if self.report_bias:
            _add_bias_metrics(metrics, aggregation_bias(clients, aggregated, weights))
        if solved is not None:
            iterations = [int(s.iterations) for s in solved.values()]
            converged = [bool(s.converged) for s in solved.values()]
            metrics["solver-iterations-max"] = max(iterations)
            metrics["solver-converged"] = sum(converged) / len(converged)
        return arrays, metrics


def _weight(content: RecordDict, key: str) -> float:
    record = next(iter(content.metric_records.values()))
    value = record[key]
    if isinstance(value, list):  # validate_message_reply_consistency rejects this already
        raise ValueError(f"metric {key!r} must be a single number, got a list")
    return float(value)


def _add_bias_metrics(metrics: MetricRecord, reports: Mapping[str, Any]) -> None:
    cosines: Sequence[float] = [float(r.cosine) for r in reports.values()]
    errors = [float(r.relative_error) for r in reports.values()]
    for name, r in reports.items():
        metrics[f"bias-cosine/{name}"] = float(r.cosine)
    metrics["bias-cosine-min"] = min(cosines)
    metrics["bias-cosine-mean"] = math.fsum(cosines) / len(cosines)
    metrics["bias-relative-error-max"] = max(errors)

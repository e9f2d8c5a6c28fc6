"""A Flower strategy that aggregates peft LoRA adapters with any lorafair aggregator.

Needs the ``flower`` extra (``pip install "lorafair[flower]"``); ``import lorafair`` never
imports this module or flwr.

Protocol (Flower's Message API, as for ``flwr.serverapp.strategy.FedAvg``): each client replies
with one ``ArrayRecord`` holding its peft adapter state dict (``get_peft_model_state_dict`` or the
module state dict; see :mod:`lorafair.interop.peft`) and one ``MetricRecord`` holding its weight
under ``weighted_by_key`` (``"num-examples"`` by default). The server splits each state dict into
LoRA factors and other tensors, aggregates the factors with the chosen method, averages the
other tensors (FedAvg), and returns one ``ArrayRecord`` in the key format of the first reply
aggregated (see ``reply_order``).

What travels to the clients follows the method's registry entry
(:class:`lorafair.registry.AggregatorSpec`), never its name:

- ``output="adapters"``: the global adapter, in the ``arrays`` record (FedAvg's place).
- ``output="adapters+residual"`` (FedEx-LoRA): the adapter as above, and the residuals of
  every round so far in their own record :data:`RESIDUAL_KEY` (peft keys; the rounds' factors
  concatenated along the rank axis, so ``B_res @ A_res`` is their sum,
  :attr:`LoRAStrategy.residual_total`), with ``config["lorafair-residual-round"]`` the last
  round it includes. The client adds ``B_res @ A_res`` to a fresh copy of its frozen weights:
  no client state, so a client that missed a round or a restarted run still folds the whole
  sum. Cost: the rank grows by FedEx-LoRA's residual rank (``Σ r_k + r``, or
  ``residual_rank``) per round.
- ``output="per_client"`` (FedSA-LoRA): only the shared ``Ā`` (the ``lora_A`` keys and the
  averaged other tensors); each client keeps its own ``B`` in its ``context.state``.
- ``round_options`` (RoLoRA): options that follow ``server_round``; the round's values also go
  to the clients as ``config["lorafair-<option>"]`` (e.g. ``"lorafair-trained": "A"``).

Every message also carries :data:`RANKS_KEY`, a ``ConfigRecord`` ``{layer: rank}`` of the
adapter it holds, so that a client can rebuild its adapter when a method changes the rank
(FLoRA's ``Σ r_k``, FlexLoRA's and HetLoRA's truncations).

bfloat16 adapters: Flower's ``ArrayRecord(state_dict)`` cannot hold them (it goes through
NumPy). Encode with :func:`to_array_record` and decode with :func:`from_array_record`, which
carry bfloat16 bit for bit as raw bytes; the strategy reads both encodings and aggregates in
the adapters' own dtype.

If clients' LoRA ranks or alphas differ, clients should upload factors with peft's scaling folded
into B (:func:`lorafair.interop.peft.fold_scaling`) and unfold their own scaling from what they
receive (:func:`~lorafair.interop.peft.unfold_scaling`); the strategy itself is scaling-agnostic.
Ranks may differ between clients where the method allows it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from logging import INFO, WARNING
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg, Result
from flwr.supercore import log
from torch import Tensor

from lorafair import registry
from lorafair._fit import flag_sum
from lorafair.aggregate import FedExResult, FedSAResult, lora_fair, lora_fair_solved
from lorafair.errors import LoRAFairError, NonFiniteError
from lorafair.interop.peft import (
    PeftAdapter,
    PeftSplit,
    fedavg_others,
    fold_scaling,
    from_peft_state_dict,
    to_peft_state_dict,
    write_adapter,
)
from lorafair.metrics import aggregation_bias
from lorafair.registry import AggregatorSpec
from lorafair.types import LoRAFactors

__all__ = [
    "BF16_STYPE",
    "RANKS_KEY",
    "RESIDUAL_KEY",
    "Checkpoint",
    "LoRAStrategy",
    "from_array_record",
    "latest_checkpoint",
    "to_array_record",
]

Aggregator = Callable[..., Any]

BF16_STYPE = "lorafair.bfloat16.le-bytes"
"""The ``Array.stype`` of a bfloat16 tensor carried as its raw little-endian bytes."""

RESIDUAL_KEY = "lorafair-residual"
"""The message record holding FedEx-LoRA's residual (peft keys; ``B @ A`` is the update)."""

RANKS_KEY = "lorafair-ranks"
"""The message record ``{layer: rank}`` of the adapter a message carries."""


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


OnInvalidReply = Literal["reject", "raise"]
"""What :class:`LoRAStrategy` does with a reply it cannot aggregate: skip it, or raise."""


class _InvalidReply(Exception):
    """A reply the strategy will not aggregate; ``error`` is what the check raised."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class _Reply(NamedTuple):
    """One readable reply: its node, content, adapter split and weight."""

    node: object
    content: RecordDict
    split: PeftSplit
    weight: float


class _Signature(NamedTuple):
    """What every reply of one model shares: layers with (d_in, d_out[, rank]), other keys."""

    layers: tuple[tuple[str, int, int, int], ...]
    others: tuple[tuple[str, tuple[int, ...], str], ...]
    dtype: str


class _Download(NamedTuple):
    """What one round sends the clients."""

    arrays: dict[str, Tensor]
    """The ``arrays`` record: the global adapter (or only ``Ā``, FedSA-LoRA) and other tensors."""
    residual: dict[str, LoRAFactors] | None
    """FedEx-LoRA's residual for the frozen weights; ``None`` for other methods."""
    update: dict[str, LoRAFactors] | None
    """Factors whose ``B @ A`` is the round's global update (for the bias metrics); ``None``
    for personalised methods."""


def _download_adapters(
    spec: AggregatorSpec, result: Any, like: PeftSplit, others: Mapping[str, Tensor]
) -> _Download:
    adapters = dict(result)
    update = spec.update_factors(result) if spec.update_factors is not None else None
    return _Download(to_peft_state_dict(adapters, like=like, others=others), None, update)


def _download_residual(
    spec: AggregatorSpec, result: Any, like: PeftSplit, others: Mapping[str, Tensor]
) -> _Download:
    fedex: FedExResult = result
    update = spec.update_factors(result) if spec.update_factors is not None else None
    arrays = to_peft_state_dict(fedex.adapters, like=like, others=others)
    return _Download(arrays, dict(fedex.residual), update)


def _download_shared_A(
    spec: AggregatorSpec, result: Any, like: PeftSplit, others: Mapping[str, Tensor]
) -> _Download:
    fedsa: FedSAResult = result
    # Lay the shared Ā out in `like`'s key format, then drop every lora_B key (found by
    # identity: they hold `like`'s own B tensors).
    full = to_peft_state_dict(
        {name: LoRAFactors(A, like.factors[name].B) for name, A in fedsa.shared_A.items()},
        like=like,
        others=others,
    )
    own_B = {id(f.B) for f in like.factors.values()}
    return _Download({k: v for k, v in full.items() if id(v) not in own_B}, None, None)


_DOWNLOADS: Mapping[
    registry.Output,
    Callable[[AggregatorSpec, Any, PeftSplit, Mapping[str, Tensor]], _Download],
] = {
    "adapters": _download_adapters,
    "adapters+residual": _download_residual,
    "per_client": _download_shared_A,
}
"""What a round sends, by the registry's ``output`` of the method."""

_SOLVED: Mapping[Callable[..., Any], Callable[..., Any]] = {lora_fair: lora_fair_solved}
"""Aggregators with a variant that also returns the solver's per-layer solutions (metrics)."""


def _resolve(aggregator: str | AggregatorSpec | Aggregator) -> AggregatorSpec:
    """The registry entry of ``aggregator`` (a name, a spec, or a registered function).

    An unregistered function gets a spec with ``output="adapters"`` and no claims.
    """
    if isinstance(aggregator, AggregatorSpec):
        return aggregator
    if isinstance(aggregator, str):
        return registry.get(aggregator)
    if not callable(aggregator):
        raise TypeError(
            f"aggregator must be a registry name or a callable, got {type(aggregator).__name__}"
        )
    for spec in registry.specs():
        if spec.fn is aggregator:
            return spec
    return AggregatorSpec(
        name=getattr(aggregator, "__name__", repr(aggregator)),
        fn=aggregator,
        defaults={},
        exact=False,
        optimal=False,
        never_worse_than_fedit=False,
        shared_A=False,
        equal_ranks=False,
        floor="memory",
        summary="user-supplied aggregator",
    )


def _ranks(arrays: ArrayRecord) -> dict[str, int]:
    """``{layer: rank}`` of the ``lora_A`` arrays in ``arrays`` (keys as peft writes them)."""
    out: dict[str, int] = {}
    for key, array in arrays.items():
        if ".lora_A." in key and len(array.shape) == 2:
            out[key.split(".lora_A.")[0]] = int(array.shape[0])
    return out


def _signature(split: PeftSplit, *, with_ranks: bool) -> _Signature:
    layers = tuple(
        (name, int(A.shape[1]), int(B.shape[0]), int(A.shape[0]) if with_ranks else 0)
        for name, (A, B) in split.factors.items()
    )
    others = tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in split.others.items()))
    first = next(iter(split.factors.values()))
    return _Signature(layers, others, str(first.A.dtype))


def _describe_mismatch(got: _Signature, want: _Signature) -> str:
    if {n for n, *_ in got.layers} != {n for n, *_ in want.layers}:
        extra = sorted({n for n, *_ in got.layers} - {n for n, *_ in want.layers})
        missing = sorted({n for n, *_ in want.layers} - {n for n, *_ in got.layers})
        return f"layers differ from the global adapter's (extra {extra}, missing {missing})"
    shapes = {n: rest for n, *rest in want.layers}
    for name, *rest in got.layers:
        if shapes[name] != rest:
            d_in, d_out, rank = rest
            w_in, w_out, w_rank = shapes[name]
            return (
                f"layer {name!r} has (d_in, d_out{', rank' if rank else ''}) = "
                f"{(d_in, d_out, rank)[: 3 if rank else 2]}, the global adapter "
                f"{(w_in, w_out, w_rank)[: 3 if w_rank else 2]}"
            )
    if got.others != want.others:
        return "its non-LoRA tensors differ in keys, shapes or dtypes from the global adapter's"
    return f"its factors are {got.dtype}, the global adapter's {want.dtype}"


def _check_finite(split: PeftSplit) -> None:
    """:class:`NonFiniteError` naming the first tensor of a reply with NaN or Inf.

    One sum per tensor (:func:`lorafair._fit.flag_sum`), no temporary: a sum is finite whenever
    every entry is, unless it overflows, so only a non-finite sum costs the exact
    ``isfinite`` test of its tensor (``isfinite(t).all()`` on every tensor took about a third
    of ``LoRAStrategy(fedit)``'s server time in a profile of ``python -m
    benchmarks.flower_round``)."""
    tensors = [
        (f"layer {name!r}: lora_{which}", t)
        for name, (A, B) in split.factors.items()
        for which, t in (("A", A), ("B", B))
    ] + [(f"tensor {key!r}", t) for key, t in split.others.items()]
    tensors = [(what, t) for what, t in tensors if t.is_floating_point() and t.numel()]
    if not tensors:
        return
    sums = torch.stack([flag_sum(t) for _, t in tensors])
    if bool(torch.isfinite(sums).all()):
        return
    for what, t in tensors:
        if not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"{what} holds NaN or Inf")


class Checkpoint(NamedTuple):
    """A round's checkpoint as :meth:`LoRAStrategy.restore` reads it."""

    path: str
    round: int
    """The last round it holds; a resumed run starts at ``round + 1``."""
    arrays: ArrayRecord
    """The global ``arrays`` exactly as the strategy held them (the clients' key format)."""


_STATE = "state.json"
_ARRAYS = "arrays.safetensors"
_RESIDUAL = "residual.safetensors"
_ADAPTER = "adapter"


def latest_checkpoint(directory: str | os.PathLike[str]) -> str | None:
    """The complete ``round-<t>`` folder with the largest ``t`` in ``directory``, or ``None``."""
    if not os.path.isdir(directory):
        return None
    rounds = [
        int(name[len("round-") :])
        for name in os.listdir(directory)
        if name.startswith("round-")
        and name[len("round-") :].isdigit()
        and os.path.isfile(os.path.join(directory, name, _STATE))
    ]
    return os.path.join(directory, f"round-{max(rounds)}") if rounds else None


def _save_tensors(path: str, tensors: Mapping[str, Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path)


def _load_tensors(path: str) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


class LoRAStrategy(FedAvg):
    """FedAvg's sampling and metrics, with LoRA factors aggregated by any lorafair method.

    ``aggregator`` is a registry name (``"fedit"``, ``"fedex_lora"``, ``"rolora"``, ... see
    :func:`lorafair.registry.names`), an :class:`~lorafair.registry.AggregatorSpec`, a
    registered function of :mod:`lorafair.aggregate`, or your own function with the same
    signature. It is called as ``fn(clients, weights, **options)`` with ``weights`` the replies'
    ``weighted_by_key`` values (normalised to ``p_k = n_k / Σ n_j`` by the aggregator) and
    ``options`` the registry's ``defaults``, then its ``round_options(server_round - 1)``, then
    ``options`` given here (later ones win). What travels back follows the registry's
    ``output`` (see the module docstring). Non-LoRA tensors are averaged with
    :func:`~lorafair.interop.peft.fedavg_others` (``nonfloat`` as there).

    Bad replies (``on_invalid_reply="reject"``, the default): a reply whose records are not one
    ``ArrayRecord`` and one ``MetricRecord``, whose weight is missing or not a finite number
    ``>= 0``, whose adapter cannot be decoded or split (the library's error), holds NaN or
    Inf, or has other layers, shapes, dtypes (or, for equal-rank methods, ranks) than the
    global adapter sent (than most replies, before any was sent) is rejected: logged with its
    node id and the error, counted in the round's metric ``"replies-rejected"``, and the others
    are aggregated exactly as if it had not been sent. With fewer than ``min_train_nodes``
    valid replies left, or if the method itself rejects the valid ones (e.g. FFA-LoRA's
    ``FrozenAMismatchError``), the round returns no arrays and Flower keeps the global adapter
    as it was. ``on_invalid_reply="raise"`` raises instead (``InconsistentMessageReplies`` for
    the records, lorafair's errors for the adapters).

    :meth:`aggregate_train` returns the aggregated ``ArrayRecord`` and a ``MetricRecord`` with
    the clients' metrics averaged as FedAvg does, ``"replies-rejected"``, plus, with
    ``report_bias`` and a global update (every method but FedSA-LoRA), the per-layer cosine
    ``cos(B A, ΔW)`` of the update to the ideal ``ΔW = Σ p_k B_k A_k`` as
    ``"bias-cosine/<layer>"``, its minimum ``"bias-cosine-min"`` and mean ``"bias-cosine-mean"``
    and the largest relative error ``"bias-relative-error-max"`` (factored, float64, via
    :func:`lorafair.metrics.aggregation_bias`); and, for ``lora_fair``, the solver's
    ``"solver-iterations-max"`` and ``"solver-converged"`` (fraction of layers), from the same
    single solve that gives the adapter (:func:`lorafair.aggregate.lora_fair_solved`).

    ``reply_order="content"`` (the default) aggregates the replies sorted by the SHA-256 of
    their contents (of a sample of each array's bytes; of all of them where two samples
    agree), so that a round's result depends only on the set of replies, not on their
    arrival order or the nodes' ids (floating-point sums depend on the order); ``"arrival"``
    keeps Flower's order.

    Checkpoints (``checkpoint_dir`` with ``checkpoint_like``, a peft adapter folder read with
    :func:`lorafair.interop.peft.read_adapter`, e.g. the initial adapter's ``save_pretrained``):
    when round ``t``'s global adapter is sent for evaluation (:meth:`configure_evaluate`, which
    Flower calls every round, also with ``fraction_evaluate = 0``), the strategy writes
    ``checkpoint_dir/round-<t>/`` atomically (a temporary folder, then a rename) with
    ``adapter/`` (a peft folder for ``PeftModel.from_pretrained``, via
    :func:`~lorafair.interop.peft.write_adapter`; ``scaling_folded`` says whether the replies
    carry peft's scaling in B as :func:`~lorafair.interop.peft.fold_scaling` gives; FedSA-LoRA
    has no global adapter and writes none), ``arrays.safetensors`` (the global arrays exactly,
    for a bit-exact resume), ``residual.safetensors`` (FedEx-LoRA: the summed residual, which
    belongs in the frozen weights) and ``state.json`` (round, method). A restarted ServerApp
    calls :meth:`restore` on :func:`latest_checkpoint` and passes ``first_round = round + 1``
    to :meth:`start`: RoLoRA's phase and any schedule read from ``server-round`` (e.g. a
    cosine learning rate) follow, because they are functions of the round.

    Every other argument is :class:`flwr.serverapp.strategy.FedAvg`'s, keyword-only.
    """

    def __init__(
        self,
        aggregator: str | AggregatorSpec | Aggregator,
        *,
        options: Mapping[str, Any] | None = None,
        adapter_name: str = "default",
        nonfloat: Literal["equal", "first"] = "equal",
        report_bias: bool = True,
        on_invalid_reply: OnInvalidReply = "reject",
        checkpoint_dir: str | os.PathLike[str] | None = None,
        checkpoint_like: PeftAdapter | None = None,
        scaling_folded: bool = False,
        reply_order: Literal["content", "arrival"] = "content",
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
        spec = _resolve(aggregator)
        if nonfloat not in ("equal", "first"):
            raise ValueError(f"nonfloat must be 'equal' or 'first', got {nonfloat!r}")
        if (checkpoint_dir is None) != (checkpoint_like is None):
            raise ValueError(
                "checkpoint_dir and checkpoint_like go together: the folder to write to and "
                "the peft adapter (lorafair.interop.peft.read_adapter) whose config it follows"
            )
        if reply_order not in ("content", "arrival"):
            raise ValueError(f"reply_order must be 'content' or 'arrival', got {reply_order!r}")
        if on_invalid_reply not in ("reject", "raise"):
            raise ValueError(
                f"on_invalid_reply must be 'reject' or 'raise', got {on_invalid_reply!r}"
            )
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
        self.spec = spec
        self.aggregator = spec.fn
        self.options: dict[str, Any] = dict(options or {})
        self.adapter_name = adapter_name
        self.nonfloat: Literal["equal", "first"] = nonfloat
        self.report_bias = report_bias
        self.on_invalid_reply: OnInvalidReply = on_invalid_reply
        self.checkpoint_dir = None if checkpoint_dir is None else os.fspath(checkpoint_dir)
        self.checkpoint_like = checkpoint_like
        self.scaling_folded = scaling_folded
        self.reply_order: Literal["content", "arrival"] = reply_order
        self._reference: _Signature | None = None
        self._residual: ArrayRecord | None = None
        self._residual_round = 0
        self._residual_total: dict[str, LoRAFactors] = {}

    @property
    def residual_total(self) -> dict[str, LoRAFactors]:
        """FedEx-LoRA: every round's residual so far, concatenated along the rank axis.

        ``B @ A`` per layer is what the clients have added to their frozen weights; empty for
        other methods. Rank: the sum of the rounds' residual ranks.
        """
        return dict(self._residual_total)

    def round_options(self, server_round: int) -> dict[str, Any]:
        """The aggregator's options in ``server_round`` (1-based, as Flower counts)."""
        scheduled = self.spec.round_options(server_round - 1) if self.spec.round_options else {}
        return {**self.spec.defaults, **scheduled, **self.options}

    def summary(self) -> None:
        """Log the configuration (FedAvg's, plus the method and its options)."""
        log(INFO, "\t├──> LoRA aggregation: %s %s", self.spec.name, self.options)
        log(INFO, "\t├──> Invalid replies: %s", self.on_invalid_reply)
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's messages, plus this round's options, the ranks and FedEx-LoRA's residual.

        ``config["lorafair-<option>"]`` carries each scheduled option of the round (RoLoRA's
        ``"lorafair-trained"``); see the module docstring for the records.
        """
        self._reference = self._signature_of(arrays)
        if self.spec.round_options is not None:
            for key, value in self.spec.round_options(server_round - 1).items():
                if isinstance(value, str | int | float | bool):
                    config[f"lorafair-{key}"] = value
        messages = list(super().configure_train(server_round, arrays, config, grid))
        return self._attach(messages, arrays)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's messages, plus the ranks and FedEx-LoRA's residual (as for training).

        With ``checkpoint_dir``, first writes round ``server_round``'s checkpoint (``arrays``
        is the round's global adapter; see the class docstring).
        """
        if self.checkpoint_dir is not None:
            self.save_checkpoint(server_round, arrays)
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        return self._attach(messages, arrays)

    def _attach(self, messages: list[Message], arrays: ArrayRecord) -> list[Message]:
        ranks = ConfigRecord(dict(_ranks(arrays)))
        for msg in messages:
            msg.content[RANKS_KEY] = ranks
            if self._residual is not None:
                msg.content[RESIDUAL_KEY] = self._residual
                msg.content.config_records[self.configrecord_key]["lorafair-residual-round"] = (
                    self._residual_round
                )
        return messages

    def _signature_of(self, arrays: ArrayRecord) -> _Signature | None:
        try:
            split = from_peft_state_dict(from_array_record(arrays), adapter_name=self.adapter_name)
        except (LoRAFairError, ValueError, TypeError):
            return None  # e.g. FedSA-LoRA's Ā-only download: compare replies with each other
        return _signature(split, with_ranks=self.spec.equal_ranks)

    def _read(self, msg: Message) -> _Reply:
        """One reply's adapter and weight; raises what makes it invalid."""
        content = msg.content
        if len(content.array_records) != 1 or len(content.metric_records) != 1:
            raise InconsistentMessageReplies(
                reason=f"expected one ArrayRecord and one MetricRecord, got "
                f"{len(content.array_records)} and {len(content.metric_records)}"
            )
        metrics = next(iter(content.metric_records.values()))
        if self.weighted_by_key not in metrics:
            raise InconsistentMessageReplies(
                reason=f"its MetricRecord has no weight {self.weighted_by_key!r}"
            )
        value = metrics[self.weighted_by_key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InconsistentMessageReplies(
                reason=f"weight {self.weighted_by_key!r} must be a single number, got {value!r}"
            )
        if not math.isfinite(value) or value < 0:
            raise InconsistentMessageReplies(
                reason=f"weight {self.weighted_by_key!r} must be finite and >= 0, got {value!r}"
            )
        # read in place (one copy less of every input): the aggregators never write to it
        state_dict = _decode(next(iter(content.array_records.values())), copy=False)
        split = from_peft_state_dict(state_dict, adapter_name=self.adapter_name)
        _check_finite(split)
        return _Reply(msg.metadata.src_node_id, content, split, float(value))

    def _read_all(self, messages: list[Message]) -> tuple[list[_Reply], int]:
        """The readable replies of one model, and how many were rejected."""
        readable: list[_Reply] = []
        rejected = 0
        for msg in messages:
            try:
                readable.append(self._read(msg))
            except Exception as error:  # any failure to read one reply
                if self.on_invalid_reply == "raise":
                    raise
                self._reject(msg, error)
                rejected += 1
        if not readable:
            return readable, rejected
        signatures = [_signature(r.split, with_ranks=self.spec.equal_ranks) for r in readable]
        want = self._reference
        if want is None:
            want = Counter(signatures).most_common(1)[0][0]
        kept: list[_Reply] = []
        for reply, got in zip(readable, signatures, strict=True):
            if got == want:
                kept.append(reply)
                continue
            mismatch = InconsistentMessageReplies(reason=_describe_mismatch(got, want))
            if self.on_invalid_reply == "raise":
                raise mismatch
            self._reject_node(reply.node, mismatch)
            rejected += 1
        return kept, rejected

    def _reject(self, msg: Message, error: Exception) -> None:
        self._reject_node(msg.metadata.src_node_id, error)

    @staticmethod
    def _reject_node(node: object, error: Exception) -> None:
        log(
            WARNING,
            "\t> Rejected the reply from node %s: %s: %s",
            node,
            type(error).__name__,
            error,
        )

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the replies' adapters with the method; see the class docstring.

        Replies carrying an error are skipped (and logged), as in FedAvg; the others are
        aggregated in ``reply_order``. Returns
        ``(None, None)`` when no reply without error is left, and ``(None, metrics)`` (the
        global adapter stays) when fewer than ``min_train_nodes`` valid replies remain.
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
        # Replies arrive in any order (and Flower samples nodes at random); floating-point sums
        # depend on the order. Sorting by content makes the result a function of the set of
        # replies alone, whatever the arrival order or the nodes' ids (a resumed run on a new
        # federation reproduces the uninterrupted one bit for bit).
        if self.reply_order == "content":
            valid = _content_sorted(valid)
        kept, rejected = self._read_all(valid)
        unchanged = MetricRecord({"replies-rejected": rejected})
        if self.on_invalid_reply == "reject" and len(kept) < max(self.min_train_nodes, 1):
            log(
                WARNING,
                "aggregate_train: %d valid replies < min_train_nodes = %d; "
                "the global adapter stays as it was",
                len(kept),
                self.min_train_nodes,
            )
            return None, unchanged
        weights = [r.weight for r in kept]
        clients = [r.split.factors for r in kept]
        options = self.round_options(server_round)
        solved: Mapping[str, Any] | None = None
        try:
            if self.spec.fn in _SOLVED:
                result, solved = _SOLVED[self.spec.fn](clients, weights, **options)
            else:
                result = self.spec.fn(clients, weights, **options)
        except LoRAFairError as error:
            if self.on_invalid_reply == "raise":
                raise
            log(
                WARNING,
                "aggregate_train: %s rejected the round's replies (%s: %s); "
                "the global adapter stays as it was",
                self.spec.name,
                type(error).__name__,
                error,
            )
            return None, unchanged
        like = kept[0].split
        others = (
            fedavg_others([r.split.others for r in kept], weights, nonfloat=self.nonfloat)
            if like.others
            else {}
        )
        download = _DOWNLOADS[self.spec.output](self.spec, result, like, others)
        if download.residual is not None:
            self._add_residual(server_round, download.residual, like)
        arrays = to_array_record(download.arrays)

        metrics = self.train_metrics_aggr_fn([r.content for r in kept], self.weighted_by_key)
        metrics["replies-rejected"] = rejected
        if self.report_bias and download.update is not None:
            _add_bias_metrics(metrics, aggregation_bias(clients, download.update, weights))
        if solved is not None:
            iterations = [int(s.iterations) for s in solved.values()]
            converged = [bool(s.converged) for s in solved.values()]
            metrics["solver-iterations-max"] = max(iterations)
            metrics["solver-converged"] = sum(converged) / len(converged)
        return arrays, metrics

    def _add_residual(
        self, server_round: int, residual: Mapping[str, LoRAFactors], like: PeftSplit
    ) -> None:
        total = self._residual_total
        self._residual_total = {
            name: LoRAFactors(
                torch.cat([total[name].A, A]) if name in total else A.clone(),
                torch.cat([total[name].B, B], dim=1) if name in total else B.clone(),
            )
            for name, (A, B) in residual.items()
        }
        self._residual = to_array_record(to_peft_state_dict(self._residual_total, like=like))
        self._residual_round = server_round

    def save_checkpoint(self, server_round: int, arrays: ArrayRecord) -> str:
        """Write ``checkpoint_dir/round-<server_round>`` (see the class docstring); its path.

        Atomic: everything goes to a temporary folder beside it, renamed when complete; an
        older folder of the same round is replaced. Cost: one write of the adapter twice (the
        peft folder and the exact arrays) plus FedEx-LoRA's residual.
        """
        if self.checkpoint_dir is None or self.checkpoint_like is None:
            raise ValueError("this strategy has no checkpoint_dir / checkpoint_like")
        os.makedirs(self.checkpoint_dir, exist_ok=True)
        final = os.path.join(self.checkpoint_dir, f"round-{server_round}")
        tmp = os.path.join(self.checkpoint_dir, f".round-{server_round}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        try:
            state_dict = from_array_record(arrays)
            if not self.spec.personalised:
                split = from_peft_state_dict(state_dict, adapter_name=self.adapter_name)
                update = (
                    split.factors
                    if self.scaling_folded
                    else fold_scaling(split.factors, self.checkpoint_like.scalings)
                )
                write_adapter(
                    os.path.join(tmp, _ADAPTER),
                    update,
                    like=self.checkpoint_like,
                    others=split.others,
                )
            _save_tensors(os.path.join(tmp, _ARRAYS), state_dict)
            if self._residual is not None:
                _save_tensors(os.path.join(tmp, _RESIDUAL), from_array_record(self._residual))
            state = {
                "round": server_round,
                "method": self.spec.name,
                "residual_round": self._residual_round,
            }
            with open(os.path.join(tmp, _STATE), "w") as f:
                json.dump(state, f, indent=1)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def restore(self, path: str | os.PathLike[str]) -> Checkpoint:
        """Read a checkpoint folder written by :meth:`save_checkpoint` into this strategy.

        Restores FedEx-LoRA's summed residual; returns the round and the global arrays to
        pass to :meth:`start` (``initial_arrays=c.arrays, first_round=c.round + 1``). Raises
        ``ValueError`` naming the folder when it is incomplete or from another method.
        """
        folder = os.fspath(path)
        try:
            with open(os.path.join(folder, _STATE)) as f:
                state = json.load(f)
            arrays = _load_tensors(os.path.join(folder, _ARRAYS))
        except (OSError, ValueError) as error:
            raise ValueError(f"{folder}: not a complete lorafair checkpoint ({error})") from None
        if state.get("method") != self.spec.name:
            raise ValueError(
                f"{folder}: a checkpoint of {state.get('method')!r}, not {self.spec.name!r}"
            )
        residual_file = os.path.join(folder, _RESIDUAL)
        if os.path.isfile(residual_file):
            residual = _load_tensors(residual_file)
            self._residual = to_array_record(residual)
            self._residual_round = int(state["residual_round"])
            self._residual_total = dict(
                from_peft_state_dict(residual, adapter_name=self.adapter_name).factors
            )
        return Checkpoint(folder, int(state["round"]), to_array_record(arrays))

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        *,
        first_round: int = 1,
    ) -> Result:
        """Flower's :meth:`Strategy.start` loop over rounds ``first_round … num_rounds``.

        The same steps as Flower 1.42's loop (train, aggregate, evaluate, central evaluation);
        ``first_round > 1`` resumes a run from a checkpoint (:meth:`restore`), with
        ``initial_arrays`` the checkpoint's arrays (centrally evaluated as round
        ``first_round - 1``).
        """
        if first_round < 1:
            raise ValueError(f"first_round must be >= 1, got {first_round}")
        log(
            INFO, "Starting %s strategy at round %s of %s:", self.spec.name, first_round, num_rounds
        )
        self.summary()
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        result = Result()
        t_start = time.time()
        if evaluate_fn:
            res = evaluate_fn(first_round - 1, initial_arrays)
            log(INFO, "Initial global evaluation results: %s", res)
            if res is not None:
                result.evaluate_metrics_serverapp[first_round - 1] = res
        arrays = initial_arrays
        result.arrays = arrays
        for current_round in range(first_round, num_rounds + 1):
            log(INFO, "")
            log(INFO, "[ROUND %s/%s]", current_round, num_rounds)
            train_replies = grid.send_and_receive(
                messages=self.configure_train(current_round, arrays, train_config, grid),
                timeout=timeout,
            )
            agg_arrays, agg_train_metrics = self.aggregate_train(current_round, train_replies)
            if agg_arrays is not None:
                result.arrays = agg_arrays
                arrays = agg_arrays
            if agg_train_metrics is not None:
                log(INFO, "\t└──> Aggregated MetricRecord: %s", agg_train_metrics)
                result.train_metrics_clientapp[current_round] = agg_train_metrics
            evaluate_replies = grid.send_and_receive(
                messages=self.configure_evaluate(current_round, arrays, evaluate_config, grid),
                timeout=timeout,
            )
            agg_evaluate_metrics = self.aggregate_evaluate(current_round, evaluate_replies)
            if agg_evaluate_metrics is not None:
                log(INFO, "\t└──> Aggregated MetricRecord: %s", agg_evaluate_metrics)
                result.evaluate_metrics_clientapp[current_round] = agg_evaluate_metrics
            if evaluate_fn:
                res = evaluate_fn(current_round, arrays)
                log(INFO, "\t└──> MetricRecord: %s", res)
                if res is not None:
                    result.evaluate_metrics_serverapp[current_round] = res
        log(INFO, "Strategy execution finished in %.2fs", time.time() - t_start)
        return result


_SAMPLES = 64
"""Slices of each array a reply's sample key reads (``_SAMPLE_BYTES`` each, evenly spaced)."""
_SAMPLE_BYTES = 64


def _content_key(msg: Message, *, whole: bool) -> bytes:
    """SHA-256 of a reply's array keys, dtypes, shapes, metrics and bytes: all of them
    (``whole``), or ``_SAMPLES`` evenly spaced slices of ``_SAMPLE_BYTES`` of each array."""
    digest = hashlib.sha256()
    for name, record in msg.content.array_records.items():
        digest.update(name.encode())
        for key, array in record.items():
            digest.update(f"{key}|{array.dtype}|{tuple(array.shape)}|{len(array.data)}|".encode())
            data = memoryview(array.data)
            step = len(data) // _SAMPLES
            if whole or step <= _SAMPLE_BYTES:
                digest.update(data)
            else:
                for i in range(_SAMPLES):
                    digest.update(data[i * step : i * step + _SAMPLE_BYTES])
    for metrics in msg.content.metric_records.values():
        digest.update(repr(sorted(metrics.items())).encode())
    return digest.digest()


def _content_sorted(messages: list[Message]) -> list[Message]:
    """The replies in an order that depends on their contents alone (not on who sent them or
    when): by the SHA-256 of a sample of each array's bytes, replies whose samples agree by the
    SHA-256 of all their bytes (then equal keys mean equal contents, in any order).

    Cost: 4 KiB hashed per array; all of a reply's bytes (about 1 GB/s) only where two
    samples agree, e.g. identical replies. Hashing every reply whole took over half of
    ``LoRAStrategy(fedit)``'s server time in a profile of ``python -m benchmarks.flower_round``
    (one Llama-3-8B block, K = 20), which now gives it below Flower's ``FedAvg``.
    """
    sampled = [_content_key(m, whole=False) for m in messages]
    shared = {k for k, n in Counter(sampled).items() if n > 1}
    keys = [
        (k, _content_key(m, whole=True) if k in shared else b"")
        for k, m in zip(sampled, messages, strict=True)
    ]
    order = sorted(range(len(messages)), key=keys.__getitem__)
    return [messages[i] for i in order]


def _add_bias_metrics(metrics: MetricRecord, reports: Mapping[str, Any]) -> None:
    cosines: Sequence[float] = [float(r.cosine) for r in reports.values()]
    errors = [float(r.relative_error) for r in reports.values()]
    for name, r in reports.items():
        metrics[f"bias-cosine/{name}"] = float(r.cosine)
    metrics["bias-cosine-min"] = min(cosines)
    metrics["bias-cosine-mean"] = math.fsum(cosines) / len(cosines)
    metrics["bias-relative-error-max"] = max(errors)

"""Boundary validation: each public entry point calls :func:`prepare` once; inner code trusts it."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lorafair.errors import (
    AdapterFormatError,
    DeviceMismatchError,
    DtypeMismatchError,
    EmptyClientsError,
    InvalidWeightsError,
    LayerKeyError,
    LoRAShapeError,
    NonFiniteError,
)
from lorafair.types import ClientFactors, LoRAFactors

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Layer:
    """One validated layer: the K clients' factors, all 2-D, finite, same dtype and device."""

    name: str
    As: tuple[Tensor, ...]
    Bs: tuple[Tensor, ...]

    @property
    def d_in(self) -> int:
        return int(self.As[0].shape[1])

    @property
    def d_out(self) -> int:
        return int(self.Bs[0].shape[0])

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(int(a.shape[0]) for a in self.As)

    @property
    def dtype(self) -> torch.dtype:
        return self.As[0].dtype

    @property
    def device(self) -> torch.device:
        return self.As[0].device

    @property
    def shape_key(self) -> tuple[object, ...]:
        """Layers with equal keys can be stacked and solved in one batched computation."""
        return (self.d_out, self.d_in, self.ranks, self.dtype, self.device)


@dataclass(frozen=True)
class Prepared:
    """Validated input: layers in the first client's key order and normalised weights."""

    layers: dict[str, Layer]
    weights: tuple[float, ...]

    @property
    def n_clients(self) -> int:
        return len(self.weights)


def normalise_weights(weights: Sequence[float] | None, n_clients: int) -> tuple[float, ...]:
    """Return ``p_k = w_k / Σ w_j`` as Python floats; ``None`` gives ``1 / K`` each.

    Weights are real numbers (Python or NumPy numbers, or a 1-D tensor), finite and ``≥ 0``,
    not all zero; text and booleans are refused. Where their sum overflows they are scaled by
    their largest first, so the result depends only on their ratios (``[1e308] * 3`` gives
    ``1/3`` each)."""
    if weights is None:
        return tuple(1.0 / n_clients for _ in range(n_clients))
    source: object = weights
    if isinstance(source, Tensor):  # accepted too: a 1-D tensor of weights
        source = source.detach().reshape(-1).cpu().tolist()
    try:
        items = list(source)  # type: ignore[call-overload]
    except TypeError:
        raise InvalidWeightsError(
            f"weights must be a sequence of numbers, got {type(source).__name__}"
        ) from None
    for k, w in enumerate(items):
        if isinstance(w, Tensor) and w.numel() == 1 and w.dtype != torch.bool:
            continue  # a one-element tensor of a number
        if isinstance(w, (str, bytes, bool)) or not isinstance(w, numbers.Real):
            raise InvalidWeightsError(
                f"weights must be a sequence of numbers; client {k}'s is {w!r} ({type(w).__name__})"
            )
    values = [float(w) for w in items]
    if len(values) != n_clients:
        raise InvalidWeightsError(f"got {len(values)} weights for {n_clients} clients")
    for k, w in enumerate(values):
        if not math.isfinite(w):
            raise InvalidWeightsError(f"weight of client {k} is {w}; weights must be finite")
        if w < 0:
            raise InvalidWeightsError(f"weight of client {k} is {w}; weights must be >= 0")
    top = max(values)
    if top <= 0:
        raise InvalidWeightsError("all weights are zero; at least one must be positive")
    try:
        total = math.fsum(values)
    except OverflowError:  # an intermediate sum of finite weights above the float range
        total = math.inf
    if math.isinf(total):  # scaled into [0, 1] first, the sum cannot overflow
        values = [w / top for w in values]
        total = math.fsum(values)
    return tuple(w / total for w in values)


def _as_pair(value: object, name: str, k: int) -> tuple[Tensor, Tensor]:
    if isinstance(value, Tensor) or not isinstance(value, Sequence) or len(value) != 2:
        raise LoRAShapeError(
            f"layer {name!r}: client {k} must give a pair (A, B) of tensors, "
            f"got {type(value).__name__}"
        )
    A, B = value[0], value[1]
    for label, t in (("A", A), ("B", B)):
        if not isinstance(t, Tensor):
            raise LoRAShapeError(
                f"layer {name!r}: client {k} has {label} of type {type(t).__name__}, "
                "expected a torch.Tensor"
            )
    return A, B


_PEFT_MARKERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")


def _reject_peft_state_dict(client: Mapping[str, object], k: int) -> None:
    """A peft state dict (``'….lora_A.weight' -> Tensor``) is the commonest wrong input."""
    for key, value in client.items():
        text = key if type(key) is str else str(key)
        if "lora_" not in text or not isinstance(value, Tensor):  # every marker has "lora_"
            continue
        parts = text.split(".")
        if any(m in parts for m in _PEFT_MARKERS):
            raise AdapterFormatError(
                f"client {k} looks like a peft state dict (key {str(key)!r} maps to a tensor); "
                "lorafair aggregators take layer -> (A, B) pairs: convert it with "
                "lorafair.interop.peft.from_peft_state_dict(state_dict).factors"
            )


EXCESS_RANK_HINT = "If this rank is on purpose, pass allow_excess_rank=True"
"""The end of the excess-rank error, which ``lorafair aggregate`` words as its own option."""


def _check_rank(name: str, k: int, A: Tensor, B: Tensor) -> None:
    r, d_in, d_out = int(A.shape[0]), int(A.shape[1]), int(B.shape[0])
    if r > d_in and r > d_out:
        raise LoRAShapeError(
            f"layer {name!r}: client {k} has A of shape {tuple(A.shape)} and B of shape "
            f"{tuple(B.shape)}: rank {r} exceeds both d_in = {d_in} and d_out = {d_out}. "
            "A and B look swapped: A must be (r, d_in) and B (d_out, r), as peft's "
            f"lora_A.weight and lora_B.weight. {EXCESS_RANK_HINT}"
        )


def _check_layer(
    name: str,
    As: list[Tensor],
    Bs: list[Tensor],
    *,
    equal_ranks: bool,
    allow_excess_rank: bool = False,
) -> None:
    A0, B0 = As[0], Bs[0]
    for k, (A, B) in enumerate(zip(As, Bs, strict=True)):
        for label, t in (("A", A), ("B", B)):
            if t.ndim != 2:
                raise LoRAShapeError(
                    f"layer {name!r}: client {k} has {label} of shape {tuple(t.shape)}; "
                    f"{label} must be 2-D ({'(r, d_in)' if label == 'A' else '(d_out, r)'})"
                )
            if t.dtype not in _FLOAT_DTYPES:
                raise DtypeMismatchError(
                    f"layer {name!r}: client {k} has {label} of dtype {t.dtype}; "
                    "expected float16, bfloat16, float32 or float64"
                )
            if t.dtype != A0.dtype:
                raise DtypeMismatchError(
                    f"layer {name!r}: client {k} has {label} of dtype {t.dtype} "
                    f"but client 0 has A of dtype {A0.dtype}"
                )
            if t.device != A0.device:
                raise DeviceMismatchError(
                    f"layer {name!r}: client {k} has {label} on {t.device} "
                    f"but client 0 has A on {A0.device}"
                )
            if t.device.type == "meta":
                raise DeviceMismatchError(
                    f"layer {name!r}: client {k} has {label} on the meta device, which holds "
                    "shapes but no values; load the weights before aggregating"
                )
        if A.shape[0] != B.shape[1]:
            raise LoRAShapeError(
                f"layer {name!r}: client {k} has A of shape {tuple(A.shape)} and B of shape "
                f"{tuple(B.shape)}; A.shape[0] (rank) must equal B.shape[1]"
            )
        if A.shape[0] == 0:
            raise LoRAShapeError(f"layer {name!r}: client {k} has rank 0")
        if A.shape[1] != A0.shape[1]:
            raise LoRAShapeError(
                f"layer {name!r}: client {k} has A of shape {tuple(A.shape)} but client 0 has "
                f"{tuple(A0.shape)} (d_in differs)"
            )
        if B.shape[0] != B0.shape[0]:
            raise LoRAShapeError(
                f"layer {name!r}: client {k} has B of shape {tuple(B.shape)} but client 0 has "
                f"{tuple(B0.shape)} (d_out differs)"
            )
        if not allow_excess_rank:
            _check_rank(name, k, A, B)
        if equal_ranks and A.shape[0] != A0.shape[0]:
            raise LoRAShapeError(
                f"layer {name!r}: client {k} has A of shape {tuple(A.shape)} but client 0 has "
                f"{tuple(A0.shape)}; this aggregator needs equal ranks"
            )


def _pairs(values: Sequence[object]) -> list[tuple[Tensor, Tensor]] | None:
    """The clients' ``(A, B)`` of one layer when every value is a tuple of two tensors (the
    common case, checked in one pass); ``None`` sends the layer to :func:`_as_pair`'s messages."""
    out = []
    for v in values:
        if not isinstance(v, tuple) or len(v) != 2:
            return None
        A, B = v
        if not isinstance(A, Tensor) or not isinstance(B, Tensor):
            return None
        out.append((A, B))
    return out


def _plain(t: Tensor) -> bool:
    """A factor taken as it is: contiguous and not requiring grad."""
    return not t.requires_grad and t.is_contiguous()


def _as_plain(t: Tensor) -> Tensor:
    """A factor as the aggregators take it: detached (a model's parameters: the server step is
    not differentiated, so no result carries an autograd graph; a view, no copy) and
    contiguous (a transposed or sliced factor is copied once, so every result is laid out,
    and computed to the bit, as for contiguous input, and can be saved as it is)."""
    return t.detach().contiguous()


def _layer_ok(
    As: Sequence[Tensor], Bs: Sequence[Tensor], *, equal_ranks: bool, allow_excess_rank: bool
) -> bool:
    """True only if :func:`_check_layer` would pass: the same conditions, read once per tensor
    (its shape, dtype and device), so that valid input costs a few attribute reads per factor.
    False sends the layer to :func:`_check_layer`, which names the first failure."""
    A0, B0 = As[0], Bs[0]
    dtype, device = A0.dtype, A0.device
    sa0, sb0 = A0.shape, B0.shape
    if dtype not in _FLOAT_DTYPES or len(sa0) != 2 or len(sb0) != 2 or device.type == "meta":
        return False
    r0, d_in = sa0
    d_out = sb0[0]
    for A, B in zip(As, Bs, strict=True):
        sa, sb = A.shape, B.shape
        if len(sa) != 2 or len(sb) != 2 or A.dtype != dtype or B.dtype != dtype:
            return False
        r = sa[0]
        if r == 0 or sb[1] != r or sa[1] != d_in or sb[0] != d_out:
            return False
        if (equal_ranks and r != r0) or (not allow_excess_rank and r > d_in and r > d_out):
            return False
        if A.device != device or B.device != device:
            return False
    return True


def raise_if_nonfinite(layers: Mapping[str, Layer]) -> None:
    """Raise :class:`NonFiniteError` naming the first layer/client/factor with NaN or Inf.

    One device-side reduction per factor and a single host sync for the whole input.
    """
    flags = []
    owners: list[tuple[str, int, str]] = []
    for name, layer in layers.items():
        for k, (A, B) in enumerate(zip(layer.As, layer.Bs, strict=True)):
            flags.append(torch.isfinite(A).all())
            owners.append((name, k, "A"))
            flags.append(torch.isfinite(B).all())
            owners.append((name, k, "B"))
    if not flags:
        return
    by_device: dict[torch.device, list[int]] = {}
    for i, f in enumerate(flags):
        by_device.setdefault(f.device, []).append(i)
    ok = [True] * len(flags)
    for idx in by_device.values():
        values = torch.stack([flags[i] for i in idx]).cpu().tolist()
        for i, v in zip(idx, values, strict=True):
            ok[i] = bool(v)
    for i, good in enumerate(ok):
        if not good:
            name, k, label = owners[i]
            raise NonFiniteError(f"layer {name!r}: client {k} has NaN or Inf in {label}")


def _listed(names: Sequence[str], noun: str, limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{noun}{'s' if len(names) > 1 else ''} {shown}{more}"


def same_keys(mappings: Sequence[Mapping[str, object]], *, noun: str) -> list[str]:
    """Client 0's keys, after checking every client has exactly them.

    The error names both sides of the first difference: the keys client k lacks and the keys
    it has that client 0 does not.
    """
    names = list(mappings[0].keys())
    reference = set(names)
    for k, m in enumerate(mappings[1:], start=1):
        keys = set(m.keys())
        if keys != reference:
            missing = [str(n) for n in names if n not in keys]
            extra = [str(n) for n in m if n not in reference]
            parts = []
            if missing:
                they = "them" if len(missing) > 1 else "it"
                parts.append(
                    f"client {k} is missing {_listed(missing, noun)} (client 0 has {they})"
                )
            if extra:
                parts.append(f"client {k} has {_listed(extra, noun)} that client 0 does not have")
            raise LayerKeyError("; ".join(parts))
    return names


def prepare(
    clients: Sequence[ClientFactors],
    weights: Sequence[float] | None,
    *,
    equal_ranks: bool,
    check_finite: bool = True,
    allow_excess_rank: bool = False,
) -> Prepared:
    """Validate clients and weights once at the API boundary.

    Checks: at least one client with at least one layer; every client has the same layer names
    (the first missing or extra one is named); each factor is a 2-D floating tensor, finite;
    within a layer all factors share dtype and device, ``A_k.shape[0] == B_k.shape[1]``, and
    ``d_in``/``d_out`` agree across clients (and ranks too when ``equal_ranks``); weights as in
    :func:`normalise_weights`; a rank above both ``d_in`` and ``d_out`` (almost always A and B
    swapped) unless ``allow_excess_rank``; no factor on the ``meta`` device (no values); a peft
    state dict passed as a client is named as such. Nothing is mutated; a factor that requires
    grad or is not contiguous is taken as :func:`_as_plain` makes it (a detached view; a
    contiguous copy), so no result carries an autograd graph or an input's strides.
    ``check_finite=False`` leaves the NaN/Inf check to a caller that gets it for free from its
    own arithmetic (and then calls :func:`raise_if_nonfinite` to name the culprit).
    """
    if isinstance(clients, Mapping):
        raise EmptyClientsError(
            "clients must be a sequence of per-client mappings, got a single mapping; "
            "wrap one client as [client]"
        )
    clients = list(clients)
    if not clients:
        raise EmptyClientsError("no clients to aggregate")
    for k, c in enumerate(clients):
        if not isinstance(c, Mapping):
            raise LayerKeyError(
                f"client {k} must be a mapping of layer name to (A, B), got {type(c).__name__}"
            )
        _reject_peft_state_dict(c, k)
    names = same_keys(clients, noun="layer")
    if not names:
        raise EmptyClientsError("client 0 has no layers")
    p = normalise_weights(weights, len(clients))
    layers: dict[str, Layer] = {}
    for name in names:
        values = [c[name] for c in clients]
        pairs = _pairs(values)
        if pairs is None:
            pairs = [_as_pair(v, name, k) for k, v in enumerate(values)]
        As = [a for a, _ in pairs]
        Bs = [b for _, b in pairs]
        if not _layer_ok(As, Bs, equal_ranks=equal_ranks, allow_excess_rank=allow_excess_rank):
            _check_layer(name, As, Bs, equal_ranks=equal_ranks, allow_excess_rank=allow_excess_rank)
        if not all(_plain(t) for t in As) or not all(_plain(t) for t in Bs):
            As, Bs = [_as_plain(a) for a in As], [_as_plain(b) for b in Bs]
        layers[name] = Layer(name, tuple(As), tuple(Bs))
    if check_finite:
        raise_if_nonfinite(layers)
    return Prepared(layers, p)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every narrower float is accumulated in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def weighted_sum(tensors: Sequence[Tensor], p: Sequence[float], dtype: torch.dtype) -> Tensor:
    """``Σ p_k T_k`` accumulated in ``dtype`` (a fresh tensor; inputs untouched)."""
    acc = tensors[0].to(dtype) * p[0]
    for t, w in zip(tensors[1:], p[1:], strict=True):
        acc.add_(t.to(dtype), alpha=w)
    return acc


def stacked(layer: Layer, p: Sequence[float], dtype: torch.dtype) -> LoRAFactors:
    """FLoRA's stacking: ``A_s = cat_k(p_k A_k)`` (Σr_k, d_in), ``B_s = cat_k(B_k)`` (d_out, Σr_k).

    ``B_s @ A_s = Σ p_k B_k A_k = ΔW`` exactly, so every factored identity for ΔW starts here.
    """
    A_s = torch.cat([a.to(dtype) * w for a, w in zip(layer.As, p, strict=True)], dim=0)
    B_s = torch.cat([b.to(dtype) for b in layer.Bs], dim=1)
    return LoRAFactors(A_s, B_s)


def stacked_batch(
    layers: Sequence[Layer], p: Sequence[float] | None, dtype: torch.dtype
) -> LoRAFactors:
    """:func:`stacked` for same-shaped layers at once: ``A_s`` (L, R, d_in), ``B_s`` (L, d_out, R).

    ``p=None`` gives the unweighted ``Â = cat_k A_k`` (no scaling pass). Filled in place, so the
    only allocation is the batch itself (no per-layer temporaries).
    """
    first = layers[0]
    total = sum(first.ranks)
    A_s = torch.empty(len(layers), total, first.d_in, dtype=dtype, device=first.device)
    B_s = torch.empty(len(layers), first.d_out, total, dtype=dtype, device=first.device)
    for i, layer in enumerate(layers):
        start = 0
        for k, (A, B) in enumerate(zip(layer.As, layer.Bs, strict=True)):
            stop = start + A.shape[0]
            A_s[i, start:stop].copy_(A)
            if p is not None:
                A_s[i, start:stop].mul_(p[k])
            B_s[i, :, start:stop].copy_(B)
            start = stop
    return LoRAFactors(A_s, B_s)


def packed(sizes: Sequence[int], budget: int) -> list[range]:
    """Consecutive items in batches of at most ``budget`` in all (greedy, in order; at least
    one item each, so one item above the budget is a batch of its own): their index ranges."""
    out: list[range] = []
    start, used = 0, 0
    for i, size in enumerate(sizes):
        if i > start and used + size > budget:
            out.append(range(start, i))
            start, used = i, 0
        used += size
    if start < len(sizes):
        out.append(range(start, len(sizes)))
    return out


def chunked(layers: Sequence[Layer], bytes_per_layer: int, budget: int) -> list[list[Layer]]:
    """Split same-shaped layers into batches whose working set stays within ``budget`` bytes.

    Batching amortises per-call overhead; bounding it keeps peak memory at a fixed budget
    instead of a multiple of all layers' factors (always at least one layer per batch).
    """
    return [list(layers[r.start : r.stop]) for r in packed([bytes_per_layer] * len(layers), budget)]


def group_by_shape(layers: Sequence[Layer]) -> list[list[Layer]]:
    """Group layers whose factors have identical shapes, dtype and device (first-seen order)."""
    groups: dict[tuple[object, ...], list[Layer]] = {}
    for layer in layers:
        groups.setdefault(layer.shape_key, []).append(layer)
    return list(groups.values())

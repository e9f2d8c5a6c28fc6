"""peft adapter state dicts <-> lorafair factors, by pure state-dict manipulation.

peft stores a LoRA ``nn.Linear`` adapter as two tensors per module: ``lora_A.weight`` of shape
(r, d_in) and ``lora_B.weight`` of shape (d_out, r) — exactly lorafair's ``(A, B)`` — and applies
``W0 + s · B @ A`` with ``s = lora_alpha / r`` (``lora_alpha / √r`` with ``use_rslora=True``).
Two key formats exist, and both are read:

* saved format, what ``peft.get_peft_model_state_dict`` returns and ``set_peft_model_state_dict``
  loads: ``base_model.model.fc1.lora_A.weight`` (the adapter name removed);
* module format, what ``model.state_dict()`` returns:
  ``base_model.model.fc1.lora_A.default.weight``.

The layer name is the module path before ``.lora_A`` / ``.lora_B``
(``base_model.model.fc1`` above), the same in both formats. Every other key (heads,
``modules_to_save``, biases, frozen base weights, other adapters, DoRA magnitudes) is returned
in :attr:`PeftSplit.others`, never dropped; :func:`fedavg_others` averages those.

Scaling. Aggregators see the factors as given. When clients' ranks or alphas differ, fold each
client's ``s`` into ``B`` first (:func:`fold_scaling`, so ``B @ A`` is the update the model
really applies) and divide the receiving model's ``s`` out of the result (:func:`unfold_scaling`).
FLoRA's stacked result has rank ``R = Σ r_k``: load it into a peft model built with ``r = R``
and any ``lora_alpha = α``, after ``unfold_scaling(result, lora_scaling(R, α))`` (or
``scalings_of(model)``); that model then applies exactly ``ΔW``.

Nothing in this module imports peft.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from lorafair._validate import normalise_weights, same_keys, weighted_sum
from lorafair.errors import (
    DtypeMismatchError,
    EmptyClientsError,
    LayerKeyError,
    LoRAFairError,
    LoRAShapeError,
    NonFiniteError,
)
from lorafair.types import LoRAFactors

__all__ = [
    "PeftSplit",
    "fedavg_others",
    "fold_scaling",
    "from_peft_state_dict",
    "lora_scaling",
    "scalings_of",
    "to_peft_state_dict",
    "unfold_scaling",
]

_FACTOR_NAMES = ("lora_A", "lora_B")


class PeftSplit(NamedTuple):
    """A peft state dict split into LoRA factors and everything else.

    ``factors``: layer name (module path) to ``LoRAFactors(A, B)``, in first-seen order; the
    tensors are those of the input (not copied). ``others``: every key that is not the named
    adapter's ``lora_A``/``lora_B`` weight, unchanged. ``adapter_name``: the adapter name found
    in the keys (module format), or ``None`` for the saved format.
    """

    factors: dict[str, LoRAFactors]
    others: dict[str, Tensor]
    adapter_name: str | None


class _Key(NamedTuple):
    layer: str
    which: Literal["A", "B"]
    adapter: str | None


def _parse(key: str, adapter_name: str) -> _Key | None:
    """``<layer>.lora_A.weight`` or ``<layer>.lora_A.<adapter_name>.weight``; else ``None``."""
    parts = key.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] in _FACTOR_NAMES:
            rest = parts[i + 1 :]
            which: Literal["A", "B"] = "A" if parts[i] == "lora_A" else "B"
            layer = ".".join(parts[:i])
            if rest == ["weight"]:
                return _Key(layer, which, None)
            if rest == [adapter_name, "weight"]:
                return _Key(layer, which, adapter_name)
            return None
    return None


def _key(layer: str, which: Literal["A", "B"], adapter: str | None) -> str:
    base = f"{layer}.lora_{which}" if layer else f"lora_{which}"
    return f"{base}.weight" if adapter is None else f"{base}.{adapter}.weight"


def from_peft_state_dict(
    state_dict: Mapping[str, Tensor], *, adapter_name: str = "default"
) -> PeftSplit:
    """Split a peft state dict into ``{layer: LoRAFactors(A, B)}`` and the other keys.

    Accepts the saved format (``<layer>.lora_A.weight``) and the module format
    (``<layer>.lora_A.<adapter_name>.weight``); a dict mixing the two is an error. Keys of
    other adapters go to ``others``. Each layer needs both factors, 2-D, with
    ``A.shape[0] == B.shape[1]`` (only ``nn.Linear``-style LoRA; peft's Conv and Embedding
    LoRA layers use other shapes and are rejected). Cost: one pass over the keys; no copies.

    >>> import torch
    >>> sd = {"m.fc.lora_A.weight": torch.zeros(2, 3), "m.fc.lora_B.weight": torch.zeros(4, 2),
    ...       "m.head.weight": torch.zeros(1, 4)}
    >>> split = from_peft_state_dict(sd)
    >>> list(split.factors), list(split.others), split.adapter_name
    (['m.fc'], ['m.head.weight'], None)
    """
    if not isinstance(state_dict, Mapping):
        raise LayerKeyError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    found: dict[str, dict[str, Tensor]] = {}
    others: dict[str, Tensor] = {}
    formats: dict[str | None, str] = {}
    for key, value in state_dict.items():
        parsed = _parse(str(key), adapter_name)
        if parsed is None:
            others[key] = value
            continue
        formats.setdefault(parsed.adapter, key)
        if not isinstance(value, Tensor):
            raise LoRAShapeError(f"key {key!r} holds a {type(value).__name__}, not a tensor")
        found.setdefault(parsed.layer, {})[parsed.which] = value
    if len(formats) > 1:
        raise LayerKeyError(
            f"state dict mixes key formats: {formats[None]!r} (saved, no adapter name) and "
            f"{formats[adapter_name]!r} (module format, adapter {adapter_name!r})"
        )
    factors: dict[str, LoRAFactors] = {}
    for layer, pair in found.items():
        for which, other in (("A", "B"), ("B", "A")):
            if which not in pair:
                raise LayerKeyError(f"layer {layer!r} has lora_{other} but no lora_{which}")
        A, B = pair["A"], pair["B"]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise LoRAShapeError(
                f"layer {layer!r}: lora_A of shape {tuple(A.shape)} and lora_B of shape "
                f"{tuple(B.shape)}; expected 2-D (r, d_in) and (d_out, r) (nn.Linear LoRA)"
            )
        factors[layer] = LoRAFactors(A, B)
    if not factors:
        raise LayerKeyError(
            f"no lora_A/lora_B weights found for adapter {adapter_name!r} (looked for "
            f"'<module>.lora_A.weight' and '<module>.lora_A.{adapter_name}.weight')"
        )
    adapter = next(iter(formats))
    return PeftSplit(factors, others, adapter)


def to_peft_state_dict(
    factors: Mapping[str, LoRAFactors | tuple[Tensor, Tensor]],
    *,
    like: Mapping[str, Tensor] | PeftSplit,
    others: Mapping[str, Tensor] | None = None,
    adapter_name: str = "default",
) -> dict[str, Tensor]:
    """Build a peft state dict holding ``factors``, in the key format and order of ``like``.

    ``like`` is a state dict (or its :class:`PeftSplit`) of the target adapter, e.g. a
    client's upload or ``get_peft_model_state_dict(model)``; its format (saved or module) is
    reproduced, so the result loads with ``set_peft_model_state_dict`` (saved format) or
    ``model.load_state_dict(..., strict=False)`` (module format). ``factors`` must have exactly
    ``like``'s layers (shapes may differ, e.g. FLoRA's rank Σ r_k); ``adapter_name`` is used to
    read a module-format ``like`` as in :func:`from_peft_state_dict`. ``others`` (optional) are
    placed at their position in ``like``, new keys after. Tensors are not copied, so
    ``to_peft_state_dict(s.factors, like=sd, others=s.others)`` with ``s =
    from_peft_state_dict(sd)`` returns ``sd``'s keys, order and tensors exactly.
    """
    split = like if isinstance(like, PeftSplit) else None
    if split is None:
        if not isinstance(like, Mapping):
            kind = type(like).__name__
            raise LayerKeyError(f"like must be a state dict or PeftSplit, got {kind}")
        order = list(like.keys())
        split = from_peft_state_dict(like, adapter_name=adapter_name)
    else:
        order = []
        for name in split.factors:
            order += [_key(name, "A", split.adapter_name), _key(name, "B", split.adapter_name)]
        order += list(split.others)
    missing = [n for n in split.factors if n not in factors]
    if missing:
        raise LayerKeyError(f"factors lack layer {missing[0]!r} that `like` has")
    extra = [n for n in factors if n not in split.factors]
    if extra:
        raise LayerKeyError(f"factors have layer {extra[0]!r} that `like` does not have")
    adapter = split.adapter_name
    by_key: dict[str, Tensor] = {}
    for name in split.factors:
        value = factors[name]
        if isinstance(value, Tensor) or not isinstance(value, Sequence) or len(value) != 2:
            raise LoRAShapeError(f"layer {name!r}: expected a pair (A, B)")
        by_key[_key(name, "A", adapter)] = value[0]
        by_key[_key(name, "B", adapter)] = value[1]
    out: dict[str, Tensor] = {}
    rest = dict(others) if others is not None else {}
    for key in order:
        if key in by_key:
            out[key] = by_key.pop(key)
        elif key in rest:
            out[key] = rest.pop(key)
    out.update(by_key)
    for key, tensor in rest.items():
        if key in out:
            raise LayerKeyError(f"key {key!r} of `others` collides with a LoRA factor key")
        out[key] = tensor
    return out


def fedavg_others(
    others: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float] | None = None,
    *,
    nonfloat: Literal["equal", "first"] = "equal",
) -> dict[str, Tensor]:
    """FedAvg of the non-LoRA tensors: ``T = Σ p_k T_k`` per key, ``p_k = w_k / Σ w_j``.

    Floating tensors are accumulated in float64 and returned in their dtype. Integer and bool
    tensors (e.g. BatchNorm's ``num_batches_tracked``) cannot be averaged: ``nonfloat="equal"``
    requires them equal across clients (else an error naming key and client), ``"first"``
    takes client 0's. Every client must have the same keys, shapes and dtypes; non-finite
    values are an error. Cost: O(K · numel) flops, one float64 buffer per key.
    """
    if nonfloat not in ("equal", "first"):
        raise LoRAFairError(f"nonfloat must be 'equal' or 'first', got {nonfloat!r}")
    if isinstance(others, Mapping):
        raise EmptyClientsError("others must be a sequence of per-client mappings")
    others = list(others)
    if not others:
        raise EmptyClientsError("no clients to average")
    p = normalise_weights(weights, len(others))
    names = same_keys(others, noun="key")
    out: dict[str, Tensor] = {}
    for name in names:
        ts = [o[name] for o in others]
        t0 = ts[0]
        for k, t in enumerate(ts):
            if not isinstance(t, Tensor):
                raise LoRAShapeError(f"key {name!r}: client {k} holds {type(t).__name__}")
            if t.shape != t0.shape:
                raise LoRAShapeError(
                    f"key {name!r}: client {k} has shape {tuple(t.shape)} but client 0 has "
                    f"{tuple(t0.shape)}"
                )
            if t.dtype != t0.dtype:
                raise DtypeMismatchError(
                    f"key {name!r}: client {k} has dtype {t.dtype} but client 0 has {t0.dtype}"
                )
        if t0.is_floating_point() or t0.is_complex():
            for k, t in enumerate(ts):
                if not bool(torch.isfinite(t).all()):
                    raise NonFiniteError(f"key {name!r}: client {k} has NaN or Inf")
            acc = torch.complex128 if t0.is_complex() else torch.float64
            out[name] = weighted_sum(ts, p, acc).to(t0.dtype)
        else:
            if nonfloat == "equal":
                for k, t in enumerate(ts[1:], start=1):
                    if not torch.equal(t, t0):
                        raise LoRAFairError(
                            f"key {name!r}: client {k} differs from client 0 and has dtype "
                            f"{t0.dtype}, which cannot be averaged; pass nonfloat='first' to "
                            "keep client 0's"
                        )
            out[name] = t0.clone()
    return out


def lora_scaling(rank: int, alpha: float, *, use_rslora: bool = False) -> float:
    """peft's LoRA scaling ``s``: ``alpha / rank``, or ``alpha / √rank`` with rsLoRA."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise LoRAFairError(f"rank must be a positive int, got {rank!r}")
    if not math.isfinite(alpha):
        raise LoRAFairError(f"alpha must be finite, got {alpha!r}")
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def _scaled(
    factors: Mapping[str, LoRAFactors | tuple[Tensor, Tensor]],
    scaling: float | Mapping[str, float],
    *,
    invert: bool,
) -> dict[str, LoRAFactors]:
    out: dict[str, LoRAFactors] = {}
    for name, value in factors.items():
        if isinstance(value, Tensor) or not isinstance(value, Sequence) or len(value) != 2:
            raise LoRAShapeError(f"layer {name!r}: expected a pair (A, B)")
        if isinstance(scaling, Mapping):
            if name not in scaling:
                raise LayerKeyError(f"no scaling given for layer {name!r}")
            s = float(scaling[name])
        else:
            s = float(scaling)
        if not math.isfinite(s) or (invert and s == 0.0):
            raise LoRAFairError(f"layer {name!r}: scaling {s} cannot be used here")
        A, B = value[0], value[1]
        out[name] = LoRAFactors(A, B / s if invert else B * s)
    return out


def fold_scaling(
    factors: Mapping[str, LoRAFactors | tuple[Tensor, Tensor]],
    scaling: float | Mapping[str, float],
) -> dict[str, LoRAFactors]:
    """Fold peft's scaling into B: ``(A, s·B)``, so that ``(s·B) @ A`` is the applied update.

    ``scaling`` is one ``s`` for every layer or a per-layer mapping (e.g. :func:`scalings_of`
    of the client's model, which honours ``rank_pattern``, ``alpha_pattern`` and rsLoRA).
    Do this on each client's factors before aggregating when ranks or alphas differ.
    Cost: one scaled copy of each B.
    """
    return _scaled(factors, scaling, invert=False)


def unfold_scaling(
    factors: Mapping[str, LoRAFactors | tuple[Tensor, Tensor]],
    scaling: float | Mapping[str, float],
) -> dict[str, LoRAFactors]:
    """Divide the receiving model's scaling out of B: ``(A, B / s)``, undoing :func:`fold_scaling`.

    With ``s`` the scaling of the peft model that will load the result (rank = the result's
    rank, e.g. ``Σ r_k`` after FLoRA), that model applies ``s · (B/s) @ A = B @ A`` exactly.
    """
    return _scaled(factors, scaling, invert=True)


def scalings_of(model: torch.nn.Module, *, adapter_name: str = "default") -> dict[str, float]:
    """Per-layer scaling ``s`` of a peft model's LoRA layers, keyed like its state dict.

    Reads each LoRA layer's ``scaling[adapter_name]`` (peft's own value, so ``rank_pattern``,
    ``alpha_pattern`` and ``use_rslora`` are honoured); duck-typed, peft is not imported. Layer
    names match :func:`from_peft_state_dict` on the same object's (``get_peft_model_``)state dict.
    """
    out: dict[str, float] = {}
    for name, module in model.named_modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, Mapping) and hasattr(module, "lora_A") and adapter_name in scaling:
            out[name] = float(scaling[adapter_name])
    if not out:
        raise LayerKeyError(f"model has no LoRA layers with adapter {adapter_name!r}")
    return out

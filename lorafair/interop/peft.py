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
``modules_to_save``, biases, frozen base weights, other adapters) is returned in
:attr:`PeftSplit.others`, never dropped; :func:`fedavg_others` averages those. Keys of LoRA
variants whose update is not ``s · B @ A`` (DoRA's ``lora_magnitude_vector``, embedding
LoRA's ``lora_embedding_A`` / ``lora_embedding_B``, LoRA biases ``lora_A.bias`` /
``lora_B.bias``, in either format and of any adapter) are refused by name, by
:func:`from_peft_state_dict`, :func:`fedavg_others` and :func:`read_adapter` alike, with the
same rule as ``lorafair aggregate``: averaging them would silently give a wrong model.

Scaling. Aggregators see the factors as given. When clients' ranks or alphas differ, fold each
client's ``s`` into ``B`` first (:func:`fold_scaling`, so ``B @ A`` is the update the model
really applies) and divide the receiving model's ``s`` out of the result (:func:`unfold_scaling`).
FLoRA's stacked result has rank ``R = Σ r_k``: load it into a peft model built with ``r = R``
and any ``lora_alpha = α``, after ``unfold_scaling(result, lora_scaling(R, α))`` (or
``scalings_of(model)``); that model then applies exactly ``ΔW``.

Folders. :func:`read_adapter` reads what ``save_pretrained`` writes (``adapter_config.json``
plus ``adapter_model.safetensors`` or ``.bin``) into a :class:`PeftAdapter`, with each layer's
scaling exactly as peft computes it; :func:`applied_factors` folds it into B; and
:func:`write_adapter` writes a result as a folder that ``PeftModel.from_pretrained`` loads and
that applies exactly the result's ``B @ A``, with ``r`` / ``rank_pattern`` / ``alpha_pattern``
fitted to its per-layer ranks and the input dtype kept. DoRA, embedding LoRA and LoRA biases
are refused by name (their updates are not ``s · B @ A``); ``modules_to_save`` copies are kept
in ``others``. Reading and writing ``.safetensors`` needs the ``safetensors`` package
(``pip install 'lorafair[peft]'``).

Nothing in this module imports peft.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from lorafair._validate import normalise_weights, same_keys, weighted_sum
from lorafair.errors import (
    AdapterFolderError,
    AdapterFormatError,
    DtypeMismatchError,
    EmptyClientsError,
    LayerKeyError,
    LoRAFairError,
    LoRAShapeError,
    NonFiniteError,
)
from lorafair.types import LoRAFactors

__all__ = [
    "AdapterFolderError",
    "PeftAdapter",
    "PeftSplit",
    "applied_factors",
    "fedavg_others",
    "fold_scaling",
    "from_peft_state_dict",
    "lora_scaling",
    "read_adapter",
    "scalings_of",
    "to_peft_state_dict",
    "unfold_scaling",
    "write_adapter",
]

_FACTOR_NAMES = ("lora_A", "lora_B")
# Key parts of LoRA variants whose update is not ``s · B @ A``, or that lorafair cannot aggregate.
_REFUSED_PARTS = {
    "lora_magnitude_vector": "DoRA magnitudes (use_dora=True): DoRA's update is not s·B@A",
    "lora_embedding_A": "embedding LoRA",
    "lora_embedding_B": "embedding LoRA",
}


def _unsupported(key: str) -> str | None:
    """What ``key`` is, if it belongs to a LoRA variant lorafair refuses; else ``None``.

    The one rule behind every refusal (:func:`from_peft_state_dict`, :func:`fedavg_others`,
    :func:`read_adapter` and ``lorafair aggregate``): a dotted part ``lora_magnitude_vector``
    (DoRA), ``lora_embedding_A`` / ``lora_embedding_B`` (embedding LoRA), or a key ending in
    ``bias`` below a ``lora_A`` / ``lora_B`` part (a LoRA bias). Saved keys
    (``m.lora_B.bias``) and module keys (``m.lora_B.default.bias``) of any adapter alike.
    """
    parts = str(key).split(".")
    for part in parts:
        if part in _REFUSED_PARTS:
            return _REFUSED_PARTS[part]
    if parts[-1] == "bias" and any(p in _FACTOR_NAMES for p in parts[:-1]):
        return "a LoRA bias (lora_bias=True)"
    return None


def _refuse_unsupported(key: str, where: str, error: type[LoRAFairError]) -> None:
    """Raise ``error`` naming ``key`` (after ``where``, e.g. ``"client 1: "``) if
    :func:`_unsupported` refuses it."""
    what = _unsupported(key)
    if what is not None:
        raise error(f"{where}key {key!r} is {what}; lorafair does not aggregate it")


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
    state_dict: Mapping[str, Tensor], *, adapter_name: str = "default", client: int | None = None
) -> PeftSplit:
    """Split a peft state dict into ``{layer: LoRAFactors(A, B)}`` and the other keys.

    Accepts the saved format (``<layer>.lora_A.weight``) and the module format
    (``<layer>.lora_A.<adapter_name>.weight``); a dict mixing the two is an error. Keys of
    other adapters go to ``others``. Each layer needs both factors, 2-D, with
    ``A.shape[0] == B.shape[1]`` (only ``nn.Linear``-style LoRA; peft's Conv and Embedding
    LoRA layers use other shapes and are rejected). Keys of DoRA (``lora_magnitude_vector``),
    embedding LoRA (``lora_embedding_A`` / ``lora_embedding_B``) and LoRA biases are refused
    with an :class:`~lorafair.errors.AdapterFormatError` naming the key, whichever adapter they
    belong to (the rule of ``lorafair aggregate``). ``client`` (optional) is named in every
    error, e.g. ``client 1: key '...'``. Cost: one pass over the keys; no copies.

    >>> import torch
    >>> sd = {"m.fc.lora_A.weight": torch.zeros(2, 3), "m.fc.lora_B.weight": torch.zeros(4, 2),
    ...       "m.head.weight": torch.zeros(1, 4)}
    >>> split = from_peft_state_dict(sd)
    >>> list(split.factors), list(split.others), split.adapter_name
    (['m.fc'], ['m.head.weight'], None)
    """
    who = "" if client is None else f"client {client}: "
    try:
        return _split(state_dict, adapter_name)
    except LoRAFairError as exc:
        if not who:
            raise
        raise type(exc)(f"{who}{exc}") from None


def _split(state_dict: Mapping[str, Tensor], adapter_name: str) -> PeftSplit:
    if not isinstance(state_dict, Mapping):
        raise LayerKeyError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    found: dict[str, dict[str, Tensor]] = {}
    others: dict[str, Tensor] = {}
    formats: dict[str | None, str] = {}
    for key, value in state_dict.items():
        _refuse_unsupported(str(key), "", AdapterFormatError)
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
    same_rank: bool = False,
) -> dict[str, Tensor]:
    """Build a peft state dict holding ``factors``, in the key format and order of ``like``.

    ``like`` is a state dict (or its :class:`PeftSplit`) of the target adapter, e.g. a
    client's upload or ``get_peft_model_state_dict(model)``; its format (saved or module) is
    reproduced, so the result loads with ``set_peft_model_state_dict`` (saved format) or
    ``model.load_state_dict(..., strict=False)`` (module format). ``factors`` must have exactly
    ``like``'s layers; ``adapter_name`` is used to read a module-format ``like`` as in
    :func:`from_peft_state_dict`. ``others`` (optional) are placed at their position in
    ``like``, new keys after.

    Shapes. Each ``factors[layer]`` must be a pair of 2-D tensors ``A`` (r, d_in) and ``B``
    (d_out, r) with ``like``'s ``d_in`` and ``d_out`` for that layer; otherwise a
    :class:`~lorafair.errors.LoRAShapeError` names the layer and both shapes. The rank ``r``
    may differ from ``like``'s by default, because ``like`` often only supplies the key layout:
    FLoRA's stacked rank ``Σ r_k``, FlexLoRA's or HetLoRA's ranks, a client truncating a larger
    global rank, or FedEx-LoRA's residual are all written against an adapter of another rank.
    Such a result loads only into a peft model built with that rank (``r`` /
    ``rank_pattern``); ``set_peft_model_state_dict`` of a model of ``like``'s rank fails with
    peft's "size mismatch". Pass ``same_rank=True`` to refuse a rank different from ``like``'s
    here instead (a :class:`~lorafair.errors.LoRAShapeError` naming the layer and both
    shapes) when the result must load into the model ``like`` was taken from. Tensors are not
    copied, so ``to_peft_state_dict(s.factors, like=sd, others=s.others)`` with
    ``s = from_peft_state_dict(sd)`` returns ``sd``'s keys, order and tensors exactly.
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
    for name, (A0, B0) in split.factors.items():
        value = factors[name]
        if isinstance(value, Tensor) or not isinstance(value, Sequence) or len(value) != 2:
            raise LoRAShapeError(f"layer {name!r}: expected a pair (A, B)")
        A, B = value[0], value[1]
        if not isinstance(A, Tensor) or not isinstance(B, Tensor) or A.ndim != 2 or B.ndim != 2:
            raise LoRAShapeError(f"layer {name!r}: A and B must be 2-D tensors")
        fits = A.shape[1] == A0.shape[1] and B.shape[0] == B0.shape[0]
        if not fits or A.shape[0] != B.shape[1] or (same_rank and A.shape[0] != A0.shape[0]):
            need = "(r, d_in) and (d_out, r)" if not same_rank else "the same shapes"
            raise LoRAShapeError(
                f"layer {name!r}: A {tuple(A.shape)} and B {tuple(B.shape)} do not fit `like`'s "
                f"A {tuple(A0.shape)} and B {tuple(B0.shape)} (expected {need} with d_out = "
                f"{B0.shape[0]}, d_in = {A0.shape[1]})"
            )
        by_key[_key(name, "A", adapter)] = A
        by_key[_key(name, "B", adapter)] = B
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
    values are an error. Keys of DoRA (``lora_magnitude_vector``), embedding LoRA
    (``lora_embedding_A`` / ``lora_embedding_B``) and LoRA biases are refused, as by
    :func:`from_peft_state_dict` and ``lorafair aggregate``: an
    :class:`~lorafair.errors.AdapterFormatError` naming the key and the first client that has
    it. Cost: O(K · numel) flops, one float64 buffer per key.
    """
    if nonfloat not in ("equal", "first"):
        raise LoRAFairError(f"nonfloat must be 'equal' or 'first', got {nonfloat!r}")
    if isinstance(others, Mapping):
        raise EmptyClientsError("others must be a sequence of per-client mappings")
    others = list(others)
    if not others:
        raise EmptyClientsError("no clients to average")
    for k, client in enumerate(others):
        if isinstance(client, Mapping):
            for key in client:
                _refuse_unsupported(str(key), f"client {k}: ", AdapterFormatError)
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


# --------------------------------------------------------------------------------------------
# Adapter folders, as peft's ``save_pretrained`` writes them.

_CONFIG_FILE = "adapter_config.json"
_SAFETENSORS_FILE = "adapter_model.safetensors"
_BIN_FILE = "adapter_model.bin"
_MODEL_PREFIX = "base_model.model."
# peft's LoraConfig defaults for the fields that set the scaling.
_DEFAULT_R = 8
_DEFAULT_ALPHA = 8


class PeftAdapter(NamedTuple):
    """One peft LoRA adapter folder, read without peft.

    ``path``: the folder; ``config``: ``adapter_config.json`` as loaded; ``factors``: layer
    (module path in the saved keys, e.g. ``base_model.model.model.layers.0.self_attn.q_proj``)
    to ``LoRAFactors(A, B)`` exactly as stored; ``scalings``: per layer, peft's ``s`` from ``r``,
    ``lora_alpha``, ``use_rslora``, ``rank_pattern`` and ``alpha_pattern``; ``others``: every
    other key, unchanged (``modules_to_save`` copies); ``dtype``: the factors' dtype.
    The model applies ``W0 + s · B @ A`` per layer; :func:`applied_factors` folds ``s`` into B.
    """

    path: str
    config: dict[str, Any]
    factors: dict[str, LoRAFactors]
    scalings: dict[str, float]
    others: dict[str, Tensor]
    dtype: torch.dtype


def _who(path: str | os.PathLike[str], client: int | None) -> str:
    return f"{os.fspath(path)}" if client is None else f"client {client} ({os.fspath(path)})"


def _module_key(layer: str) -> str:
    """The base model's module name of a saved layer: ``layer`` without ``base_model.model.``.

    peft matches ``rank_pattern`` / ``alpha_pattern`` against this name.
    """
    return layer[len(_MODEL_PREFIX) :] if layer.startswith(_MODEL_PREFIX) else layer


def _pattern_value(pattern: Mapping[str, Any], key: str, default: Any) -> Any:
    """peft's ``get_pattern_key``: the first pattern ``p`` with ``re.match(rf"(.*\\.)?({p})$")``."""
    for p in pattern:
        if re.match(rf"(.*\.)?({p})$", key):
            return pattern[p]
    return default


def _exact_pattern(layer: str) -> str:
    """A ``rank_pattern`` / ``alpha_pattern`` key that matches exactly the module of ``layer``.

    ``^`` plus the escaped module name: under peft's rule ``(.*\\.)?(key)$`` the anchor fails
    unless the optional prefix is empty, so no other module (e.g. ``x.<name>``) matches.
    """
    return "^" + re.escape(_module_key(layer))


class _RankAlpha(NamedTuple):
    rank: int
    alpha: float


def _rank_alpha(config: Mapping[str, Any], layer: str) -> _RankAlpha:
    key = _module_key(layer)
    rank = _pattern_value(config.get("rank_pattern") or {}, key, config.get("r", _DEFAULT_R))
    alpha = _pattern_value(
        config.get("alpha_pattern") or {}, key, config.get("lora_alpha", _DEFAULT_ALPHA)
    )
    return _RankAlpha(rank, alpha)


def _scaling(config: Mapping[str, Any], layer: str, where: str) -> tuple[int, float]:
    rank, alpha = _rank_alpha(config, layer)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise AdapterFolderError(f"{where}: layer {layer!r}: config gives rank {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise AdapterFolderError(f"{where}: layer {layer!r}: config gives lora_alpha {alpha!r}")
    return rank, lora_scaling(rank, float(alpha), use_rslora=bool(config.get("use_rslora")))


def _load_config(path: str, who: str) -> dict[str, Any]:
    file = os.path.join(path, _CONFIG_FILE)
    if not os.path.isdir(path):
        raise AdapterFolderError(f"{who}: not a folder")
    try:
        with open(file, encoding="utf-8") as fh:
            config = json.load(fh)
    except FileNotFoundError:
        raise AdapterFolderError(f"{who}: no {_CONFIG_FILE} in the folder") from None
    except (OSError, ValueError) as exc:
        raise AdapterFolderError(f"{who}: {file} cannot be read as JSON: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterFolderError(f"{who}: {file} is not a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterFolderError(f"{who}: {file} has peft_type {peft_type!r}; only LORA is read")
    for field, what in (("use_dora", "DoRA"), ("target_parameters", "LoRA on nn.Parameter")):
        if config.get(field):
            raise AdapterFolderError(
                f"{who}: {file} sets {field}={config[field]!r} ({what}): its update is not "
                "s·B@A of lora_A/lora_B, which is what lorafair aggregates"
            )
    return config


def _load_weights(path: str, who: str) -> tuple[str, dict[str, Tensor]]:
    safe = os.path.join(path, _SAFETENSORS_FILE)
    binary = os.path.join(path, _BIN_FILE)
    if os.path.isfile(safe):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise AdapterFolderError(
                f"{who}: reading {_SAFETENSORS_FILE} needs safetensors: "
                "pip install 'lorafair[peft]'"
            ) from None
        try:
            return safe, load_file(safe)
        except Exception as exc:  # safetensors raises its own error types on corrupt files
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise AdapterFolderError(
                f"{who}: {safe} cannot be read (truncated or corrupt?): {reason}"
            ) from None
    if os.path.isfile(binary):
        try:
            state = torch.load(binary, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle, zip and EOF errors alike
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise AdapterFolderError(
                f"{who}: {binary} cannot be read (truncated or corrupt?): {reason}"
            ) from None
        if not isinstance(state, dict):
            raise AdapterFolderError(f"{who}: {binary} does not hold a state dict")
        return binary, state
    raise AdapterFolderError(f"{who}: neither {_SAFETENSORS_FILE} nor {_BIN_FILE} in the folder")


def read_adapter(path: str | os.PathLike[str], *, client: int | None = None) -> PeftAdapter:
    """Read a peft LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``,
    or ``adapter_model.bin``) into factors and peft's per-layer scalings, without peft.

    Each layer's rank and alpha come from ``rank_pattern`` / ``alpha_pattern`` (first matching
    pattern, peft's ``(.*\\.)?(pattern)$`` rule on the base model's module name) or ``r`` /
    ``lora_alpha``; ``s = alpha / r`` (``alpha / √r`` with ``use_rslora``). Checked: the stored
    rank equals the config's, every factor is finite and all factors share one floating dtype.
    Refused, naming the key: DoRA magnitudes, embedding LoRA, LoRA biases (their updates are
    not ``s · B @ A``). Every error names the file, the layer and ``client`` (when given) and
    is an :class:`AdapterFolderError` or another :class:`~lorafair.errors.LoRAFairError`.
    Cost: one read of the file; no copies beyond safetensors' own load.
    """
    folder = os.fspath(path)
    who = _who(folder, client)
    config = _load_config(folder, who)
    file, state = _load_weights(folder, who)
    where = f"{who}: {file}"
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise AdapterFolderError(f"{where}: key {key!r} holds a {type(value).__name__}")
        _refuse_unsupported(str(key), f"{where}: ", AdapterFolderError)
    try:
        split = from_peft_state_dict(state)
    except LoRAFairError as exc:
        raise type(exc)(f"{where}: {exc}") from None
    dtypes = {f.A.dtype for f in split.factors.values()} | {
        f.B.dtype for f in split.factors.values()
    }
    first_layer = next(iter(split.factors))
    dtype = split.factors[first_layer].A.dtype
    scalings: dict[str, float] = {}
    for layer, (A, B) in split.factors.items():
        for label, t in (("lora_A", A), ("lora_B", B)):
            if not t.is_floating_point():
                raise DtypeMismatchError(f"{where}: layer {layer!r}: {label} has dtype {t.dtype}")
            if len(dtypes) > 1 and t.dtype != dtype:
                raise DtypeMismatchError(
                    f"{where}: layer {layer!r}: {label} has dtype {t.dtype} but layer "
                    f"{first_layer!r} has {dtype}"
                )
            if not bool(torch.isfinite(t).all()):
                raise NonFiniteError(f"{where}: layer {layer!r}: {label} has NaN or Inf")
        rank, s = _scaling(config, layer, where)
        if A.shape[0] != rank:
            raise LoRAShapeError(
                f"{where}: layer {layer!r}: lora_A has rank {A.shape[0]} but the config gives "
                f"rank {rank} (r / rank_pattern)"
            )
        scalings[layer] = s
    return PeftAdapter(folder, config, split.factors, scalings, split.others, dtype)


def applied_factors(adapter: PeftAdapter) -> dict[str, LoRAFactors]:
    """Factors whose ``B @ A`` is the update the model applies: ``(A, s · B)`` per layer.

    ``s · B`` is computed in float64 and rounded once to the adapter's dtype (exact when ``s``
    is a power of two, e.g. ``lora_alpha = 2r``). Cost: one scaled copy of each B.
    """
    return {
        name: LoRAFactors(A, (B.to(torch.float64) * adapter.scalings[name]).to(B.dtype))
        for name, (A, B) in adapter.factors.items()
    }


def _most_common(values: Sequence[Any]) -> Any:
    counts: dict[Any, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return max(counts, key=lambda v: counts[v])  # first seen wins a tie


def _plain(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _fitted_config(like: PeftAdapter, ranks: Mapping[str, int]) -> dict[str, Any]:
    """``like.config`` with ``r``, ``lora_alpha``, ``rank_pattern`` and ``alpha_pattern`` fitted
    to per-layer ``ranks``, every other field kept.

    Each layer keeps ``like``'s scaling ``s``: a layer whose rank is unchanged keeps its alpha;
    one of new rank ``R`` gets ``alpha = s · R`` (``s · √R`` with rsLoRA). ``r`` and
    ``lora_alpha`` are the most common values; the other layers are listed in the patterns
    under :func:`exact_pattern` keys (previous patterns are replaced).
    """
    rslora = bool(like.config.get("use_rslora"))
    target: dict[str, _RankAlpha] = {}
    for layer, R in ranks.items():
        old = _rank_alpha(like.config, layer)
        if old.rank == R:
            target[layer] = _RankAlpha(R, old.alpha)
        else:
            s = like.scalings[layer]
            target[layer] = _RankAlpha(R, _plain(s * (math.sqrt(R) if rslora else R)))
    r = _most_common([t.rank for t in target.values()])
    alpha = _most_common([t.alpha for t in target.values()])
    config = dict(like.config)
    config["r"] = r
    config["lora_alpha"] = alpha
    config["rank_pattern"] = {_exact_pattern(n): t.rank for n, t in target.items() if t.rank != r}
    config["alpha_pattern"] = {
        _exact_pattern(n): t.alpha for n, t in target.items() if t.alpha != alpha
    }
    return config


def _check_update(
    update: Mapping[str, LoRAFactors | tuple[Tensor, Tensor]], like: PeftAdapter
) -> dict[str, LoRAFactors]:
    if not isinstance(update, Mapping):
        raise LayerKeyError("update must be a mapping of layer name to (A, B)")
    missing = [n for n in like.factors if n not in update]
    if missing:
        raise LayerKeyError(f"update lacks layer {missing[0]!r} of {like.path}")
    extra = [n for n in update if n not in like.factors]
    if extra:
        raise LayerKeyError(f"update has layer {extra[0]!r} that {like.path} does not have")
    out: dict[str, LoRAFactors] = {}
    for name, (A0, B0) in like.factors.items():
        value = update[name]
        if isinstance(value, Tensor) or not isinstance(value, Sequence) or len(value) != 2:
            raise LoRAShapeError(f"layer {name!r}: expected a pair (A, B)")
        A, B = value[0], value[1]
        if not isinstance(A, Tensor) or not isinstance(B, Tensor) or A.ndim != 2 or B.ndim != 2:
            raise LoRAShapeError(f"layer {name!r}: A and B must be 2-D tensors")
        if A.shape[1] != A0.shape[1] or B.shape[0] != B0.shape[0] or A.shape[0] != B.shape[1]:
            raise LoRAShapeError(
                f"layer {name!r}: A {tuple(A.shape)} and B {tuple(B.shape)} do not fit "
                f"{like.path}'s layer (d_out, d_in) = ({B0.shape[0]}, {A0.shape[1]})"
            )
        if A.shape[0] < 1:
            raise LoRAShapeError(f"layer {name!r}: rank 0 cannot be written as a peft adapter")
        for label, t in (("A", A), ("B", B)):
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise NonFiniteError(f"layer {name!r}: {label} is not finite floating point")
        out[name] = LoRAFactors(A, B)
    return out


def _is_nonempty_dir(path: str) -> bool:
    if not os.path.isdir(path):
        return False
    with os.scandir(path) as entries:
        return any(True for _ in entries)


def _check_output_folder(
    path: str | os.PathLike[str], *, force: bool = False, hint: str = "pass force=True"
) -> None:
    """Raise :class:`AdapterFolderError` unless ``path`` may be written: absent, an empty
    folder, or (with ``force``) a folder to replace. A file in its place is always refused.
    ``hint``: how the caller's user replaces a folder (``lorafair aggregate``: ``--force``)."""
    folder = os.fspath(path)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise AdapterFolderError(f"{folder}: exists and is not a folder")
    if _is_nonempty_dir(folder) and not force:
        raise AdapterFolderError(f"{folder}: folder is not empty ({hint} to replace it)")


def _write_folder(
    path: str | os.PathLike[str],
    files: Mapping[str, Callable[[str], None]],
    *,
    force: bool = False,
) -> None:
    """Write a folder atomically: each ``files[name](file_path)`` writes one file (``name`` may
    hold ``/`` for a sub-folder) into a temporary
    folder beside ``path``, which then replaces ``path`` by rename. On any failure the temporary
    folder is removed and ``path`` is left as it was. Refuses a non-empty ``path`` unless
    ``force`` (then the old folder is replaced as a whole)."""
    folder = os.path.abspath(os.fspath(path))
    _check_output_folder(folder, force=force)
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.tmp-", dir=parent)
    try:
        for name, write in files.items():
            target = os.path.join(tmp, name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            write(target)
        if os.path.isdir(folder):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.old-", dir=parent)
            os.rmdir(old)
            os.rename(folder, old)
            try:
                os.rename(tmp, folder)
            except BaseException:
                os.rename(old, folder)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _adapter_files(
    update: Mapping[str, LoRAFactors | tuple[Tensor, Tensor]],
    *,
    like: PeftAdapter,
    others: Mapping[str, Tensor] | None = None,
) -> dict[str, Callable[[str], None]]:
    """The two files of :func:`write_adapter`, as writers for :func:`write_folder` (to add more
    files, e.g. FedEx-LoRA's residual, to the same atomic write). Validates ``update`` first."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise AdapterFolderError(
            "writing adapters needs safetensors: pip install 'lorafair[peft]'"
        ) from None
    checked = _check_update(update, like)
    config = _fitted_config(like, {n: A.shape[0] for n, (A, _) in checked.items()})
    state: dict[str, Tensor] = {}
    for name, (A, B) in checked.items():
        rank, s = _scaling(config, name, "written config")
        if rank != A.shape[0]:  # _fitted_config's patterns must reproduce the ranks
            raise LoRAFairError(
                f"layer {name!r}: fitted config gives rank {rank}, not {A.shape[0]}"
            )
        state[f"{name}.lora_A.weight"] = A.to(like.dtype).contiguous().clone()
        state[f"{name}.lora_B.weight"] = (B.to(torch.float64) / s).to(like.dtype).contiguous()
    rest = like.others if others is None else others
    for key, tensor in rest.items():
        if key in state:
            raise LayerKeyError(f"key {key!r} of `others` collides with a LoRA factor key")
        state[key] = tensor.contiguous().clone()

    def write_config(file: str) -> None:
        with open(file, "w", encoding="utf-8") as fh:
            json.dump(config, fh, indent=2, sort_keys=True)
            fh.write("\n")

    def write_weights(file: str) -> None:
        save_file(state, file, metadata={"format": "pt"})

    return {_CONFIG_FILE: write_config, _SAFETENSORS_FILE: write_weights}


def write_adapter(
    path: str | os.PathLike[str],
    update: Mapping[str, LoRAFactors | tuple[Tensor, Tensor]],
    *,
    like: PeftAdapter,
    others: Mapping[str, Tensor] | None = None,
    force: bool = False,
) -> None:
    """Write ``update`` as a peft adapter folder that ``PeftModel.from_pretrained`` loads and that
    applies exactly ``B @ A`` per layer.

    ``update[layer] = (A, B)``: ``B @ A`` is the update the loaded model must apply (scaling
    folded in, as :func:`applied_factors` gives), of any rank per layer, with ``like``'s layers
    and shapes. The config is ``like.config`` with ``r`` / ``lora_alpha`` / ``rank_pattern`` /
    ``alpha_pattern`` fitted by :func:`fitted_config` (each layer keeps ``like``'s scaling ``s``);
    ``adapter_model.safetensors`` holds ``A`` and ``B / s`` (divided in float64, rounded once to
    ``like.dtype``: bf16 stays bf16) under peft's saved keys, plus ``others`` (default:
    ``like.others``). Atomic (:func:`write_folder`); refuses a non-empty ``path`` unless
    ``force``. Cost: one float64 copy of each B, one write.
    """
    _check_output_folder(path, force=force)
    _write_folder(path, _adapter_files(update, like=like, others=others), force=force)

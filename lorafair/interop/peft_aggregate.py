"""Aggregate peft adapter folders with any registered method, and write the result as folders.

:func:`aggregate_adapters` takes the clients' :class:`~lorafair.interop.peft.PeftAdapter`\\ s
(from :func:`~lorafair.interop.peft.read_adapter`), checks that they describe the same
adapter, runs one method of :mod:`lorafair.registry` on their factors and returns the
updates the loaded models must apply; :func:`write_aggregated` writes them as folders that
``PeftModel.from_pretrained`` loads. ``lorafair aggregate`` is these two steps.

Rules, stated once:

* **Scaling.** peft applies ``s · B @ A``. When every client has the same ``s`` on every layer,
  the method runs on the stored factors (as a library user would call it) and ``s`` is applied
  to the result. When the scalings differ anywhere (ranks 2/4/8 under one ``lora_alpha``;
  different alphas; rsLoRA on some clients), each client's ``s_k`` is folded into its B first
  (``B_k ← s_k B_k``, computed in float64, rounded once to the stored dtype), so that the
  method aggregates the updates the clients' models really applied. The writer divides the
  output's scaling out again (:func:`~lorafair.interop.peft.write_adapter`).
* **dtype.** The method runs in the stored dtype, as the library does (float64 accumulation
  inside, result in the input dtype): bf16 in, bf16 out.
* **Configs.** Every ``adapter_config.json`` field must agree between clients except those that
  only set the scaling or the training run (``r``, ``lora_alpha``, ``rank_pattern``,
  ``alpha_pattern``, ``use_rslora``, ``lora_dropout``, ``init_lora_weights``,
  ``inference_mode``, ``peft_version``, ``runtime_config``); ``target_modules`` and
  ``modules_to_save`` compare as sets. The output folder takes client 0's config, with ranks
  and alphas fitted to the result.
* **Other keys.** ``modules_to_save`` copies (full trained weights) are FedAvg'd with the
  clients' weights, ``Σ p_k T_k`` in float64, for methods with one global adapter; a
  personalised method (FedSA-LoRA) leaves each client its own. Any other non-LoRA key is
  refused with an error naming it; DoRA, embedding LoRA and LoRA biases are refused by name
  with one rule shared with :func:`~lorafair.interop.peft.read_adapter`,
  :func:`~lorafair.interop.peft.from_peft_state_dict` and
  :func:`~lorafair.interop.peft.fedavg_others`.
* **What is written** (``AggregatorSpec.output``): one adapter folder (``adapters``);
  FedEx-LoRA's adapter folder plus ``fedex_residual.safetensors``, the residual to fold into
  the base weights (``adapters+residual``, see :data:`RESIDUAL_FILE`); FedSA-LoRA's one folder
  per client, ``client_<k>/`` (``per_client``).
"""

from __future__ import annotations

import inspect
import math
import os
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from lorafair import metrics, registry
from lorafair.aggregate import fedit
from lorafair.errors import (
    AdapterFolderError,
    DtypeMismatchError,
    EmptyClientsError,
    FrozenFactorMismatchError,
    LayerKeyError,
    LoRAFairError,
    LoRAShapeError,
)
from lorafair.interop.peft import (
    PeftAdapter,
    _adapter_files,
    _module_key,
    _refuse_unsupported,
    _write_folder,
    fedavg_others,
)
from lorafair.types import FedExResult, FedSAResult, LoRAFactors

__all__ = [
    "RESIDUAL_FILE",
    "WRITES",
    "AggregatedAdapters",
    "aggregate_adapters",
    "method_options",
    "parse_option",
    "write_aggregated",
]

RESIDUAL_FILE = "fedex_residual.safetensors"
"""FedEx-LoRA's residual, beside the adapter: keys ``<module>.residual_A`` (q, d_in) and
``<module>.residual_B`` (d_out, q), ``<module>`` the base model's module name
(``model.layers.0.self_attn.q_proj``). Fold it into the base weights before loading the
adapter: ``W ← W + residual_B @ residual_A`` (its transpose for ``fan_in_fan_out`` layers,
e.g. GPT-2's Conv1D). The scaling is already applied."""

WRITES: Mapping[registry.Output, str] = {
    "adapters": "one adapter folder",
    "adapters+residual": (
        f"one adapter folder plus {RESIDUAL_FILE} (ΔW − s·B̄Ā, to fold into the base weights)"
    ),
    "per_client": "one adapter folder per client, client_<k>/ (personalised: no global adapter)",
}
"""What ``lorafair aggregate`` writes for each kind of method output."""

# Fields that only set the scaling (folded) or describe the training run, not the adapter.
_FREE_FIELDS = frozenset(
    {
        "r",
        "lora_alpha",
        "rank_pattern",
        "alpha_pattern",
        "use_rslora",
        "lora_dropout",
        "init_lora_weights",
        "inference_mode",
        "peft_version",
        "runtime_config",
    }
)
_SET_FIELDS = frozenset({"target_modules", "modules_to_save"})


class AggregatedAdapters(NamedTuple):
    """The result of :func:`aggregate_adapters`, ready for :func:`write_aggregated`.

    ``adapters``: the updates the loaded models must apply (scaling folded into B), one dict
    for a global method, K for a personalised one; ``others``: the non-LoRA keys to write with
    each; ``residual``: FedEx-LoRA's applied residual (``B_res @ A_res`` to add to W0), else
    ``None``; ``cosine`` / ``fedit_cosine``: per layer ``cos(BA, ΔW)`` of the method's global
    update (``None`` when there is no global update) and of FedIT's (clients zero-padded to the
    largest rank where ranks differ, as LoRA-FAIR pads); ``folded``: whether the clients'
    scalings differed and were folded first.
    """

    method: str
    output: registry.Output
    adapters: tuple[dict[str, LoRAFactors], ...]
    others: tuple[dict[str, Tensor], ...]
    residual: dict[str, LoRAFactors] | None
    cosine: dict[str, float] | None
    fedit_cosine: dict[str, float] | None
    folded: bool


def _client_paths(message: str, adapters: Sequence[PeftAdapter]) -> str:
    """Name each ``client k`` of a library error by its folder too."""

    def named(match: re.Match[str]) -> str:
        k = int(match.group(1))
        if 0 <= k < len(adapters):
            return f"client {k} ({adapters[k].path})"
        return match.group(0)

    return re.sub(r"client (\d+)(?! \()", named, message)


def _canonical(field: str, value: Any) -> Any:
    if field in _SET_FIELDS and isinstance(value, list):
        return sorted(map(str, value))
    return value


def _check_configs(adapters: Sequence[PeftAdapter]) -> None:
    first = adapters[0]
    for k, adapter in enumerate(adapters[1:], start=1):
        for field in sorted((set(first.config) | set(adapter.config)) - _FREE_FIELDS):
            a = _canonical(field, first.config.get(field))
            b = _canonical(field, adapter.config.get(field))
            if a != b:
                raise AdapterFolderError(
                    f"client {k} ({adapter.path}) has {field}={adapter.config.get(field)!r} but "
                    f"client 0 ({first.path}) has {field}={first.config.get(field)!r}"
                )


def _check_layers(adapters: Sequence[PeftAdapter]) -> None:
    first = adapters[0]
    for k, adapter in enumerate(adapters[1:], start=1):
        who = f"client {k} ({adapter.path})"
        missing = [n for n in first.factors if n not in adapter.factors]
        if missing:
            raise LayerKeyError(f"{who}: layer {missing[0]!r} missing; client 0 has it")
        extra = [n for n in adapter.factors if n not in first.factors]
        if extra:
            raise LayerKeyError(f"{who}: layer {extra[0]!r} that client 0 does not have")
        if adapter.dtype != first.dtype:
            raise DtypeMismatchError(
                f"{who}: factors are {adapter.dtype} but client 0's ({first.path}) are "
                f"{first.dtype}"
            )
        for name, (A0, B0) in first.factors.items():
            A, B = adapter.factors[name]
            if A.shape[1] != A0.shape[1] or B.shape[0] != B0.shape[0]:
                raise LoRAShapeError(
                    f"{who}: layer {name!r}: (d_out, d_in) = ({B.shape[0]}, {A.shape[1]}) but "
                    f"client 0 ({first.path}) has ({B0.shape[0]}, {A0.shape[1]})"
                )


def _is_module_to_save(key: str, names: Sequence[str]) -> bool:
    module = _module_key(key).rsplit(".", 1)[0]
    return any(module == n or module.endswith("." + n) for n in names)


def _check_others(adapters: Sequence[PeftAdapter]) -> None:
    for k, adapter in enumerate(adapters):
        names = adapter.config.get("modules_to_save") or []
        for key in adapter.others:
            # DoRA, embedding LoRA, LoRA biases: the rule of read_adapter and fedavg_others
            _refuse_unsupported(str(key), f"client {k} ({adapter.path}): ", AdapterFolderError)
            if not _is_module_to_save(str(key), names):
                raise AdapterFolderError(
                    f"client {k} ({adapter.path}): key {key!r} is neither lora_A/lora_B nor a "
                    "modules_to_save weight; lorafair does not know how to aggregate it"
                )


def _scaled(factors: Mapping[str, LoRAFactors], s: Mapping[str, float]) -> dict[str, LoRAFactors]:
    """``(A, s·B)`` with ``s·B`` in float64 (kept: the writer divides in float64 too)."""
    return {n: LoRAFactors(A, B.to(torch.float64) * s[n]) for n, (A, B) in factors.items()}


def _folded(adapter: PeftAdapter) -> dict[str, LoRAFactors]:
    return {
        n: LoRAFactors(A, (B.to(torch.float64) * adapter.scalings[n]).to(B.dtype))
        for n, (A, B) in adapter.factors.items()
    }


def _zero_padded(clients: Sequence[Mapping[str, LoRAFactors]]) -> list[dict[str, LoRAFactors]]:
    """Every client's factors zero-padded to the layer's largest rank (ΔW is unchanged): the
    FedIT baseline of mixed ranks, as LoRA-FAIR and HetLoRA pad."""
    top = {n: max(c[n].A.shape[0] for c in clients) for n in clients[0]}
    out: list[dict[str, LoRAFactors]] = []
    for c in clients:
        padded: dict[str, LoRAFactors] = {}
        for n, (A, B) in c.items():
            extra = top[n] - A.shape[0]
            padded[n] = (
                LoRAFactors(
                    torch.cat([A, A.new_zeros(extra, A.shape[1])]),
                    torch.cat([B, B.new_zeros(B.shape[0], extra)], dim=1),
                )
                if extra
                else LoRAFactors(A, B)
            )
        out.append(padded)
    return out


def _cosines(
    clients: Sequence[Mapping[str, LoRAFactors]],
    update: Mapping[str, LoRAFactors],
    weights: Sequence[float] | None,
) -> dict[str, float]:
    report = metrics.aggregation_bias(clients, update, weights, allow_excess_rank=True)
    return {name: r.cosine for name, r in report.items()}


class _Written(NamedTuple):
    adapters: tuple[dict[str, LoRAFactors], ...]
    residual: dict[str, LoRAFactors] | None


def _one_adapter(result: Any, scalings: Sequence[Mapping[str, float]]) -> _Written:
    return _Written((_scaled(result, scalings[0]),), None)


def _adapter_and_residual(result: Any, scalings: Sequence[Mapping[str, float]]) -> _Written:
    fedex: FedExResult = result
    return _Written((_scaled(fedex.adapters, scalings[0]),), _scaled(fedex.residual, scalings[0]))


def _per_client(result: Any, scalings: Sequence[Mapping[str, float]]) -> _Written:
    personal: FedSAResult = result
    return _Written(
        tuple(_scaled(a, s) for a, s in zip(personal.adapters, scalings, strict=True)), None
    )


_OUTPUTS: Mapping[registry.Output, Callable[[Any, Sequence[Mapping[str, float]]], _Written]] = {
    "adapters": _one_adapter,
    "adapters+residual": _adapter_and_residual,
    "per_client": _per_client,
}
"""Per kind of method output: the applied updates (client k's scaling applied to its own
adapter; client 0's to a global one) and FedEx-LoRA's applied residual."""


def aggregate_adapters(
    adapters: Sequence[PeftAdapter],
    *,
    method: str,
    weights: Sequence[float] | None = None,
    options: Mapping[str, object] | None = None,
    report: bool = True,
) -> AggregatedAdapters:
    """Aggregate K peft adapters with the registered ``method``; the module docstring's rules.

    ``weights``: the clients' example counts (``None``: equal). ``options``: keyword options of
    the method, over its registry defaults. ``report``: also compute ``cos(BA, ΔW)`` of the
    result and of FedIT's (factored, float64; O((d_out + d_in)(r + R)²) per layer).
    Errors (:class:`~lorafair.errors.LoRAFairError`) name the client's folder, the layer and
    the field or key. Cost: the method's own, plus one scaled copy of each B.
    """
    adapters = list(adapters)
    if not adapters:
        raise EmptyClientsError("no adapters to aggregate")
    spec = registry.get(method)
    _check_configs(adapters)
    _check_layers(adapters)
    _check_others(adapters)
    layers = list(adapters[0].factors)
    folded = any(a.scalings[n] != adapters[0].scalings[n] for a in adapters for n in layers)
    clients = [_folded(a) if folded else dict(a.factors) for a in adapters]
    kwargs = {**spec.defaults, **(options or {})}
    try:
        result = spec.fn(clients, weights, **kwargs)
    except LoRAFairError as exc:
        hint = (
            f"{method} needs every client to share the frozen factor (trained with it frozen, "
            "from one initialisation): "
            if spec.shared_A and isinstance(exc, FrozenFactorMismatchError)
            else f"{method}: "
        )
        raise type(exc)(hint + _client_paths(str(exc), adapters)) from None
    scalings = [dict.fromkeys(layers, 1.0) if folded else a.scalings for a in adapters]
    written = _OUTPUTS[spec.output](result, scalings)
    if spec.personalised:  # each client keeps its own non-LoRA keys
        others = tuple(dict(a.others) for a in adapters)
    else:
        try:
            averaged = (
                fedavg_others([a.others for a in adapters], weights)
                if any(a.others for a in adapters)
                else {}
            )
        except LoRAFairError as exc:
            raise type(exc)(_client_paths(str(exc), adapters)) from None
        others = (averaged,)
    cosine = fedit_cosine = None
    if report:
        if spec.update_factors is not None:
            cosine = _cosines(clients, spec.update_factors(result), weights)
        if spec.name == "fedit":  # its own result is the baseline
            fedit_cosine = cosine
        else:  # the baseline of inputs the method accepted (a rank above d_in, d_out included)
            baseline = fedit(_zero_padded(clients), weights, allow_excess_rank=True)
            fedit_cosine = _cosines(clients, baseline, weights)
    return AggregatedAdapters(
        method,
        spec.output,
        written.adapters,
        others,
        written.residual,
        cosine,
        fedit_cosine,
        folded,
    )


def _residual_writer(
    residual: Mapping[str, LoRAFactors], dtype: torch.dtype
) -> Callable[[str], None]:
    from safetensors.torch import save_file

    state: dict[str, Tensor] = {}
    for name, (A, B) in residual.items():
        module = _module_key(name)
        state[f"{module}.residual_A"] = A.to(dtype).contiguous().clone()
        state[f"{module}.residual_B"] = B.to(dtype).contiguous().clone()

    def write(file: str) -> None:
        save_file(state, file, metadata={"format": "pt", "fold": "W += residual_B @ residual_A"})

    return write


def write_aggregated(
    path: str | os.PathLike[str],
    result: AggregatedAdapters,
    adapters: Sequence[PeftAdapter],
    *,
    force: bool = False,
) -> list[str]:
    """Write ``result`` under ``path`` in one atomic step; return the folders written.

    One adapter folder like client 0 (plus :data:`RESIDUAL_FILE` for FedEx-LoRA), or, for a
    personalised method, ``path/client_<k>/`` like client k. Nothing is written if any part
    fails; a non-empty ``path`` is refused unless ``force`` (then replaced as a whole).
    """
    files: dict[str, Callable[[str], None]] = {}
    folders: list[str] = []
    if result.output == "per_client":
        for k, (update, others) in enumerate(zip(result.adapters, result.others, strict=True)):
            sub = f"client_{k}"
            built = _adapter_files(update, like=adapters[k], others=others)
            files.update({f"{sub}/{name}": write for name, write in built.items()})
            folders.append(os.path.join(os.fspath(path), sub))
    else:
        files.update(_adapter_files(result.adapters[0], like=adapters[0], others=result.others[0]))
        if result.residual is not None:
            files[RESIDUAL_FILE] = _residual_writer(result.residual, adapters[0].dtype)
        folders.append(os.fspath(path))
    _write_folder(path, files, force=force)
    return folders


# --------------------------------------------------------------------------------------------
# Options from the command line: KEY=VALUE against the method's keyword-only parameters.


def _convert(text: str, annotation: Any) -> Any:
    """``text`` as a value of ``annotation``; ``ValueError`` if it is none of its forms."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union or type(annotation).__name__ == "UnionType":
        for member in typing.get_args(annotation):
            try:
                return _convert(text, member)
            except ValueError:
                continue
        raise ValueError(text)
    if origin is Literal:
        for choice in typing.get_args(annotation):
            if text == str(choice):
                return choice
        raise ValueError(text)
    if annotation is type(None):
        if text.lower() == "none":
            return None
        raise ValueError(text)
    if annotation is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ValueError(text)
    if annotation is int:
        return int(text)
    if annotation is float:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(text)
        return value
    if annotation is str:
        return text
    fields = getattr(annotation, "_fields", None)
    if isinstance(annotation, type) and fields:  # a NamedTuple such as EnergyThreshold
        parts = text.split(",")
        hints = typing.get_type_hints(annotation)
        if not 1 <= len(parts) <= len(fields):
            raise ValueError(text)
        return annotation(*(_convert(p, hints[f]) for p, f in zip(parts, fields, strict=False)))
    raise ValueError(text)


def _describe(annotation: Any) -> str:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Literal:
        return " | ".join(map(str, args))
    if args:
        return " | ".join(_describe(a) for a in args)
    fields = getattr(annotation, "_fields", None)
    if isinstance(annotation, type) and fields:
        return f"{annotation.__name__}({','.join(fields)})"
    return "none" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def method_options(method: str) -> dict[str, Any]:
    """The keyword-only options of ``method``'s function, name to type annotation."""
    fn = inspect.unwrap(registry.get(method).fn)
    hints = typing.get_type_hints(fn)
    return {
        name: hints.get(name, str)
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def parse_option(method: str, item: str) -> tuple[str, object]:
    """``KEY=VALUE`` as a keyword option of ``method``, typed from its annotation.

    ``rank=8`` (int), ``lam=0.01`` (float), ``trained=A`` (a ``Literal``), ``rank=0.99`` or
    ``rank=0.99,16`` (an ``EnergyThreshold(threshold, max_rank)``), ``rank=none``.
    :class:`~lorafair.errors.LoRAFairError` naming the option and the choices otherwise.
    """
    key, sep, text = item.partition("=")
    key = key.strip()
    options = method_options(method)
    if not sep or not key:
        raise LoRAFairError(f"option {item!r}: expected KEY=VALUE")
    if key not in options:
        known = ", ".join(options) or "none"
        raise LoRAFairError(f"method {method!r} has no option {key!r}; its options: {known}")
    try:
        return key, _convert(text.strip(), options[key])
    except (ValueError, TypeError):
        raise LoRAFairError(
            f"option {key}={text!r} of {method!r}: expected {_describe(options[key])}"
        ) from None

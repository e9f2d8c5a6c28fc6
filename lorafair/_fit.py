"""Private: one rule for a result that does not fit the output dtype.

Every aggregator computes in float64 (or in float32 for a float16/bfloat16 average) and returns
in the inputs' dtype. For finite input a result fits whenever each output entry is a convex
combination, or a weighted copy, of input entries (FedIT, FFA-LoRA, RoLoRA, FLoRA, HetLoRA,
FedSA-LoRA, FedEx-LoRA's adapters and its exact residual ``[B_s, B̄]·[A_s; −Ā]``). Where a
method re-factors the update, its factors can carry more magnitude than its inputs:

- where the method's contract leaves the scale free it already takes the representation that
  fits best, the balanced split ``B = U S^{1/2}``, ``A = S^{1/2} Vᵀ`` (FlexLoRA's default
  ``split="balanced"``, FedEx-LoRA's ``residual_rank=q``). Its entries are at most
  ``√σ_i``, so one exceeds the dtype's limit only where ``σ₁ > max²`` (4.3·10⁹ in float16);
  every rank-r factorisation ``B A = ΔW`` then has ``max|B|·max|A| ≥ σ₁ / (r √(d_in d_out))``,
  rarely within range, so the method raises rather than search for another split;
- where the contract fixes the scale (FedSVD's ``A' = Vᵀ`` with orthonormal rows, so
  ``B' = UΣ``; FlexLoRA's ``split="left"``; LoRA-FAIR's ``Ā`` kept and ``B̄ + ΔB`` corrected)
  the factor is what the method promises, and changing it would break the promise.

So the rule is the same for every method: a result that holds Inf or NaN for finite input
raises :class:`~lorafair.errors.DtypeOverflowError`, never returns silently. One exception,
declared per method (``fits_dtype(bounded=True)``): an average's exact value lies within the
dtype's range, so an Inf there is the rounding of a sum at the limit (``fl(p₁x + p₂x)`` can
exceed ``max`` for ``x = max``) and is clamped to ``±max``, within an ulp of the exact value.
:func:`fits_dtype` applies it to every public aggregator's return value: one sum per
output tensor and one host synchronisation per call (O(r (d_in + d_out)) per layer, against
the aggregators' own O(K r (d_in + d_out)) or more); only when a sum is not finite are the
tensors scanned one by one. To name the value that does not fit, the offending layer alone is
recomputed from the clients' factors cast to float64 (error path only).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import wraps
from typing import Any, NamedTuple, ParamSpec, TypeVar

import torch
from torch import Tensor

from lorafair._threads import torch_single_threaded
from lorafair.errors import DtypeOverflowError, LoRAFairError

__all__ = ["fits_dtype", "flag_sum"]

_P = ParamSpec("_P")
_T = TypeVar("_T")


class _Leaf(NamedTuple):
    """One output tensor and where it sits in the result (the keys that lead to it)."""

    path: tuple[str | int, ...]
    layer: str
    factor: str
    tensor: Tensor


def _leaves(
    value: object, path: tuple[str | int, ...] = (), layer: str = "", label: str = ""
) -> Iterator[_Leaf]:
    """Every tensor of a result, with its layer and a label such as ``"client 1's B"``."""
    if isinstance(value, Tensor):
        yield _Leaf(path, layer, label or "factor", value)
    elif isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple
        for field, item in zip(value._fields, value, strict=True):
            named = field if len(field) > 1 else f"{label} {field}".strip()
            yield from _leaves(item, (*path, field), layer, named)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _leaves(item, (*path, key), str(key), label)
    elif isinstance(value, (tuple, list)):
        for k, item in enumerate(value):
            yield from _leaves(item, (*path, k), layer, f"client {k}'s")


def _at(value: Any, path: Sequence[str | int]) -> Any:
    for key in path:
        value = (
            getattr(value, key)
            if isinstance(key, str) and hasattr(value, "_fields")
            else value[key]
        )
    return value


def _float64_value(
    fn: Callable[..., object], args: tuple[Any, ...], kwargs: dict[str, Any], leaf: _Leaf
) -> float | None:
    """Largest magnitude of the offending tensor, recomputed for its layer alone in float64."""
    clients = args[0] if args else kwargs.get("clients")
    if not isinstance(clients, Sequence):
        return None
    try:
        one = [{leaf.layer: tuple(t.double() for t in c[leaf.layer])} for c in clients]
        rest = {k: v for k, v in kwargs.items() if k != "clients"}
        out = fn(one, *args[1:], **rest)
        return float(_at(out, leaf.path).abs().max())
    except (LoRAFairError, RuntimeError, KeyError, TypeError, IndexError, AttributeError):
        return None


def _overflow(
    fn: Callable[..., object], args: tuple[Any, ...], kwargs: dict[str, Any], leaf: _Leaf
) -> DtypeOverflowError:
    dtype = leaf.tensor.dtype
    name = str(dtype).removeprefix("torch.")
    limit = float(torch.finfo(dtype).max)
    value = _float64_value(fn, args, kwargs, leaf)
    wider = (
        "float32" if value is None or value < float(torch.finfo(torch.float32).max) else "float64"
    )
    advice = f"aggregate in {wider} instead (cast every client's A and B with .to(torch.{wider}))"
    if dtype == torch.float64:
        advice = "float64 is the widest dtype: check the clients' factors (a diverged client?)"
    held = "a value beyond it" if value is None or value == math.inf else f"{value:.6g}"
    fit = "" if value is None or value >= limit else f" (it fits, but {name} arithmetic overflowed)"
    return DtypeOverflowError(
        f"layer {leaf.layer!r}: {fn.__name__}'s {leaf.factor} holds {held}{fit}, above "
        f"{name}'s largest finite value {limit:.6g}, so the result cannot be returned in {name}; "
        f"{advice}",
        layer=leaf.layer,
        factor=leaf.factor,
        value=value,
        dtype=dtype,
    )


def flag_sum(t: Tensor) -> Tensor:
    """A 0-d tensor that is finite whenever every entry of ``t`` is (and, but for an overflow
    of the sum, only then): one read of ``t``, no temporary.

    The native ``Σ t`` for every dtype but float16 (torch accumulates bfloat16 in float32 and
    rounds once, and bfloat16 has float32's range); for float16, whose sums overflow at 65504,
    ``max t − min t`` in float32 (one ``aminmax``: NaN propagates, ±Inf stays infinite, and
    finite halves never overflow it). Not ``t.sum(dtype=torch.float32)``: torch converts the
    whole tensor first, a float32 temporary twice the size of a bfloat16 factor (35 MiB for a
    Llama-3-70B MLP factor at R = 320) and 19 ms against 0.7 ms for the native sum, measured
    on one thread with ``python docs/scripts/flag_sums.py``."""
    if t.dtype == torch.float16:
        low, high = torch.aminmax(t)
        return high.float() - low.float()
    return t.sum()


@torch_single_threaded
def _sums(tensors: list[Tensor]) -> list[Tensor]:
    """:func:`flag_sum` of each, on one thread of torch's pool: the check runs after the
    aggregator's pinned call, where a 2-thread torch kernel right after OpenBLAS's threaded
    ``syrk`` waits for its spinning workers (in a profile of ``flexlora`` on one Llama-3-8B
    block under load, a quarter of the call)."""
    return [flag_sum(t) for t in tensors]


def fits_dtype(
    *, bounded: bool | Callable[[Mapping[str, Any]], bool] = False, copies: bool = False
) -> Callable[[Callable[_P, _T]], Callable[_P, _T]]:
    """Decorator: ``fn``'s result, or :class:`DtypeOverflowError` if a tensor of it is not finite.

    ``fn`` validates its input (finite), so a non-finite output means the result does not fit
    the output dtype. ``bounded`` (or ``bounded(kwargs)``) declares that every output entry is a
    convex combination, or a copy times a weight ``0 ≤ p ≤ 1``, of finite input entries: its
    exact value lies within the dtype's range, so an Inf can only be the rounding of a sum at
    the limit (``fl(p₁x + p₂x) > max`` for ``x = max``), and is clamped to ``±max`` (within an
    ulp of the exact value) instead of raising. Cost: one sum per output tensor and one host
    synchronisation; only when a sum is not finite (NaN/Inf, or a sum that overflows) are the
    tensors scanned one by one.

    ``copies`` declares that every output entry is one input entry times a weight
    ``0 ≤ p ≤ 1`` (FLoRA's stacks): ``|p x| ≤ |x|`` and rounding is monotonic, so the result
    is finite for finite input and nothing is checked (the function reads NaN/Inf off its own
    outputs to name the culprit). For FLoRA the check was a second read of an output as large
    as its input.
    """

    def decorate(fn: Callable[_P, _T]) -> Callable[_P, _T]:
        if copies:
            return fn

        @wraps(fn)
        def checked(*args: _P.args, **kwargs: _P.kwargs) -> _T:
            out = fn(*args, **kwargs)
            leaves = list(_leaves(out))
            if not leaves:
                return out
            sums = _sums([leaf.tensor for leaf in leaves])
            if len({t.dtype for t in sums}) > 1:
                sums = [t.double() for t in sums]
            if bool(torch.isfinite(torch.stack(sums)).all()):
                return out
            clamp = bounded(kwargs) if callable(bounded) else bounded
            for leaf in leaves:  # a sum may overflow with every entry finite
                if bool(torch.isfinite(leaf.tensor).all()):
                    continue
                if clamp and not bool(leaf.tensor.isnan().any()):
                    limit = float(torch.finfo(leaf.tensor.dtype).max)
                    leaf.tensor.clamp_(-limit, limit)  # a fresh output tensor of fn's
                    continue
                raise _overflow(fn, args, dict(kwargs), leaf)
            return out

        return checked

    return decorate

"""Private: client averages of many layers at once, with NaN/Inf detected from the results.

The cheap aggregators (FedIT, FFA-LoRA, FLoRA) are memory-bound: their floor is one read of every
input byte plus one write of the output. To stay near it they

- average each factor of every layer while its accumulator is in cache (one read of each input);
- detect NaN/Inf from what they compute anyway: in IEEE arithmetic ``Σ p_k T_k`` is non-finite
  whenever some ``T_k`` is (``0·Inf`` is NaN, so a zero weight does not hide one), so one
  reduction over the *output* (1/K of the input) replaces a pass over every input;
- synchronise with the host once per call (:func:`check`), and run the pass that names the
  layer and client (:func:`lorafair._validate.raise_if_nonfinite`) only when a flag is raised.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lorafair._threads import torch_pool_for
from lorafair._validate import Layer, accumulation_dtype, raise_if_nonfinite


def weighted_sums(items: Sequence[Sequence[Tensor]], p: Sequence[float]) -> list[Tensor]:
    """``[Σ_k p_k T_k for T in items]``, each accumulated in its accumulation dtype.

    ``items[i]`` holds the K tensors (one per client) of item i; the result ``i`` is a fresh
    tensor in ``items[i][0]``'s dtype. Item by item, so that the accumulator stays in cache while
    the K inputs stream past it once (client by client over all items would re-read it K times).

    Accuracy of the float32 accumulation (float32, float16, bfloat16 inputs): K − 1 sequential
    additions of products ``p_k T_k``, so each element is within ``γ_K Σ_k p_k |T_k|`` of the exact
    sum, ``γ_K = K u / (1 − K u)`` with u = 2⁻²⁴ (3.6·10⁻⁷ relative at K = 6, 6·10⁻⁶ at K = 100;
    typically ``√K u``); the inputs' own rounding is already ``u_in Σ_k p_k |T_k|``. float64
    inputs accumulate in float64. Measured on the ViT-B/16 cell: one kernel per input tensor is
    all this costs beyond the reads (``benchmarks/README.md``, "Floors"). Each item runs on
    the threads :func:`lorafair._threads.torch_pool_for` gives its bytes (the same bits: every
    element is summed in the same order on any number of threads).
    """
    out = []
    for ts in items:
        with torch_pool_for(item_bytes(ts)):  # the thread policy: the item's bytes its work
            acc = accumulate(ts, p)
            out.append(acc if acc.dtype == ts[0].dtype else acc.to(ts[0].dtype))
    return out


def accumulate(ts: Sequence[Tensor], p: Sequence[float]) -> Tensor:
    """``Σ_k p_k T_k`` of one item, a fresh tensor in its accumulation dtype (float32 for
    float32, float16 and bfloat16 inputs; float64 for float64): FedIT's average before it is
    rounded to the inputs' dtype. One kernel per input tensor, each reading it once (after the
    first, converted to the accumulator's dtype, a narrow input is converted inside its kernel,
    with no temporary); on the threads of the caller's torch pool (:func:`weighted_sums` sets
    them)."""
    acc = torch.mul(ts[0].to(accumulation_dtype(ts[0].dtype)), p[0])
    for t, w in zip(ts[1:], p[1:], strict=True):
        acc.add_(t, alpha=w)
    return acc


def item_bytes(ts: Sequence[Tensor]) -> int:
    """The input bytes of one item's K tensors (from the first: the K are alike)."""
    return ts[0].numel() * ts[0].element_size() * len(ts) if ts else 0


def nonfinite_flag(tensors: Sequence[Tensor]) -> list[Tensor]:
    """One 0-d bool tensor per device: True where some element of ``tensors`` is NaN or Inf.

    One read of ``tensors`` (their sums: NaN and Inf propagate, ``Inf − Inf`` is NaN; an overflow
    of finite values may raise a flag too, which only costs the naming pass). No host sync.
    """
    by_device: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t)
    return [~torch.isfinite(torch.stack([t.sum() for t in ts]).sum()) for ts in by_device.values()]


def check(
    flags: Sequence[Tensor], layers: Mapping[str, Layer], extra: Tensor | None = None
) -> list[bool]:
    """Bring ``flags`` (and ``extra``, flattened) to the host in one transfer; name any culprit.

    Raises :class:`lorafair.errors.NonFiniteError` naming the first layer, client and factor with
    NaN or Inf when a flag is set and some input is non-finite (a flag raised by an overflow of
    finite inputs leaves the result as computed, as a direct computation would). Returns
    ``extra``'s values (empty without it). One round trip when all are on one device.
    """
    device = flags[0].device  # layers on several devices (rare) cost one transfer each
    parts = [torch.stack([f.reshape(()).to(device) for f in flags]).any().reshape(1)]
    if extra is not None:
        parts.append(extra.reshape(-1).to(device=device, dtype=torch.bool))
    host = torch.cat(parts).cpu().tolist()
    if host[0]:
        raise_if_nonfinite(layers)
    return [bool(v) for v in host[1:]]

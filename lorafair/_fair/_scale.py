"""float64 input near its limits: LoRA-FAIR solved on factors scaled by powers of two.

The solvers form float64 Grams of the stacked factors (``A_s A_sᵀ``, ``B_sᵀ B_s``), which
overflow (or underflow to zero) when float64 factors hold entries beyond ``2^±128``; inputs of
float32's range never do. The problem is homogeneous under an exact rescaling: with
``A_k = 2^a Â_k`` and ``B_k = 2^b B̂_k`` for every client, ``ΔW``, ``B̄ Ā`` and the cosine
scale together, so with the residual on ``B`` the problem in ``ΔB = 2^b ΔB̂`` is the scaled
problem with ``λ̂ = λ 2^{c b}`` (``c = 1`` for ``norm="fro"``, ``2`` for ``"fro_squared"``), and
the answer is ``(2^a Â', 2^b B̂')`` (with the residual on ``A``, ``a`` and ``b`` swap roles). A
``λ̂`` beyond float64's range makes any nonzero residual infinitely costly: the answer is FedIT's
``(Ā, B̄)``. Such layers are solved one by one (a rare path); the others in one call as usual.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import torch
from torch import Tensor

from lorafair._fair._options import _Options
from lorafair._validate import Layer, prepare, weighted_sum
from lorafair.types import LoRAFactors

_FAR = 128
"""A layer is rescaled when its largest |A| or |B| entry lies outside ``[2^-128, 2^128]``."""

_MAX = float(torch.finfo(torch.float64).max)

_Solve = Callable[
    [Sequence[Mapping[str, LoRAFactors]], "Sequence[float] | None", _Options],
    dict[str, LoRAFactors],
]


def far_float64(clients: object) -> bool:
    """Whether some float64 factor has its largest entry outside ``[2^-128, 2^128]``.

    Looks only at well-formed ``layer -> (A, B)`` float64 tensors (anything else is left to
    validation); one ``amax`` per factor and one host synchronisation.
    """
    if not isinstance(clients, Sequence):
        return False
    tops = [
        t.detach().abs().amax()
        for c in clients
        if isinstance(c, Mapping)
        for pair in c.values()
        if isinstance(pair, tuple) and len(pair) == 2
        for t in pair
        if isinstance(t, Tensor) and t.dtype == torch.float64 and t.numel() > 0
    ]
    if not tops:
        return False
    e = torch.frexp(torch.stack([t.to(tops[0].device) for t in tops]))[1]
    nonzero = torch.stack(tops) > 0
    return bool(((e.abs() > _FAR) & nonzero).any())


def _exponent(ts: Sequence[Tensor]) -> int:
    top = float(torch.stack([t.abs().amax() for t in ts]).amax())
    return 0 if top == 0.0 or not math.isfinite(top) else math.frexp(top)[1]


def _below_max(t: Tensor, e: int) -> Tensor:
    """``t`` clamped so that ``t · 2^e`` stays within float64's range."""
    if e <= 0:
        return t
    bound = math.ldexp(_MAX, -e)
    return t.clamp(-bound, bound)


def _fedit(
    layer: Layer, As: Sequence[Tensor], Bs: Sequence[Tensor], p: Sequence[float]
) -> LoRAFactors:
    """FedIT's ``(Ā, B̄)`` of the scaled factors, zero-padded to the largest rank (``ΔB = 0``)."""
    r = max(layer.ranks)
    pad_A = [torch.cat([A, A.new_zeros(r - A.shape[0], A.shape[1])]) for A in As]
    pad_B = [torch.cat([B, B.new_zeros(B.shape[0], r - B.shape[1])], 1) for B in Bs]
    return LoRAFactors(weighted_sum(pad_A, p, torch.float64), weighted_sum(pad_B, p, torch.float64))


def solve_scaled(
    solve: _Solve,
    clients: Sequence[Mapping[str, LoRAFactors | tuple[Tensor, Tensor]]],
    weights: Sequence[float] | None,
    opts: _Options,
    allow_excess_rank: bool,
) -> dict[str, LoRAFactors]:
    """``solve`` per layer on factors scaled to a largest entry in ``[0.5, 1)``, scaled back.

    Where even the scaled problem leaves float64's range (clients whose updates differ by more
    than about 10^150, so that ``‖ΔW‖²`` or ``‖B̄Ā‖²`` underflows beside the other), the solve
    cannot evaluate the objective and no candidate can beat ``ΔB = 0``: FedIT's answer, as
    the solvers return whenever nothing beats it.
    """
    prep = prepare(clients, weights, equal_ranks=False, allow_excess_rank=allow_excess_rank)
    out: dict[str, LoRAFactors] = {}
    power = 2 if opts.norm == "fro_squared" else 1
    for name, layer in prep.layers.items():
        a, b = _exponent(layer.As), _exponent(layer.Bs)
        As = [torch.ldexp(A, torch.tensor(-a)) for A in layer.As]
        Bs = [torch.ldexp(B, torch.tensor(-b)) for B in layer.Bs]
        try:
            lam = math.ldexp(opts.lam, power * (b if opts.residual_on == "B" else a))
        except OverflowError:
            lam = math.inf  # every nonzero residual costs infinitely much: ΔB* = 0
        solved = None
        if math.isfinite(lam):
            scaled = [{name: LoRAFactors(A, B)} for A, B in zip(As, Bs, strict=True)]
            try:
                solved = solve(scaled, weights, replace(opts, lam=lam))[name]
            except RuntimeError:  # torch.linalg.LinAlgError: the scaled problem is out of reach
                solved = None
            if solved is not None and not all(bool(torch.isfinite(t).all()) for t in solved):
                solved = None
        if solved is None:
            A_hat, B_hat = _fedit(layer, As, Bs, prep.weights)
            # averages of entries ≤ max: an Inf after scaling back is the rounding at the limit
            A_hat, B_hat = _below_max(A_hat, a), _below_max(B_hat, b)
        else:
            A_hat, B_hat = solved
        out[name] = LoRAFactors(
            torch.ldexp(A_hat, torch.tensor(a)).to(layer.dtype),
            torch.ldexp(B_hat, torch.tensor(b)).to(layer.dtype),
        )
    return out

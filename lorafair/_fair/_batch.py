"""Private: the same-shape batch of layers: stacks, Grams, ``P_u @ coef``, the output.

Same-shaped layers travel together as one :class:`_Group` (a leading dimension ``L``). Every
product with the clients' stacked factors (the two ``R × R`` Grams, ``P_u @ coef``, the
corrected factor returned in the inputs' dtype, and how that dtype rounds it) is computed here.
On CPU the Grams and ``P_u @ coef`` go through :mod:`lorafair._stacks` (float64 column blocks
for the Grams, one client's factor at a time for the products, one single-thread kernel per
worker); elsewhere one layer at a time through torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from lorafair import _linalg, _stacks
from lorafair._average import accumulate, item_bytes
from lorafair._fair import _tolerances as _tol
from lorafair._fair._options import _Options
from lorafair._threads import torch_pool_for
from lorafair._validate import Layer

_F64 = torch.float64


@dataclass
class _Group:
    """Same-shaped layers batched along a leading dimension ``L`` (R = Σ r_k).

    The float64 stacks ``A_u`` (L, R, d_in) and ``B_s`` (L, d_out, R) are built on first use;
    the Gram and product paths never build them (they convert column blocks, or one client's
    factor, into reused buffers, see :func:`_grams`).
    """

    layers: list[Layer]
    p: Sequence[float]
    pw: Tensor  # (R,) float64, p_k on client k's rows: ΔW = B_s diag(pw) A_u
    E: Tensor  # (R, r) float64, block k = p_k I (zero-padded to r): Ā = Eᵀ A_u, B̄ = B_s E

    @property
    def names(self) -> list[str]:
        return [ly.name for ly in self.layers]

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].dtype

    @property
    def device(self) -> torch.device:
        return self.layers[0].device

    @property
    def n(self) -> int:
        return len(self.layers)

    @property
    def r(self) -> int:
        return int(self.E.shape[-1])

    @cached_property
    def A_u(self) -> Tensor:
        """(L, R, d_in) float64, the clients' ``A_k`` stacked (unweighted)."""
        first = self.layers[0]
        out = torch.empty(self.n, sum(first.ranks), first.d_in, dtype=_F64, device=self.device)
        for i, layer in enumerate(self.layers):
            torch.cat(layer.As, dim=0, out=out[i])
        return out

    @cached_property
    def B_s(self) -> Tensor:
        """(L, d_out, R) float64, the clients' ``B_k`` side by side."""
        first = self.layers[0]
        out = torch.empty(self.n, first.d_out, sum(first.ranks), dtype=_F64, device=self.device)
        for i, layer in enumerate(self.layers):
            torch.cat(layer.Bs, dim=1, out=out[i])
        return out

    @cached_property
    def A_s(self) -> Tensor:
        """(L, R, d_in) float64, rows ``p_k A_k`` (so ``ΔW = B_s A_s``)."""
        return self.A_u * self.pw[:, None]

    @cached_property
    def Abar(self) -> Tensor:
        """(L, r, d_in) float64 ``Ā``."""
        return self.E.mT @ self.A_u

    @cached_property
    def Bbar(self) -> Tensor:
        """(L, d_out, r) float64 ``B̄``."""
        return self.B_s @ self.E

    @cached_property
    def A_acc(self) -> Tensor:
        """(L, r, d_in) FedIT's ``Ā`` in the accumulation dtype, exactly as :func:`fedit` sums."""
        return torch.stack(_layer_sums(self, lambda ly: [_pad_rows(a, self.r) for a in ly.As]))

    @cached_property
    def B_acc(self) -> Tensor:
        """(L, d_out, r) FedIT's ``B̄`` in the accumulation dtype, exactly as :func:`fedit` sums."""
        return torch.stack(
            _layer_sums(self, lambda ly: [_pad_rows(b.mT, self.r).mT for b in ly.Bs])
        )


def _layer_sums(grp: _Group, factors: Callable[[Layer], list[Tensor]]) -> list[Tensor]:
    """Each layer's FedIT sum of ``factors(layer)`` in the accumulation dtype, by FedIT's own
    code (:func:`lorafair._average.accumulate`: the same bits as :func:`fedit`), on the
    threads the thread policy gives its input bytes (:func:`lorafair._threads.torch_pool_for`;
    the same bits on any number)."""
    out = []
    for ly in grp.layers:
        ts = factors(ly)
        with torch_pool_for(item_bytes(ts)):
            out.append(accumulate(ts, grp.p))
    return out


def _pad_rows(t: Tensor, r: int) -> Tensor:
    return (
        t
        if t.shape[-2] == r
        else torch.cat([t, t.new_zeros(*t.shape[:-2], r - t.shape[-2], t.shape[-1])], dim=-2)
    )


def _build_group(layers: list[Layer], p: Sequence[float]) -> _Group:
    """Same-shaped layers as one group; the weights live in the small ``pw`` and ``E``."""
    ranks = layers[0].ranks
    r = max(ranks)
    pw = torch.cat([torch.full((rk,), w, dtype=_F64) for rk, w in zip(ranks, p, strict=True)])
    E = torch.zeros(sum(ranks), r, dtype=_F64)
    start = 0
    for rk, w in zip(ranks, p, strict=True):
        E[start : start + rk, :rk] = w * torch.eye(rk, dtype=_F64)
        start += rk
    dev = layers[0].device
    return _Group(list(layers), p, pw.to(dev), E.to(dev))


def _stacked_layer(layer: Layer, side: Literal["A", "B"], buf: Tensor) -> Tensor:
    """One layer's ``A_u`` (R, d_in) or ``B_s`` (d_out, R) converted into the float64 ``buf``."""
    if side == "A":
        return torch.cat(layer.As, dim=0, out=buf)
    return torch.cat(layer.Bs, dim=1, out=buf)


def _grams(groups: Sequence[_Group]) -> list[tuple[Tensor, Tensor]]:
    """Every group's ``M_A = A_u A_uᵀ`` and ``M_B = B_sᵀ B_s`` (L, R, R), float64.

    On the CPU from :func:`lorafair._stacks.grams`: every group's layers in one list of
    one-thread ``syrk`` side by side, each layer's stacks cast into a worker's small float64
    buffer in column blocks, never a float64 copy of a whole stack. Elsewhere torch's products,
    one layer at a time through a reused buffer. Cost: ``(d_in + d_out) R²`` flops per layer.
    """
    host = iter(_stacks.grams([grp.layers for grp in groups if grp.device.type == "cpu"]))
    return [next(host) if grp.device.type == "cpu" else _device_grams(grp) for grp in groups]


def _device_grams(grp: _Group) -> tuple[Tensor, Tensor]:
    """:func:`_grams` for one group off the CPU: torch products, one layer at a time."""
    first = grp.layers[0]
    R = sum(first.ranks)
    buf_a = torch.empty(R, first.d_in, dtype=_F64, device=grp.device)
    buf_b = torch.empty(first.d_out, R, dtype=_F64, device=grp.device)
    M_A = torch.empty(grp.n, R, R, dtype=_F64, device=grp.device)
    M_B = torch.empty(grp.n, R, R, dtype=_F64, device=grp.device)
    for i, layer in enumerate(grp.layers):
        a = _stacked_layer(layer, "A", buf_a)
        b = _stacked_layer(layer, "B", buf_b)
        torch.matmul(a, a.mT, out=M_A[i])
        torch.matmul(b.mT, b, out=M_B[i])
    return M_A, M_B


class _Times(NamedTuple):
    """One group's share of :func:`_products`: ``P_u @ coef`` for the layers ``rows``."""

    grp: _Group
    coef: Tensor  # (L, R, r) float64, one per layer of the group
    rows: list[int]  # the layers to compute, in order


def _p_times(grp: _Group, opts: _Options, coef: Tensor) -> Tensor:
    """``P_u @ coef`` (L, d, r) float64 for every layer of one group (see :func:`_products`)."""
    return _products([_Times(grp, coef, list(range(grp.n)))], opts)[0]


def _products(jobs: Sequence[_Times], opts: _Options) -> list[Tensor]:
    """``P_u @ coef`` (len(rows), d, r) float64 for the corrected side ``P_u`` (see
    :func:`_flat_sides`), per job.

    From the float64 stacks when they exist (float64 inputs); on the CPU from
    :func:`lorafair._stacks.products` (all the jobs' layers side by side, as in :func:`_grams`);
    elsewhere one layer at a time through a reused buffer. Computed as ``(coefᵀ P_uᵀ)ᵀ``: BLAS
    runs the tall-skinny product about twice as fast with the long dimension last. Cost:
    ``2 d R r`` flops and one float64 cast-copy of ``P_u`` per layer.
    """
    side: Literal["A", "B"] = "B" if opts.residual_on == "B" else "A"
    out: list[Tensor] = []
    items: list[_stacks.Product] = []
    for job in jobs:
        grp, coef, rows = job.grp, job.coef, job.rows
        if grp.dtype == _F64:
            P_u = _flat_sides(grp, opts)[0][rows]
            out.append((coef[rows].mT @ P_u.mT).mT)
            continue
        if grp.device.type != "cpu":
            out.append(_device_products(job, side))
            continue
        coef_t = coef.mT.numpy()
        out_np = np.empty((len(rows), grp.r, _stacks.width(grp.layers[0], side)))
        items += [
            _stacks.Product(grp.layers[i], side, coef_t[i], out_np[j]) for j, i in enumerate(rows)
        ]
        out.append(torch.from_numpy(out_np).mT)
    _stacks.products(items)
    return out


def _device_products(job: _Times, side: Literal["A", "B"]) -> Tensor:
    """:func:`_products` for one group off the CPU: torch products, one layer at a time."""
    grp, coef, rows = job.grp, job.coef, job.rows
    first = grp.layers[0]
    R = sum(first.ranks)
    d = first.d_out if side == "B" else first.d_in
    out = torch.empty(len(rows), grp.r, d, dtype=_F64, device=grp.device)
    if side == "B":
        buf = torch.empty(first.d_out, R, dtype=_F64, device=grp.device)
        for j, i in enumerate(rows):
            torch.matmul(coef[i].mT, _stacked_layer(grp.layers[i], "B", buf).mT, out=out[j])
    else:
        buf = torch.empty(R, first.d_in, dtype=_F64, device=grp.device)
        for j, i in enumerate(rows):
            torch.matmul(coef[i].mT, _stacked_layer(grp.layers[i], "A", buf), out=out[j])
    return out.mT


class _Residuals(NamedTuple):
    """A group's residuals: ``ΔP = P_u coef`` (flat) plus ``extra`` (explicit, float64, in the
    corrected factor's own orientation: (L, d_out, r) for ΔB, (L, r, d_in) for ΔA)."""

    objective: Tensor  # (L,)
    cosine: Tensor  # (L,)
    iterations: Tensor  # (L,)
    converged: Tensor  # (L,)
    coef: Tensor | None = None  # (L, R, r)
    extra: Tensor | None = None


def _orient(t: Tensor, opts: _Options) -> Tensor:
    """From the corrected factor ``P`` (d × r) orientation to ``ΔB`` (as is) or ``ΔA`` (``Pᵀ``)."""
    return t if opts.residual_on == "B" else t.mT


def _delta(grp: _Group, sol: _Residuals, opts: _Options) -> Tensor:
    """The explicit residual (L, …) in float64 (one ``(d × R)(R × r)`` GEMM per layer)."""
    parts = []
    if sol.coef is not None:
        parts.append(_orient(_p_times(grp, opts, sol.coef), opts))
    if sol.extra is not None:
        parts.append(sol.extra)
    return parts[0] if len(parts) == 1 else parts[0] + parts[1]


def _corrected(
    groups: Sequence[_Group], solved: Sequence[_Residuals], opts: _Options
) -> list[Tensor]:
    """Each group's corrected factor (``B̄ + ΔB`` or ``Ā + ΔA``, L layers) in the inputs' dtype.

    Flat: one float64 GEMM ``P_u (E + coef)`` per layer, rounded once (all the groups' layers
    in one :func:`_products`). Layers whose residual is exactly zero return FedIT's factor bit
    for bit, without the GEMM.
    """
    plan: list[_Times | None] = []
    for grp, sol in zip(groups, solved, strict=True):
        if sol.coef is None:
            plan.append(None)
            continue
        still = (sol.coef == 0).all(dim=(-2, -1))
        if sol.extra is not None:
            still &= (sol.extra == 0).all(dim=(-2, -1))
        rows = [i for i, s in enumerate(still.tolist()) if not s]
        plan.append(_Times(grp, grp.E + sol.coef, rows))
    products = iter(_products([job for job in plan if job is not None], opts))
    out: list[Tensor] = []
    for grp, sol, job in zip(groups, solved, plan, strict=True):

        def fedit_side(grp: _Group = grp) -> Tensor:  # FedIT's own, as fedit sums it
            return grp.B_acc if opts.residual_on == "B" else grp.A_acc

        if job is None:
            assert sol.extra is not None
            acc = fedit_side()
            out.append((acc + sol.extra.to(acc.dtype)).to(grp.dtype))
            continue
        full = _orient(next(products), opts)
        if sol.extra is not None:
            full = full + sol.extra[job.rows]
        moved = full.to(grp.dtype, memory_format=torch.contiguous_format)
        if len(job.rows) == grp.n:
            out.append(moved)
            continue
        factor = fedit_side().to(grp.dtype, memory_format=torch.contiguous_format)
        factor[job.rows] = moved
        out.append(factor)
    return out


def _update_norm(grp: _Group) -> Tensor:
    """``‖ΔW‖_F = ‖B_s diag(pw) A_u‖_F`` per layer (L,), float64, never forming ``ΔW``.

    float64 inputs: a thin QR of the factor with fewer rows (``‖B_s A_s‖ = ‖A_sᵀ B_sᵀ‖``), whose
    relative error is about ``ε κ`` (``κ = ‖B_s‖‖A_s‖/‖ΔW‖``, no cancellation). Narrower inputs
    (float32/16, bfloat16): the float64 Gram trace ``<B_sᵀB_s, pw pwᵀ ⊙ A_u A_uᵀ>``, two GEMMs
    and no Householder sweep; its relative error is about ``d ε₆₄ κ²``, below the inputs' own
    rounding (``ε₃₂ κ``) unless ``κ ≳ 10⁵``, i.e. unless the clients' updates cancel almost
    exactly. Cost: O((d_out + d_in) R²) either way (R = Σ r_k).
    """
    if grp.dtype != _F64:
        M_A, M_B = _grams([grp])[0]
        return _gram_norm(M_B, M_A, grp.pw)
    if grp.A_s.shape[-1] < grp.B_s.shape[-2]:
        return _linalg.fro_norm(grp.A_s.mT, grp.B_s.mT)
    return _linalg.fro_norm(grp.B_s, grp.A_s)


def _gram_norm(M_B: Tensor, M_A: Tensor, pw: Tensor) -> Tensor:
    """``‖B diag(pw) A‖_F`` from ``M_B = BᵀB`` and ``M_A = AAᵀ`` (R × R each)."""
    gram = (M_B * M_A * (pw[:, None] * pw[None, :])).sum(dim=(-2, -1))
    return torch.sqrt(torch.clamp(gram, min=0.0))


def _corrected_dim(grp: _Group, opts: _Options) -> int:
    """``d``: rows of the corrected factor ``P`` (d_out for ``"B"``, d_in for ``"A"``)."""
    first = grp.layers[0]
    return first.d_out if opts.residual_on == "B" else first.d_in


def _flat_sides(grp: _Group, opts: _Options) -> tuple[Tensor, Tensor]:
    """``(P_u, Q_u)`` with ``ΔW' = P_u diag(pw) Q_u``, the corrected ``P = P_u E`` and the fixed
    ``Q = Eᵀ Q_u``: ``(B_s, A_u)`` for ``"B"``; ``(A_uᵀ, B_sᵀ)`` for ``"A"`` (transposed)."""
    if opts.residual_on == "B":
        return grp.B_s, grp.A_u
    return grp.A_u.mT, grp.B_s.mT


class _Rounding(NamedTuple):
    """The output dtype's machine epsilon, and the norm below which the corrected factor's
    entries lose relative precision (its smallest normal × √(number of entries))."""

    eps: float
    floor: float


def turning(err_sq: Tensor, norm_sq: Tensor) -> Tensor:
    """The one rounding model: the squared angle ``u² = err² / n²`` by which a perturbation of
    size ``err`` (the output's rounding of the corrected factor, mapped to the product) can
    turn a product of norm ``n``; to second order it costs the product's cosine ``½ u²``.
    The flat form applies it to the whole product (:func:`lorafair._fair._family.turn_cost`: a
    cost added to the scores of the family's Newton point, the λ = 0 end's points and the
    general solver's answer), the column form to each product column
    (:func:`lorafair._fair._column_objective._unsafe`: points it cannot resolve are left out).
    ``n² ≤ TINY`` counts as ``TINY``."""
    return err_sq / torch.clamp(norm_sq, min=_tol.TINY)


def _rounding(grp: _Group, opts: _Options) -> _Rounding:
    """How the corrected factor (``d × r``) is rounded to the inputs' dtype."""
    info = torch.finfo(grp.dtype)
    return _Rounding(info.eps, info.tiny * math.sqrt(_corrected_dim(grp, opts) * grp.r))

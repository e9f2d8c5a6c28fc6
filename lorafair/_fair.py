"""LoRA-FAIR (Eq. 8): the server's residual correction of FedIT, solved exactly and factored.

Public names (re-exported by :mod:`lorafair.aggregate` / :mod:`lorafair.metrics`):
:func:`lora_fair`, :func:`solve_residual`, :class:`ResidualSolution`,
:func:`lora_fair_report`, :class:`FairReport`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Literal, NamedTuple

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from lorafair import _flat, _linalg, _solve
from lorafair._validate import (
    Layer,
    Prepared,
    accumulation_dtype,
    group_by_shape,
    prepare,
    raise_if_nonfinite,
    weighted_sum,
)
from lorafair.errors import LayerKeyError, LoRAFairError, LoRAShapeError, NonFiniteError
from lorafair.types import LoRAFactors

__all__ = ["FairReport", "ResidualSolution", "lora_fair", "lora_fair_report", "solve_residual"]

_Clients = Sequence[Mapping[str, "LoRAFactors | tuple[Tensor, Tensor]"]]
Norm = Literal["fro", "fro_squared"]
Similarity = Literal["flat", "columns"]
ResidualOn = Literal["B", "A"]

_F64 = torch.float64
_TIE = 1e-14  # a solver result must beat ΔB = 0 by more than this to be returned


class ResidualSolution(NamedTuple):
    """The solved residual of one layer.

    ``delta``: ``ΔB*`` (d_out, r) for ``residual_on="B"``, ``ΔA*`` (r, d_in) for ``"A"``, in the
    inputs' dtype. ``objective``: ``1 − cosine + λ·reg(delta)`` at ``delta`` (float64).
    ``cosine``: the similarity used (``"flat"`` or ``"columns"``) between the corrected product
    and ``ΔW``, 0.0 where either is zero. ``iterations``: solver iterations of the returned
    start (0 for closed-form cases). ``converged``: whether that start met ``tol``.
    """

    delta: Tensor
    objective: float
    cosine: float
    iterations: int
    converged: bool


class FairReport(NamedTuple):
    """Table 4's columns for one layer, from the clients and an aggregated ``(A', B')``.

    ``b_cosine``: ``cos(B', B̄)``; ``update_cosine``: ``cos(B'A', ΔW)``; ``fedit_cosine``:
    ``cos(B̄Ā, ΔW)`` (the uncorrected FedIT product); ``delta_b_norm``: ``‖B' − B̄‖_F``;
    ``delta_a_norm``: ``‖A' − Ā‖_F``. Flattened (Frobenius) cosines in float64; 1.0 when both
    sides are zero, 0.0 when exactly one is.
    """

    b_cosine: float
    update_cosine: float
    fedit_cosine: float
    delta_b_norm: float
    delta_a_norm: float


@dataclass(frozen=True)
class _Options:
    lam: float
    norm: Norm
    similarity: Similarity
    residual_on: ResidualOn
    tol: float
    max_iter: int


def _check_options(
    lam: float, norm: str, similarity: str, residual_on: str, tol: float, max_iter: int
) -> _Options:
    try:
        lam_f = float(lam)
    except (TypeError, ValueError):
        raise LoRAFairError(f"lam must be a number, got {lam!r}") from None
    if not math.isfinite(lam_f) or lam_f < 0:
        raise LoRAFairError(f"lam must be finite and >= 0, got {lam!r}")
    if norm not in ("fro", "fro_squared"):
        raise LoRAFairError(f"norm must be 'fro' or 'fro_squared', got {norm!r}")
    if similarity not in ("flat", "columns"):
        raise LoRAFairError(f"similarity must be 'flat' or 'columns', got {similarity!r}")
    if residual_on not in ("A", "B"):
        raise LoRAFairError(f"residual_on must be 'B' or 'A', got {residual_on!r}")
    try:
        tol_f = float(tol)
    except (TypeError, ValueError):
        raise LoRAFairError(f"tol must be a number, got {tol!r}") from None
    if not math.isfinite(tol_f) or tol_f <= 0:
        raise LoRAFairError(f"tol must be finite and > 0, got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise LoRAFairError(f"max_iter must be an int >= 1, got {max_iter!r}")
    return _Options(lam_f, norm, similarity, residual_on, tol_f, max_iter)  # type: ignore[arg-type]


@dataclass
class _Group:
    """Same-shaped layers batched along a leading dimension ``L`` (R = Σ r_k).

    The float64 stacks ``A_u`` (L, R, d_in) and ``B_s`` (L, d_out, R) are built on first use;
    the narrow-dtype flat path never builds them (it converts one layer at a time into a reused
    buffer, see :func:`_layer_grams`).
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
        acc = accumulation_dtype(self.dtype)
        return torch.stack(
            [weighted_sum([_pad_rows(a, self.r) for a in ly.As], self.p, acc) for ly in self.layers]
        )

    @cached_property
    def B_acc(self) -> Tensor:
        """(L, d_out, r) FedIT's ``B̄`` in the accumulation dtype, exactly as :func:`fedit` sums."""
        acc = accumulation_dtype(self.dtype)
        return torch.stack(
            [
                weighted_sum([_pad_rows(b.mT, self.r).mT for b in ly.Bs], self.p, acc)
                for ly in self.layers
            ]
        )


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


def _stacked_layer_host(
    layer: Layer, side: Literal["A", "B"], buf: npt.NDArray[np.float64]
) -> None:
    """:func:`_stacked_layer` for CPU tensors into a NumPy buffer (``B_s`` as ``B_sᵀ``, R × d)."""
    start = 0
    for A, B in zip(layer.As, layer.Bs, strict=True):
        rk = A.shape[0]
        t = A if side == "A" else B.mT
        if t.dtype == torch.bfloat16:  # NumPy has no bfloat16; float32 holds it exactly
            t = t.float()
        buf[start : start + rk] = t.numpy(force=True)
        start += rk


def _layer_grams(grp: _Group) -> tuple[Tensor, Tensor]:
    """``M_A = A_u A_uᵀ`` and ``M_B = B_sᵀ B_s`` (L, R, R), float64, one layer at a time.

    Each layer's factors are converted into two reused float64 buffers (a few MB, cache-sized)
    instead of one float64 copy of the whole group: same flops, no large fresh allocation. On
    CPU the buffers are NumPy arrays and ``X Xᵀ`` goes through NumPy's matmul, which hands a
    product of a matrix with its own transpose to BLAS ``syrk`` (half the flops of the general
    product torch runs).
    """
    first = grp.layers[0]
    R = sum(first.ranks)
    if grp.device.type == "cpu":
        host_a = np.empty((R, first.d_in))
        host_b = np.empty((R, first.d_out))
        MA = np.empty((grp.n, R, R))
        MB = np.empty((grp.n, R, R))
        for i, layer in enumerate(grp.layers):
            _stacked_layer_host(layer, "A", host_a)
            _stacked_layer_host(layer, "B", host_b)
            np.matmul(host_a, host_a.T, out=MA[i])
            np.matmul(host_b, host_b.T, out=MB[i])
        return torch.from_numpy(MA), torch.from_numpy(MB)
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


def _p_times(grp: _Group, opts: _Options, coef: Tensor) -> Tensor:
    """``P_u @ coef`` (L, d, r) float64 for the corrected side ``P_u`` (see :func:`_flat_sides`).

    From the float64 stacks when they exist (float64 inputs), else one layer at a time through
    a reused buffer (NumPy on CPU, as in :func:`_layer_grams`). Computed as ``(coefᵀ P_uᵀ)ᵀ``:
    BLAS runs the tall-skinny product about twice as fast with the long dimension last.
    """
    if grp.dtype == _F64:
        P_u = _flat_sides(grp, opts)[0]
        return (coef.mT @ P_u.mT).mT
    first = grp.layers[0]
    R = sum(first.ranks)
    side: Literal["A", "B"] = "B" if opts.residual_on == "B" else "A"
    d = first.d_out if side == "B" else first.d_in
    if grp.device.type == "cpu":
        host = np.empty((R, d))
        coef_t = coef.mT.numpy()
        out_np = np.empty((grp.n, grp.r, d))
        for i, layer in enumerate(grp.layers):
            _stacked_layer_host(layer, side, host)
            np.matmul(coef_t[i], host, out=out_np[i])
        return torch.from_numpy(out_np).mT
    out = torch.empty(grp.n, grp.r, d, dtype=_F64, device=grp.device)
    if side == "B":
        buf = torch.empty(first.d_out, R, dtype=_F64, device=grp.device)
        for i, layer in enumerate(grp.layers):
            torch.matmul(coef[i].mT, _stacked_layer(layer, "B", buf).mT, out=out[i])
    else:
        buf = torch.empty(R, first.d_in, dtype=_F64, device=grp.device)
        for i, layer in enumerate(grp.layers):
            torch.matmul(coef[i].mT, _stacked_layer(layer, "A", buf), out=out[i])
    return out.mT


class _Solved(NamedTuple):
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


def _delta(grp: _Group, sol: _Solved, opts: _Options) -> Tensor:
    """The explicit residual (L, …) in float64 (one ``(d × R)(R × r)`` GEMM per layer)."""
    parts = []
    if sol.coef is not None:
        parts.append(_orient(_p_times(grp, opts, sol.coef), opts))
    if sol.extra is not None:
        parts.append(sol.extra)
    return parts[0] if len(parts) == 1 else parts[0] + parts[1]


def _corrected(grp: _Group, sol: _Solved, opts: _Options) -> Tensor:
    """The corrected factor (``B̄ + ΔB`` or ``Ā + ΔA``, L layers) in the inputs' dtype.

    Flat: one float64 GEMM ``P_u (E + coef)`` per layer, rounded once. Layers whose residual is
    exactly zero return FedIT's factor bit for bit.
    """

    def fedit_side() -> Tensor:  # FedIT's corrected factor, as fedit computes it
        return grp.B_acc if opts.residual_on == "B" else grp.A_acc

    if sol.coef is None:
        assert sol.extra is not None
        acc = fedit_side()
        return (acc + sol.extra.to(acc.dtype)).to(grp.dtype)
    full = _orient(_p_times(grp, opts, grp.E + sol.coef), opts)
    if sol.extra is not None:
        full = full + sol.extra
    out = full.to(grp.dtype, memory_format=torch.contiguous_format)
    still = (sol.coef == 0).all(dim=(-2, -1))
    if sol.extra is not None:
        still &= (sol.extra == 0).all(dim=(-2, -1))
    if bool(still.any()):
        out[still] = fedit_side()[still].to(grp.dtype)
    return out


def _pick(f_runs: Tensor, f_zero: Tensor, single: bool) -> tuple[Tensor, Tensor]:
    """Index of the best start per layer (runs stacked first) and whether ΔB = 0 wins instead."""
    best = torch.argmin(f_runs, dim=0)
    f_best = f_runs.gather(0, best[None]).squeeze(0)
    zero = (f_zero <= f_best + _TIE) | torch.full_like(f_zero, single, dtype=torch.bool)
    return best, zero


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
        M_A, M_B = _layer_grams(grp)
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


def _flat_reduce(
    grp: _Group, opts: _Options, grams: tuple[Tensor, Tensor] | None
) -> tuple[_flat.Reduced, Tensor]:
    """The family solver's data and ``N = diag(pw) Q_u Qᵀ`` (L, R, r), so ``H = ΔW' Qᵀ = P_u N``.

    float64 inputs: ``H`` and ``P`` explicitly (accurate to ε even when clients cancel), ‖ΔW‖ by a
    thin QR. Narrower inputs: everything from the two R × R Grams ``M_P = P_uᵀP_u`` and
    ``M_Q = Q_u Q_uᵀ`` (``G = Eᵀ M_Q E``, ``N = diag(pw) M_Q E``, ``HᵀH = Nᵀ M_P N``,
    ``HᵀP = Nᵀ M_P E``, ``PᵀP = Eᵀ M_P E``, ``‖ΔW‖² = <M_P, pw pwᵀ ⊙ M_Q>``), whose error
    ``ε₆₄ κ²`` stays below the inputs' own rounding (see :func:`_update_norm`); ``grams`` is
    ``(M_A, M_B)`` from :func:`_layer_grams` when already computed. Cost O((d + e) R²) flops
    (the Grams) or O((d + e) R r) plus a QR (float64).
    """
    E, pw = grp.E, grp.pw
    if grp.dtype == _F64:
        P_u, Q_u = _flat_sides(grp, opts)
        Q = E.mT @ Q_u
        N = pw[:, None] * (Q_u @ Q.mT)
        red = _flat.reduced_from_columns(Q @ Q.mT, P_u @ N, P_u @ E, _update_norm(grp))
        return red, N
    M_A, M_B = grams if grams is not None else _layer_grams(grp)
    M_P, M_Q = (M_B, M_A) if opts.residual_on == "B" else (M_A, M_B)
    N = pw[:, None] * (M_Q @ E)
    MN = M_P @ N
    red = _flat.reduced_from_grams(
        E.mT @ M_Q @ E, N.mT @ MN, MN.mT @ E, E.mT @ M_P @ E, _gram_norm(M_P, M_Q, pw)
    )
    return red, N


_END_MARGIN = 1e-12
"""The general flat solver's result replaces the λ = 0 end only when below the end's floor by
more than this (relative): one approaching the same infimum can only get below it by rounding."""


class _Rounding(NamedTuple):
    """The output dtype's machine epsilon, and the norm below which the corrected factor's
    entries lose relative precision (its smallest normal × √(number of entries))."""

    eps: float
    floor: float


def _rounding(grp: _Group, opts: _Options) -> _Rounding:
    """How the corrected factor (``d × r``) is rounded to the inputs' dtype."""
    info = torch.finfo(grp.dtype)
    return _Rounding(info.eps, info.tiny * math.sqrt(_corrected_dim(grp, opts) * grp.r))


def _absolute_error(grp: _Group, opts: _Options, grams: tuple[Tensor, Tensor] | None) -> Tensor:
    """Per layer, an absolute error size of the corrected factor as computed and returned:
    ``ε₆₄ ‖P_u‖_F`` (the float64 GEMM ``P_u (E + coef)``; ``‖E‖₂ ≤ 1``) plus the output dtype's
    smallest normal times ``√(d r)`` times its unit roundoff (its subnormal spacing)."""
    if grams is None:
        P_u = _flat_sides(grp, opts)[0]
        pu = torch.linalg.matrix_norm(P_u)
    else:
        M_A, M_B = grams
        M_P = M_B if opts.residual_on == "B" else M_A
        pu = torch.sqrt(M_P.diagonal(dim1=-2, dim2=-1).sum(-1))
    unit = _rounding(grp, opts)
    out: Tensor = torch.finfo(_F64).eps * pu.to(_F64) + unit.eps / 2 * unit.floor
    return out


def _solve_flat(
    groups: list[_Group], opts: _Options, single: bool, prep: Prepared
) -> list[_Solved]:
    """Solve every group's flat problem, all groups sharing ``r`` in one batch (see :mod:`_flat`).

    Layers the two-parameter solve cannot certify are re-solved by the general ``r × 3`` solver.
    The inputs' NaN/Inf check (skipped by :func:`prepare`) comes from the Grams' diagonals for
    narrow dtypes (see :func:`_flat_reduce`) and from :func:`raise_if_nonfinite` otherwise; either
    way a bad input raises before anything is solved, naming its layer and client.
    """
    if any(grp.dtype == _F64 for grp in groups):
        raise_if_nonfinite(prep.layers)
    grams = [None if grp.dtype == _F64 else _layer_grams(grp) for grp in groups]
    # diag(M) holds float64 sums of squares of narrow floats: finite exactly when every input is
    # (|x| ≤ 6.6e4 or 3.4e38, squared and summed over < 2³¹ terms, cannot overflow float64).
    diag_sums = [M.diagonal(dim1=-2, dim2=-1).sum() for pair in grams if pair for M in pair]
    if diag_sums and not bool(torch.isfinite(torch.stack(diag_sums).sum())):
        raise_if_nonfinite(prep.layers)
        raise NonFiniteError("NaN or Inf in the clients' factors")  # pragma: no cover
    reduced = [_flat_reduce(grp, opts, gm) for grp, gm in zip(groups, grams, strict=True)]
    out: list[_Solved | None] = [None] * len(groups)
    buckets: dict[tuple[int, torch.device], list[int]] = {}
    for i, grp in enumerate(groups):
        buckets.setdefault((grp.r, grp.device), []).append(i)
    for idx in buckets.values():
        joint = _flat.Reduced(*(torch.cat([reduced[i][0][j] for i in idx]) for j in range(6)))
        wide = torch.cat(
            [
                torch.full(
                    (groups[i].n,),
                    _corrected_dim(groups[i], opts) >= 3,
                    device=joint.g.device,
                )
                for i in idx
            ]
        )
        # Output rounding: the output dtype's unit roundoff (relative to ‖P‖), and an absolute
        # floor: float64 cancellation in P_u (E + coef) (~ε₆₄ ‖P_u‖, large where clients cancel
        # in B̄) and where the d × r entries lose relative precision (float16's subnormals).
        eps = torch.cat(
            [torch.full((groups[i].n,), _rounding(groups[i], opts).eps / 2) for i in idx]
        ).to(joint.g)
        noise = torch.cat([_absolute_error(groups[i], opts, grams[i]) for i in idx]).to(joint.g)
        sol = _flat.solve(
            joint,
            wide,
            eps,
            noise,
            lam=opts.lam,
            norm=opts.norm,
            tol=opts.tol,
            max_iter=opts.max_iter,
            single=single,
        )
        start = 0
        for i in idx:
            grp = groups[i]
            n = grp.n
            sl = slice(start, start + n)
            start += n
            red, N = reduced[i]
            V = red.V
            X = (V * sol.x[sl].unsqueeze(-2)) @ V.mT
            Y = (V * sol.y[sl].unsqueeze(-2)) @ V.mT
            coef = N @ X - grp.E @ Y
            obj, cos = sol.objective[sl], sol.cosine[sl]
            iters, conv = sol.iterations[sl], sol.converged[sl]
            extra = None
            bad = ~sol.certified[sl]
            if bool(bad.any()):
                # The general solver, unless it does not get below the λ = 0 end's floor: that
                # end is often an infimum which the general solver can only approach (stopping
                # wherever its steps fade), while _flat._end approaches it by a fixed rule.
                fb = _solve_flat_general(grp, opts, single, bad, red.w[bad])
                assert fb.extra is not None
                f_general = torch.full_like(obj, torch.inf)
                f_general[bad] = fb.objective
                floor = sol.end_floor[sl]
                end = bad & (f_general >= floor - _END_MARGIN * (1.0 + floor.abs()))
                general = bad & ~end
                X_end = (V * sol.end_x[sl].unsqueeze(-2)) @ V.mT
                Y_end = (V * sol.end_y[sl].unsqueeze(-2)) @ V.mT
                coef = torch.where(end[:, None, None], N @ X_end - grp.E @ Y_end, coef)
                obj = torch.where(end, sol.end_objective[sl], obj)
                cos = torch.where(end, sol.end_cosine[sl], cos)
                iters, conv = iters.clone(), conv.clone()
                coef[general] = 0.0
                extra = _orient(fb.extra.new_zeros(n, *fb.extra.shape[-2:]), opts).clone()
                extra[general] = _orient(fb.extra[general[bad]], opts)
                obj[general], cos[general] = fb.objective[general[bad]], fb.cosine[general[bad]]
                iters[bad], conv[bad] = fb.iterations, fb.converged
            out[i] = _Solved(obj, cos, iters, conv, coef, extra)
    return [s for s in out if s is not None]


def _solve_flat_general(
    grp: _Group, opts: _Options, single: bool, rows: Tensor, w: Tensor | None = None
) -> _Solved:
    """The general ``r × 3`` reduction (:func:`_solve.flat_reduce`) for the layers ``rows``.

    ``w``: their ``‖ΔW‖_F`` where already known (else :func:`_update_norm`). Returns ``ΔP`` in
    the corrected factor's orientation (``d × r``), float64.
    """
    Abar, Bbar = grp.Abar[rows], grp.Bbar[rows]
    A_s, B_s = grp.A_s[rows], grp.B_s[rows]
    if opts.residual_on == "B":
        G = Abar @ Abar.mT
        H = B_s @ (A_s @ Abar.mT)
        base = Bbar
    else:  # transposed problem: B̄ (Ā + ΔA) ~ ΔW  <=>  (Āᵀ + ΔAᵀ) B̄ᵀ ~ ΔWᵀ
        G = Bbar.mT @ Bbar
        H = A_s.mT @ (B_s.mT @ Bbar)
        base = Abar.mT
    problem = _solve.flat_reduce(G, H, base, _update_norm(grp)[rows] if w is None else w)
    x_sol, iters, conv = _flat_minimise(problem, opts, single)
    cos, dsq = _solve.flat_terms(x_sol, *problem[:5])
    obj = 1.0 - cos + _solve.regulariser(dsq, opts.lam, opts.norm)
    return _Solved(obj, cos, iters, conv, extra=_solve.flat_delta(problem, x_sol))


def _flat_minimise(
    problem: _solve.FlatProblem, opts: _Options, single: bool
) -> tuple[Tensor, Tensor, Tensor]:
    beta = problem.beta
    n = beta.shape[0]
    x_ls = _solve.flat_lam0(problem)
    zeros_i = torch.zeros(n, dtype=torch.int64, device=beta.device)
    if opts.lam == 0.0 or single:
        x = beta if single else x_ls
        return x, zeros_i, torch.ones(n, dtype=torch.bool, device=beta.device)
    starts = [beta, x_ls, 0.5 * (beta + x_ls)]
    m = len(starts)
    data = tuple(problem[:5])
    obj = _solve.flat_objective(opts.lam, opts.norm)
    rep = tuple(t.repeat(m, *([1] * (t.ndim - 1))) for t in data)
    x0 = torch.cat(starts).reshape(m * n, -1)
    res = _solve.minimise(obj, rep, x0, tol=opts.tol, max_iter=opts.max_iter)
    f_runs = res.f.reshape(m, n)
    f_zero = obj.values(beta.reshape(n, 1, -1), *data).squeeze(1)
    best, zero = _pick(f_runs, f_zero, single)
    xs = res.x.reshape(m, n, *beta.shape[1:])
    rows = torch.arange(n, device=beta.device)
    x = xs[best, rows]
    x = torch.where(zero[:, None, None], beta, x)
    iters = res.iterations.reshape(m, n)
    conv = res.converged.reshape(m, n)
    it = torch.where(zero, iters[0], iters[best, rows])
    cv = torch.where(zero, conv[0], conv[best, rows])
    return x, it, cv


def _solve_columns(grp: _Group, opts: _Options, single: bool) -> _Solved:
    """Per-column cosine: iterate in a basis of at most ``(K + 2) r`` rows (never d_out × d_in)."""
    n_layers = grp.Abar.shape[0]
    d_out = grp.Bbar.shape[-2]
    kr = grp.B_s.shape[-1]
    r = grp.r
    left: Tensor | None
    right: Tensor | None
    Q: Tensor | None = None
    if opts.residual_on == "B":
        # Y = Z Ā with Z = Qᵀ B' in a basis Q ⊇ span(B_s, B̄) plus r spare orthogonal directions.
        if kr + 2 * r < d_out:
            pad = grp.B_s.new_zeros(n_layers, d_out, r)
            Q, _ = torch.linalg.qr(torch.cat([grp.B_s, grp.Bbar, pad], dim=-1))
            Bq = Q.mT @ grp.B_s
            Z0 = Q.mT @ grp.Bbar
        else:  # cost model: d_out <= (K + 2) r, so d_out × d_in is no bigger than the factors
            Bq = grp.B_s
            Z0 = grp.Bbar
        X = Bq @ grp.A_s
        xn = torch.linalg.vector_norm(X, dim=-2)
        left, right = None, grp.Abar
        active = (xn > 0) & (torch.linalg.vector_norm(grp.Abar, dim=-2) > 0)
        G_pinv = torch.linalg.pinv(grp.Abar @ grp.Abar.mT, hermitian=True)
        Z_ls = (Bq @ (grp.A_s @ grp.Abar.mT)) @ G_pinv
        Z_unit = (_unit_columns(X, xn) @ grp.Abar.mT) @ G_pinv
    else:
        # Y = R_B A' with B̄ = Q_B R_B; column norms of ΔW from a QR of B_s.
        Q_B, R_B = torch.linalg.qr(grp.Bbar)
        X = (Q_B.mT @ grp.B_s) @ grp.A_s
        _, R_s = torch.linalg.qr(grp.B_s, mode="r")
        xn = torch.linalg.vector_norm(R_s @ grp.A_s, dim=-2)
        left, right = R_B, None
        nonzero_b = torch.linalg.matrix_norm(R_B) > 0
        active = (xn > 0) & nonzero_b[:, None]
        Z0 = grp.Abar
        R_pinv = torch.linalg.pinv(R_B)
        Z_ls = R_pinv @ X
        Z_unit = R_pinv @ _unit_columns(X, xn)
    shape = (int(Z0.shape[-2]), int(Z0.shape[-1]))
    lam, norm = opts.lam, opts.norm
    extra = tuple(t for t in (left, right) if t is not None)
    data = (X, xn, active, Z0, *extra)
    obj = _solve.columns_objective(lam, norm, shape, left is not None, right is not None)
    if single:
        iters = torch.zeros(n_layers, dtype=torch.int64, device=X.device)
        conv = torch.ones(n_layers, dtype=torch.bool, device=X.device)
        Z = Z0
    else:
        # FedIT, the least-squares fit, their midpoint, and the least-squares fit of the unit
        # columns X_j/‖X_j‖ (every column counts alike in the mean cosine; scaled to Z_ls's
        # product norm).
        yl = torch.linalg.matrix_norm(_solve.linear_map(Z_ls, left, right))
        yu = torch.linalg.matrix_norm(_solve.linear_map(Z_unit, left, right))
        ratio = torch.where(yu > 0, yl / torch.where(yu > 0, yu, 1.0), 0.0)
        starts = [Z0, Z_ls, 0.5 * (Z0 + Z_ls), Z_unit * ratio[:, None, None]]
        unit = _rounding(grp, opts)  # rounding of the output, in the dtype it comes in
        Z, iters, conv = _columns_minimise(obj, data, starts, left is not None, opts, unit)
        if opts.lam > 0:
            Z = _columns_end(obj, data, starts, Z, left is not None, opts, unit)
    f_final = obj.values(Z.reshape(n_layers, 1, -1), *data).squeeze(1)
    diff = Z - Z0
    reg = _solve.regulariser((diff * diff).sum(dim=(-2, -1)), lam, norm)
    cos = 1.0 - (f_final - reg)
    obj_val = f_final
    delta = diff if Q is None else Q @ diff
    return _Solved(obj_val, cos, iters, conv, extra=delta)


def _unit_columns(X: Tensor, xn: Tensor) -> Tensor:
    """``X`` with each non-zero column scaled to unit norm."""
    return X / torch.where(xn > 0, xn, torch.ones_like(xn)).unsqueeze(-2)


_END_STEPS = (1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)
"""Sizes ``‖t D‖ / ‖Z0‖`` of the λ = 0-end points that :func:`_columns_end` scores."""


def _columns_end(
    obj: _solve.Batched,
    data: tuple[Tensor, ...],
    starts: list[Tensor],
    Z: Tensor,
    has_left: bool,
    opts: _Options,
    unit: _Rounding,
) -> Tensor:
    """``Z``, or where lower, a point of the λ = 0 end: ``Z0`` with its product-facing part
    replaced by ``t D``, ``D`` that part of a λ = 0 minimiser (scale-free).

    The infimum ``f*_{λ=0} + λ R(‖part‖²)`` is approached as ``t → 0⁺`` (the whole product
    vanishes with the λ = 0 directions; no stationary point gets there, so the multi-start runs
    creep towards it and stop short). First the λ = 0 problem is solved (anchor ``Z0``) for the
    layers whose result is above ``λ R(‖part‖²)``, and its ``D`` is scored at ``t = τ`` (the best
    scale, where positive: the end attained) and at ``‖t D‖ = s ‖Z0‖`` for each ``s`` of
    ``_END_STEPS``. Where that leaves a layer above the infimum because its small points are
    unsafe (:func:`_unsafe`: the λ = 0 minimiser has a vanishing column of its own, which
    shrinking the whole product pushes below what rounding ``B̄ + ΔB`` resolves), the λ = 0
    problem is solved again with the anchor ``Z0 / s`` for every ``s < 1`` (the anchor sets how
    small a column may get), and those minimisers are scored at their ``s``. Cost: one more
    multi-start λ = 0 solve for most layers, ``len(_END_STEPS)`` for the few that need them.
    """
    Z0, mat = data[3], data[4]
    n_layers = Z0.shape[0]
    shape = (int(Z0.shape[-2]), int(Z0.shape[-1]))
    Pi = torch.linalg.pinv(mat) @ mat if has_left else mat @ torch.linalg.pinv(mat)

    def facing(W: Tensor) -> Tensor:  # the part of W that reaches the product (W: …, p, q)
        P = Pi.reshape(Pi.shape[0], *([1] * (W.ndim - 3)), *Pi.shape[-2:])
        return torch.matmul(P, W) if has_left else torch.matmul(W, P)

    part = facing(Z0)
    keep = Z0 - part
    f_now = obj.values(Z.reshape(n_layers, 1, -1), *data).squeeze(1)
    floor = _solve.regulariser((part * part).sum(dim=(-2, -1)), opts.lam, opts.norm)
    steps = torch.tensor(_END_STEPS, dtype=Z0.dtype, device=Z0.device)
    n_s = steps.shape[0]
    opts0 = _Options(0.0, opts.norm, opts.similarity, opts.residual_on, opts.tol, opts.max_iter)
    obj0 = _solve.columns_objective(0.0, opts.norm, shape, has_left, not has_left)

    def score(rows: Tensor, D: Tensor, st: Tensor, with_tau: bool) -> tuple[Tensor, Tensor]:
        """Best point and value among ``keep + t D_s`` (D: rows, S, p, q; ``D_s`` scaled to
        ``‖t D_s‖ = st_s ‖Z0‖``)."""
        sub = tuple(t[rows] for t in data)
        dd = (D * D).sum(dim=(-2, -1))
        ok = dd > 0
        dd1 = torch.where(ok, dd, torch.ones_like(dd))
        c = st * torch.linalg.matrix_norm(Z0[rows])[:, None] / torch.sqrt(dd1)
        if with_tau:
            tau = (D[:, 0] * part[rows]).sum(dim=(-2, -1)) / dd1[:, 0]
            D, c, ok = (torch.cat([x[:, :1], x], dim=1) for x in (D, c, ok))
            c[:, 0] = tau
        pts = keep[rows].unsqueeze(1) + (c * ok)[..., None, None] * D
        f = obj.values(pts.flatten(-2), *sub)
        f = torch.where(_unsafe(pts, sub, has_left, unit) | ~(ok & (c > 0)), torch.inf, f)
        best = torch.argmin(f, dim=1)
        at = torch.arange(best.shape[0], device=best.device)
        return pts[at, best], f[at, best]

    out, f_out = Z.clone(), f_now.clone()

    def take(rows: Tensor, W: Tensor, f: Tensor) -> None:
        better = f < f_out[rows]
        out[rows[better]] = W[better]
        f_out[rows[better]] = f[better]

    rows = torch.nonzero(f_now > floor + _TIE).squeeze(-1)
    if rows.numel() == 0:
        return out
    sub = tuple(t[rows] for t in data)
    Zs, _, _ = _columns_minimise(obj0, sub, [x[rows] for x in starts], has_left, opts0, unit)
    limit = obj0.values(Zs.reshape(rows.shape[0], 1, -1), *sub).squeeze(1) + floor[rows]
    W, f = score(rows, facing(Zs).unsqueeze(1).expand(-1, n_s, -1, -1), steps, True)
    take(rows, W, f)
    # Layers whose end could still win by more than the plain points' reach: anchors Z0 / s
    # (s < 1; the anchor Z0 itself was solved and scored just above).
    rows = rows[f_out[rows] - limit > 1e-9 * (1.0 + limit.abs())]
    if rows.numel() == 0:
        return out
    m, small = rows.shape[0], steps[1:]
    rep = [t[rows].repeat(n_s - 1, *([1] * (t.ndim - 1))) for t in data]
    rep[3] = rep[3] / small.repeat_interleave(m)[:, None, None]
    Zs, _, _ = _columns_minimise(
        obj0, tuple(rep), [x[rows].repeat(n_s - 1, 1, 1) for x in starts], has_left, opts0, unit
    )
    W, f = score(rows, facing(Zs.reshape(n_s - 1, m, *shape).transpose(0, 1)), small, False)
    take(rows, W, f)
    return out


_DROP_TINY = 1e-3
"""A product column below this fraction of its rounding scale (:func:`_column_scale`) is taken
as one the minimiser is driving to zero: the columns problem is re-solved with it dropped."""
_DROP_UNSAFE = 2e-10
"""Largest float64 error of the objective (estimated by :func:`_unsafe`) of a returned point:
near a vanishing column its cosine is sensitive to rounding; such points are not returned (their
dropped counterparts stand in for them)."""
_DROP_STEPS = (1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10)
"""Relative distances ``ε`` at which a dropped column reappears (:func:`_solve.dropped_points`)."""
_DROP_SINGLES = 64
"""Up to this many columns, dropping each single column from the best run is scored as well."""
_DROP_SINGLES_SOLVE = 4
"""Of those, the best this many per layer seed restricted problems."""


def _drop_direction(
    dc: _solve.DroppedColumns,
    sub: tuple[Tensor, ...],
    approach: Tensor,
    has_left: bool,
    opts: _Options,
) -> Tensor:
    """The direction ``E`` (rows, p, q) along which the dropped columns ``J`` reappear.

    In the limit the dropped columns are ``left E right_J`` for the ``E`` that maximises
    ``Σ_{j∈J} cos(X_j, left E right_j)`` (λ = 0, columns ``J`` only). With ``left`` (residual on
    A) or a full-rank ``right_J`` each column takes any direction of ``range(left)``, and
    ``dc.E`` (least squares) is that maximiser. Otherwise (``right_J`` rank-deficient, e.g. the
    whole product vanishing, ``B' → 0``) the columns share directions: the λ = 0 problem is
    minimised from ``dc.E`` and from ``approach`` (the part of the seed that the projection
    removed: the direction the seed was vanishing along), and the better result is kept.
    """
    if has_left:
        return dc.E
    assert dc.PR is not None
    X, xn, active, Z0, right = sub
    rank = torch.linalg.matrix_rank(right * dc.drop.unsqueeze(-2).to(right.dtype))
    shared = dc.drop.sum(dim=-1) > rank
    if not bool(shared.any()):
        return dc.E
    E_all = dc.E.clone()
    X, xn, active, Z0, right = X[shared], xn[shared], active[shared], Z0[shared], right[shared]
    drop, approach, E_ls = dc.drop[shared], approach[shared], dc.E[shared]
    rows = Z0.shape[0]
    shape = (int(Z0.shape[-2]), int(Z0.shape[-1]))
    en = torch.linalg.matrix_norm(E_ls)
    an = torch.linalg.matrix_norm(approach)
    ok = (an > 0) & (en > 0)
    ratio = torch.where(ok, en / torch.where(ok, an, torch.ones_like(an)), 0.0)
    approach = torch.where(ok[:, None, None], approach * ratio[:, None, None], E_ls)
    obj_e = _solve.columns_objective(0.0, "fro_squared", shape, False, True)
    data_e = (X, xn, active & drop, torch.zeros_like(Z0), right)
    rep = tuple(torch.cat([t, t]) for t in data_e)
    x0 = torch.cat([E_ls, approach]).reshape(2 * rows, -1)
    res = _solve.minimise(obj_e, rep, x0, tol=opts.tol, max_iter=opts.max_iter)
    f = res.f.reshape(2, rows)
    best = torch.argmin(f, dim=0)
    E = res.x.reshape(2, rows, *shape)[best, torch.arange(rows, device=best.device)]
    E_all[shared] = E @ dc.PR[shared]
    return E_all


def _mix_columns(
    Z: Tensor, f: Tensor, layer: Tensor, data: tuple[Tensor, ...], opts: _Options
) -> Tensor:
    """Per layer, the point (L, p, n) made of each column's best among the candidates ``Z``
    (rows, p, n) of ``layer`` (rows,) with finite ``f`` (residual on A: ``Y = left Z``).

    A column's score is its share of the objective, ``−cos_j / n + λ ‖Z_j − Z0_j‖²`` (exact
    for ``"fro_squared"``; for ``"fro"``, ``λ ‖D‖`` linearised in ``‖D‖²`` at the layer's best
    candidate, ``λ ‖D_j‖² / (2 ‖D_best‖)``).
    """
    X, xn, active, Z0, left = data
    n_layers, n = xn.shape
    sub_Z0 = Z0[layer]
    Y = left[layer] @ Z
    inner = (Y * X[layer]).sum(dim=-2)
    ynorm = torch.linalg.vector_norm(Y, dim=-2)
    act = active[layer] & (ynorm > 0)
    den = torch.where(act, xn[layer] * ynorm, torch.ones_like(ynorm))
    cos = torch.where(act, inner / den, torch.zeros_like(inner))
    dsq = (Z - sub_Z0).square().sum(dim=-2)  # (rows, n)
    lam = torch.full_like(f, opts.lam)
    if opts.norm == "fro":
        f_best = torch.full((n_layers,), torch.inf, dtype=f.dtype, device=f.device)
        f_best = f_best.scatter_reduce(0, layer, f, reduce="amin")
        rows = torch.arange(f.shape[0], device=f.device)
        at = torch.full((n_layers,), 0, dtype=torch.int64, device=f.device)
        at = at.scatter_reduce(0, layer[f == f_best[layer]], rows[f == f_best[layer]], "amax")
        rho = torch.sqrt(dsq.sum(dim=-1))[at]
        lam = opts.lam / (2.0 * torch.clamp(rho, min=1e-12))[layer]
    score = -cos / n + lam[:, None] * dsq
    score = torch.where(torch.isfinite(f)[:, None], score, torch.inf)
    best = torch.full((n_layers, n), torch.inf, dtype=f.dtype, device=f.device)
    best = best.scatter_reduce(0, layer[:, None].expand(-1, n), score, reduce="amin")
    rows = torch.arange(f.shape[0], device=f.device)[:, None].expand(-1, n)
    hit = score == best[layer]
    pick = torch.full((n_layers, n), f.shape[0], dtype=torch.int64, device=f.device)
    pick = pick.scatter_reduce(
        0, layer[:, None].expand(-1, n), torch.where(hit, rows, f.shape[0]), reduce="amin"
    )
    pick = torch.clamp(pick, max=f.shape[0] - 1)
    cols = torch.arange(n, device=f.device)
    mixed = Z[pick, :, cols[None, :]]  # (L, n, p)
    mixed = mixed.mT
    return torch.where(torch.isfinite(best).all(dim=-1)[:, None, None], mixed, Z0)


def _column_scale(
    Z: Tensor, Z0: Tensor, left: Tensor | None, right: Tensor | None, floor: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """``(‖Y_j‖, s_j, Y)`` for ``Y = left Z right`` (``‖Y_j‖``, ``s_j``: …, n), with
    ``s_j = ‖left‖ (‖Z‖ + ‖Z0‖ + floor) ‖right_j‖`` bounding the rounding of ``Y_j`` (here and in
    ``(B̄ + ΔB) Ā``) by ~ε s_j (``floor``: where the output's entries lose relative precision)."""
    Y = _solve.linear_map(Z, left, right)
    scale = torch.linalg.matrix_norm(Z) + torch.linalg.matrix_norm(Z0) + floor
    if left is not None:
        scale = scale * torch.linalg.matrix_norm(left)
    scale = scale.unsqueeze(-1)
    if right is not None:
        scale = scale * torch.linalg.vector_norm(right, dim=-2)
    return torch.linalg.vector_norm(Y, dim=-2), scale, Y


def _unsafe(Z: Tensor, data: tuple[Tensor, ...], has_left: bool, unit: _Rounding) -> Tensor:
    """Whether the output cannot resolve the objective at ``Z`` (rows, [S,] p, q) to
    ``max(_DROP_UNSAFE, 10 ε)`` (``ε = unit.eps``: machine epsilon of the output dtype, ``ε₆₄``
    below; ``‖Z‖ + ‖Z0‖`` below also gets ``unit.floor``, for float16's subnormals).

    ``data`` per row (as in :func:`_solve_columns`). Evaluating the product perturbs the point
    by rounding of relative size ``ε₆₄`` (``Z`` itself, or ``B̄ + ΔB`` / ``Ā + ΔA`` in the
    caller's dense check), which cancels where a column nearly vanishes. To first order that
    moves the cosines by ``ε₆₄ (‖Z‖ + ‖Z0‖) ‖∇_Z mean_j cos_j‖``: large near a vanishing column
    unless it points at its best direction (then the gradient cancels); to second order by
    ``mean_j u_j²``, ``u_j = ε₆₄ s_j / ‖Y_j‖`` the angle by which the column can turn
    (:func:`_column_scale`). Unsafe: their sum exceeds ``_DROP_UNSAFE``.
    """
    X, xn, active, Z0, mat = data
    if Z.ndim == Z0.ndim + 1:
        X, xn, active, Z0, mat = (t.unsqueeze(1) for t in (X, xn, active, Z0, mat))
    left, right = (mat, None) if has_left else (None, mat)
    yn, sc, Y = _column_scale(Z, Z0, left, right, unit.floor)
    n = Y.shape[-1]
    ok = active & (yn > 0)
    one = torch.ones_like(yn)
    k1 = torch.where(ok, 1.0 / torch.where(ok, xn * yn, one), 0.0)  # 1/(‖X_j‖ ν)
    k3 = torch.where(ok, 1.0 / torch.where(ok, yn, one) ** 3, 0.0)  # 1/ν³
    s = torch.where(ok, (Y * X).sum(dim=-2) / torch.where(ok, xn, one), 0.0)
    GY = (k1.unsqueeze(-2) * X - (s * k3).unsqueeze(-2) * Y) / n
    GZ = _solve.adjoint_map(GY, left, right)
    size = torch.linalg.matrix_norm(Z) + torch.linalg.matrix_norm(Z0) + unit.floor
    first = unit.eps * size * torch.linalg.matrix_norm(GZ)
    u = unit.eps * sc / torch.where(ok, yn, one)
    second = torch.where(ok, u * u, 0.0).mean(dim=-1)
    exact_zero: Tensor = (active & (yn == 0)).any(dim=-1)  # an active zero column counts 0
    resolved: Tensor = first + second <= max(_DROP_UNSAFE, 10.0 * unit.eps)  # False for NaN too
    return exact_zero | ~resolved


def _columns_minimise(
    obj: _solve.Batched,
    data: tuple[Tensor, ...],
    starts: list[Tensor],
    has_left: bool,
    opts: _Options,
    unit: _Rounding,
) -> tuple[Tensor, Tensor, Tensor]:
    """Multi-start minimisation of the columns objective, through its unattained infima.

    The cosine of a product column jumps where the column vanishes, and the best values are
    often approached as some columns shrink to zero (``d_in > r``: dropping a column frees the
    others; it counts at its best cosine in the limit). Newton's iterates then creep towards
    the limit with vanishing steps and stop short of it, or pass the point where float64 can
    still resolve the column's direction. So after the plain runs, every result with columns
    that are being driven to zero (below ``_DROP_TINY`` of their scale), and for few columns the
    best result with each single column, seeds a restricted problem (:func:`_solve.drop_columns`)
    in which those columns are exactly zero: a smooth problem whose minimum is the infimum. Its
    own vanishing columns are dropped in turn (at most ``n`` rounds; each adds columns). Each
    restricted minimum is returned as a real point at a small distance ``ε`` from it
    (:func:`_solve.dropped_points`, ``_DROP_STEPS``), and every candidate is scored by the true
    objective; points whose objective float64 cannot resolve (:func:`_unsafe`) are not
    returned. Residual on A also tries the column-wise best mix of all candidates
    (:func:`_mix_columns`), polished. ``ΔB = 0`` is kept unless beaten (:func:`_pick`).
    Host syncs: one per round of dropping (the number of restricted problems is data
    dependent). Returns ``(Z, iterations, converged)``.
    """
    X, xn, active, Z0 = data[:4]
    has_right = not has_left  # the two shapes of _solve_columns: Z Ā (right) or R_B A' (left)

    def sides(d: tuple[Tensor, ...]) -> tuple[Tensor | None, Tensor | None]:
        return (d[4], None) if has_left else (None, d[4])

    n_layers, n = xn.shape
    shape = (int(Z0.shape[-2]), int(Z0.shape[-1]))
    dev = X.device
    m = len(starts)
    rep = tuple(t.repeat(m, *([1] * (t.ndim - 1))) for t in data)
    x0 = torch.cat(starts).reshape(m * n_layers, -1)
    res = _solve.minimise(obj, rep, x0, tol=opts.tol, max_iter=opts.max_iter)
    layer = torch.arange(n_layers, device=dev).repeat(m)
    Zr = res.x.reshape(m * n_layers, *shape)
    f_raw = obj.values(res.x.unsqueeze(1), *rep).squeeze(1)
    yn, sc, _ = _column_scale(Zr, rep[3], *sides(rep))
    unsafe = _unsafe(Zr, rep, has_left, unit)
    tiny = rep[2] & (yn <= _DROP_TINY * sc)
    c_x = [res.x]
    c_f = [torch.where(unsafe, torch.inf, f_raw)]
    c_layer = [layer]
    c_it = [res.iterations]
    c_cv = [res.converged]
    # Seeds of restricted problems: (layer, dropped columns, point, iterations so far).
    seed = tiny.any(dim=-1)
    s_layer, s_drop, s_W, s_it = layer[seed], tiny[seed], Zr[seed], res.iterations[seed]
    steps = torch.tensor(_DROP_STEPS, dtype=X.dtype, device=dev)
    n_steps = len(_DROP_STEPS)
    if n <= _DROP_SINGLES:
        # Each single column dropped from the best run: scored as is (projected), and the
        # _DROP_SINGLES_SOLVE best of them per layer seed restricted problems.
        best = torch.argmin(f_raw.reshape(m, n_layers), dim=0)
        rows = (best * n_layers + torch.arange(n_layers, device=dev)).repeat(n)
        eye = torch.eye(n, dtype=torch.bool, device=dev)
        single = (eye.unsqueeze(1) & active.unsqueeze(0)).reshape(n * n_layers, n)
        sub = tuple(t[layer[rows]] for t in data)
        s_left, s_right = sides(sub)
        dc = _solve.drop_columns(sub[0], sub[1], sub[2], sub[3], s_left, s_right, single)
        Zc = _solve.drop_project(dc, _solve.drop_start(dc, Zr[rows]))
        pts = _solve.dropped_points(dc, Zc, dc.E, steps)
        f_pts = obj.values(pts.flatten(-2), *sub)
        f_pts = torch.where(
            _unsafe(pts, sub, has_left, unit) | ~single.any(-1, keepdim=True), torch.inf, f_pts
        )
        c_x.append(pts.flatten(-2).flatten(0, 1))
        c_f.append(f_pts.flatten())
        c_layer.append(layer[rows].repeat_interleave(n_steps))
        c_it.append(res.iterations[rows].repeat_interleave(n_steps))
        c_cv.append(res.converged[rows].repeat_interleave(n_steps))
        score = f_pts.amin(dim=-1).reshape(n, n_layers)
        k = min(n, _DROP_SINGLES_SOLVE)
        top = torch.topk(score, k, dim=0, largest=False).indices  # (k, L)
        chosen = (top * n_layers + torch.arange(n_layers, device=dev)).flatten()
        chosen = chosen[torch.isfinite(score.flatten()[chosen])]
        s_layer = torch.cat([s_layer, layer[rows[chosen]]])
        s_drop = torch.cat([s_drop, single[chosen]])
        s_W = torch.cat([s_W, Zr[rows[chosen]]])
        s_it = torch.cat([s_it, res.iterations[rows[chosen]]])
    obj_d = _solve.columns_objective(opts.lam, opts.norm, shape, has_left, has_right, True)
    for _ in range(n):
        if s_layer.numel() == 0:
            break
        sub = tuple(t[s_layer] for t in data)
        s_left, s_right = sides(sub)
        dc = _solve.drop_columns(sub[0], sub[1], sub[2], sub[3], s_left, s_right, s_drop)
        x0 = _solve.drop_start(dc, s_W)
        rd = _solve.minimise(
            obj_d, dc.data, x0.reshape(s_W.shape[0], -1), tol=opts.tol, max_iter=opts.max_iter
        )
        it = s_it + rd.iterations
        E = _drop_direction(dc, sub, s_W - _solve.drop_project(dc, s_W), has_left, opts)
        # The seed itself with its columns J dropped, and the restricted problem's result.
        for W, its in ((x0, s_it), (rd.x, it)):
            Zc = _solve.drop_project(dc, W.reshape(s_W.shape))
            pts = _solve.dropped_points(dc, Zc, E, steps)  # (rows, S, p, q)
            f_pts = obj.values(pts.flatten(-2), *sub)
            yn, sc, _ = _column_scale(Zc, sub[3], *sides(sub))
            tiny = dc.data[2] & (yn <= _DROP_TINY * sc)
            unsafe = _unsafe(pts, sub, has_left, unit)
            c_x.append(pts.flatten(-2).flatten(0, 1))
            c_f.append(torch.where(unsafe, torch.inf, f_pts).flatten())
            c_layer.append(s_layer.repeat_interleave(n_steps))
            c_it.append(its.repeat_interleave(n_steps))
            c_cv.append(rd.converged.repeat_interleave(n_steps))
        seed = tiny.any(dim=-1)
        s_layer, s_drop, s_W, s_it = s_layer[seed], (s_drop | tiny)[seed], Zc[seed], it[seed]
    if has_left:
        # Residual on A: column j of the product depends on column j of A' only, so the
        # objective couples the columns only through the regulariser (not at all for
        # "fro_squared"). Mix the best column of every candidate, then polish.
        mixed = _mix_columns(
            torch.cat(c_x).reshape(-1, *shape), torch.cat(c_f), torch.cat(c_layer), data, opts
        )
        rp = _solve.minimise(obj, data, mixed.flatten(-2), tol=opts.tol, max_iter=opts.max_iter)
        for W, its in ((mixed.flatten(-2), rp.iterations), (rp.x, rp.iterations)):
            unsafe = _unsafe(W.reshape(-1, *shape), data, has_left, unit)
            f_w = obj.values(W.unsqueeze(1), *data).squeeze(1)
            c_x.append(W)
            c_f.append(torch.where(unsafe, torch.inf, f_w))
            c_layer.append(torch.arange(n_layers, device=dev))
            c_it.append(its)
            c_cv.append(rp.converged)
    x_all = torch.cat(c_x)
    f_all = torch.cat(c_f)
    l_all = torch.cat(c_layer)
    f_best = torch.full((n_layers,), torch.inf, dtype=X.dtype, device=dev)
    f_best = f_best.scatter_reduce(0, l_all, f_all, reduce="amin")
    idx = torch.arange(f_all.shape[0], device=dev)
    hit = f_all == f_best[l_all]
    first = torch.full((n_layers,), f_all.shape[0], dtype=torch.int64, device=dev)
    first = first.scatter_reduce(0, l_all[hit], idx[hit], reduce="amin")
    first = torch.clamp(first, max=f_all.shape[0] - 1)
    f_zero = obj.values(Z0.reshape(n_layers, 1, -1), *data).squeeze(1)
    _, zero = _pick(f_best[None], f_zero, False)
    Z = torch.where(zero[:, None, None], Z0, x_all[first].reshape(n_layers, *shape))
    it_all, cv_all = torch.cat(c_it), torch.cat(c_cv)
    iters = torch.where(zero, res.iterations[:n_layers], it_all[first])
    conv = torch.where(zero, res.converged[:n_layers], cv_all[first])
    return Z, iters, conv


def _run(
    clients: _Clients, weights: Sequence[float] | None, opts: _Options, allow_excess_rank: bool
) -> tuple[list[_Group], list[_Solved]]:
    prep = prepare(
        clients, weights, equal_ranks=False, check_finite=False, allow_excess_rank=allow_excess_rank
    )
    single = prep.n_clients == 1
    groups = [_build_group(g, prep.weights) for g in group_by_shape(list(prep.layers.values()))]
    if opts.similarity == "flat":
        solved = _solve_flat(groups, opts, single, prep)
    else:
        raise_if_nonfinite(prep.layers)
        solved = [_solve_columns(g, opts, single) for g in groups]
    return groups, solved


def _unbatch(
    clients: _Clients, groups: list[_Group], solved: list[_Solved]
) -> dict[str, tuple[_Group, _Solved, int]]:
    where: dict[str, tuple[_Group, _Solved, int]] = {}
    for grp, sol in zip(groups, solved, strict=True):
        for i, name in enumerate(grp.names):
            where[name] = (grp, sol, i)
    order = list(clients[0].keys())
    return {name: where[name] for name in order}


def solve_residual(
    clients: _Clients,
    weights: Sequence[float] | None = None,
    *,
    lam: float = 0.01,
    norm: Norm = "fro",
    similarity: Similarity = "flat",
    residual_on: ResidualOn = "B",
    tol: float = 1e-8,
    max_iter: int = 500,
    allow_excess_rank: bool = False,
) -> dict[str, ResidualSolution]:
    """Solve LoRA-FAIR's residual problem (Eq. 8) per layer; see :func:`lora_fair` for the math.

    Returns, per layer, the residual ``ΔB*`` (or ``ΔA*``) with its objective, the achieved
    cosine, the iteration count and a convergence flag (one host sync for the whole call).

    >>> import torch
    >>> c0 = {"fc": (torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0], [0.0]]))}
    >>> c1 = {"fc": (torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0], [1.0]]))}
    >>> sol = solve_residual([c0, c1], lam=0.0)["fc"]
    >>> round(sol.cosine, 6)  # λ = 0 reaches the projection bound ‖ΔW Ā⁺Ā‖ / ‖ΔW‖ = 1/√2
    0.707107
    """
    opts = _check_options(lam, norm, similarity, residual_on, tol, max_iter)
    groups, solved = _run(clients, weights, opts, allow_excess_rank)
    host = [
        (
            s.objective.cpu().tolist(),
            s.cosine.cpu().tolist(),
            s.iterations.cpu().tolist(),
            s.converged.cpu().tolist(),
        )
        for s in solved
    ]
    out: dict[str, ResidualSolution] = {}
    index = {id(s): h for s, h in zip(solved, host, strict=True)}
    deltas = {
        id(s): _delta(g, s, opts).to(g.dtype, memory_format=torch.contiguous_format)
        for g, s in zip(groups, solved, strict=True)
    }
    for name, (_, sol, i) in _unbatch(clients, groups, solved).items():
        obj, cos, it, cv = index[id(sol)]
        out[name] = ResidualSolution(
            deltas[id(sol)][i], float(obj[i]), float(cos[i]), int(it[i]), bool(cv[i])
        )
    return out


def lora_fair(
    clients: _Clients,
    weights: Sequence[float] | None = None,
    *,
    lam: float = 0.01,
    norm: Norm = "fro",
    similarity: Similarity = "flat",
    residual_on: ResidualOn = "B",
    tol: float = 1e-8,
    max_iter: int = 500,
    allow_excess_rank: bool = False,
) -> dict[str, LoRAFactors]:
    """LoRA-FAIR: FedIT's average with the residual correction of Eq. 8, solved to ``tol``.

    Returns ``(Ā, B̄ + ΔB*)`` per layer (``residual_on="A"``: ``(Ā + ΔA*, B̄)``), where
    ``Ā = Σ p_k A_k``, ``B̄ = Σ p_k B_k``, ``ΔW = Σ p_k B_k A_k`` and

        ΔB* = argmin_ΔB  1 − S(ΔW, (B̄ + ΔB) Ā) + λ·reg(ΔB),

    ``reg = ‖ΔB‖_F`` (``norm="fro"``, the paper) or ``‖ΔB‖_F²`` (``"fro_squared"``, public
    re-implementations); ``S`` the flattened cosine (``similarity="flat"``, the paper's text)
    or the mean over the d_in columns of the per-column cosine (``"columns"``, what
    ``F.cosine_similarity(ΔW, B'Ā, dim=0).mean()`` computes). A cosine with a zero side is 0.

    Method (flat): with ``G = ĀĀᵀ = V diag(g) Vᵀ`` and ``H = ΔW Āᵀ``, every stationary point
    has ``B'V`` columns ``(a (HV)_i + (B̄V)_i)/(1 + k g_i)`` for two scalars ``a``, ``k`` per
    layer, and along that family the objective needs only ``g_i``, ``‖(HV)_i‖²``,
    ``<(HV)_i, (B̄V)_i>``, ``‖(B̄V)_i‖²``, which come from ``r × r`` Grams. All layers sharing r
    are solved at once (a grid, then damped Newton on the two unknowns with closed-form
    derivatives), each answer is certified stationary for the full problem or re-solved by a
    general ``r × 3`` Newton solver from three starts (FedIT, the λ = 0 solution, their
    midpoint), and ``ΔB = 0`` is returned unless beaten, so the result is never worse than
    FedIT on this objective; a zero residual returns FedIT's factors bit for bit. λ = 0 is
    solved in closed form (the cosine-maximising ``B'`` closest to ``B̄``, reaching the bound
    ``‖ΔW Ā⁺Ā‖/‖ΔW‖``). Where the best value is only approached as the product vanishes (the
    λ = 0 end with ``B'Ā → 0``), a fixed rule goes as close to the infimum as the output
    dtype's rounding allows. ``"columns"`` iterates in an orthonormal basis of ``span(B_s, B̄)``
    plus r spare directions (≤ ``(K+2) r`` rows): multi-start Newton (four starts), restricted
    problems where columns vanish, and for ``λ > 0`` the λ = 0 problem too (the whole product
    vanishing). ``residual_on="A"`` solves the transposed problem. Clients of different ranks
    are zero-padded to the largest rank (so ``Ā``, ``B̄`` and the result have that rank); a rank
    above both ``d_in`` and ``d_out`` is rejected as a likely A/B swap unless
    ``allow_excess_rank=True``. One
    client: FedIT is exact and ``ΔB* = 0``. ``ΔW = 0``: ``ΔB* = 0``. Details:
    ``docs/lora_fair.md``.

    Cost (flat, per layer, r = rank, R = Σ r_k): O((d_out + d_in) R²) flops for two float64
    ``R × R`` Grams of the stacked factors (float64 inputs: ``H`` and ``B̄`` explicitly plus a
    thin QR for ``‖ΔW‖``), O(R² r + r³) for the small algebra, O(r) per point of the family
    solve, O(d_out R r) for the answer; memory two ``R × R`` Grams per layer and one layer's
    float64 factors at a time. Nothing of size d_out × d_in. Reductions in float64; results in
    the inputs' dtype.

    >>> import torch
    >>> c0 = {"fc": (torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0], [0.0]]))}
    >>> c1 = {"fc": (torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0], [1.0]]))}
    >>> A, B = lora_fair([c0, c1])["fc"]
    >>> A.shape, B.shape
    (torch.Size([1, 2]), torch.Size([2, 1]))
    """
    opts = _check_options(lam, norm, similarity, residual_on, tol, max_iter)
    groups, solved = _run(clients, weights, opts, allow_excess_rank)
    out: dict[str, LoRAFactors] = {}
    fixed: dict[int, Tensor] = {}
    moved: dict[int, Tensor] = {}
    for grp, sol in zip(groups, solved, strict=True):
        moved[id(sol)] = _corrected(grp, sol, opts)
        fixed[id(sol)] = (grp.A_acc if opts.residual_on == "B" else grp.B_acc).to(grp.dtype)
    for name, (_, sol, i) in _unbatch(clients, groups, solved).items():
        if opts.residual_on == "B":
            out[name] = LoRAFactors(fixed[id(sol)][i], moved[id(sol)][i])
        else:
            out[name] = LoRAFactors(moved[id(sol)][i], fixed[id(sol)][i])
    return out


def _cos(inner: float, na: float, nb: float) -> float:
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return max(-1.0, min(1.0, inner / (na * nb)))


def lora_fair_report(
    clients: _Clients,
    aggregated: Mapping[str, LoRAFactors | tuple[Tensor, Tensor]],
    weights: Sequence[float] | None = None,
) -> dict[str, FairReport]:
    """Table 4's diagnostics per layer: ``cos(B', B̄)``, ``cos(B'A', ΔW)``, ``‖B' − B̄‖``.

    ``aggregated`` maps every layer to ``(A', B')`` (e.g. :func:`lora_fair`'s output); ``Ā``,
    ``B̄`` (zero-padded to the largest client rank) and ``ΔW`` come from ``clients``. All
    factored in float64: O((d_out + d_in) R²) flops per layer, R = Σ r_k + r.
    """
    prep = prepare(clients, weights, equal_ranks=False)
    p = prep.weights
    names = list(prep.layers)
    if set(aggregated.keys()) != set(names):
        missing = [n for n in names if n not in aggregated]
        if missing:
            raise LayerKeyError(f"aggregated is missing layer {missing[0]!r}")
        extra = sorted(str(n) for n in set(aggregated.keys()) - set(names))
        raise LayerKeyError(f"aggregated has layer {extra[0]!r} that the clients do not have")
    out: dict[str, FairReport] = {}
    for name, layer in prep.layers.items():
        r = max(layer.ranks)
        pair = aggregated[name]
        A1, B1 = pair[0], pair[1]
        if tuple(A1.shape) != (r, layer.d_in) or tuple(B1.shape) != (layer.d_out, r):
            raise LoRAShapeError(
                f"layer {name!r}: aggregated A {tuple(A1.shape)} and B {tuple(B1.shape)}; "
                f"expected ({r}, {layer.d_in}) and ({layer.d_out}, {r})"
            )
        dev = layer.device
        A1 = A1.to(device=dev, dtype=_F64)
        B1 = B1.to(device=dev, dtype=_F64)
        Abar = weighted_sum([_pad_rows(a, r) for a in layer.As], p, _F64)
        Bbar = weighted_sum([_pad_rows(b.mT, r).mT for b in layer.Bs], p, _F64)
        A_s = torch.cat([a.to(_F64) * w for a, w in zip(layer.As, p, strict=True)], dim=0)
        B_s = torch.cat([b.to(_F64) for b in layer.Bs], dim=1)
        vals = (
            torch.stack(
                [
                    (B1 * Bbar).sum(),
                    torch.linalg.matrix_norm(B1),
                    torch.linalg.matrix_norm(Bbar),
                    _linalg.fro_inner(B1, A1, B_s, A_s),
                    _linalg.fro_norm(B1, A1),
                    _linalg.fro_norm(B_s, A_s),
                    _linalg.fro_inner(Bbar, Abar, B_s, A_s),
                    _linalg.fro_norm(Bbar, Abar),
                    torch.linalg.matrix_norm(B1 - Bbar),
                    torch.linalg.matrix_norm(A1 - Abar),
                ]
            )
            .cpu()
            .tolist()
        )
        out[name] = FairReport(
            _cos(vals[0], vals[1], vals[2]),
            _cos(vals[3], vals[4], vals[5]),
            _cos(vals[6], vals[7], vals[5]),
            vals[8],
            vals[9],
        )
    return out

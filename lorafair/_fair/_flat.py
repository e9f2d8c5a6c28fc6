"""Private: the flat cosine: reduce, solve by the two-unknown family, certify, fall back.

:func:`_solve_flat` reduces every group to the family data of :mod:`lorafair._fair._family`
(from two ``R × R`` Grams, or explicitly for float64 inputs), solves all layers sharing ``r`` at
once, and hands the layers the family cannot certify to the general ``r × 3`` reduction below
(:func:`flat_reduce`, :func:`flat_objective`, minimised by :func:`~lorafair._fair._newton.minimise`
from three starts), keeping the family's λ = 0 end where that does not get below the end's floor.

The general reduction: with ``G = ĀĀᵀ = V diag(g) Vᵀ`` and ``H = ΔW Āᵀ`` the objective
``1 − <B', H> / (w ‖B'Ā‖) + λ R(B' − B̄)`` depends on column ``c_i`` of ``B'V`` only through its
coordinates in an orthonormal 3-frame of ``span(h_i, b_i) ⊕ (one orthogonal direction)``,
because ``‖B'Ā‖² = Σ g_i ‖c_i‖²`` has no cross-column terms: an ``r × 3`` problem per layer,
and layers of every shape that share ``r`` are solved in one batch.
"""

from __future__ import annotations

import dataclasses
from itertools import accumulate
from typing import NamedTuple

import torch
from torch import Tensor

from lorafair._fair import _family
from lorafair._fair import _tolerances as _tol
from lorafair._fair._batch import (
    _corrected_dim,
    _flat_sides,
    _gram_norm,
    _grams,
    _Group,
    _orient,
    _Residuals,
    _rounding,
    _update_norm,
)
from lorafair._fair._cosine import cosine
from lorafair._fair._newton import (
    Batched,
    _reg_coefs,
    _reg_grad_coef,
    minimise,
    regulariser,
)
from lorafair._fair._options import Norm, _Options
from lorafair._fair._pool import Picked, _Candidates, _Pool
from lorafair._validate import Prepared, raise_if_nonfinite
from lorafair.errors import NonFiniteError

_F64 = torch.float64


class FlatProblem(NamedTuple):
    """One batch of reduced flat problems (all float64, ``L`` layers, rank ``r``).

    ``eta``/``beta`` (L, r, 3): coordinates of ``h_i``/``b_i`` in each column's frame;
    ``mask`` (L, r, 3): 1 where the frame direction exists (``d_out ≥ 3`` gives all three);
    ``g`` (L, r): eigenvalues of ``G`` (tiny ones zeroed); ``w`` (L,): ``‖ΔW‖_F``.
    ``frame`` (L, r, d, 3) and ``V`` (L, r, r) map a solution back to ``ΔB``.
    """

    eta: Tensor
    beta: Tensor
    mask: Tensor
    g: Tensor
    w: Tensor
    frame: Tensor
    V: Tensor

    @property
    def data(self) -> FlatData:
        """What :func:`flat_objective` and :func:`flat_terms` read of it."""
        return FlatData(self.eta, self.beta, self.mask, self.g, self.w)


class FlatData(NamedTuple):
    """:func:`flat_objective`'s data: :class:`FlatProblem`'s ``eta``, ``beta``, ``mask``, ``g``,
    ``w``."""

    eta: Tensor
    beta: Tensor
    mask: Tensor
    g: Tensor
    w: Tensor


def flat_reduce(G: Tensor, H: Tensor, base: Tensor, w: Tensor) -> FlatProblem:
    """Reduce ``min_B' 1 − <B',H>/(w sqrt(<B'G,B'>)) + λR(B' − base)`` to ``r × 3`` coordinates.

    ``G`` (L, r, r), ``H`` and ``base`` (L, d, r), ``w`` (L,). Cost: one batched ``eigh`` of
    ``r × r``, two ``(d × r)(r × r)`` products and ``L r`` Householder QRs of ``d × 3``:
    O(L (d r² + r³)) flops and O(L d r) memory.
    """
    g, V, small = _family.eig_basis(G)
    Hv = H @ V  # columns h_i
    Bv = base @ V  # columns b_i
    Hv = torch.where(small.unsqueeze(-2), torch.zeros_like(Hv), Hv)
    n_layers, d, r = Hv.shape
    cols = torch.stack([Hv.mT, Bv.mT, torch.zeros_like(Hv.mT)], dim=-1)  # (L, r, d, 3)
    frame, R = torch.linalg.qr(cols)  # frame (L, r, d, q), R (L, r, q, 3); q = min(d, 3)
    q = frame.shape[-1]
    eta = R[..., :, 0]
    beta = R[..., :, 1]
    mask = torch.ones_like(eta)
    if q < 3:
        pad = 3 - q
        eta = torch.cat([eta, eta.new_zeros(n_layers, r, pad)], dim=-1)
        beta = torch.cat([beta, beta.new_zeros(n_layers, r, pad)], dim=-1)
        mask = torch.cat([mask, mask.new_zeros(n_layers, r, pad)], dim=-1)
        frame = torch.cat([frame, frame.new_zeros(n_layers, r, d, pad)], dim=-1)
    return FlatProblem(eta, beta, mask, g, w, frame, V)


def flat_delta(problem: FlatProblem, x: Tensor) -> Tensor:
    """``ΔB = Σ_i frame_i (x_i − β_i) v_iᵀ`` (L, d, r) from reduced coordinates ``x`` (L, r, 3)."""
    coef = (x - problem.beta) * problem.mask
    cols = torch.einsum("lidq,liq->ldi", problem.frame, coef)
    return cols @ problem.V.mT


def flat_terms(
    x: Tensor, eta: Tensor, beta: Tensor, mask: Tensor, g: Tensor, w: Tensor
) -> tuple[Tensor, Tensor]:
    """``(cos, ‖Δ‖²)`` at reduced points ``x`` (…, r, 3); data with the same leading dims.

    ``cos = <x, η> / (w sqrt(Σ_i g_i ‖x_i‖²))`` (:func:`~lorafair._fair._cosine.cosine`,
    ``small="clamp"``); defined as 0 where ``w = 0`` or the product
    ``B'Ā`` is zero. Plain batched tensor ops (any number of leading dimensions).
    """
    xm = x * mask
    s = (xm * eta).sum(dim=(-2, -1))
    n_sq = ((xm * xm).sum(dim=-1) * g).sum(dim=-1)
    cos = cosine(s, w, n_sq, defined=w > 0, small="clamp").cos
    diff = (x - beta) * mask
    return cos, (diff * diff).sum(dim=(-2, -1))


def flat_objective(lam: float, norm: Norm) -> Batched:
    """The reduced flat objective ``f(x) = 1 − cos(x) + λ R(x − β)`` with closed-form derivatives.

    Data ``(eta, beta, mask, g, w)`` with shapes (L, r, 3), (L, r, 3), (L, r, 3), (L, r), (L,);
    ``x`` is the flattened (3 r) point. With ``x̃ = mask ⊙ x``, ``s = <x̃, η>``,
    ``q = Σ_i g_i ‖x̃_i‖²``, ``n = √q``, ``u = vec(mask ⊙ η)``, ``v = vec(g_i x̃_i)``,
    ``m = vec(mask)``, ``D = diag(m ⊙ (g ⊗ 1₃))``:

        ∇cos  = u/(w n) − s v/(w n³)
        ∇²cos = −(u vᵀ + v uᵀ)/(w n³) − s D/(w n³) + 3 s v vᵀ/(w n⁵)

    (0 where ``w = 0`` or ``q = 0``), and for ``d = m ⊙ (x − β)``: ``"fro_squared"``
    ``∇ = 2λ d``, ``∇² = 2λ diag(m)``; ``"fro"`` (``ρ = ‖d‖``) ``∇ = λ d/ρ``,
    ``∇² = λ (diag(m)/ρ − d dᵀ/ρ³)``. Cost per layer: O(r) for a value or gradient, O(r²)
    for the Hessian.
    """

    def values(x: Tensor, eta: Tensor, beta: Tensor, mask: Tensor, g: Tensor, w: Tensor) -> Tensor:
        n_layers, n_cand, _ = x.shape
        data = (eta, beta, mask, g, w)
        cos, dsq = flat_terms(
            x.reshape(n_layers, n_cand, *eta.shape[1:]), *(t.unsqueeze(1) for t in data)
        )
        return 1.0 - cos + regulariser(dsq, lam, norm)

    def _parts(
        x: Tensor, eta: Tensor, beta: Tensor, mask: Tensor, g: Tensor, w: Tensor
    ) -> tuple[Tensor, ...]:
        x3 = x.reshape(eta.shape)
        xm = x3 * mask
        s = (xm * eta).sum(dim=(-2, -1))
        v = g.unsqueeze(-1) * xm
        q = (v * xm).sum(dim=(-2, -1))
        c = cosine(s, w, q, defined=w > 0, small="clamp")
        cos, ok = c.cos, c.ok
        big = ok & (q > _tol.TINY)
        c1 = c.inverse()  # 1/(w n)
        c3 = torch.where(big, c1 / torch.where(big, q, torch.ones_like(q)), torch.zeros_like(q))
        d = (x3 - beta) * mask
        dsq = (d * d).sum(dim=(-2, -1))
        return cos, s, v.flatten(-2), (mask * eta).flatten(-2), c1, c3, q, d.flatten(-2), dsq

    def value_and_grad(
        x: Tensor, eta: Tensor, beta: Tensor, mask: Tensor, g: Tensor, w: Tensor
    ) -> tuple[Tensor, Tensor]:
        cos, s, v, u, c1, c3, _, d, dsq = _parts(x, eta, beta, mask, g, w)
        gcos = c1[:, None] * u - (s * c3)[:, None] * v
        f = 1.0 - cos + regulariser(dsq, lam, norm)
        return f, _reg_grad_coef(dsq, lam, norm)[:, None] * d - gcos

    def hessian(x: Tensor, eta: Tensor, beta: Tensor, mask: Tensor, g: Tensor, w: Tensor) -> Tensor:
        # Diagonal plus rank 3: ∇²f = diag(δ) + U C Uᵀ with U = [u, v, d] and C symmetric 3 × 3,
        # built as one batched (N × 3)(3 × N) product plus the diagonal.
        _, s, v, u, _, c3, q, d, dsq = _parts(x, eta, beta, mask, g, w)
        m = mask.flatten(-2)
        gd = (g.unsqueeze(-1) * mask).flatten(-2)
        c5 = torch.where(c3 != 0, 3.0 * s * c3 / torch.where(c3 != 0, q, torch.ones_like(q)), 0.0)
        r_diag, r_outer = _reg_coefs(dsq, lam, norm)
        delta = r_diag[:, None] * m + (s * c3)[:, None] * gd
        U = torch.stack([u, v, d], dim=-1)  # (L, N, 3)
        zero = torch.zeros_like(c3)
        C = torch.stack(
            [
                torch.stack([zero, c3, zero], dim=-1),
                torch.stack([c3, -c5, zero], dim=-1),
                torch.stack([zero, zero, -r_outer], dim=-1),
            ],
            dim=-2,
        )
        hess = (U @ C) @ U.mT
        return hess + torch.diag_embed(delta)

    return Batched(values, value_and_grad, hessian)


def flat_lam0(problem: FlatProblem) -> Tensor:
    """The λ = 0 minimiser closest to ``B̄`` in reduced coordinates (L, r, 3).

    Every ``x`` with ``x_i = t g_i⁻¹ η_i`` (``g_i > 0``, ``t > 0``) and free ``x_i`` where
    ``g_i = 0`` maximises the cosine (it reaches ``‖ΔW Ā⁺Ā‖ / ‖ΔW‖``): the λ = 0 ray of
    :class:`~lorafair._fair._family.Ray` in these coordinates. Closest to ``β``: the null
    columns keep ``β_i`` and ``t`` by :func:`~lorafair._fair._family.closest_scale`
    (``<z, β>/‖z‖²`` with ``z = g⁺η``; where that is ``≤ 0`` ``t = 1``, i.e. ``B'Ā`` is the
    least-squares fit of ``ΔW``).
    Where ``η = 0`` (``ΔW Āᵀ = 0``: every ``B'`` has cosine 0) ``x = β``.
    """
    g = problem.g.unsqueeze(-1)
    pos = g > 0
    z = torch.where(pos, problem.eta / torch.where(pos, g, torch.ones_like(g)), 0.0)
    z = z * problem.mask
    zz = (z * z).sum(dim=(-2, -1))
    zb = (z * problem.beta).sum(dim=(-2, -1))
    t = _family.closest_scale(zz, zb)
    x = torch.where(pos, t[:, None, None] * z, problem.beta)
    return torch.where((zz > 0)[:, None, None], x, problem.beta)


def _flat_reduce(
    grp: _Group, opts: _Options, grams: tuple[Tensor, Tensor] | None
) -> tuple[_family.Reduced, Tensor]:
    """The family solver's data and ``N = diag(pw) Q_u Qᵀ`` (L, R, r), so ``H = ΔW' Qᵀ = P_u N``.

    float64 inputs: ``H`` and ``P`` explicitly (accurate to ε even when clients cancel), ‖ΔW‖ by a
    thin QR. Narrower inputs: everything from the two R × R Grams ``M_P = P_uᵀP_u`` and
    ``M_Q = Q_u Q_uᵀ`` (``G = Eᵀ M_Q E``, ``N = diag(pw) M_Q E``, ``HᵀH = Nᵀ M_P N``,
    ``HᵀP = Nᵀ M_P E``, ``PᵀP = Eᵀ M_P E``, ``‖ΔW‖² = <M_P, pw pwᵀ ⊙ M_Q>``), whose error
    ``ε₆₄ κ²`` stays below the inputs' own rounding (see :func:`_update_norm`); ``grams`` is
    ``(M_A, M_B)`` from :func:`_grams` when already computed. Cost O((d + e) R²) flops
    (the Grams) or O((d + e) R r) plus a QR (float64).
    """
    E, pw = grp.E, grp.pw
    if grp.dtype == _F64:
        P_u, Q_u = _flat_sides(grp, opts)
        Q = E.mT @ Q_u
        N = pw[:, None] * (Q_u @ Q.mT)
        red = _family.reduced_from_columns(Q @ Q.mT, P_u @ N, P_u @ E, _update_norm(grp))
        return red, N
    M_A, M_B = grams if grams is not None else _grams([grp])[0]
    M_P, M_Q = (M_B, M_A) if opts.residual_on == "B" else (M_A, M_B)
    N = pw[:, None] * (M_Q @ E)
    MN = M_P @ N
    red = _family.reduced_from_grams(
        E.mT @ M_Q @ E, N.mT @ MN, MN.mT @ E, E.mT @ M_P @ E, _gram_norm(M_P, M_Q, pw)
    )
    return red, N


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
) -> list[_Residuals]:
    """Solve every group's flat problem, all groups sharing ``r`` in one batch (see :mod:`_flat`).

    Layers the two-parameter solve cannot certify are re-solved by the general ``r × 3`` solver.
    The inputs' NaN/Inf check (skipped by :func:`prepare`) comes from the Grams' diagonals for
    narrow dtypes (see :func:`_flat_reduce`) and from :func:`raise_if_nonfinite` otherwise; either
    way a bad input raises before anything is solved, naming its layer and client.
    """
    if any(grp.dtype == _F64 for grp in groups):
        raise_if_nonfinite(prep.layers)
    narrow = [grp for grp in groups if grp.dtype != _F64]
    by_id = dict(zip(map(id, narrow), _grams(narrow), strict=True))
    grams = [by_id.get(id(grp)) for grp in groups]
    # diag(M) holds float64 sums of squares of narrow floats: finite exactly when every input is
    # (|x| ≤ 6.6e4 or 3.4e38, squared and summed over < 2³¹ terms, cannot overflow float64).
    diag_sums = [M.diagonal(dim1=-2, dim2=-1).sum() for pair in grams if pair for M in pair]
    if diag_sums and not bool(torch.isfinite(torch.stack(diag_sums).sum())):
        raise_if_nonfinite(prep.layers)
        raise NonFiniteError("NaN or Inf in the clients' factors")  # pragma: no cover
    reduced = [_flat_reduce(grp, opts, gm) for grp, gm in zip(groups, grams, strict=True)]
    out: dict[int, _Residuals] = {}
    buckets: dict[tuple[int, torch.device], list[int]] = {}
    for i, grp in enumerate(groups):
        buckets.setdefault((grp.r, grp.device), []).append(i)
    for idx in buckets.values():
        parts = ([groups[i] for i in idx], [reduced[i] for i in idx], [grams[i] for i in idx])
        out.update(zip(idx, _solve_bucket(*parts, opts, single), strict=True))
    return [out[i] for i in range(len(groups))]


def _solve_bucket(
    groups: list[_Group],
    reduced: list[tuple[_family.Reduced, Tensor]],
    grams: list[tuple[Tensor, Tensor] | None],
    opts: _Options,
    single: bool,
) -> list[_Residuals]:
    """Groups sharing ``r`` (and device): problem → candidates → one scorer (:class:`_FlatScorer`).

    The problem: the family's data of every layer (``joint``) and the output's rounding
    (``eps``, ``noise``). The candidates: the family's point and the λ = 0 end's points
    (:func:`~lorafair._fair._family.solve`), and, for a layer whose first pick is neither
    ``ΔB = 0`` shown optimal nor the family's certified point, the general ``r × 3`` solver's
    answer (:func:`_solve_flat_general`; there the family's point leaves the pool). A second
    pick gives each layer's answer.
    """
    reds = [red for red, _ in reduced]
    joint = _family.Reduced(*(torch.cat(field) for field in zip(*reds, strict=True)))
    r = joint.g.shape[1]
    wide = torch.cat(
        [
            torch.full((grp.n,), _corrected_dim(grp, opts) >= 3, device=joint.g.device)
            for grp in groups
        ]
    )
    # Output rounding: the output dtype's unit roundoff (relative to ‖P‖), and an absolute
    # floor: float64 cancellation in P_u (E + coef) (~ε₆₄ ‖P_u‖, large where clients cancel
    # in B̄) and where the d × r entries lose relative precision (float16's subnormals).
    eps = torch.cat([torch.full((grp.n,), _rounding(grp, opts).eps / 2) for grp in groups])
    eps = eps.to(joint.g)
    noise = torch.cat(
        [_absolute_error(grp, opts, gm) for grp, gm in zip(groups, grams, strict=True)]
    )
    noise = noise.to(joint.g)
    sol = _family.solve(
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

    first = _FlatScorer.of(joint, sol, eps, noise, opts)
    certified = first.certified()
    scorer = first.keeping(certified)
    ends = list(accumulate(grp.n for grp in groups))
    slices = [slice(e - grp.n, e) for grp, e in zip(groups, ends, strict=True)]
    general: list[tuple[Tensor, Tensor] | None] = []
    for grp, (red, _), sl in zip(groups, reduced, slices, strict=True):
        bad = ~certified[sl]
        if not bool(bad.any()):
            general.append(None)
            continue
        rows = torch.nonzero(bad).squeeze(-1) + sl.start
        fb = _solve_flat_general(grp, opts, single, bad, red.w[bad])
        assert fb.extra is not None
        P = grp.Bbar[bad] if opts.residual_on == "B" else grp.Abar[bad].mT
        scorer.offer_general(rows, P + fb.extra, fb)
        general.append((bad, fb.extra))
    final = scorer.pick()
    out = []
    for grp, (red, N), gen, sl in zip(groups, reduced, general, slices, strict=True):
        V, xs, rep = red.V, final.x[sl], final.report[sl]
        X = (V * xs[:, :r].unsqueeze(-2)) @ V.mT
        Y = (V * xs[:, r : 2 * r].unsqueeze(-2)) @ V.mT
        extra = None
        if gen is not None:
            bad, delta = gen
            extra = delta.new_zeros(grp.n, *delta.shape[-2:])
            extra[bad] = delta * xs[bad, -1][:, None, None]
            extra = _orient(extra, opts)
        it, cv = final.iterations[sl], final.converged[sl]
        out.append(_Residuals(rep[:, 0], rep[:, 1], it, cv, N @ X - grp.E @ Y, extra))
    return out


class _Scored(NamedTuple):
    """The family's candidates (:class:`~lorafair._fair._family.FamilyCandidates`) as the flat
    scorer scored them, on the layers' device: ``zero`` (L, 2) the objective and cosine of
    ``ΔB = 0``; ``found`` and ``end`` the pool's rows of the family's point and of the λ = 0
    end's points; ``good``, ``zero_ok`` (L,) the family's certificates; ``floor`` (L,) the
    infimum the end's points approach."""

    zero: Tensor
    found: _Candidates
    end: _Candidates
    good: Tensor
    zero_ok: Tensor
    floor: Tensor


def _score(points: _family.Points, host: _family.Host, lam: float, norm: Norm) -> _Candidates:
    """The family's ``points`` as pool rows (layer-major), on the host: ``report`` their
    objective ``f`` and cosine; score ``f``, plus :func:`~lorafair._fair._family.turn_cost`
    where ``points.charged``, ``inf`` where not ``points.valid``."""
    g, hh, hb, bb, w, eps, noise = host
    x, y = points.x, points.y
    terms = _family.point_terms(x, y, *(a[:, None, :] for a in (g, hh, hb, bb)))
    f, cos = _family.point_objective(*terms, w[:, None], lam, norm)
    cost = f + _family.turn_cost(terms[1], g, bb, eps, noise) if points.charged else f
    if points.valid is not None:
        cost = torch.where(points.valid, cost, torch.inf)
    n_layers, per = x.shape[0], x.shape[1]
    return _Candidates(
        torch.cat([x, y.expand_as(x)], dim=-1).reshape(n_layers * per, 2 * x.shape[-1]),
        cost.reshape(-1),
        torch.arange(n_layers).repeat_interleave(per),
        points.iterations[:, None].expand(n_layers, per).reshape(-1),
        points.converged[:, None].expand(n_layers, per).reshape(-1),
        torch.stack([f, cos], dim=-1).reshape(-1, 2),
    )


def _score_family(
    fam: _family.FamilyCandidates, lam: float, norm: Norm, device: torch.device
) -> _Scored:
    """Every candidate of ``fam`` scored on the host (:func:`_score`), then moved to
    ``device``; ``ΔB = 0`` at its objective, never charged; the end's floor (see
    :class:`~lorafair._fair._family.End`; the closed forms' own objective where there is no
    end)."""
    host = fam.problem
    g, hh, hb, bb, w = host.g, host.hh, host.hb, host.bb, host.w
    with torch.inference_mode():
        zeros = torch.zeros_like(g)
        f0, cos0 = _family.point_objective(
            *_family.point_terms(zeros, zeros, g, hh, hb, bb), w, lam, norm
        )
        found = _score(fam.found, host, lam, norm)
        if fam.end is None:
            end = _Candidates(*(t[:0] for t in found))
            floor = found.report[:, 0]
        else:
            end = _score(fam.end.points, host, lam, norm)
            f_end = end.report[:, 0].reshape(g.shape[0], -1)
            inf = torch.where(fam.end.has, fam.end.limit, f0)
            floor = torch.where(fam.end.toward, f_end[:, 0], inf)
    found, end = (_Candidates(*(t.to(device, copy=True) for t in c)) for c in (found, end))
    zero, good, zero_ok, floor = (
        t.to(device, copy=True) for t in (torch.stack([f0, cos0], -1), fam.good, fam.zero_ok, floor)
    )
    return _Scored(zero, found, end, good, zero_ok, floor)


@dataclasses.dataclass
class _FlatScorer:
    """The flat form's one scorer, for one bucket (layers sharing ``r``): the objective, the
    flat rounding rule and the pool.

    A candidate is ``(x, y, e)`` (one row, ``2r + 1``): ``ΔP = H V diag(x) Vᵀ − P V diag(y) Vᵀ
    + e ΔP_general``; ``ΔB = 0`` is all zeros, always in the pool at its objective, never
    charged. A score is the objective plus what rounding the output can cost the point
    (:func:`~lorafair._fair._family.turn_cost`, of the whole product). The family's candidates
    (:func:`~lorafair._fair._family.solve`) are scored on the host, where the family's data
    are (:func:`_score_family`); the general solver's answer (:meth:`offer_general`) is scored
    here, and offered only where it gets below the λ = 0 end's ``floor`` by more than
    ``END_MARGIN`` (that floor is the infimum the end's points approach: a general point
    approaching it can only get below it by rounding, and where it stops depends on where its
    steps fade, not on what the output can hold).
    """

    red: _family.Reduced
    fam: _Scored
    eps: Tensor
    noise: Tensor
    pool: _Pool

    @classmethod
    def of(
        cls,
        red: _family.Reduced,
        fam: _family.FamilyCandidates,
        eps: Tensor,
        noise: Tensor,
        opts: _Options,
    ) -> _FlatScorer:
        """A pool of ``ΔB = 0``, the family's point and the λ = 0 end's points, scored."""
        scored = _score_family(fam, opts.lam, opts.norm, red.g.device)
        return cls(red, scored, eps, noise, _family_pool(red, scored, None))

    def keeping(self, certified: Tensor) -> _FlatScorer:
        """The same scorer, its pool anew with the family's point only where ``certified``
        (L,). (A layer sent to the general solver keeps its family point out of the final
        pick: there it either lost the first pick (to ``ΔB = 0`` or the end, still in) or is
        not certified, i.e. not a minimiser, and where it creeps towards the end, the product
        vanishing, its reduced objective loses digits to cancellation in ``n²``.)"""
        return dataclasses.replace(self, pool=_family_pool(self.red, self.fam, certified))

    def certified(self) -> Tensor:
        """Per layer (L,), whether the family's answer stands: this pool's pick is ``ΔB = 0``
        shown optimal or the family's certified point (else the general solver runs)."""
        first = self.pick()
        n_found = self.fam.found.f.shape[0]
        row = torch.clamp(first.row, min=0, max=n_found - 1)
        at_found = (first.row < n_found) & self.fam.good[row]
        certified: Tensor = torch.where(first.row < 0, self.fam.zero_ok, at_found)
        return certified

    def offer_general(self, rows: Tensor, P_new: Tensor, fb: _Residuals) -> None:
        """The general solver's answer for the layers ``rows`` (its corrected factor ``P_new``
        (rows, d, r), its objective and cosine in ``fb``), as the candidate ``e = 1``."""
        r = self.red.g.shape[1]
        PV = P_new @ self.red.V[rows]
        g, bb = self.red.g[rows], self.red.bb[rows]
        n_sq = ((PV * PV).sum(-2) * g).sum(-1)
        cost = fb.objective + _family.turn_cost(n_sq, g, bb, self.eps[rows], self.noise[rows])
        floor = self.fam.floor[rows]
        below = fb.objective < floor - _tol.END_MARGIN * (1.0 + floor.abs())
        x = fb.objective.new_zeros(rows.shape[0], 2 * r + 1)
        x[:, -1] = 1.0
        report = torch.stack([fb.objective, fb.cosine], -1)
        f = torch.where(below, cost, torch.inf)
        self.pool.add(x, f, rows, fb.iterations, fb.converged, report)

    def pick(self) -> Picked:
        """Per layer the pool's choice (:meth:`_Pool.pick`): ``x`` (L, 2r + 1), its objective
        and cosine (``report``) and its run's counts."""
        return self.pool.pick()


def _family_pool(red: _family.Reduced, fam: _Scored, certified: Tensor | None) -> _Pool:
    """A pool of ``ΔB = 0``, the family's point (only where ``certified`` (L,), if given) and
    the λ = 0 end's points."""
    n_all, r = red.g.shape
    found = fam.found
    if certified is not None:
        found = found._replace(f=torch.where(certified[found.layer], found.f, torch.inf))
    pool = _Pool(red.g.new_zeros(n_all, 2 * r + 1), fam.zero[:, 0], zero_report=fam.zero)
    for part in (found, fam.end):
        pool.add(*part._replace(x=torch.cat([part.x, part.x.new_zeros(len(part.x), 1)], 1)))
    return pool


def _solve_flat_general(
    grp: _Group, opts: _Options, single: bool, rows: Tensor, w: Tensor | None = None
) -> _Residuals:
    """The general ``r × 3`` reduction (:func:`flat_reduce`) for the layers ``rows``.

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
    problem = flat_reduce(G, H, base, _update_norm(grp)[rows] if w is None else w)
    x_sol, iters, conv = _flat_minimise(problem, opts, single)
    cos, dsq = flat_terms(x_sol, *problem.data)
    obj = 1.0 - cos + regulariser(dsq, opts.lam, opts.norm)
    return _Residuals(obj, cos, iters, conv, extra=flat_delta(problem, x_sol))


def _flat_minimise(
    problem: FlatProblem, opts: _Options, single: bool
) -> tuple[Tensor, Tensor, Tensor]:
    beta = problem.beta
    n = beta.shape[0]
    x_ls = flat_lam0(problem)
    zeros_i = torch.zeros(n, dtype=torch.int64, device=beta.device)
    if opts.lam == 0.0 or single:
        x = beta if single else x_ls
        return x, zeros_i, torch.ones(n, dtype=torch.bool, device=beta.device)
    starts = [beta, x_ls, 0.5 * (beta + x_ls)]
    m = len(starts)
    data = problem.data
    obj = flat_objective(opts.lam, opts.norm)
    rep = FlatData(*(t.repeat(m, *([1] * (t.ndim - 1))) for t in data))
    res = minimise(
        obj, rep, torch.cat(starts).reshape(m * n, -1), tol=opts.tol, max_iter=opts.max_iter
    )
    pool = _Pool(beta.reshape(n, -1), obj.values(beta.reshape(n, 1, -1), *data).squeeze(1))
    layer = torch.arange(n, device=beta.device).repeat(m)
    pool.add(res.x, res.f, layer, res.iterations, res.converged)
    x, _, _, it, cv, _ = pool.pick((beta.shape[1], beta.shape[2]))
    return x, it, cv

"""Private: the column cosine (``similarity="columns"``, mean over the d_in columns): its solve.

Solved in the coordinates of an orthonormal basis of ``span(B_s) ⊕ (r orthogonal directions)``
(``B̄ ∈ span(B_s)``; at most ``(K + 1) r`` rows; residual on A: ``Y = R_B A'``), never
d_out × d_in: multi-start :func:`~lorafair._fair._newton.minimise` from four starts,
restricted problems where product columns vanish (:mod:`._dropped`), for ``λ > 0`` the λ = 0
end, and for residual on A a column-wise mix. Every point is scored by the true objective
(:mod:`._column_objective`), with points whose objective float64 cannot resolve in the output
dtype (:func:`~lorafair._fair._column_objective._unsafe`) left out.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from lorafair._fair import _tolerances as _tol
from lorafair._fair._batch import _Group, _Residuals, _rounding
from lorafair._fair._column_objective import (
    ColumnData,
    ColumnProblem,
    ColumnScorer,
    _column_scale,
    linear_map,
)
from lorafair._fair._cosine import cosine
from lorafair._fair._dropped import (
    _drop_direction,
    drop_columns,
    drop_project,
    drop_start,
    dropped_points,
)
from lorafair._fair._newton import Runs, minimise, regulariser
from lorafair._fair._options import _Options
from lorafair._validate import Prepared, raise_if_nonfinite


def solve_columns(
    groups: list[_Group], opts: _Options, single: bool, prep: Prepared
) -> list[_Residuals]:
    """The column form (a :class:`~lorafair._fair._api._Form`): each group by
    :func:`_solve_columns`, after the inputs' NaN/Inf check (naming layer and client)."""
    raise_if_nonfinite(prep.layers)
    return [_solve_columns(g, opts, single) for g in groups]


class _Stacks(NamedTuple):
    """A group's float64 stacks as the column form reads them: ``B_s`` (L, d_out, R), ``A_s``
    (L, R, d_in) with ``ΔW = B_s A_s``, ``Abar`` and ``Bbar``; ``B_pad`` (L, d_out, R + pad) is
    ``[B_s 0]``, whose first R columns ``B_s`` is."""

    B_s: Tensor
    A_s: Tensor
    Abar: Tensor
    Bbar: Tensor
    B_pad: Tensor


def _canonical(grp: _Group, pad: int) -> _Stacks:
    """:class:`_Stacks` with each layer's clients in a canonical order: sorted by a key of
    their own values (weight, rank, then the sum and the sum of squares of ``A_k``'s first row
    and of ``B_k``'s first column), and ``Ā``, ``B̄`` summed in that order. The column form's
    multi-start can end in another local minimum when only the rounding changes, so without
    this the residual could depend on the order in which the same clients are given; with it,
    ``ΔB`` and the objective are functions of each layer's set of clients (equal keys: in
    practice equal clients, whose order does not matter). The output adds that residual to
    FedIT's own ``Ā``, ``B̄`` (:func:`~lorafair._fair._batch._corrected`), summed in the order
    given as :func:`~lorafair.aggregate.fedit` sums them, so the returned factors can differ by
    an ulp between orders, and a zero residual returns FedIT's factors bit for bit. Cost:
    ``4 K`` reductions over one row or column each, one host transfer, and the float64 stacks
    written once, in that order (``pad`` zero columns after ``B_s``)."""
    ranks = grp.layers[0].ranks
    first = grp.layers[0]
    starts = [sum(ranks[:k]) for k in range(len(ranks))]
    f64 = torch.float64
    stats = []
    for ly in grp.layers:
        a = torch.stack([A[0] for A in ly.As]).to(f64)  # (K, d_in): first rows
        b = torch.stack([B[:, 0] for B in ly.Bs]).to(f64)  # (K, d_out): first columns
        stats.append(torch.stack([(a * a).sum(-1), a.sum(-1), (b * b).sum(-1), b.sum(-1)], -1))
    host = torch.stack(stats).cpu().tolist()  # (L, K, 4)
    orders = [
        sorted(range(len(ranks)), key=lambda k: (grp.p[k], ranks[k], *per[k])) for per in host
    ]
    R = sum(ranks)
    A_u = torch.empty(grp.n, R, first.d_in, dtype=f64, device=grp.device)
    B_pad = torch.zeros(grp.n, first.d_out, R + pad, dtype=f64, device=grp.device)
    for i, (ly, order) in enumerate(zip(grp.layers, orders, strict=True)):
        torch.cat([ly.As[k] for k in order], dim=0, out=A_u[i])
        B_pad[i, :, :R] = torch.cat([ly.Bs[k] for k in order], dim=1)
    rows = [[starts[k] + i for k in order for i in range(ranks[k])] for order in orders]
    idx = torch.tensor(rows, dtype=torch.int64, device=grp.device)  # (L, R)
    E_c = grp.E[idx]  # (L, R, r): the same products whatever the order was
    B_s = B_pad[..., :R]
    return _Stacks(B_s, A_u * grp.pw[idx][..., None], E_c.mT @ A_u, B_s @ E_c, B_pad)


class _Setup(NamedTuple):
    """A group's column problem, with what its starts and its answer need: the least-squares
    fits ``Z_ls`` (of ``ΔW``) and ``Z_unit`` (of its unit columns), and ``basis`` (the
    Householder QR of ``[B_s 0]``, residual on B with a basis; else None)."""

    problem: ColumnProblem
    Z_ls: Tensor
    Z_unit: Tensor
    basis: tuple[Tensor, Tensor] | None


def _setup(grp: _Group, opts: _Options) -> _Setup:
    """The typed problem in a basis of at most ``(K + 1) r`` rows (never d_out × d_in).

    Residual on B: ``Y = Z Ā`` with ``Z = Qᵀ B'`` in a basis ``Q`` of ``span(B_s) ∋ B̄`` plus r
    spare orthogonal directions (the Householder QR ``[B_s 0] = Q R``, ``Q`` kept as its
    reflectors, never formed), or ``Z = B'`` itself where ``d_out <= (K + 1) r`` (cost model: then
    d_out × d_in is no bigger than the factors). Residual on A: ``Y = R_B A'`` with
    ``B̄ = Q_B R_B``; the column norms of ΔW from a QR of ``B_s``."""
    d_out, kr, r = grp.layers[0].d_out, sum(grp.layers[0].ranks), grp.r
    based = opts.residual_on == "B" and kr + r < d_out
    st = _canonical(grp, r if based else 0)
    basis: tuple[Tensor, Tensor] | None = None
    if opts.residual_on == "B":
        if based:
            m = kr + r
            basis = torch.geqrf(st.B_pad)
            Bq = basis[0][..., :m, :kr].triu()  # Qᵀ B_s: R's first K r columns
            Z0 = torch.ormqr(*basis, st.Bbar, left=True, transpose=True)[..., :m, :]
        else:
            Bq = st.B_s
            Z0 = st.Bbar
        X = Bq @ st.A_s
        xn = torch.linalg.vector_norm(X, dim=-2)
        mat = st.Abar
        active = (xn > 0) & (torch.linalg.vector_norm(st.Abar, dim=-2) > 0)
        G_pinv = torch.linalg.pinv(st.Abar @ st.Abar.mT, hermitian=True)
        Z_ls = (Bq @ (st.A_s @ st.Abar.mT)) @ G_pinv
        Z_unit = (_unit_columns(X, xn) @ st.Abar.mT) @ G_pinv
    else:
        Q_B, R_B = torch.linalg.qr(st.Bbar)
        X = (Q_B.mT @ st.B_s) @ st.A_s
        _, R_s = torch.linalg.qr(st.B_s, mode="r")
        xn = torch.linalg.vector_norm(R_s @ st.A_s, dim=-2)
        mat = R_B
        nonzero_b = torch.linalg.matrix_norm(R_B) > 0
        active = (xn > 0) & nonzero_b[:, None]
        Z0 = st.Abar
        R_pinv = torch.linalg.pinv(R_B)
        Z_ls = R_pinv @ X
        Z_unit = R_pinv @ _unit_columns(X, xn)
    data = ColumnData(X, xn, active, Z0, mat, xn.new_zeros(grp.n))
    problem = ColumnProblem(data, opts.residual_on == "A", opts, _rounding(grp, opts))
    return _Setup(problem, Z_ls, Z_unit, basis)


def _starts(setup: _Setup) -> list[Tensor]:
    """The multi-start's starts (each (L, p, q)): FedIT, the least-squares fit, their midpoint,
    and the least-squares fit of the unit columns ``X_j/‖X_j‖`` (every column counts alike in
    the mean cosine; scaled to ``Z_ls``'s product norm)."""
    p = setup.problem
    Z0, Z_ls, Z_unit = p.data.Z0, setup.Z_ls, setup.Z_unit
    left, right = p.data.sides(p.on_left)
    yl = torch.linalg.matrix_norm(linear_map(Z_ls, left, right))
    yu = torch.linalg.matrix_norm(linear_map(Z_unit, left, right))
    ratio = torch.where(yu > 0, yl / torch.where(yu > 0, yu, 1.0), 0.0)
    return [Z0, Z_ls, 0.5 * (Z0 + Z_ls), Z_unit * ratio[:, None, None]]


def _solve_columns(grp: _Group, opts: _Options, single: bool) -> _Residuals:
    """Per-column cosine: the problem (:func:`_setup`), its candidates (the multi-start with
    its restricted problems and, residual on A, the column mix: :func:`_columns_minimise`; for
    ``λ > 0`` the λ = 0 end: :func:`_columns_end`), one scorer (:class:`ColumnScorer`) picks."""
    setup = _setup(grp, opts)
    problem = setup.problem
    Z0 = problem.data.Z0
    n_layers = Z0.shape[0]
    if single:
        iters = torch.zeros(n_layers, dtype=torch.int64, device=Z0.device)
        conv = torch.ones(n_layers, dtype=torch.bool, device=Z0.device)
        Z = Z0
        obj = problem.objective()
        f_final = obj.values(Z.reshape(n_layers, 1, -1), *problem.data).squeeze(1)
    else:
        starts = _starts(setup)
        scorer = ColumnScorer.of(problem)
        f_starts = None  # where the starts are only ranked, their values serve both ends
        if _ranked(Z0.shape[-2] * Z0.shape[-1], len(starts)):
            f_starts = scorer.values(torch.cat([z.flatten(-2) for z in starts]))
        _columns_minimise(scorer, starts, f_starts)
        if opts.lam > 0:
            _columns_end(scorer, starts, f_starts)
        Z, f_final, _, iters, conv, _ = scorer.pick()  # f: the scorer's value, by obj.values
    diff = Z - Z0
    reg = regulariser((diff * diff).sum(dim=(-2, -1)), opts.lam, opts.norm)
    cos = 1.0 - (f_final - reg)
    if setup.basis is not None:  # back from the basis: ΔB = Q (Z − Z0)
        d_out = grp.layers[0].d_out
        rest = diff.new_zeros(n_layers, d_out - diff.shape[-2], grp.r)
        diff = torch.ormqr(
            *setup.basis, torch.cat([diff, rest], dim=-2), left=True, transpose=False
        )
    return _Residuals(f_final, cos, iters, conv, extra=diff)


def _unit_columns(X: Tensor, xn: Tensor) -> Tensor:
    """``X`` with each non-zero column scaled to unit norm."""
    return X / torch.where(xn > 0, xn, torch.ones_like(xn)).unsqueeze(-2)


def _columns_end(
    scorer: ColumnScorer, starts: list[Tensor], f_starts: Tensor | None = None
) -> None:
    """Offers ``scorer`` points of the λ = 0 end: ``Z0`` with its product-facing part replaced by
    ``t D``, ``D`` that part of a λ = 0 minimiser (scale-free).

    The infimum ``f*_{λ=0} + λ R(‖part‖²)`` is approached as ``t → 0⁺`` (the whole product
    vanishes with the λ = 0 directions; no stationary point gets there, so the multi-start runs
    creep towards it and stop short). First the λ = 0 problem is solved (anchor ``Z0``) for the
    layers whose result is above ``λ R(‖part‖²)``, and its ``D`` is scored at ``t = τ`` (the best
    scale, where positive: the end attained) and at ``‖t D‖ = s ‖Z0‖`` for each ``s`` of
    ``COLUMNS_END_STEPS``. Where that leaves a layer above the infimum because its small points
    are unsafe (:func:`_unsafe`: the λ = 0 minimiser has a vanishing column of its own, which
    shrinking the whole product pushes below what rounding ``B̄ + ΔB`` resolves), the λ = 0
    problem is solved again with the anchor ``Z0 / s`` for every ``s < 1`` (the anchor sets how
    small a column may get), and those minimisers are scored at their ``s``. Cost: one more
    multi-start λ = 0 solve for most layers, ``len(COLUMNS_END_STEPS)`` for the few that need
    them. ``f_starts`` (start-major, as :func:`_multistart`): the starts' objective values, where
    known; the λ = 0 solve ranks its starts by them less their regulariser (the same cosines).
    """
    problem = scorer.problem
    data, opts, on_left = problem.data, problem.opts, problem.on_left
    Z0, mat = data.Z0, data.mat
    n_layers = Z0.shape[0]
    shape = problem.shape
    Pi = torch.linalg.pinv(mat) @ mat if on_left else mat @ torch.linalg.pinv(mat)

    def facing(W: Tensor, rows: Tensor) -> Tensor:  # the part of W (rows, …, p, q) that
        # reaches the product, by the projectors of the layers ``rows``
        P = Pi[rows].reshape(rows.shape[0], *([1] * (W.ndim - 3)), *Pi.shape[-2:])
        return torch.matmul(P, W) if on_left else torch.matmul(W, P)

    part = facing(Z0, torch.arange(n_layers, device=Z0.device))
    keep = Z0 - part
    now = scorer.pick()
    floor = regulariser((part * part).sum(dim=(-2, -1)), opts.lam, opts.norm)
    steps = torch.tensor(_tol.COLUMNS_END_STEPS, dtype=Z0.dtype, device=Z0.device)
    n_s = steps.shape[0]

    def offer(rows: Tensor, D: Tensor, st: Tensor, with_tau: bool) -> None:
        """``keep + t D_s`` to the scorer (D: rows, S, p, q; ``D_s`` scaled to
        ``‖t D_s‖ = st_s ‖Z0‖``), checked by :func:`_unsafe` best first."""
        dd = (D * D).sum(dim=(-2, -1))
        ok = dd > 0
        dd1 = torch.where(ok, dd, torch.ones_like(dd))
        c = st * torch.linalg.matrix_norm(Z0[rows])[:, None] / torch.sqrt(dd1)
        if with_tau:
            tau = (D[:, 0] * part[rows]).sum(dim=(-2, -1)) / dd1[:, 0]
            D, c, ok = (torch.cat([x[:, :1], x], dim=1) for x in (D, c, ok))
            c[:, 0] = tau
        pts = keep[rows].unsqueeze(1) + (c * ok)[..., None, None] * D
        its, cv = now.iterations[rows], now.converged[rows]
        scorer.offer(pts, rows, its, cv, data=data.take(rows), valid=ok & (c > 0), best_first=True)

    rows = torch.nonzero(now.f > floor + _tol.TIE).squeeze(-1)
    if rows.numel() == 0:
        return
    lam0 = problem.at_lam0()
    starts0 = [now.x[rows], *(x[rows] for x in starts)]  # the λ > 0 result too: near λ = 0's
    f0 = None
    if f_starts is not None:

        def cosine_part(f: Tensor, W: Tensor) -> Tensor:  # f less the regulariser at W
            diff = W - Z0[rows]
            return f - regulariser((diff * diff).sum(dim=(-2, -1)), opts.lam, opts.norm)

        known = [now.f[rows], *f_starts.reshape(len(starts), n_layers)[:, rows]]
        f0 = torch.cat([cosine_part(f, W) for f, W in zip(known, starts0, strict=True)])
    sub0 = ColumnScorer.of(lam0._replace(data=data.take(rows)))
    _columns_minimise(sub0, starts0, f0)
    Zs = sub0.pick().x
    limit = sub0.obj.values(Zs.reshape(rows.shape[0], 1, -1), *sub0.problem.data).squeeze(1)
    limit = limit + floor[rows]
    offer(rows, facing(Zs, rows).unsqueeze(1).expand(-1, n_s, -1, -1), steps, True)
    # Layers whose end could still win by more than the plain points' reach: anchors Z0 / s
    # (s < 1; the anchor Z0 itself was solved and scored just above).
    rows = rows[scorer.pick().f[rows] - limit > _tol.END_REACH * (1.0 + limit.abs())]
    if rows.numel() == 0:
        return
    m, small = rows.shape[0], steps[1:]
    rep = ColumnData(*(t[rows].repeat(n_s - 1, *([1] * (t.ndim - 1))) for t in data))
    rep = rep._replace(Z0=rep.Z0 / small.repeat_interleave(m)[:, None, None])
    starts0 = [x[rows].repeat(n_s - 1, 1, 1) for x in starts]
    sub0 = ColumnScorer.of(lam0._replace(data=rep))
    _columns_minimise(sub0, starts0)
    Zs = sub0.pick().x
    offer(rows, facing(Zs.reshape(n_s - 1, m, *shape).transpose(0, 1), rows), small, False)


def _mix_columns(Z: Tensor, f: Tensor, layer: Tensor, problem: ColumnProblem) -> Tensor:
    """Per layer, the point (L, p, n) made of each column's best among the candidates ``Z``
    (rows, p, n) of ``layer`` (rows,) with finite ``f`` (residual on A: ``Y = left Z``).

    A column's score is its share of the objective, ``−cos_j / n + λ ‖Z_j − Z0_j‖²`` (exact
    for ``"fro_squared"``; for ``"fro"``, ``λ ‖D‖`` linearised in ``‖D‖²`` at the layer's best
    candidate, ``λ ‖D_j‖² / (2 ‖D_best‖)``).
    """
    d = problem.data
    X, xn, active, Z0, left = d.X, d.xn, d.active, d.Z0, d.mat
    opts = problem.opts
    n_layers, n = xn.shape
    sub_Z0 = Z0[layer]
    Y = left[layer] @ Z
    inner = (Y * X[layer]).sum(dim=-2)
    ynorm = torch.linalg.vector_norm(Y, dim=-2)
    cos = cosine(inner, xn[layer], norm=ynorm, defined=active[layer], small="zero").cos
    dsq = (Z - sub_Z0).square().sum(dim=-2)  # (rows, n)
    lam = torch.full_like(f, opts.lam)
    if opts.norm == "fro":
        f_best = torch.full((n_layers,), torch.inf, dtype=f.dtype, device=f.device)
        f_best = f_best.scatter_reduce(0, layer, f, reduce="amin")
        rows = torch.arange(f.shape[0], device=f.device)
        at = torch.full((n_layers,), 0, dtype=torch.int64, device=f.device)
        at = at.scatter_reduce(0, layer[f == f_best[layer]], rows[f == f_best[layer]], "amax")
        rho = torch.sqrt(dsq.sum(dim=-1))[at]
        lam = opts.lam / (2.0 * torch.clamp(rho, min=_tol.MIX_FLOOR))[layer]
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


def _ranked(n_unknowns: int, n_starts: int) -> bool:
    """Whether :func:`_multistart` ranks its starts (L-BFGS sizes) instead of running all."""
    return n_unknowns > _tol.NEWTON_MAX_UNKNOWNS and n_starts > 1


def _multistart(scorer: ColumnScorer, starts: list[Tensor], f_starts: Tensor | None = None) -> Runs:
    """:func:`minimise` from every start (each (L, p, q)) of every layer; rows start-major
    (start ``i`` of layer ``l`` is row ``i L + l``). One run per start over the layers' own data
    (no copy of the data per start). The result's ``f`` is the objective by the scorer's values
    (not the run's own) at every row that ran; ``f_starts`` (m L,): the starts' values where the
    caller has them: they rank the starts and stand, unchanged, for those that do not run (the
    λ = 0 end passes values less their regulariser, equal to the scorer's up to rounding).

    Up to ``NEWTON_MAX_UNKNOWNS`` unknowns every start runs to convergence. Above (L-BFGS,
    where each evaluation costs ``O((K + 1) r)`` per column and the starts dominate the cost)
    the starts are ranked by their objective and only the best one per layer runs; the others
    stay candidates as they are. (On ViT-B/16 shapes all four starts end at the same minimum to
    ~1e-9; see ``docs/validation.md``.)
    """
    obj, data, opts = scorer.obj, scorer.problem.data, scorer.problem.opts
    n_layers, m = starts[0].shape[0], len(starts)
    x0s = [z.reshape(n_layers, -1) for z in starts]

    def joined(runs: list[Runs]) -> Runs:
        return Runs(*(torch.cat(z) for z in zip(*runs, strict=True)))

    if not _ranked(x0s[0].shape[-1], m):
        res = joined([minimise(obj, data, x, tol=opts.tol, max_iter=opts.max_iter) for x in x0s])
        return res._replace(f=scorer.values(res.x))
    x = torch.cat(x0s)
    # the starts, ranked by their values
    f = scorer.values(x) if f_starts is None else f_starts.clone()
    best = torch.argmin(f.reshape(m, n_layers), dim=0)
    rows = best * n_layers + torch.arange(n_layers, device=best.device)
    more = minimise(obj, data, x[rows], tol=opts.tol, max_iter=opts.max_iter)
    it = torch.zeros_like(f, dtype=torch.int64)
    cv = torch.zeros_like(f, dtype=torch.bool)
    x[rows], f[rows], it[rows], cv[rows] = (
        more.x,
        scorer.values(more.x),
        more.iterations,
        more.converged,
    )
    return Runs(x, f, it, cv)


def _columns_minimise(
    scorer: ColumnScorer, starts: list[Tensor], f_starts: Tensor | None = None
) -> None:
    """Multi-start minimisation of the columns objective, through its unattained infima: every
    point it makes is offered to ``scorer``.

    The cosine of a product column jumps where the column vanishes, and the best values are
    often approached as some columns shrink to zero (``d_in > r``: dropping a column frees the
    others; it counts at its best cosine in the limit). Newton's iterates then creep towards
    the limit with vanishing steps and stop short of it, or pass the point where float64 can
    still resolve the column's direction. So after the plain runs, every result with columns
    that are being driven to zero (below ``_tol.DROP_TINY`` of their scale), and for few columns
    the best result with each single column, seeds a restricted problem (:func:`drop_columns`)
    in which those columns are exactly zero: a smooth problem whose minimum is the infimum. Its
    own vanishing columns are dropped in turn (at most ``n`` rounds; each adds columns). Each
    restricted minimum is offered as a real point at a small distance ``ε`` from it
    (:func:`dropped_points`, ``_tol.DROP_STEPS``). Residual on A also offers the column-wise
    best mix of all candidates (:func:`_mix_columns`), polished. Host syncs: one per round of
    dropping (the number of restricted problems is data dependent).
    """
    problem = scorer.problem
    data, opts, on_left, shape = problem.data, problem.opts, problem.on_left, problem.shape
    X, xn, active, Z0 = data.X, data.xn, data.active, data.Z0
    n_layers, n = xn.shape
    dev = X.device
    m = len(starts)
    res = _multistart(scorer, starts, f_starts)
    layer = torch.arange(n_layers, device=dev).repeat(m)
    Zr = res.x.reshape(m * n_layers, *shape)
    # per layer (L, m, …) against the layers' data, back to rows start-major (m L, …)
    Z_lm = Zr.reshape(m, n_layers, *shape).transpose(0, 1)

    def rows_of(t: Tensor) -> Tensor:
        return t.transpose(0, 1).reshape(m * n_layers, *t.shape[2:])

    f_raw = res.f
    yn, sc = (
        rows_of(t) for t in _column_scale(Z_lm, Z0.unsqueeze(1), data.mat.unsqueeze(1), on_left)
    )
    tiny = active.repeat(m, 1) & (yn <= _tol.DROP_TINY * sc)
    scorer.offer_runs(res, m)
    # Seeds of restricted problems: (layer, dropped columns, point, iterations so far).
    seed = tiny.any(dim=-1)
    s_layer, s_drop, s_W, s_it = layer[seed], tiny[seed], Zr[seed], res.iterations[seed]
    steps = torch.tensor(_tol.DROP_STEPS, dtype=X.dtype, device=dev)
    if n <= _tol.DROP_SINGLES:
        # Each single column dropped from the best run: scored as is (projected), and the
        # _tol.DROP_SINGLES_SOLVE best of them per layer seed restricted problems.
        best = torch.argmin(f_raw.reshape(m, n_layers), dim=0)
        rows = (best * n_layers + torch.arange(n_layers, device=dev)).repeat(n)
        eye = torch.eye(n, dtype=torch.bool, device=dev)
        single = (eye.unsqueeze(1) & active.unsqueeze(0)).reshape(n * n_layers, n)
        sub = ColumnData(*(t[layer[rows]] for t in data))
        dc = drop_columns(sub, on_left, single)
        Zc = drop_project(dc, drop_start(dc, Zr[rows]))
        pts = dropped_points(dc, Zc, dc.E, steps)
        valid = single.any(-1, keepdim=True)
        its, cv = res.iterations[rows], res.converged[rows]
        f_pts = scorer.offer(pts, layer[rows], its, cv, data=sub, valid=valid)
        score = f_pts.amin(dim=-1).reshape(n, n_layers)
        k = min(n, _tol.DROP_SINGLES_SOLVE)
        top = torch.topk(score, k, dim=0, largest=False).indices  # (k, L)
        chosen = (top * n_layers + torch.arange(n_layers, device=dev)).flatten()
        chosen = chosen[torch.isfinite(score.flatten()[chosen])]
        s_layer = torch.cat([s_layer, layer[rows[chosen]]])
        s_drop = torch.cat([s_drop, single[chosen]])
        s_W = torch.cat([s_W, Zr[rows[chosen]]])
        s_it = torch.cat([s_it, res.iterations[rows[chosen]]])
    for _ in range(n):
        if s_layer.numel() == 0:
            break
        sub = ColumnData(*(t[s_layer] for t in data))
        dc = drop_columns(sub, on_left, s_drop)
        x0 = drop_start(dc, s_W)
        rd = minimise(
            scorer.obj, dc.data, x0.reshape(s_W.shape[0], -1), tol=opts.tol, max_iter=opts.max_iter
        )
        it = s_it + rd.iterations
        E = _drop_direction(dc, sub, s_W - drop_project(dc, s_W), opts)
        # The seed itself with its columns J dropped, and the restricted problem's result.
        for W, its in ((x0, s_it), (rd.x, it)):
            Zc = drop_project(dc, W.reshape(s_W.shape))
            pts = dropped_points(dc, Zc, E, steps)  # (rows, S, p, q)
            yn, sc = _column_scale(Zc, sub.Z0, sub.mat, on_left)
            tiny = dc.data.active & (yn <= _tol.DROP_TINY * sc)
            scorer.offer(pts, s_layer, its, rd.converged, data=sub)
        seed = tiny.any(dim=-1)
        s_layer, s_drop, s_W, s_it = s_layer[seed], (s_drop | tiny)[seed], Zc[seed], it[seed]
    if on_left:
        # Residual on A: column j of the product depends on column j of A' only, so the
        # objective couples the columns only through the regulariser (not at all for
        # "fro_squared"). Mix the best column of every candidate, then polish.
        sofar = scorer.pool.joined()
        mixed = _mix_columns(sofar.x.reshape(-1, *shape), sofar.f, sofar.layer, problem)
        rp = minimise(scorer.obj, data, mixed.flatten(-2), tol=opts.tol, max_iter=opts.max_iter)
        every = torch.arange(n_layers, device=dev)
        for W in (mixed.flatten(-2), rp.x):
            scorer.offer(W.reshape(-1, *shape), every, rp.iterations, rp.converged)

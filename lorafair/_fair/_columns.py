"""Private: the column cosine (``similarity="columns"``): mean over the d_in columns.

Solved in the coordinates of an orthonormal basis of ``span(B_s) ⊕ (r orthogonal directions)``
(``B̄ ∈ span(B_s)``; at most ``(K + 1) r`` rows; residual on A: ``Y = R_B A'``), never d_out × d_in:
multi-start :func:`~lorafair._fair._newton.minimise` from four starts, restricted problems where
product columns vanish (:func:`drop_columns`), for ``λ > 0`` the λ = 0 end, and for residual on
A a column-wise mix. Every point is scored by the true objective, with points whose objective
float64 cannot resolve in the output dtype (:func:`_unsafe`) left out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lorafair._fair import _tolerances as _tol
from lorafair._fair._batch import _Group, _Rounding, _rounding, _Solved, turning
from lorafair._fair._newton import (
    Batched,
    SolveResult,
    _reg_grad_coef,
    _reg_hessian,
    _safe_sqrt,
    minimise,
    regulariser,
)
from lorafair._fair._options import Norm, _Options
from lorafair._fair._pool import _Pool
from lorafair._validate import Prepared, raise_if_nonfinite


def _column_norms(t: Tensor) -> Tensor:
    """``‖t_j‖`` (…, n) of the columns as ``sqrt(Σ t²)``, for the rounding checks: torch's
    ``vector_norm`` over dim −2 (not contiguous) is 4–10× slower on CPU (torch 2.13)."""
    return (t * t).sum(dim=-2).sqrt()


def linear_map(Z: Tensor, left: Tensor | None, right: Tensor | None) -> Tensor:
    """``left @ Z @ right`` (a missing side is the identity); any leading dimensions."""
    Y = Z if left is None else left @ Z
    return Y if right is None else Y @ right


def adjoint_map(G: Tensor, left: Tensor | None, right: Tensor | None) -> Tensor:
    """``leftᵀ @ G @ rightᵀ``, the adjoint of :func:`linear_map` (pulls a gradient back to Z)."""
    out = G if left is None else left.mT @ G
    return out if right is None else out @ right.mT


def _factored(Z: Tensor, left: Tensor | None, right: Tensor | None) -> bool:
    """``Y = Z right`` (residual on B) with ``Z`` at least ``_tol.FACTORED_ROWS`` times as tall as
    wide: column sums without forming ``Y`` (:func:`_column_sums`), q × n work instead of p × n."""
    return left is None and right is not None and Z.shape[-2] >= _tol.FACTORED_ROWS * Z.shape[-1]


def _norms_sq(Z: Tensor, left: Tensor | None, right: Tensor | None) -> Tensor:
    """``‖Y_j‖²`` (…, n), ``Y = left Z right``. For ``Y = Z right`` without forming ``Y``: with
    ``Z = Q R`` (thin QR) ``‖Z a_j‖ = ‖R a_j‖``, as accurate as the product itself (error
    ``ε ‖Z‖ ‖a_j‖``, unlike the quadratic form ``a_jᵀ ZᵀZ a_j``); O(p q² + q² n), not O(p q n)."""
    if _factored(Z, left, right):
        assert right is not None
        U: Tensor = torch.linalg.qr(Z, mode="r").R @ right
        return (U * U).sum(dim=-2)
    Y = linear_map(Z, left, right)
    return (Y * Y).sum(dim=-2)


class _Sums(NamedTuple):
    """Per product column ``j``: ``inner = <X_j, Y_j>`` and ``nsq = ‖Y_j‖²`` (…, n)."""

    inner: Tensor
    nsq: Tensor


def _column_sums(
    Z: Tensor, X: Tensor, left: Tensor | None, right: Tensor | None, ZtX: Tensor | None = None
) -> _Sums:
    """:class:`_Sums` of ``Y = left Z right`` against ``X`` (any leading dimensions, broadcast).

    For ``Y = Z right`` (q ≪ p) ``<X_j, Y_j> = Σ_k (ZᵀX)_kj right_kj``: one GEMM (none where
    ``ZtX``, the product ``ZᵀX``, is given) and q × n elementwise work instead of p × n (same
    rounding order, ``ε ‖X_j‖ ‖Z‖ ‖right_j‖``)."""
    if _factored(Z, left, right):
        assert right is not None
        T = Z.mT @ X if ZtX is None else ZtX
        return _Sums((T * right).sum(dim=-2), _norms_sq(Z, left, right))
    Y = linear_map(Z, left, right)
    return _Sums((Y * X).sum(dim=-2), (Y * Y).sum(dim=-2))


def _pullback(
    Z: Tensor, X: Tensor, k1: Tensor, c: Tensor, left: Tensor | None, right: Tensor | None
) -> Tensor:
    """``leftᵀ (X diag(k1) − Y diag(c)) rightᵀ`` with ``Y = left Z right``: the gradient in ``Z``
    of a function of the column sums with ``∂/∂Y_j = k1_j X_j − c_j Y_j``. For ``Y = Z right``:
    ``X (k1 ⊙ right)ᵀ − Z (right diag(c) rightᵀ)``, again without forming ``Y``."""
    if _factored(Z, left, right):
        assert right is not None
        return X @ (k1.unsqueeze(-2) * right).mT - Z @ ((c.unsqueeze(-2) * right) @ right.mT)
    Y = linear_map(Z, left, right)
    return adjoint_map(k1.unsqueeze(-2) * X - c.unsqueeze(-2) * Y, left, right)


def columns_terms(
    Z: Tensor,
    left: Tensor | None,
    right: Tensor | None,
    X: Tensor,
    xn: Tensor,
    active: Tensor,
) -> Tensor:
    """Mean over columns ``j`` of ``<X_j, Y_j> / (xn_j ‖Y_j‖)`` with ``Y = left @ Z @ right``.

    Any leading (batch) dimensions, broadcast: ``Z`` (…, p, q); ``left`` (…, m, p) or None
    (identity); ``right`` (…, q, n) or None; ``X`` (…, m, n) the projection of ΔW on the
    coordinates of ``Y``; ``xn`` (…, n) the full column norms of ΔW; ``active`` (…, n): columns
    whose cosine can be non-zero (the others count as 0). Cost: O(m p q + m q n) per point.
    """
    inner, nsq = _column_sums(Z, X, left, right)
    xs = torch.where(active, xn, 1.0)
    cos = torch.where(active, inner / (xs * _safe_sqrt(nsq)), 0.0)
    return cos.mean(dim=-1)


def columns_objective(
    lam: float,
    norm: Norm,
    shape: tuple[int, int],
    has_left: bool,
    has_right: bool,
    has_offset: bool = False,
) -> Batched:
    """``f(Z) = 1 − mean_j cos(X_j, Y_j) + λ R(Z − Z0)``, ``Y = left Z right``, closed forms.

    Data ``(X, xn, active, Z0, c0?, left?, right?)`` (see :func:`columns_terms`), ``Z`` of
    ``shape`` flattened row-major. With ``has_offset`` the regulariser is ``λ R`` of
    ``‖Z − Z0‖² + c0`` (``c0`` (L,) ≥ 0; used by :func:`drop_columns`). Per column, with
    ``a = X_j/xn_j``, ``y = Y_j``, ``ν = ‖y‖``, ``s = <a, y>``: ``∇_y cos_j = a/ν − s y/ν³`` and
    ``∇²_y cos_j = −(a yᵀ + y aᵀ)/ν³ − s I/ν³ + 3 s y yᵀ/ν⁵``; the chain rule through the linear
    map gives ``∇_Z = leftᵀ (∇_Y) rightᵀ`` and
    ``∇²_Z[(a,k),(b,l)] = Σ_j right[k,j] right[l,j] (leftᵀ ∇²_y cos_j left)[a,b] / n``.
    Regulariser derivatives as in :func:`flat_objective` (mask of ones). Cost: a value or a
    gradient O(m p q + m q n); the Hessian O(n (m² p + p² q²)) (only used for small ``p q``).
    """
    p, q = shape

    def split(lr: tuple[Tensor, ...]) -> tuple[Tensor | None, Tensor | None]:
        return (lr[0] if has_left else None), (lr[-1] if has_right else None)

    def offset(rest: tuple[Tensor, ...]) -> tuple[Tensor | None, tuple[Tensor, ...]]:
        return (rest[0], rest[1:]) if has_offset else (None, rest)

    def with_offset(dsq: Tensor, c0: Tensor | None) -> Tensor:
        return dsq if c0 is None else dsq + c0

    def values(
        x: Tensor, X: Tensor, xn: Tensor, active: Tensor, Z0: Tensor, *rest: Tensor
    ) -> Tensor:
        n_layers, n_cand, _ = x.shape
        Z = x.reshape(n_layers, n_cand, p, q)
        c0, lr = offset(rest)
        left, right = split(lr)
        cos = columns_terms(
            Z,
            None if left is None else left.unsqueeze(1),
            None if right is None else right.unsqueeze(1),
            X.unsqueeze(1),
            xn.unsqueeze(1),
            active.unsqueeze(1),
        )
        diff = Z - Z0.unsqueeze(1)
        dsq = (diff * diff).sum(dim=(-2, -1))
        if c0 is not None:
            dsq = dsq + c0[:, None]
        return 1.0 - cos + regulariser(dsq, lam, norm)

    def _cosine_terms(
        inner: Tensor, nsq: Tensor, xn: Tensor, active: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``cos`` (mean) and per column ``k1 = 1/(xn ν)``, ``k3 = 1/ν³``, ``s = <a, y>``,
        ``xs`` from the columns' inner products with ΔW and squared norms."""
        nu = _safe_sqrt(nsq)
        xs = torch.where(active, xn, torch.ones_like(xn))
        big = active & (nsq > _tol.TINY)
        zero = torch.zeros_like(nu)
        k1 = torch.where(active, 1.0 / (xs * nu), zero)  # 1/(xn ν)
        k3 = torch.where(big, 1.0 / (nu * nu * nu), zero)  # 1/ν³
        s = torch.where(active, inner / xs, zero)  # <a, y>
        cos = (s * torch.where(active, 1.0 / nu, zero)).mean(dim=-1)
        return cos, k1, k3, s, xs

    def value_and_grad(
        x: Tensor,
        X: Tensor,
        xn: Tensor,
        active: Tensor,
        Z0: Tensor,
        *rest: Tensor,
        fx: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        c0, lr = offset(rest)
        left, right = split(lr)
        Z = x.reshape(x.shape[0], p, q)
        cos, k1, k3, s, _ = _cosine_terms(*_column_sums(Z, X, left, right, fx), xn, active)
        GZ = _pullback(Z, X, k1, s * k3, left, right) / X.shape[-1]
        diff = Z - Z0
        dsq = with_offset((diff * diff).sum(dim=(-2, -1)), c0)
        f = 1.0 - cos + regulariser(dsq, lam, norm)
        grad = _reg_grad_coef(dsq, lam, norm)[:, None, None] * diff - GZ
        return f, grad.flatten(-2)

    def hessian(
        x: Tensor, X: Tensor, xn: Tensor, active: Tensor, Z0: Tensor, *rest: Tensor
    ) -> Tensor:
        c0, lr = offset(rest)
        Z = x.reshape(x.shape[0], p, q)
        Y = linear_map(Z, *split(lr))
        nsq = (Y * Y).sum(dim=-2)
        _, _, k3, s, xs = _cosine_terms((Y * X).sum(dim=-2), nsq, xn, active)
        n_layers, m, n_cols = Y.shape
        k5 = torch.where(
            k3 != 0, 3.0 * s * k3 / torch.where(k3 != 0, nsq, torch.ones_like(nsq)), 0.0
        )
        a = (X / xs.unsqueeze(-2)).mT  # (L, n, m)
        y = Y.mT
        ay = a.unsqueeze(-1) * y.unsqueeze(-2)
        eye_m = torch.eye(m, dtype=Y.dtype, device=Y.device)
        Hj = (
            -k3[..., None, None] * (ay + ay.mT)
            - (s * k3)[..., None, None] * eye_m
            + k5[..., None, None] * (y.unsqueeze(-1) * y.unsqueeze(-2))
        ) / n_cols  # (L, n, m, m): Hessian of cos_j / n in Y_j
        left, right = split(lr)
        if left is not None:
            Hj = left.mT.unsqueeze(1) @ Hj @ left.unsqueeze(1)  # (L, n, p, p)
        if right is None:
            right = torch.eye(n_cols, dtype=Y.dtype, device=Y.device).expand(n_layers, -1, -1)
        hz = torch.einsum("lkj,lqj,ljab->lakbq", right, right, Hj).reshape(n_layers, p * q, p * q)
        diff = (Z - Z0).flatten(-2)
        dsq = with_offset((diff * diff).sum(dim=-1), c0)
        return _reg_hessian(diff, dsq, torch.ones_like(diff), lam, norm) - hz

    def line(
        x: Tensor,
        d: Tensor,
        ts: Tensor,
        X: Tensor,
        xn: Tensor,
        active: Tensor,
        Z0: Tensor,
        *rest: Tensor,
        fx: Tensor | None = None,
        fd: Tensor | None = None,
    ) -> Tensor:
        # Along Z + t D every column's <X_j, Y_j>, ‖Y_j‖² and ‖Z − Z0‖² are polynomials in t of
        # degree ≤ 2: two products (Y, V = left D right) serve every step length. Where a
        # quadratic cancels (the point nears a zero column or Z0), the layer is evaluated exactly.
        c0, lr = offset(rest)
        left, right = split(lr)
        n_layers = x.shape[0]
        Z = x.reshape(n_layers, p, q)
        D = d.reshape(n_layers, p, q)
        t = ts[None, :, None]
        if _factored(Z, left, right):
            # The same five sums without Y or V: ZᵀX, DᵀX and, with [Z D] = Q R, Y_j, V_j
            # have the norms and inner product of R_Z a_j, R_D a_j (R_Z, R_D: R's halves).
            assert right is not None
            ZD = torch.cat([Z, D], dim=-1)
            if fx is None or fd is None:
                T = ZD.mT @ X  # one GEMM for ZᵀX and DᵀX
                fx, fd = T[..., :q, :], T[..., q:, :]
            yx, vx = (fx * right).sum(dim=-2), (fd * right).sum(dim=-2)
            R = torch.linalg.qr(ZD, mode="r").R
            U, W = R[..., :q, :q] @ right, R[..., q:] @ right  # R_Z's lower half is zero
            yy, vv = (U * U).sum(dim=-2), (W * W).sum(dim=-2)
            yv = (U * W[..., :q, :]).sum(dim=-2)
        else:
            Y, V = linear_map(Z, left, right), linear_map(D, left, right)
            yx, vx = (Y * X).sum(dim=-2), (V * X).sum(dim=-2)
            yy, vv, yv = (Y * Y).sum(dim=-2), (V * V).sum(dim=-2), (Y * V).sum(dim=-2)
        inner = yx.unsqueeze(1) + t * vx.unsqueeze(1)
        ends = yy.unsqueeze(1) + t * t * vv.unsqueeze(1)
        nsq = ends + 2.0 * t * yv.unsqueeze(1)  # (L, S, n)
        act = active.unsqueeze(1)
        xs = torch.where(active, xn, 1.0).unsqueeze(1)
        cos = torch.where(act, inner / (xs * _safe_sqrt(nsq)), 0.0)
        diff = Z - Z0
        t2 = ts[None, :]
        e0 = (diff * diff).sum(dim=(-2, -1))[:, None] + t2 * t2 * (D * D).sum(dim=(-2, -1))[:, None]
        dsq = e0 + 2.0 * t2 * (diff * D).sum(dim=(-2, -1))[:, None]
        lost = (act & (nsq <= _tol.LINE_CANCEL * ends) & (ends > 0)).any(dim=-1)
        lost |= (dsq <= _tol.LINE_CANCEL * e0) & (e0 > 0)
        if c0 is not None:
            dsq = dsq + c0[:, None]
        f = 1.0 - cos.mean(dim=-1) + regulariser(torch.clamp(dsq, min=0.0), lam, norm)
        redo = lost.any(dim=-1)
        if bool(redo.any()):
            sub = (X, xn, active, Z0, *rest)
            pts = x[redo].unsqueeze(1) + t2.unsqueeze(-1) * d[redo].unsqueeze(1)
            f[redo] = values(pts, *(a[redo] for a in sub))
        return f

    def features(x: Tensor, X: Tensor, *_: Tensor) -> Tensor:
        # ZᵀX (L, q, n): linear in Z, so minimise carries it along its steps (one GEMM fewer
        # in each gradient and in each line search).
        return x.reshape(x.shape[0], p, q).mT @ X

    factored = has_right and not has_left and p >= _tol.FACTORED_ROWS * q
    return Batched(
        _by_rows(values, candidates=True),
        _by_rows(value_and_grad),
        hessian,
        _by_rows(line, keep=2),
        _by_rows(features) if factored else None,
    )


def _by_rows(
    fn: Callable[..., Any], *, candidates: bool = False, keep: int = -1
) -> Callable[..., Any]:
    """``fn(x, …)`` over its leading (row) dimension in cache-sized chunks (:func:`_in_chunks`);
    ``x`` (rows, S, N) with ``candidates``; argument ``keep`` (the line's step lengths) is not
    split; the data's ``X`` comes first after ``x`` (after ``x, d, ts`` for the line); keyword
    tensors (the carried features) are split with the rows."""

    def run(*args: Tensor, **kw: Tensor | None) -> Any:
        x, X = args[0], args[1 if keep < 0 else 3]
        per_row = X.shape[-2] * X.shape[-1] * X.element_size() * (x.shape[1] if candidates else 1)
        given = {k: v for k, v in kw.items() if v is not None}
        if not given:
            return _in_chunks(fn, args, per_row, keep)
        names = list(given)

        def call(*a: Tensor) -> Any:
            n_pos = len(a) - len(names)
            return fn(*a[:n_pos], **dict(zip(names, a[n_pos:], strict=True)))

        return _in_chunks(call, (*args, *given.values()), per_row, keep)

    return run


def _in_chunks(fn: Callable[..., Any], args: tuple[Tensor, ...], per_row: int, keep: int) -> Any:
    """``fn(*args)`` over chunks of the arguments' leading (row) dimension (``args[keep]`` whole)
    whose ``m × n`` arrays hold at most ``_tol.CHUNK_BYTES`` (``per_row`` bytes a row), results
    concatenated: on CPU the elementwise passes then run from cache, not memory (3–7× per pass
    at ViT sizes). Accelerators take one chunk. Rows are independent, so only rounding changes.
    """
    step = max(1, _tol.CHUNK_BYTES // max(per_row, 1))
    n_rows = args[0].shape[0]
    if args[0].device.type != "cpu" or n_rows <= step:
        return fn(*args)
    parts = [
        fn(*(a if k == keep else a[i : i + step] for k, a in enumerate(args)))
        for i in range(0, n_rows, step)
    ]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(z) for z in zip(*parts, strict=True))
    return torch.cat(parts)


class DroppedColumns(NamedTuple):
    """The columns problem restricted to the points whose product columns ``J`` vanish.

    ``data``: the restricted problem's data for :func:`columns_objective` with ``has_offset``
    (``X``, ``xn``, ``active`` without ``J``, ``Z0``, ``c0``, ``left`` or the reduced
    ``right``); ``drop`` (L, n) the mask of ``J``; ``PL`` (L, p, p) / ``PR`` (L, q, q) the
    projectors of :func:`drop_columns` (``PR`` None on the left-only form, where it is the
    column mask ``drop``); ``E`` (L, p, q) the direction along which the dropped columns
    reappear with their best cosines.
    """

    data: tuple[Tensor, ...]
    drop: Tensor
    PL: Tensor | None
    PR: Tensor | None
    E: Tensor


def drop_columns(
    X: Tensor,
    xn: Tensor,
    active: Tensor,
    Z0: Tensor,
    left: Tensor | None,
    right: Tensor | None,
    drop: Tensor,
) -> DroppedColumns:
    """Restrict the columns problem (data of :func:`columns_objective`) to ``left Z right_J = 0``.

    ``J`` = the columns where ``drop`` (L, n) is set. The cosine of column ``j`` is
    discontinuous where ``Y_j = left Z right_j`` vanishes: arbitrarily close to such a ``Z``,
    ``Y_j = ε left E right_j`` takes any direction of ``range(left)``, so the objective's
    infimum there counts column ``j`` at its best cosine ``‖P X_j‖ / xn_j`` (``P`` the
    projector on ``range(left)``), not 0. Such infima (LoRA-FAIR with ``d_in > r``: a column
    driven to zero frees the others) are not attained; they are found here as exact minima of
    a smooth restricted problem, then approached by :func:`dropped_points`.

    The restriction is ``Z = Π(W) = W − P_L W P_R`` (``P_L = left⁺ left``, ``P_R = right_J
    right_J⁺``: the orthogonal projection onto the constraint's subspace). On it
    ``Y = left W (I − P_R) right`` and ``‖Π(W) − Z0‖² = ‖Π(W − Z0)‖² + c0``, ``c0 =
    ‖P_L Z0 P_R‖²``; replacing that by ``‖W − Z0‖² + c0`` (equal wherever the part of ``W`` that
    ``Π`` removes equals ``Z0``'s, which minimises it) gives a problem with the same minimum
    and a non-singular Hessian. Either ``left`` (m, p) or ``right`` (q, n) is given (the
    shapes of :func:`_solve_columns`); with ``left`` only, ``P_R`` is the
    diagonal column mask. Cost: one ``pinv`` of ``left`` (m × p) or of ``right_J`` (q × n)
    and O(p q (p + q + n)) flops per layer.
    """
    dm = drop.unsqueeze(-2).to(X.dtype)
    keep = active & ~drop
    if right is None:
        assert left is not None
        pinv = torch.linalg.pinv(left)
        PL = pinv @ left
        c0 = ((PL @ Z0) * dm).square().sum(dim=(-2, -1))
        E = (pinv @ X) * dm
        return DroppedColumns((X, xn, keep, Z0, c0, left), drop, PL, None, E)
    assert left is None
    RJ = right * dm
    pinv = torch.linalg.pinv(RJ)  # (n, q), zero rows outside J
    PR = RJ @ pinv
    reduced = right - PR @ right
    reduced = reduced * (1.0 - dm)
    # Columns in span(right_J) vanish with J (numerically: a tiny remainder); they count 0.
    rest = torch.linalg.vector_norm(reduced, dim=-2)
    keep = keep & (rest > 1e-10 * torch.linalg.vector_norm(right, dim=-2))
    c0 = (Z0 @ PR).square().sum(dim=(-2, -1))
    E = (X * dm) @ pinv
    return DroppedColumns((X, xn, keep, Z0, c0, reduced), drop, None, PR, E)


def drop_start(dc: DroppedColumns, W: Tensor) -> Tensor:
    """``Π(W) + P_L Z0 P_R`` (L, p, q): a start for the restricted problem whose (relaxed)
    objective equals the true one at ``Π(W)``, i.e. ``W`` with the columns ``J`` projected out."""
    Z0 = dc.data[3]
    if dc.PR is None:
        assert dc.PL is not None
        dm = dc.drop.unsqueeze(-2).to(W.dtype)
        return W - (dc.PL @ (W - Z0)) * dm
    if dc.PL is None:
        return W - (W - Z0) @ dc.PR
    return W - dc.PL @ (W - Z0) @ dc.PR


def drop_project(dc: DroppedColumns, W: Tensor) -> Tensor:
    """``Π(W) = W − P_L W P_R`` (L, p, q): the point of the full problem that ``W`` stands for."""
    if dc.PR is None:
        assert dc.PL is not None
        return W - (dc.PL @ W) * dc.drop.unsqueeze(-2).to(W.dtype)
    if dc.PL is None:
        return W - W @ dc.PR
    return W - dc.PL @ W @ dc.PR


def dropped_points(dc: DroppedColumns, Zc: Tensor, E: Tensor, steps: Tensor) -> Tensor:
    """Points ``Zc + ε_s E`` (L, S, p, q) approaching the restricted problem's value at ``Zc``.

    ``Zc = Π(W)`` (L, p, q) from :func:`drop_project`; ``ε_s = steps_s (‖Zc‖ + ‖Z0‖) / ‖E‖``.
    The dropped columns of ``Y`` are then ``ε_s left E right_j`` (their best directions when
    ``right_J`` has full column rank), the others move by O(ε_s): the objective tends to the
    restricted value minus the dropped columns' cosines / n as ``steps → 0``. Float64 rounding
    of the vanished part (~1e-16 (‖Zc‖ + ‖Z0‖)) turns those directions by ~1e-16 / steps, which
    costs only second order in a cosine at its best direction.
    """
    base = torch.linalg.matrix_norm(Zc) + torch.linalg.matrix_norm(dc.data[3])
    base = torch.where(base > 0, base, torch.ones_like(base))
    en = torch.linalg.matrix_norm(E)
    scale = torch.where(en > 0, base / torch.where(en > 0, en, torch.ones_like(en)), 0.0)
    eps = steps[None, :] * scale[:, None]  # (L, S)
    return Zc.unsqueeze(1) + eps[..., None, None] * E.unsqueeze(1)


def solve_columns(
    groups: list[_Group], opts: _Options, single: bool, prep: Prepared
) -> list[_Solved]:
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


def _solve_columns(grp: _Group, opts: _Options, single: bool) -> _Solved:
    """Per-column cosine: iterate in a basis of at most ``(K + 1) r`` rows (never d_out × d_in)."""
    d_out, kr, r = grp.layers[0].d_out, sum(grp.layers[0].ranks), grp.r
    based = opts.residual_on == "B" and kr + r < d_out
    st = _canonical(grp, r if based else 0)
    n_layers = st.Abar.shape[0]
    left: Tensor | None
    right: Tensor | None
    basis: tuple[Tensor, Tensor] | None = None
    if opts.residual_on == "B":
        # Y = Z Ā with Z = Qᵀ B' in a basis Q of span(B_s) ∋ B̄ plus r spare orthogonal
        # directions: the Householder QR [B_s 0] = Q R, Q kept as its reflectors (never formed).
        if based:
            m = kr + r
            basis = torch.geqrf(st.B_pad)
            Bq = basis[0][..., :m, :kr].triu()  # Qᵀ B_s: R's first K r columns
            Z0 = torch.ormqr(*basis, st.Bbar, left=True, transpose=True)[..., :m, :]
        else:  # cost model: d_out <= (K + 1) r, so d_out × d_in is no bigger than the factors
            Bq = st.B_s
            Z0 = st.Bbar
        X = Bq @ st.A_s
        xn = torch.linalg.vector_norm(X, dim=-2)
        left, right = None, st.Abar
        active = (xn > 0) & (torch.linalg.vector_norm(st.Abar, dim=-2) > 0)
        G_pinv = torch.linalg.pinv(st.Abar @ st.Abar.mT, hermitian=True)
        Z_ls = (Bq @ (st.A_s @ st.Abar.mT)) @ G_pinv
        Z_unit = (_unit_columns(X, xn) @ st.Abar.mT) @ G_pinv
    else:
        # Y = R_B A' with B̄ = Q_B R_B; column norms of ΔW from a QR of B_s.
        Q_B, R_B = torch.linalg.qr(st.Bbar)
        X = (Q_B.mT @ st.B_s) @ st.A_s
        _, R_s = torch.linalg.qr(st.B_s, mode="r")
        xn = torch.linalg.vector_norm(R_s @ st.A_s, dim=-2)
        left, right = R_B, None
        nonzero_b = torch.linalg.matrix_norm(R_B) > 0
        active = (xn > 0) & nonzero_b[:, None]
        Z0 = st.Abar
        R_pinv = torch.linalg.pinv(R_B)
        Z_ls = R_pinv @ X
        Z_unit = R_pinv @ _unit_columns(X, xn)
    shape = (int(Z0.shape[-2]), int(Z0.shape[-1]))
    lam, norm = opts.lam, opts.norm
    extra = tuple(t for t in (left, right) if t is not None)
    data = (X, xn, active, Z0, *extra)
    obj = columns_objective(lam, norm, shape, left is not None, right is not None)
    if single:
        iters = torch.zeros(n_layers, dtype=torch.int64, device=X.device)
        conv = torch.ones(n_layers, dtype=torch.bool, device=X.device)
        Z = Z0
        f_final = obj.values(Z.reshape(n_layers, 1, -1), *data).squeeze(1)
    else:
        # FedIT, the least-squares fit, their midpoint, and the least-squares fit of the unit
        # columns X_j/‖X_j‖ (every column counts alike in the mean cosine; scaled to Z_ls's
        # product norm).
        yl = torch.linalg.matrix_norm(linear_map(Z_ls, left, right))
        yu = torch.linalg.matrix_norm(linear_map(Z_unit, left, right))
        ratio = torch.where(yu > 0, yl / torch.where(yu > 0, yu, 1.0), 0.0)
        starts = [Z0, Z_ls, 0.5 * (Z0 + Z_ls), Z_unit * ratio[:, None, None]]
        unit = _rounding(grp, opts)  # rounding of the output, in the dtype it comes in
        f_starts = None  # where the starts are only ranked, their values serve both ends
        if _ranked(shape[0] * shape[1], len(starts)):
            f_starts = _row_values(obj, data, torch.cat([z.flatten(-2) for z in starts]))
        pool = _columns_minimise(obj, data, starts, left is not None, opts, unit, f_starts)
        if opts.lam > 0:
            _columns_end(obj, data, starts, pool, left is not None, opts, unit, f_starts)
        Z, f_final, iters, conv = pool.choice(shape)  # f: the scorer's value, by obj.values
    diff = Z - Z0
    reg = regulariser((diff * diff).sum(dim=(-2, -1)), lam, norm)
    cos = 1.0 - (f_final - reg)
    obj_val = f_final
    if basis is not None:  # back from the basis: ΔB = Q (Z − Z0)
        rest = diff.new_zeros(n_layers, d_out - diff.shape[-2], r)
        diff = torch.ormqr(*basis, torch.cat([diff, rest], dim=-2), left=True, transpose=False)
    delta = diff
    return _Solved(obj_val, cos, iters, conv, extra=delta)


def _take(data: tuple[Tensor, ...], rows: Tensor) -> tuple[Tensor, ...]:
    """``data``'s rows ``rows`` (sorted and unique, as ``nonzero`` gives them): the tensors
    themselves when that is every row (no copy of ``X``, the largest of them)."""
    if rows.shape[0] == data[0].shape[0]:
        return data
    return tuple(t[rows] for t in data)


def _unit_columns(X: Tensor, xn: Tensor) -> Tensor:
    """``X`` with each non-zero column scaled to unit norm."""
    return X / torch.where(xn > 0, xn, torch.ones_like(xn)).unsqueeze(-2)


def _columns_end(
    obj: Batched,
    data: tuple[Tensor, ...],
    starts: list[Tensor],
    pool: _Pool,
    has_left: bool,
    opts: _Options,
    unit: _Rounding,
    f_starts: Tensor | None = None,
) -> None:
    """Adds to ``pool`` points of the λ = 0 end: ``Z0`` with its product-facing part replaced by
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
    Z0, mat = data[3], data[4]
    n_layers = Z0.shape[0]
    shape = (int(Z0.shape[-2]), int(Z0.shape[-1]))
    Pi = torch.linalg.pinv(mat) @ mat if has_left else mat @ torch.linalg.pinv(mat)

    def facing(W: Tensor) -> Tensor:  # the part of W that reaches the product (W: …, p, q)
        P = Pi.reshape(Pi.shape[0], *([1] * (W.ndim - 3)), *Pi.shape[-2:])
        return torch.matmul(P, W) if has_left else torch.matmul(W, P)

    part = facing(Z0)
    keep = Z0 - part
    now = pool.choice(shape)
    floor = regulariser((part * part).sum(dim=(-2, -1)), opts.lam, opts.norm)
    steps = torch.tensor(_tol.COLUMNS_END_STEPS, dtype=Z0.dtype, device=Z0.device)
    n_s = steps.shape[0]
    opts0 = dataclasses.replace(opts, lam=0.0)
    obj0 = columns_objective(0.0, opts.norm, shape, has_left, not has_left)

    def offer(rows: Tensor, D: Tensor, st: Tensor, with_tau: bool) -> None:
        """``keep + t D_s`` into the pool (D: rows, S, p, q; ``D_s`` scaled to
        ``‖t D_s‖ = st_s ‖Z0‖``), checked by :func:`_unsafe` best first."""
        sub = _take(data, rows)
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
        f = torch.where(ok & (c > 0), f, torch.inf)

        def unsafe_at(r: Tensor, k: Tensor) -> Tensor:
            return _unsafe(pts[r, k], _take(sub, r), has_left, unit)

        f = _first_safe(f, unsafe_at)
        n_pts = f.shape[1]

        def each(t: Tensor) -> Tensor:
            return t[rows].repeat_interleave(n_pts)

        layer = torch.arange(n_layers, device=f.device)
        pool.add(pts.flatten(-2).flatten(0, 1), f.flatten(), *map(each, (layer, *now[2:])))

    rows = torch.nonzero(now.f > floor + _tol.TIE).squeeze(-1)
    if rows.numel() == 0:
        return
    sub = _take(data, rows)
    starts0 = [now.Z[rows], *(x[rows] for x in starts)]  # the λ > 0 result too: near λ = 0's
    f0 = None
    if f_starts is not None:

        def cosine_part(f: Tensor, W: Tensor) -> Tensor:  # f less the regulariser at W
            diff = W - Z0[rows]
            return f - regulariser((diff * diff).sum(dim=(-2, -1)), opts.lam, opts.norm)

        known = [now.f[rows], *f_starts.reshape(len(starts), n_layers)[:, rows]]
        f0 = torch.cat([cosine_part(f, W) for f, W in zip(known, starts0, strict=True)])
    Zs = _columns_minimise(obj0, sub, starts0, has_left, opts0, unit, f0).choice(shape).Z
    limit = obj0.values(Zs.reshape(rows.shape[0], 1, -1), *sub).squeeze(1) + floor[rows]
    offer(rows, facing(Zs).unsqueeze(1).expand(-1, n_s, -1, -1), steps, True)
    # Layers whose end could still win by more than the plain points' reach: anchors Z0 / s
    # (s < 1; the anchor Z0 itself was solved and scored just above).
    rows = rows[pool.choice(shape).f[rows] - limit > _tol.END_REACH * (1.0 + limit.abs())]
    if rows.numel() == 0:
        return
    m, small = rows.shape[0], steps[1:]
    rep = [t[rows].repeat(n_s - 1, *([1] * (t.ndim - 1))) for t in data]
    rep[3] = rep[3] / small.repeat_interleave(m)[:, None, None]
    starts0 = [x[rows].repeat(n_s - 1, 1, 1) for x in starts]
    Zs = _columns_minimise(obj0, tuple(rep), starts0, has_left, opts0, unit).choice(shape).Z
    offer(rows, facing(Zs.reshape(n_s - 1, m, *shape).transpose(0, 1)), small, False)


def _drop_direction(
    dc: DroppedColumns,
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
    obj_e = columns_objective(0.0, "fro_squared", shape, False, True)
    data_e = (X, xn, active & drop, torch.zeros_like(Z0), right)
    rep = tuple(torch.cat([t, t]) for t in data_e)
    x0 = torch.cat([E_ls, approach]).reshape(2 * rows, -1)
    res = minimise(obj_e, rep, x0, tol=opts.tol, max_iter=opts.max_iter)
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
) -> tuple[Tensor, Tensor]:
    """``(‖Y_j‖, s_j)`` (…, n) for ``Y = left Z right`` (``Z`` (rows, p, q)), with
    ``s_j = ‖left‖ (‖Z‖ + ‖Z0‖ + floor) ‖right_j‖`` bounding the rounding of ``Y_j`` (here and in
    ``(B̄ + ΔB) Ā``) by ~ε s_j (``floor``: where the output's entries lose relative precision)."""
    mat = left if right is None else right
    assert mat is not None
    has_left = right is None

    def rows(Z: Tensor, Z0: Tensor, mat: Tensor) -> tuple[Tensor, Tensor]:
        return (
            _scale_rows(Z, Z0, mat, None, floor)
            if has_left
            else _scale_rows(Z, Z0, None, mat, floor)
        )

    m, n = (mat.shape[-2], Z.shape[-1]) if has_left else (Z.shape[-2], mat.shape[-1])
    out: tuple[Tensor, Tensor] = _in_chunks(rows, (Z, Z0, mat), m * n * Z.element_size(), -1)
    return out


def _scale_rows(
    Z: Tensor, Z0: Tensor, left: Tensor | None, right: Tensor | None, floor: float
) -> tuple[Tensor, Tensor]:
    """:func:`_column_scale` on one chunk of rows."""
    return _norms_sq(Z, left, right).sqrt(), _rounding_scale(Z, Z0, left, right, floor)


def _rounding_scale(
    Z: Tensor, Z0: Tensor, left: Tensor | None, right: Tensor | None, floor: float
) -> Tensor:
    """``s_j = ‖left‖ (‖Z‖ + ‖Z0‖ + floor) ‖right_j‖`` (…, n) of :func:`_column_scale`."""
    scale: Tensor = torch.linalg.matrix_norm(Z) + torch.linalg.matrix_norm(Z0) + floor
    if left is not None:
        scale = scale * torch.linalg.matrix_norm(left)
    scale = scale.unsqueeze(-1)
    if right is not None:
        scale = scale * _column_norms(right)
    return scale


def _unsafe(Z: Tensor, data: tuple[Tensor, ...], has_left: bool, unit: _Rounding) -> Tensor:
    """Whether the output cannot resolve the objective at ``Z`` (rows, [S,] p, q) to
    ``max(_tol.DROP_UNSAFE, 10 ε)`` (``ε = unit.eps``: machine epsilon of the output dtype, ``ε₆₄``
    below; ``‖Z‖ + ‖Z0‖`` below also gets ``unit.floor``, for float16's subnormals).

    ``data`` per row (as in :func:`_solve_columns`). Evaluating the product perturbs the point
    by rounding of relative size ``ε₆₄`` (``Z`` itself, or ``B̄ + ΔB`` / ``Ā + ΔA`` in the
    caller's dense check), which cancels where a column nearly vanishes. To first order that
    moves the cosines by ``ε₆₄ (‖Z‖ + ‖Z0‖) ‖∇_Z mean_j cos_j‖``: large near a vanishing column
    unless it points at its best direction (then the gradient cancels); to second order by
    ``mean_j u_j²``, ``u_j = ε₆₄ s_j / ‖Y_j‖`` the angle by which the column can turn
    (:func:`_column_scale`; the rounding model :func:`~lorafair._fair._batch.turning`, counted
    here without its ½: an admissibility margin, not a cost). Unsafe: their sum exceeds
    ``_tol.DROP_UNSAFE``.
    """
    X = data[0]
    per_row = X.shape[-2] * X.shape[-1] * X.element_size() * (Z.shape[1] if Z.ndim == 4 else 1)
    out: Tensor = _in_chunks(
        lambda *a: _unsafe_rows(a[0], a[1:], has_left, unit), (Z, *data), per_row, -1
    )
    return out


def _unsafe_rows(Z: Tensor, data: tuple[Tensor, ...], has_left: bool, unit: _Rounding) -> Tensor:
    """:func:`_unsafe` on one chunk of rows."""
    X, xn, active, Z0, mat = data
    if Z.ndim == Z0.ndim + 1:
        X, xn, active, Z0, mat = (t.unsqueeze(1) for t in (X, xn, active, Z0, mat))
    left, right = (mat, None) if has_left else (None, mat)
    sc = _rounding_scale(Z, Z0, left, right, unit.floor)
    limit = max(_tol.DROP_UNSAFE, 10.0 * unit.eps)
    # Explicit Y here, whatever the shape: near a vanishing column the factored pullback's
    # two terms cancel, and their rounding (ε ‖Z‖ ‖right_j‖ / ν_j relative) is what is judged.
    Y = linear_map(Z, left, right)
    yn = _column_norms(Y)
    n = Y.shape[-1]
    ok = active & (yn > 0)
    one = torch.ones_like(yn)
    k1 = torch.where(ok, 1.0 / torch.where(ok, xn * yn, one), 0.0)  # 1/(‖X_j‖ ν)
    k3 = torch.where(ok, 1.0 / torch.where(ok, yn, one) ** 3, 0.0)  # 1/ν³
    s = torch.where(ok, (Y * X).sum(dim=-2) / torch.where(ok, xn, one), 0.0)
    GY = (k1.unsqueeze(-2) * X - (s * k3).unsqueeze(-2) * Y) / n
    GZ = adjoint_map(GY, left, right)
    size = torch.linalg.matrix_norm(Z) + torch.linalg.matrix_norm(Z0) + unit.floor
    first = unit.eps * size * torch.linalg.matrix_norm(GZ)
    err = unit.eps * sc
    second = torch.where(ok, turning(err * err, yn * yn), 0.0).mean(dim=-1)
    exact_zero: Tensor = (active & (yn == 0)).any(dim=-1)  # an active zero column counts 0
    resolved: Tensor = first + second <= limit  # False for NaN too
    return exact_zero | ~resolved


def _first_safe(f: Tensor, unsafe_at: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """``f`` (rows, S) with ``inf`` where :func:`_unsafe`, as far as an argmin over ``S`` can
    tell: per row the points are checked best first (ties: lowest index first) until one is
    safe; the unchecked rest, at least as high and later, can never be picked. ``unsafe_at(rows,
    s)`` checks point ``s[i]`` of row ``rows[i]``. Cost: one check per row, more only where the
    best point is unsafe (instead of ``S``)."""
    out = torch.where(torch.isfinite(f), f, torch.inf)
    left = torch.ones(f.shape[0], dtype=torch.bool, device=f.device)
    for _ in range(f.shape[1]):
        if not bool(left.any()):
            break
        rows = torch.nonzero(left).squeeze(-1)
        best = torch.argmin(out[rows], dim=1)
        bad = unsafe_at(rows, best) | ~torch.isfinite(out[rows, best])
        out[rows[bad], best[bad]] = torch.inf
        left[rows[~bad]] = False
    return out


def _safe_best_first(
    Z: Tensor, data: tuple[Tensor, ...], f: Tensor, m: int, unit: _Rounding
) -> Tensor:
    """:func:`_first_safe` over the ``m`` runs of each layer (``Z`` (m L, p, q) start-major,
    ``data`` per layer; residual on B), as (m L,)."""
    n_layers = f.shape[0] // m

    def unsafe_at(lay: Tensor, start: Tensor) -> Tensor:
        return _unsafe(Z[start * n_layers + lay], _take(data, lay), False, unit)

    return _first_safe(f.reshape(m, n_layers).mT, unsafe_at).mT.reshape(-1)


def _row_values(obj: Batched, data: tuple[Tensor, ...], x: Tensor) -> Tensor:
    """``obj.values`` at the rows ``x`` (k L, N), start-major (row ``i L + l``: point ``i`` of
    layer ``l``), scored per layer against the layers' own data; (k L,) in the same order."""
    n_layers = data[0].shape[0]
    k = x.shape[0] // n_layers
    return obj.values(x.reshape(k, n_layers, -1).transpose(0, 1), *data).mT.reshape(-1)


def _ranked(n_unknowns: int, n_starts: int) -> bool:
    """Whether :func:`_multistart` ranks its starts (L-BFGS sizes) instead of running all."""
    return n_unknowns > _tol.NEWTON_MAX_UNKNOWNS and n_starts > 1


def _multistart(
    obj: Batched,
    data: tuple[Tensor, ...],
    starts: list[Tensor],
    opts: _Options,
    f_starts: Tensor | None = None,
) -> SolveResult:
    """:func:`minimise` from every start (each (L, p, q)) of every layer; rows start-major
    (start ``i`` of layer ``l`` is row ``i L + l``). One run per start over the layers' own data
    (no copy of the data per start). The result's ``f`` is the objective by ``obj.values`` (the
    scorer's values, not the run's own) at every row that ran; ``f_starts`` (m L,): the starts'
    values where the caller has them: they rank the starts and stand, unchanged, for those that
    do not run (the λ = 0 end passes values less their regulariser, equal to ``obj.values`` up
    to rounding).

    Up to ``NEWTON_MAX_UNKNOWNS`` unknowns every start runs to convergence. Above (L-BFGS,
    where each evaluation costs ``O((K + 1) r)`` per column and the starts dominate the cost)
    the starts are ranked by their objective and only the best one per layer runs; the others
    stay candidates as they are. (On ViT-B/16 shapes all four starts end at the same minimum to
    ~1e-9; see ``docs/lora_fair.md``, validation history.)
    """
    n_layers, m = starts[0].shape[0], len(starts)
    x0s = [z.reshape(n_layers, -1) for z in starts]

    def joined(runs: list[SolveResult]) -> SolveResult:
        return SolveResult(*(torch.cat(z) for z in zip(*runs, strict=True)))

    if not _ranked(x0s[0].shape[-1], m):
        res = joined([minimise(obj, data, x, tol=opts.tol, max_iter=opts.max_iter) for x in x0s])
        return res._replace(f=_row_values(obj, data, res.x))
    x = torch.cat(x0s)
    # the starts, ranked by their values
    f = _row_values(obj, data, x) if f_starts is None else f_starts.clone()
    best = torch.argmin(f.reshape(m, n_layers), dim=0)
    rows = best * n_layers + torch.arange(n_layers, device=best.device)
    more = minimise(obj, data, x[rows], tol=opts.tol, max_iter=opts.max_iter)
    it = torch.zeros_like(f, dtype=torch.int64)
    cv = torch.zeros_like(f, dtype=torch.bool)
    x[rows], f[rows], it[rows], cv[rows] = (
        more.x,
        _row_values(obj, data, more.x),
        more.iterations,
        more.converged,
    )
    return SolveResult(x, f, it, cv)


def _columns_minimise(
    obj: Batched,
    data: tuple[Tensor, ...],
    starts: list[Tensor],
    has_left: bool,
    opts: _Options,
    unit: _Rounding,
    f_starts: Tensor | None = None,
) -> _Pool:
    """Multi-start minimisation of the columns objective, through its unattained infima.

    The cosine of a product column jumps where the column vanishes, and the best values are
    often approached as some columns shrink to zero (``d_in > r``: dropping a column frees the
    others; it counts at its best cosine in the limit). Newton's iterates then creep towards
    the limit with vanishing steps and stop short of it, or pass the point where float64 can
    still resolve the column's direction. So after the plain runs, every result with columns
    that are being driven to zero (below ``_tol.DROP_TINY`` of their scale), and for few columns the
    best result with each single column, seeds a restricted problem (:func:`drop_columns`)
    in which those columns are exactly zero: a smooth problem whose minimum is the infimum. Its
    own vanishing columns are dropped in turn (at most ``n`` rounds; each adds columns). Each
    restricted minimum is returned as a real point at a small distance ``ε`` from it
    (:func:`dropped_points`, ``_tol.DROP_STEPS``), and every candidate is scored by the true
    objective; points whose objective float64 cannot resolve (:func:`_unsafe`) are not
    returned. Residual on A also tries the column-wise best mix of all candidates
    (:func:`_mix_columns`), polished. ``ΔB = 0`` is kept unless beaten (:meth:`_Pool.choice`).
    Host syncs: one per round of dropping (the number of restricted problems is data
    dependent). Returns the pool (:meth:`_Pool.choice` picks from it).
    """
    X, xn, active, Z0 = data[:4]
    has_right = not has_left  # the two shapes of _solve_columns: Z Ā (right) or R_B A' (left)

    def sides(d: tuple[Tensor, ...]) -> tuple[Tensor | None, Tensor | None]:
        return (d[4], None) if has_left else (None, d[4])

    n_layers, n = xn.shape
    shape = (int(Z0.shape[-2]), int(Z0.shape[-1]))
    dev = X.device
    m = len(starts)
    res = _multistart(obj, data, starts, opts, f_starts)
    layer = torch.arange(n_layers, device=dev).repeat(m)
    Zr = res.x.reshape(m * n_layers, *shape)
    # per layer (L, m, …) against the layers' data, back to rows start-major (m L, …)
    Z_lm = Zr.reshape(m, n_layers, *shape).transpose(0, 1)

    def rows_of(t: Tensor) -> Tensor:
        return t.transpose(0, 1).reshape(m * n_layers, *t.shape[2:])

    f_raw = res.f
    mat = data[4].unsqueeze(1)
    yn, sc = (
        rows_of(t)
        for t in _column_scale(Z_lm, Z0.unsqueeze(1), *((mat, None) if has_left else (None, mat)))
    )
    if has_left:  # the column mix below reads every candidate's score
        f_safe = torch.where(rows_of(_unsafe(Z_lm, data, has_left, unit)), torch.inf, f_raw)
    else:
        f_safe = _safe_best_first(Zr, data, f_raw, m, unit)
    tiny = active.repeat(m, 1) & (yn <= _tol.DROP_TINY * sc)
    f_zero = obj.values(Z0.reshape(n_layers, 1, -1), *data).squeeze(1)
    pool = _Pool(Z0.flatten(-2), f_zero)
    pool.add(res.x, f_safe, layer, res.iterations, res.converged)
    # Seeds of restricted problems: (layer, dropped columns, point, iterations so far).
    seed = tiny.any(dim=-1)
    s_layer, s_drop, s_W, s_it = layer[seed], tiny[seed], Zr[seed], res.iterations[seed]
    steps = torch.tensor(_tol.DROP_STEPS, dtype=X.dtype, device=dev)
    n_steps = len(_tol.DROP_STEPS)
    if n <= _tol.DROP_SINGLES:
        # Each single column dropped from the best run: scored as is (projected), and the
        # _tol.DROP_SINGLES_SOLVE best of them per layer seed restricted problems.
        best = torch.argmin(f_raw.reshape(m, n_layers), dim=0)
        rows = (best * n_layers + torch.arange(n_layers, device=dev)).repeat(n)
        eye = torch.eye(n, dtype=torch.bool, device=dev)
        single = (eye.unsqueeze(1) & active.unsqueeze(0)).reshape(n * n_layers, n)
        sub = tuple(t[layer[rows]] for t in data)
        s_left, s_right = sides(sub)
        dc = drop_columns(sub[0], sub[1], sub[2], sub[3], s_left, s_right, single)
        Zc = drop_project(dc, drop_start(dc, Zr[rows]))
        pts = dropped_points(dc, Zc, dc.E, steps)
        f_pts = obj.values(pts.flatten(-2), *sub)
        f_pts = torch.where(
            _unsafe(pts, sub, has_left, unit) | ~single.any(-1, keepdim=True), torch.inf, f_pts
        )
        pool.add(
            pts.flatten(-2).flatten(0, 1),
            f_pts.flatten(),
            layer[rows].repeat_interleave(n_steps),
            res.iterations[rows].repeat_interleave(n_steps),
            res.converged[rows].repeat_interleave(n_steps),
        )
        score = f_pts.amin(dim=-1).reshape(n, n_layers)
        k = min(n, _tol.DROP_SINGLES_SOLVE)
        top = torch.topk(score, k, dim=0, largest=False).indices  # (k, L)
        chosen = (top * n_layers + torch.arange(n_layers, device=dev)).flatten()
        chosen = chosen[torch.isfinite(score.flatten()[chosen])]
        s_layer = torch.cat([s_layer, layer[rows[chosen]]])
        s_drop = torch.cat([s_drop, single[chosen]])
        s_W = torch.cat([s_W, Zr[rows[chosen]]])
        s_it = torch.cat([s_it, res.iterations[rows[chosen]]])
    obj_d = columns_objective(opts.lam, opts.norm, shape, has_left, has_right, True)
    for _ in range(n):
        if s_layer.numel() == 0:
            break
        sub = tuple(t[s_layer] for t in data)
        s_left, s_right = sides(sub)
        dc = drop_columns(sub[0], sub[1], sub[2], sub[3], s_left, s_right, s_drop)
        x0 = drop_start(dc, s_W)
        rd = minimise(
            obj_d, dc.data, x0.reshape(s_W.shape[0], -1), tol=opts.tol, max_iter=opts.max_iter
        )
        it = s_it + rd.iterations
        E = _drop_direction(dc, sub, s_W - drop_project(dc, s_W), has_left, opts)
        # The seed itself with its columns J dropped, and the restricted problem's result.
        for W, its in ((x0, s_it), (rd.x, it)):
            Zc = drop_project(dc, W.reshape(s_W.shape))
            pts = dropped_points(dc, Zc, E, steps)  # (rows, S, p, q)
            f_pts = obj.values(pts.flatten(-2), *sub)
            yn, sc = _column_scale(Zc, sub[3], *sides(sub))
            tiny = dc.data[2] & (yn <= _tol.DROP_TINY * sc)
            unsafe = _unsafe(pts, sub, has_left, unit)
            pool.add(
                pts.flatten(-2).flatten(0, 1),
                torch.where(unsafe, torch.inf, f_pts).flatten(),
                s_layer.repeat_interleave(n_steps),
                its.repeat_interleave(n_steps),
                rd.converged.repeat_interleave(n_steps),
            )
        seed = tiny.any(dim=-1)
        s_layer, s_drop, s_W, s_it = s_layer[seed], (s_drop | tiny)[seed], Zc[seed], it[seed]
    if has_left:
        # Residual on A: column j of the product depends on column j of A' only, so the
        # objective couples the columns only through the regulariser (not at all for
        # "fro_squared"). Mix the best column of every candidate, then polish.
        sofar = pool.joined()
        mixed = _mix_columns(sofar.x.reshape(-1, *shape), sofar.f, sofar.layer, data, opts)
        rp = minimise(obj, data, mixed.flatten(-2), tol=opts.tol, max_iter=opts.max_iter)
        for W, its in ((mixed.flatten(-2), rp.iterations), (rp.x, rp.iterations)):
            unsafe = _unsafe(W.reshape(-1, *shape), data, has_left, unit)
            f_w = obj.values(W.unsqueeze(1), *data).squeeze(1)
            pool.add(
                W,
                torch.where(unsafe, torch.inf, f_w),
                torch.arange(n_layers, device=dev),
                its,
                rp.converged,
            )
    return pool

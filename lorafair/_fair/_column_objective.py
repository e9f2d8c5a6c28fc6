"""Private: the column cosine's objective, and what float64 can resolve of it.

The mean over the ``d_in`` columns of ``cos(X_j, Y_j)`` with ``Y = left Z right`` (a basis of
at most ``(K + 1) r`` rows, never ``d_out × d_in``), plus ``λ R(‖Z − Z0‖²)``, with closed-form
gradient, Hessian, line values and the carried features ``ZᵀX`` (:func:`columns_objective`),
evaluated in cache-sized row chunks (:func:`_in_chunks`); the admissibility check
(:func:`_unsafe`, :func:`_first_safe`): whether the output's rounding can resolve the objective
at a point, where a product column nearly vanishes; and the form's one scorer
(:class:`ColumnScorer`), which owns both and the pool.

The problem travels as :class:`ColumnProblem` (its per-layer tensors :class:`ColumnData`, the
side its matrix multiplies on, the options and the output's rounding).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lorafair._fair import _tolerances as _tol
from lorafair._fair._batch import _Rounding, turning
from lorafair._fair._cosine import cosine
from lorafair._fair._newton import (
    Batched,
    Runs,
    _reg_grad_coef,
    _reg_hessian,
    regulariser,
)
from lorafair._fair._options import Norm, _Options
from lorafair._fair._pool import Picked, _Pool


class ColumnData(NamedTuple):
    """The column problem's tensors, one row per layer: ``X`` (L, m, n) ΔW in the coordinates of
    ``Y``, ``xn`` (L, n) ΔW's full column norms, ``active`` (L, n) the columns whose cosine can
    be non-zero, ``Z0`` (L, p, q) FedIT's point (``ΔB = 0``), ``mat`` the fixed factor of
    ``Y``: ``left`` (L, m, p) in ``Y = left Z`` (residual on A) or ``right`` (L, q, n) in
    ``Y = Z right`` (residual on B), ``c0`` (L,) ≥ 0 the regulariser's offset, ``λ R(‖Z − Z0‖² +
    c0)``: 0 for the problem itself, ``‖P_L Z0 P_R‖²`` for a restricted one
    (:func:`~lorafair._fair._dropped.drop_columns`). Unpacks as :func:`columns_objective`'s
    data."""

    X: Tensor
    xn: Tensor
    active: Tensor
    Z0: Tensor
    mat: Tensor
    c0: Tensor

    def take(self, rows: Tensor) -> ColumnData:
        """Rows ``rows`` (sorted and unique, as ``nonzero`` gives them): the tensors themselves
        when that is every row (no copy of ``X``, the largest of them)."""
        if rows.shape[0] == self.X.shape[0]:
            return self
        return ColumnData(*(t[rows] for t in self))

    def sides(self, on_left: bool) -> tuple[Tensor | None, Tensor | None]:
        """``(left, right)`` of ``Y = left Z right``: ``mat`` on its side, None on the other."""
        return (self.mat, None) if on_left else (None, self.mat)


class ColumnProblem(NamedTuple):
    """A group's column problem: minimise ``1 − mean_j cos(X_j, Y_j) + λ R(‖Z − Z0‖²)`` over
    ``Z`` (L, p, q). ``data`` its tensors; ``on_left``: ``Y = left Z`` (residual on A), else
    ``Y = Z right``; ``opts`` λ, the norm, ``tol`` and ``max_iter``; ``unit`` how the output
    dtype rounds (the admissibility rule of :func:`_unsafe`)."""

    data: ColumnData
    on_left: bool
    opts: _Options
    unit: _Rounding

    @property
    def shape(self) -> tuple[int, int]:
        """``(p, q)``, the shape of ``Z``."""
        return int(self.data.Z0.shape[-2]), int(self.data.Z0.shape[-1])

    def objective(self) -> Batched:
        """:func:`columns_objective` of this problem (and of its restricted problems, whose
        data differ)."""
        return columns_objective(self.opts.lam, self.opts.norm, self.shape, self.on_left)

    def at_lam0(self) -> ColumnProblem:
        """The same problem with ``λ = 0`` (the λ = 0 end)."""
        return self._replace(opts=dataclasses.replace(self.opts, lam=0.0))


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
    return cosine(inner, xn, nsq, defined=active, small="floor").cos.mean(dim=-1)


def columns_objective(lam: float, norm: Norm, shape: tuple[int, int], on_left: bool) -> Batched:
    """``f(Z) = 1 − mean_j cos(X_j, Y_j) + λ R(‖Z − Z0‖² + c0)``, ``Y = left Z right``, closed
    forms.

    Data: a :class:`ColumnData`, unpacked (see :func:`columns_terms`); its ``mat`` is ``left``
    where ``on_left`` (``Y = left Z``), else ``right`` (``Y = Z right``); ``Z`` of ``shape``
    flattened row-major. Per column, with
    ``a = X_j/xn_j``, ``y = Y_j``, ``ν = ‖y‖``, ``s = <a, y>``: ``∇_y cos_j = a/ν − s y/ν³`` and
    ``∇²_y cos_j = −(a yᵀ + y aᵀ)/ν³ − s I/ν³ + 3 s y yᵀ/ν⁵``; the chain rule through the linear
    map gives ``∇_Z = leftᵀ (∇_Y) rightᵀ`` and
    ``∇²_Z[(a,k),(b,l)] = Σ_j right[k,j] right[l,j] (leftᵀ ∇²_y cos_j left)[a,b] / n``.
    Regulariser derivatives as in :func:`flat_objective` (mask of ones). Cost: a value or a
    gradient O(m p q + m q n); the Hessian O(n (m² p + p² q²)) (only used for small ``p q``).
    """
    p, q = shape

    def values(x: Tensor, *tensors: Tensor) -> Tensor:
        X, xn, active, Z0, _, c0 = data = ColumnData(*tensors)
        left, right = data.sides(on_left)
        n_layers, n_cand, _ = x.shape
        Z = x.reshape(n_layers, n_cand, p, q)
        cos = columns_terms(
            Z,
            None if left is None else left.unsqueeze(1),
            None if right is None else right.unsqueeze(1),
            X.unsqueeze(1),
            xn.unsqueeze(1),
            active.unsqueeze(1),
        )
        diff = Z - Z0.unsqueeze(1)
        dsq = (diff * diff).sum(dim=(-2, -1)) + c0[:, None]
        return 1.0 - cos + regulariser(dsq, lam, norm)

    def _cosine_terms(
        inner: Tensor, nsq: Tensor, xn: Tensor, active: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``cos`` (mean) and per column ``k1 = 1/(xn ν)``, ``k3 = 1/ν³``, ``s = <a, y>``,
        ``xs`` from the columns' inner products with ΔW and squared norms (the cosine by
        :func:`~lorafair._fair._cosine.cosine`, split as ``s · (1/ν)``)."""
        c = cosine(inner, xn, nsq, defined=active, small="floor", form="split")
        nu = c.norm
        big = active & (nsq > _tol.TINY)
        k1 = c.inverse()  # 1/(xn ν)
        k3 = torch.where(big, 1.0 / (nu * nu * nu), torch.zeros_like(nu))  # 1/ν³
        return c.cos.mean(dim=-1), k1, k3, c.unit(inner), c.ref

    def value_and_grad(
        x: Tensor, *tensors: Tensor, fx: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        X, xn, active, Z0, _, c0 = data = ColumnData(*tensors)
        left, right = data.sides(on_left)
        Z = x.reshape(x.shape[0], p, q)
        cos, k1, k3, s, _ = _cosine_terms(*_column_sums(Z, X, left, right, fx), xn, active)
        GZ = _pullback(Z, X, k1, s * k3, left, right) / X.shape[-1]
        diff = Z - Z0
        dsq = (diff * diff).sum(dim=(-2, -1)) + c0
        f = 1.0 - cos + regulariser(dsq, lam, norm)
        grad = _reg_grad_coef(dsq, lam, norm)[:, None, None] * diff - GZ
        return f, grad.flatten(-2)

    def hessian(x: Tensor, *tensors: Tensor) -> Tensor:
        X, xn, active, Z0, _, c0 = data = ColumnData(*tensors)
        left, right = data.sides(on_left)
        Z = x.reshape(x.shape[0], p, q)
        Y = linear_map(Z, left, right)
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
        if left is not None:
            Hj = left.mT.unsqueeze(1) @ Hj @ left.unsqueeze(1)  # (L, n, p, p)
        if right is None:
            right = torch.eye(n_cols, dtype=Y.dtype, device=Y.device).expand(n_layers, -1, -1)
        hz = torch.einsum("lkj,lqj,ljab->lakbq", right, right, Hj).reshape(n_layers, p * q, p * q)
        diff = (Z - Z0).flatten(-2)
        dsq = (diff * diff).sum(dim=-1) + c0
        return _reg_hessian(diff, dsq, torch.ones_like(diff), lam, norm) - hz

    def line(
        x: Tensor,
        d: Tensor,
        ts: Tensor,
        *tensors: Tensor,
        fx: Tensor | None = None,
        fd: Tensor | None = None,
    ) -> Tensor:
        # Along Z + t D every column's <X_j, Y_j>, ‖Y_j‖² and ‖Z − Z0‖² are polynomials in t of
        # degree ≤ 2: two products (Y, V = left D right) serve every step length. Where a
        # quadratic cancels (the point nears a zero column or Z0), the layer is evaluated exactly.
        X, xn, active, Z0, _, c0 = data = ColumnData(*tensors)
        left, right = data.sides(on_left)
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
        cos = cosine(inner, xn.unsqueeze(1), nsq, defined=act, small="floor").cos
        diff = Z - Z0
        t2 = ts[None, :]
        e0 = (diff * diff).sum(dim=(-2, -1))[:, None] + t2 * t2 * (D * D).sum(dim=(-2, -1))[:, None]
        dsq = e0 + 2.0 * t2 * (diff * D).sum(dim=(-2, -1))[:, None]
        lost = (act & (nsq <= _tol.LINE_CANCEL * ends) & (ends > 0)).any(dim=-1)
        lost |= (dsq <= _tol.LINE_CANCEL * e0) & (e0 > 0)
        dsq = dsq + c0[:, None]
        f = 1.0 - cos.mean(dim=-1) + regulariser(torch.clamp(dsq, min=0.0), lam, norm)
        redo = lost.any(dim=-1)
        if bool(redo.any()):
            pts = x[redo].unsqueeze(1) + t2.unsqueeze(-1) * d[redo].unsqueeze(1)
            f[redo] = values(pts, *(a[redo] for a in data))
        return f

    def features(x: Tensor, X: Tensor, *_: Tensor) -> Tensor:
        # ZᵀX (L, q, n): linear in Z, so minimise carries it along its steps (one GEMM fewer
        # in each gradient and in each line search).
        return x.reshape(x.shape[0], p, q).mT @ X

    factored = not on_left and p >= _tol.FACTORED_ROWS * q
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


def _column_scale(Z: Tensor, Z0: Tensor, mat: Tensor, on_left: bool) -> tuple[Tensor, Tensor]:
    """``(‖Y_j‖, s_j)`` (…, n) for ``Y = left Z right`` (``Z`` (rows, p, q); ``mat`` is ``left``
    where ``on_left``, else ``right``), with ``s_j = ‖left‖ (‖Z‖ + ‖Z0‖) ‖right_j‖`` bounding
    the rounding of ``Y_j`` (here and in ``(B̄ + ΔB) Ā``) by ~ε s_j."""

    def rows(Z: Tensor, Z0: Tensor, mat: Tensor) -> tuple[Tensor, Tensor]:
        left, right = (mat, None) if on_left else (None, mat)
        return _norms_sq(Z, left, right).sqrt(), _rounding_scale(Z, Z0, left, right, 0.0)

    m, n = (mat.shape[-2], Z.shape[-1]) if on_left else (Z.shape[-2], mat.shape[-1])
    out: tuple[Tensor, Tensor] = _in_chunks(rows, (Z, Z0, mat), m * n * Z.element_size(), -1)
    return out


def _rounding_scale(
    Z: Tensor, Z0: Tensor, left: Tensor | None, right: Tensor | None, floor: float
) -> Tensor:
    """``s_j = ‖left‖ (‖Z‖ + ‖Z0‖ + floor) ‖right_j‖`` (…, n) of :func:`_column_scale`
    (``floor``: where the output's entries lose relative precision; :func:`_unsafe` adds it)."""
    scale: Tensor = torch.linalg.matrix_norm(Z) + torch.linalg.matrix_norm(Z0) + floor
    if left is not None:
        scale = scale * torch.linalg.matrix_norm(left)
    scale = scale.unsqueeze(-1)
    if right is not None:
        scale = scale * _column_norms(right)
    return scale


def _unsafe(Z: Tensor, data: ColumnData, on_left: bool, unit: _Rounding) -> Tensor:
    """Whether the output cannot resolve the objective at ``Z`` (rows, [S,] p, q) to
    ``max(DROP_UNSAFE, UNSAFE_EPS · ε)`` (``ε = unit.eps``: machine epsilon of the output dtype,
    ``ε₆₄`` below; ``‖Z‖ + ‖Z0‖`` below also gets ``unit.floor``, for float16's subnormals).

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
    X = data.X
    per_row = X.shape[-2] * X.shape[-1] * X.element_size() * (Z.shape[1] if Z.ndim == 4 else 1)
    out: Tensor = _in_chunks(
        lambda *a: _unsafe_rows(a[0], ColumnData(*a[1:]), on_left, unit), (Z, *data), per_row, -1
    )
    return out


def _unsafe_rows(Z: Tensor, data: ColumnData, on_left: bool, unit: _Rounding) -> Tensor:
    """:func:`_unsafe` on one chunk of rows."""
    if Z.ndim == data.Z0.ndim + 1:
        data = ColumnData(*(t.unsqueeze(1) for t in data))
    X, xn, active, Z0 = data.X, data.xn, data.active, data.Z0
    left, right = data.sides(on_left)
    sc = _rounding_scale(Z, Z0, left, right, unit.floor)
    limit = max(_tol.DROP_UNSAFE, _tol.UNSAFE_EPS * unit.eps)
    # Explicit Y here, whatever the shape: near a vanishing column the factored pullback's
    # two terms cancel, and their rounding (ε ‖Z‖ ‖right_j‖ / ν_j relative) is what is judged.
    Y = linear_map(Z, left, right)
    yn = _column_norms(Y)
    n = Y.shape[-1]
    inner = (Y * X).sum(dim=-2)
    c = cosine(inner, xn, norm=yn, defined=active, small="zero")
    ok = c.ok
    k1 = c.inverse()  # 1/(‖X_j‖ ν)
    k3 = torch.where(ok, 1.0 / torch.where(ok, yn, torch.ones_like(yn)) ** 3, 0.0)  # 1/ν³
    s = c.unit(inner)
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


@dataclasses.dataclass
class ColumnScorer:
    """The column form's one scorer: the objective, the admissibility rule (:func:`_unsafe`) and
    the pool, for one :class:`ColumnProblem`.

    Every candidate generator of :mod:`._columns` hands its points to :meth:`offer` (or, for the
    multi-start's runs, :meth:`offer_runs`): each is scored by the true objective, ``inf`` where
    ruled out (not valid, or its objective not resolved in the output dtype), and added to the
    pool, which starts with ``ΔB = 0`` (``Z0``) at its objective; :meth:`pick` chooses
    (:meth:`_Pool.choice`: per layer the lowest score, ``ΔB = 0`` unless beaten by ``TIE``).
    """

    problem: ColumnProblem
    obj: Batched
    pool: _Pool

    @classmethod
    def of(cls, problem: ColumnProblem) -> ColumnScorer:
        """A scorer whose pool holds ``ΔB = 0`` alone."""
        obj = problem.objective()
        Z0 = problem.data.Z0
        f_zero = obj.values(Z0.reshape(Z0.shape[0], 1, -1), *problem.data).squeeze(1)
        return cls(problem, obj, _Pool(Z0.flatten(-2), f_zero))

    def values(self, x: Tensor) -> Tensor:
        """The objective at the rows ``x`` (k L, N), start-major (row ``i L + l``: point ``i`` of
        layer ``l``), each against its own layer's data; (k L,) in the same order."""
        n_layers = self.problem.data.X.shape[0]
        k = x.shape[0] // n_layers
        data = self.problem.data
        return self.obj.values(x.reshape(k, n_layers, -1).transpose(0, 1), *data).mT.reshape(-1)

    def offer(
        self,
        pts: Tensor,
        layer: Tensor,
        iterations: Tensor,
        converged: Tensor,
        *,
        data: ColumnData | None = None,
        valid: Tensor | None = None,
        best_first: bool = False,
    ) -> Tensor:
        """Points ``pts`` (rows, S, p, q), or one each (rows, p, q), of ``layer`` (rows,), from
        runs with ``iterations`` / ``converged`` (rows,): scored against ``data`` (their layers'
        rows of the problem's data; default the whole, one row per layer), ``inf`` where not
        ``valid`` (rows, S) or :func:`_unsafe` (``best_first``: checked best first per row, as
        far as the argmin can tell, :func:`_first_safe`), and added to the pool. Returns their
        scores (rows, S)."""
        p = self.problem
        sub = p.data if data is None else data
        x = pts.flatten(-2) if pts.ndim == 4 else pts.flatten(-2).unsqueeze(1)
        f = self.obj.values(x, *sub)
        if valid is not None:
            f = torch.where(valid, f, torch.inf)
        if best_first:

            def unsafe_at(r: Tensor, k: Tensor) -> Tensor:
                return _unsafe(pts[r, k], sub.take(r), p.on_left, p.unit)

            f = _first_safe(f, unsafe_at)
        else:
            bad = _unsafe(pts, sub, p.on_left, p.unit)
            f = torch.where(bad if pts.ndim == 4 else bad[:, None], torch.inf, f)
        n = f.shape[1]
        each = (t.repeat_interleave(n) for t in (layer, iterations, converged))
        self.pool.add(x.flatten(0, 1), f.flatten(), *each)
        return f

    def offer_runs(self, runs: Runs, m: int) -> None:
        """The multi-start's ``runs`` (``m`` starts per layer, start-major, ``f`` their values):
        residual on A every unsafe run is ruled out (the column mix reads every score), residual
        on B only as far as each layer's argmin can tell (:func:`_first_safe`)."""
        p = self.problem
        n_layers = p.data.X.shape[0]
        layer = torch.arange(n_layers, device=runs.x.device).repeat(m)
        Zr = runs.x.reshape(m * n_layers, *p.shape)
        if p.on_left:
            Z_lm = Zr.reshape(m, n_layers, *p.shape).transpose(0, 1)
            bad = _unsafe(Z_lm, p.data, True, p.unit).transpose(0, 1).reshape(m * n_layers)
            f = torch.where(bad, torch.inf, runs.f)
        else:

            def unsafe_at(lay: Tensor, start: Tensor) -> Tensor:
                return _unsafe(Zr[start * n_layers + lay], p.data.take(lay), False, p.unit)

            f = _first_safe(runs.f.reshape(m, n_layers).mT, unsafe_at).mT.reshape(-1)
        self.pool.add(runs.x, f, layer, runs.iterations, runs.converged)

    def pick(self) -> Picked:
        """Per layer the chosen point ``x`` (L, p, q), its objective ``f`` and its run's counts."""
        return self.pool.pick(self.problem.shape)

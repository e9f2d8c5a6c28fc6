"""Private: the column form's restricted problems, where product columns vanish.

The cosine of a product column jumps where the column vanishes, so the column objective's best
values are often infima that no point attains (a column driven to zero frees the others). Each
such infimum is the exact minimum of a smooth restricted problem in which those columns are zero
(:func:`drop_columns`), approached by real points at small distances from it
(:func:`dropped_points`) along the direction in which the columns reappear
(:func:`_drop_direction`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from lorafair._fair import _tolerances as _tol
from lorafair._fair._column_objective import ColumnData, columns_objective
from lorafair._fair._newton import minimise
from lorafair._fair._options import _Options


class DroppedColumns(NamedTuple):
    """The columns problem restricted to the points whose product columns ``J`` vanish.

    ``data``: the restricted problem's data, a :class:`ColumnData` (``active`` less the dropped
    columns ``J``, ``mat`` the same ``left`` or the reduced ``right``, ``c0`` the regulariser's
    offset: the same objective, :func:`columns_objective`, serves both); ``drop`` (L, n) the mask
    of ``J``; ``PL`` (L, p, p) / ``PR`` (L, q, q) the projectors of :func:`drop_columns` (``PR``
    None on the left-only form, ``Y = left Z``, where it is the column mask ``drop``); ``E``
    (L, p, q) the direction along which the dropped columns reappear with their best cosines.
    """

    data: ColumnData
    drop: Tensor
    PL: Tensor | None
    PR: Tensor | None
    E: Tensor


def drop_columns(data: ColumnData, on_left: bool, drop: Tensor) -> DroppedColumns:
    """Restrict the columns problem ``data`` (``Y = left Z`` where ``on_left``, else
    ``Y = Z right``) to ``left Z right_J = 0``.

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
    and a non-singular Hessian. Either ``left`` (m, p) or ``right`` (q, n) is ``data.mat``
    (the shapes of :func:`_solve_columns`); with ``left`` only, ``P_R`` is the diagonal column
    mask. Cost: one ``pinv`` of ``left`` (m × p) or of ``right_J`` (q × n)
    and O(p q (p + q + n)) flops per layer.
    """
    X, xn, active, Z0, mat = data.X, data.xn, data.active, data.Z0, data.mat
    dm = drop.unsqueeze(-2).to(X.dtype)
    keep = active & ~drop
    if on_left:
        left = mat
        pinv = torch.linalg.pinv(left)
        PL = pinv @ left
        c0 = ((PL @ Z0) * dm).square().sum(dim=(-2, -1))
        E = (pinv @ X) * dm
        return DroppedColumns(ColumnData(X, xn, keep, Z0, left, c0), drop, PL, None, E)
    right = mat
    RJ = right * dm
    pinv = torch.linalg.pinv(RJ)  # (n, q), zero rows outside J
    PR = RJ @ pinv
    reduced = right - PR @ right
    reduced = reduced * (1.0 - dm)
    # Columns in span(right_J) vanish with J (numerically: a tiny remainder); they count 0.
    rest = torch.linalg.vector_norm(reduced, dim=-2)
    keep = keep & (rest > _tol.DROP_REMAINDER * torch.linalg.vector_norm(right, dim=-2))
    c0 = (Z0 @ PR).square().sum(dim=(-2, -1))
    E = (X * dm) @ pinv
    return DroppedColumns(ColumnData(X, xn, keep, Z0, reduced, c0), drop, None, PR, E)


def drop_start(dc: DroppedColumns, W: Tensor) -> Tensor:
    """``Π(W) + P_L Z0 P_R`` (L, p, q): a start for the restricted problem whose (relaxed)
    objective equals the true one at ``Π(W)``, i.e. ``W`` with the columns ``J`` projected out."""
    Z0 = dc.data.Z0
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
    base = torch.linalg.matrix_norm(Zc) + torch.linalg.matrix_norm(dc.data.Z0)
    base = torch.where(base > 0, base, torch.ones_like(base))
    en = torch.linalg.matrix_norm(E)
    scale = torch.where(en > 0, base / torch.where(en > 0, en, torch.ones_like(en)), 0.0)
    eps = steps[None, :] * scale[:, None]  # (L, S)
    return Zc.unsqueeze(1) + eps[..., None, None] * E.unsqueeze(1)


def _drop_direction(
    dc: DroppedColumns, sub: ColumnData, approach: Tensor, opts: _Options
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
    if dc.PR is None:  # on the left
        return dc.E
    X, xn, active, Z0, right = sub.X, sub.xn, sub.active, sub.Z0, sub.mat
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
    obj_e = columns_objective(0.0, "fro_squared", shape, on_left=False)
    data_e = ColumnData(X, xn, active & drop, torch.zeros_like(Z0), right, Z0.new_zeros(rows))
    rep = ColumnData(*(torch.cat([t, t]) for t in data_e))
    x0 = torch.cat([E_ls, approach]).reshape(2 * rows, -1)
    res = minimise(obj_e, rep, x0, tol=opts.tol, max_iter=opts.max_iter)
    f = res.f.reshape(2, rows)
    best = torch.argmin(f, dim=0)
    E = res.x.reshape(2, rows, *shape)[best, torch.arange(rows, device=best.device)]
    E_all[shared] = E @ dc.PR[shared]
    return E_all

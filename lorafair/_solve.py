"""Private batched numerics of the LoRA-FAIR residual solve (see :mod:`lorafair._fair`).

Everything here is float64, batched over a leading layer dimension ``L`` and free of host
syncs except every ``sync_every`` iterations of :func:`minimise` (every iteration on CPU) to stop
early once every layer has converged. Objectives come with closed-form gradients and Hessians
(no ``torch.func``, no autograd). Inputs are trusted (validated in :mod:`lorafair._fair`).

Two reduced problems, both exactly equivalent to the full ``d_out × r`` problem:

* ``flat`` similarity (:func:`flat_reduce`, :func:`flat_objective`): with ``G = ĀĀᵀ = V diag(g) Vᵀ``
  and ``H = ΔW Āᵀ`` the objective ``1 − <B', H> / (w ‖B'Ā‖) + λ R(B' − B̄)`` depends on column
  ``c_i`` of ``B'V`` only through its coordinates in an orthonormal 3-frame of
  ``span(h_i, b_i) ⊕ (one orthogonal direction)`` (``h_i``/``b_i``: columns of ``HV``/``B̄V``),
  because ``‖B'Ā‖² = Σ g_i ‖c_i‖²`` has no cross-column terms. So each layer becomes an
  ``r × 3`` problem, and layers of every shape that share ``r`` are solved in one batch.
* ``columns`` similarity (:func:`columns_objective`): the mean over the ``d_in`` columns of the
  per-column cosine; solved in the coordinates of an orthonormal basis of
  ``span(B_s, B̄) ⊕ (r orthogonal directions)`` (at most ``(K + 2) r`` rows).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from torch import Tensor

Norm = Literal["fro", "fro_squared"]

_TINY = 1e-300


def _safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt`` with a zero (not NaN) gradient at 0."""
    return torch.sqrt(torch.clamp(x, min=_TINY))


def regulariser(delta_sq: Tensor, lam: float, norm: Norm) -> Tensor:
    """``λ‖Δ‖_F`` (``"fro"``) or ``λ‖Δ‖_F²`` (``"fro_squared"``) from ``‖Δ‖_F²``."""
    if norm == "fro":
        return lam * _safe_sqrt(delta_sq)
    return lam * delta_sq


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


def flat_reduce(G: Tensor, H: Tensor, base: Tensor, w: Tensor) -> FlatProblem:
    """Reduce ``min_B' 1 − <B',H>/(w sqrt(<B'G,B'>)) + λR(B' − base)`` to ``r × 3`` coordinates.

    ``G`` (L, r, r), ``H`` and ``base`` (L, d, r), ``w`` (L,). Cost: one batched ``eigh`` of
    ``r × r``, two ``(d × r)(r × r)`` products and ``L r`` Householder QRs of ``d × 3``:
    O(L (d r² + r³)) flops and O(L d r) memory.
    """
    g, V = torch.linalg.eigh(G)
    scale = g.abs().amax(dim=-1, keepdim=True)
    small = g <= scale * (g.shape[-1] * 1e-13)
    g = torch.where(small, torch.zeros_like(g), g)
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


def _reg_value(dsq: Tensor, lam: float, norm: Norm) -> Tensor:
    return regulariser(dsq, lam, norm)


def _reg_grad_coef(dsq: Tensor, lam: float, norm: Norm) -> Tensor:
    """``c`` with ``∇ reg = c · d`` (``d`` the masked difference): ``2λ`` or ``λ/ρ``."""
    if norm == "fro_squared":
        return torch.full_like(dsq, 2.0 * lam)
    big = dsq > _TINY
    return torch.where(big, lam / _safe_sqrt(dsq), torch.zeros_like(dsq))


def _reg_hessian(d: Tensor, dsq: Tensor, diag: Tensor, lam: float, norm: Norm) -> Tensor:
    """Hessian of ``reg`` in ``x`` (…, N, N), ``d`` (…, N) the difference, ``diag`` its mask.

    ``"fro_squared"``: ``2λ diag(mask)``. ``"fro"`` (``ρ = ‖d‖``): ``λ (diag(mask)/ρ − d dᵀ/ρ³)``,
    and 0 where ``ρ² ≤ 1e-300`` (matching the clamped square root's zero derivative).
    """
    eye = torch.diag_embed(diag)
    if norm == "fro_squared":
        return (2.0 * lam) * eye
    big = dsq > _TINY
    rho = _safe_sqrt(dsq)
    c1 = torch.where(big, lam / rho, torch.zeros_like(rho))
    c3 = torch.where(big, lam / (rho * rho * rho), torch.zeros_like(rho))
    outer = d.unsqueeze(-1) * d.unsqueeze(-2)
    return c1[..., None, None] * eye - c3[..., None, None] * outer


def flat_terms(
    x: Tensor, eta: Tensor, beta: Tensor, mask: Tensor, g: Tensor, w: Tensor
) -> tuple[Tensor, Tensor]:
    """``(cos, ‖Δ‖²)`` at reduced points ``x`` (…, r, 3); data with the same leading dims.

    ``cos = <x, η> / (w sqrt(Σ_i g_i ‖x_i‖²))``; defined as 0 where ``w = 0`` or the product
    ``B'Ā`` is zero. Plain batched tensor ops (any number of leading dimensions).
    """
    xm = x * mask
    s = (xm * eta).sum(dim=(-2, -1))
    n_sq = ((xm * xm).sum(dim=-1) * g).sum(dim=-1)
    ok = (w > 0) & (n_sq > 0)
    denom = torch.where(ok, w * _safe_sqrt(n_sq), torch.ones_like(s))
    cos = torch.where(ok, s / denom, torch.zeros_like(s))
    diff = (x - beta) * mask
    return cos, (diff * diff).sum(dim=(-2, -1))


class Batched(NamedTuple):
    """A batched objective: ``values(x (L, S, N), *data) -> (L, S)``; ``value_and_grad(x (L, N),
    *data) -> ((L,), (L, N))``; ``hessian(x (L, N), *data) -> (L, N, N)``. Closed forms only
    (no ``torch.func``/autograd), so no per-layer Python loop and no host sync.
    """

    values: Callable[..., Tensor]
    value_and_grad: Callable[..., tuple[Tensor, Tensor]]
    hessian: Callable[..., Tensor]


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
        return 1.0 - cos + _reg_value(dsq, lam, norm)

    def _parts(
        x: Tensor, eta: Tensor, beta: Tensor, mask: Tensor, g: Tensor, w: Tensor
    ) -> tuple[Tensor, ...]:
        x3 = x.reshape(eta.shape)
        xm = x3 * mask
        s = (xm * eta).sum(dim=(-2, -1))
        v = g.unsqueeze(-1) * xm
        q = (v * xm).sum(dim=(-2, -1))
        ok = (w > 0) & (q > 0)
        n = _safe_sqrt(q)
        wn = torch.where(ok, w * n, torch.ones_like(n))
        cos = torch.where(ok, s / wn, torch.zeros_like(s))
        big = ok & (q > _TINY)
        c1 = torch.where(ok, 1.0 / wn, torch.zeros_like(wn))  # 1/(w n)
        c3 = torch.where(big, c1 / torch.where(big, q, torch.ones_like(q)), torch.zeros_like(q))
        d = (x3 - beta) * mask
        dsq = (d * d).sum(dim=(-2, -1))
        return cos, s, v.flatten(-2), (mask * eta).flatten(-2), c1, c3, q, d.flatten(-2), dsq

    def value_and_grad(
        x: Tensor, eta: Tensor, beta: Tensor, mask: Tensor, g: Tensor, w: Tensor
    ) -> tuple[Tensor, Tensor]:
        cos, s, v, u, c1, c3, _, d, dsq = _parts(x, eta, beta, mask, g, w)
        gcos = c1[:, None] * u - (s * c3)[:, None] * v
        f = 1.0 - cos + _reg_value(dsq, lam, norm)
        return f, _reg_grad_coef(dsq, lam, norm)[:, None] * d - gcos

    def hessian(x: Tensor, eta: Tensor, beta: Tensor, mask: Tensor, g: Tensor, w: Tensor) -> Tensor:
        # Diagonal plus rank 3: ∇²f = diag(δ) + U C Uᵀ with U = [u, v, d] and C symmetric 3 × 3,
        # built as one batched (N × 3)(3 × N) product plus the diagonal.
        _, s, v, u, _, c3, q, d, dsq = _parts(x, eta, beta, mask, g, w)
        m = mask.flatten(-2)
        gd = (g.unsqueeze(-1) * mask).flatten(-2)
        c5 = torch.where(c3 != 0, 3.0 * s * c3 / torch.where(c3 != 0, q, torch.ones_like(q)), 0.0)
        if norm == "fro_squared":
            r_diag = torch.full_like(dsq, 2.0 * lam)
            r_outer = torch.zeros_like(dsq)
        else:
            big = dsq > _TINY
            rho = _safe_sqrt(dsq)
            r_diag = torch.where(big, lam / rho, torch.zeros_like(rho))
            r_outer = torch.where(big, lam / (rho * rho * rho), torch.zeros_like(rho))
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
    ``g_i = 0`` maximises the cosine (it reaches ``‖ΔW Ā⁺Ā‖ / ‖ΔW‖``). Closest to ``β``: the null
    columns keep ``β_i`` and ``t = <z, β>/‖z‖²`` with ``z = g⁺η``; where that ``t ≤ 0`` (no
    closest point on the open ray) ``t = 1``, i.e. ``B'Ā`` is the least-squares fit of ``ΔW``.
    Where ``η = 0`` (``ΔW Āᵀ = 0``: every ``B'`` has cosine 0) ``x = β``.
    """
    g = problem.g.unsqueeze(-1)
    pos = g > 0
    z = torch.where(pos, problem.eta / torch.where(pos, g, torch.ones_like(g)), 0.0)
    z = z * problem.mask
    zz = (z * z).sum(dim=(-2, -1))
    zb = (z * problem.beta).sum(dim=(-2, -1))
    t = torch.where(zz > 0, zb / torch.where(zz > 0, zz, torch.ones_like(zz)), 0.0)
    t = torch.where(t > 0, t, torch.ones_like(t))
    x = torch.where(pos, t[:, None, None] * z, problem.beta)
    return torch.where((zz > 0)[:, None, None], x, problem.beta)


def linear_map(Z: Tensor, left: Tensor | None, right: Tensor | None) -> Tensor:
    """``left @ Z @ right`` (a missing side is the identity); any leading dimensions."""
    Y = Z if left is None else left @ Z
    return Y if right is None else Y @ right


def adjoint_map(G: Tensor, left: Tensor | None, right: Tensor | None) -> Tensor:
    """``leftᵀ @ G @ rightᵀ``, the adjoint of :func:`linear_map` (pulls a gradient back to Z)."""
    out = G if left is None else left.mT @ G
    return out if right is None else out @ right.mT


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
    Y = linear_map(Z, left, right)
    inner = (Y * X).sum(dim=-2)
    ynorm = _safe_sqrt((Y * Y).sum(dim=-2))
    xs = torch.where(active, xn, torch.ones_like(xn))
    cos = torch.where(active, inner / (xs * ynorm), torch.zeros_like(inner))
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

    def _parts(
        x: Tensor, X: Tensor, xn: Tensor, active: Tensor, lr: tuple[Tensor, ...]
    ) -> tuple[Tensor, ...]:
        Z = x.reshape(x.shape[0], p, q)
        Y = linear_map(Z, *split(lr))
        inner = (Y * X).sum(dim=-2)
        nsq = (Y * Y).sum(dim=-2)
        nu = _safe_sqrt(nsq)
        xs = torch.where(active, xn, torch.ones_like(xn))
        big = active & (nsq > _TINY)
        zero = torch.zeros_like(nu)
        k1 = torch.where(active, 1.0 / (xs * nu), zero)  # 1/(xn ν)
        k3 = torch.where(big, 1.0 / (nu * nu * nu), zero)  # 1/ν³
        s = torch.where(active, inner / xs, zero)  # <a, y>
        cos = (s * torch.where(active, 1.0 / nu, zero)).mean(dim=-1)
        return Z, Y, cos, k1, k3, s, xs, nsq

    def value_and_grad(
        x: Tensor, X: Tensor, xn: Tensor, active: Tensor, Z0: Tensor, *rest: Tensor
    ) -> tuple[Tensor, Tensor]:
        c0, lr = offset(rest)
        Z, Y, cos, k1, k3, s, _, _ = _parts(x, X, xn, active, lr)
        n_cols = Y.shape[-1]
        GY = (k1.unsqueeze(-2) * X - (s * k3).unsqueeze(-2) * Y) / n_cols
        GZ = adjoint_map(GY, *split(lr))
        diff = Z - Z0
        dsq = with_offset((diff * diff).sum(dim=(-2, -1)), c0)
        f = 1.0 - cos + regulariser(dsq, lam, norm)
        grad = _reg_grad_coef(dsq, lam, norm)[:, None, None] * diff - GZ
        return f, grad.flatten(-2)

    def hessian(
        x: Tensor, X: Tensor, xn: Tensor, active: Tensor, Z0: Tensor, *rest: Tensor
    ) -> Tensor:
        c0, lr = offset(rest)
        Z, Y, _, _, k3, s, xs, nsq = _parts(x, X, xn, active, lr)
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

    return Batched(values, value_and_grad, hessian)


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
    shapes of :func:`lorafair._fair._solve_columns`); with ``left`` only, ``P_R`` is the
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


def _modified_newton(hess: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """``−|H|⁻¹ g`` with ``|H|`` the Hessian's eigenvalues made positive (and bounded below)."""
    evals, evecs = torch.linalg.eigh(hess)
    floor = evals.abs().amax(dim=-1, keepdim=True) * 1e-12 + 1e-300
    pd = (evals > floor).all(dim=-1)
    coef = (evecs.mT @ g.unsqueeze(-1)).squeeze(-1) / torch.clamp(evals.abs(), min=floor)
    return -(evecs @ coef.unsqueeze(-1)).squeeze(-1), pd


def _newton_direction(hess: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Newton direction and a positive-definiteness flag per layer.

    On CPU (where reading a flag costs no device sync) a batched Cholesky serves the positive
    definite Hessians and only the others pay for an eigendecomposition; on accelerators every
    layer takes the (sync-free) eigendecomposition path.
    """
    if hess.device.type != "cpu":
        return _modified_newton(hess, g)
    chol, info = torch.linalg.cholesky_ex(hess)
    ok = info == 0
    d = torch.cholesky_solve(-g.unsqueeze(-1), chol).squeeze(-1)
    ok = ok & torch.isfinite(d).all(dim=-1)
    if bool(ok.all()):
        return d, ok
    bad = ~ok
    d_bad, _ = _modified_newton(hess[bad], g[bad])
    d = d.clone()
    d[bad] = d_bad
    return d, ok


class SolveResult(NamedTuple):
    """Per-layer result of :func:`minimise`: point, objective, iterations, convergence flag."""

    x: Tensor
    f: Tensor
    iterations: Tensor
    converged: Tensor


NEWTON_MAX_UNKNOWNS = 192
"""Above this many unknowns per layer, :func:`minimise` uses L-BFGS instead of Newton."""


def minimise(
    obj: Batched,
    data: tuple[Tensor, ...],
    x0: Tensor,
    *,
    tol: float,
    max_iter: int,
    n_steps: int = 14,
    shrink: float = 0.3,
    memory: int = 10,
    sync_every: int = 5,
) -> SolveResult:
    """Minimise ``obj`` independently for each of the ``L`` rows of ``x0`` (L, N).

    Direction: Newton's with the exact (closed-form) Hessian, its eigenvalues replaced by
    their absolute values (bounded below), when ``N <= NEWTON_MAX_UNKNOWNS``; else L-BFGS.
    Step: ``n_steps`` lengths ``shrink**k`` tried in one batched evaluation; per layer the
    longest satisfying Armijo's condition (else the best that lowers the objective), so there
    is no data-dependent control flow and no host sync; ``converged.all()`` is read every
    ``sync_every`` iterations (every iteration on CPU, where that costs no device sync). A
    layer has converged when the Hessian is positive definite and the Newton decrement
    ``gᵀH⁻¹g`` is at most ``tol (1 + |f|)`` (L-BFGS: the step changed the objective by at most
    ``tol (1 + |f|)`` and the quasi-Newton decrement is that small), or when a step lowers the
    objective by less than ``1e-3 tol (1 + |f|)`` (an infimum that is only approached, e.g. as
    a product column shrinks to zero), or when no step length lowers the objective along the
    steepest-descent direction either (no float64 progress).
    Cost per iteration: Newton O(L N³) plus the Hessian; L-BFGS
    O(L N memory) plus ``n_steps + 1`` objective evaluations.
    """
    n_layers, n = x0.shape
    newton = n <= NEWTON_MAX_UNKNOWNS
    every = 1 if x0.device.type == "cpu" else sync_every  # reading a CPU flag costs no sync
    dev, dt = x0.device, x0.dtype
    x = x0.clone()
    f, g = obj.value_and_grad(x, *data)
    S = x.new_zeros(n_layers, memory, n)
    Yh = x.new_zeros(n_layers, memory, n)
    rho = x.new_zeros(n_layers, memory)
    gamma = x.new_ones(n_layers)
    filled = 0
    head = 0
    ts = shrink ** torch.arange(n_steps, device=dev, dtype=dt)
    done = torch.zeros(n_layers, dtype=torch.bool, device=dev)
    use_sd = torch.zeros(n_layers, dtype=torch.bool, device=dev) if newton else ~done
    iters = torch.zeros(n_layers, dtype=torch.int64, device=dev)
    for it in range(max_iter):
        if newton:
            hess = obj.hessian(x, *data)
            hess = 0.5 * (hess + hess.mT)
            hess = torch.where(torch.isfinite(hess), hess, torch.zeros_like(hess))
            d, pd = _newton_direction(hess, g)
        else:
            q = g.clone()
            order = [(head - 1 - j) % memory for j in range(filled)]
            alphas = []
            for j in order:
                a = rho[:, j] * (S[:, j] * q).sum(-1)
                q = q - a[:, None] * Yh[:, j]
                alphas.append(a)
            r = gamma[:, None] * q
            for j, a in zip(reversed(order), reversed(alphas), strict=True):
                b = rho[:, j] * (Yh[:, j] * r).sum(-1)
                r = r + S[:, j] * (a - b)[:, None]
            d = -r
            pd = torch.ones_like(done)
        gd = (g * d).sum(-1)
        gnorm = torch.linalg.vector_norm(g, dim=-1)
        xnorm = torch.linalg.vector_norm(x, dim=-1)
        sd_scale = (xnorm + 1.0) / torch.clamp(gnorm, min=1e-300)
        steepest = use_sd | ~(gd < 0) | ~torch.isfinite(gd)
        d = torch.where(steepest[:, None], -g * sd_scale[:, None], d)
        gd = torch.where(steepest, -gnorm * gnorm * sd_scale, gd)
        bound = tol * (1.0 + f.abs())
        if newton:
            small = pd & ~steepest & (-gd <= bound)
            done = done | small
        xc = x.unsqueeze(1) + ts[None, :, None] * d.unsqueeze(1)
        fc = obj.values(xc, *data)
        fc = torch.where(torch.isfinite(fc), fc, torch.full_like(fc, float("inf")))
        armijo = fc <= f[:, None] + 1e-4 * ts[None, :] * gd[:, None]
        first = torch.argmax(armijo.to(torch.int8), dim=1)
        pick = torch.where(armijo.any(dim=1), first, torch.argmin(fc, dim=1))
        f_pick = fc.gather(1, pick[:, None]).squeeze(1)
        improved = f_pick < f
        move = improved & ~done
        x_new = torch.where(move[:, None], x + ts[pick][:, None] * d, x)
        f_new, g_new = obj.value_and_grad(x_new, *data)
        f_new = torch.where(move, f_new, f)
        g_new = torch.where(move[:, None], g_new, g)
        iters = iters + (~done).to(torch.int64)
        stalled = ~improved & steepest
        if not newton:
            small = (f - f_new <= bound) & (-gd <= bound) & ~steepest
            done = done | (move & small)
        # No minimiser (an infimum approached as the product vanishes) or float64 resolution.
        negligible = move & (f - f_new <= 1e-3 * bound)
        done = done | stalled | negligible
        use_sd = ~improved & ~steepest
        if not newton:
            s_vec = x_new - x
            y_vec = g_new - g
            sy = (s_vec * y_vec).sum(-1)
            yy = (y_vec * y_vec).sum(-1)
            ss = (s_vec * s_vec).sum(-1)
            valid = move & (sy > 1e-12 * torch.sqrt(yy * ss))
            S[:, head] = s_vec
            Yh[:, head] = y_vec
            rho[:, head] = torch.where(
                valid, 1.0 / torch.where(valid, sy, torch.ones_like(sy)), 0.0
            )
            gamma = torch.where(valid, sy / torch.where(valid, yy, torch.ones_like(yy)), gamma)
            head = (head + 1) % memory
            filled = min(filled + 1, memory)
        x, f, g = x_new, f_new, g_new
        if (it + 1) % every == 0 and bool(done.all()):
            break
    return SolveResult(x, f, iters, done)
